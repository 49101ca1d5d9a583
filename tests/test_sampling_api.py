"""worldsim.sample / refine / save_video / show, on one tiny captioned pixel-space model."""
import logging
import types

import av
import jax
import numpy as np
import pytest
from PIL import Image

import worldsim
from worldsim import sampling
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import trainer

SIZE = dict(num_frames=2, height=16, width=16)


@pytest.fixture(scope="module")
def sim():
  """tests/conftest.py's tiny_config (pixel space, 4 x 4 patches), captioned, one block,
  with random parameters: sampling is plumbing here, and training even two steps costs about
  a minute of compiling (test_trainer.py samples trained workdirs)."""
  from experiments import physics_tiny
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages = ("dit", "samples")
    config.data.space = "pixel"
    config.model.patch_size = (1, 4, 4)
    config.sample.num_frames, config.sample.height, config.sample.width = 2, 16, 16
    config.model.text, config.data.caption_len = "bytes", 16
    config.model.depth, config.model.text_depth, config.model.attention = 1, 1, "xla"
  abstract = trainer.build(config, mesh_lib.make_mesh(config.mesh)).abstract_state.ema_params
  return sampling.WorldSim.from_params(config, _random_params(abstract))


def _random_params(abstract):
  """Like tests/random_params.py: kernels ~ N(0, 1 / fan_in), scales near 1, small biases
  (the DiT's zero-initialised head would make every velocity 0)."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.float32(1.0) + np.float32(0.1) * rng.standard_normal(leaf.shape, np.float32)
    if "bias" in name:
      return np.float32(0.1) * rng.standard_normal(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    return rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan_in))
  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_batches_of_captions_are_seeded_and_the_module_api_matches(sim, tmp_path, monkeypatch):
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  assert sampling.resolve_checkpoint(tmp_path / "checkpoints" / "7") == (str(tmp_path), 7)
  monkeypatch.setattr(sampling, "_load", lambda workdir, step: sim)   # as if loaded from it
  kwargs = dict(steps=2, seed=1, progress=False, **SIZE)
  videos = worldsim.sample(["a red ball", "a blue box"], checkpoint=str(tmp_path), **kwargs)
  assert videos.dtype == np.uint8 and videos.shape == (2, 2, 16, 16, 3)
  np.testing.assert_array_equal(videos, sim.sample(["a red ball", "a blue box"], **kwargs))
  assert not np.array_equal(videos, sim.sample(["a red ball", "a blue box"],
                                               **{**kwargs, "seed": 2}))
  # Clip i's noise comes from (seed, i): the first clip of a batch is the clip drawn alone.
  alone = sim.sample("a red ball", **kwargs)
  assert alone.shape == (2, 16, 16, 3)
  assert np.abs(alone.astype(int) - videos[0]).max() <= 1
  assert not np.array_equal(videos[0], videos[1])


def test_guidance_scale_one_equals_the_conditional_model(sim):
  # Both passes in one batch with w = 1 give the caption's velocity: one unguided step.
  grid = (2, 4, 4)
  text = sim._captions("a red ball")
  inputs = sampling._step_inputs(1, grid, 0, text, 1.0)
  carry = sampling.samplers.get("euler").init(
      sampling._noise(sampling._clip_keys(0, 1), grid, sim.token_dim))
  times = (np.float32(1.0), np.float32(1.0), np.float32(0.5))     # (t_prev, t, t_next)
  step = lambda guided, inputs: sim._step_fn("euler", guided)(sim.params, carry, times,
                                                               inputs).x
  one_pass = step(False, inputs)                        # compiled as sample() compiles it
  np.testing.assert_allclose(step(True, inputs), one_pass, atol=1e-5)
  # ... while another scale moves it.
  other = step(True, {**inputs, "guidance": jax.numpy.float32(3.0)})
  assert np.abs(other - one_pass).max() > 1e-3


def test_the_progress_bar_ticks_over_the_steps(sim, capsys, monkeypatch):
  monkeypatch.setattr(sampling, "PROGRESS_DELAY_S", 0.0)
  sim.sample("a ball", sampler="dpmpp_2m", steps=3, progress=True, **SIZE)
  assert "worldsim sample (dpmpp_2m)" in capsys.readouterr().err
  sim.sample("a ball", sampler="dpmpp_2m", steps=3, progress=False, **SIZE)
  assert "worldsim sample" not in capsys.readouterr().err


def test_sizes_from_seconds_and_aspect_ratio_are_rounded_and_logged(sim, caplog):
  shape = lambda **kw: sim.video_shape(**kw)
  assert shape(num_frames=3, height=16, width=24) == (3, 16, 24)
  with caplog.at_level(logging.INFO):
    assert shape(aspect_ratio="16:9", size=16) == (2, 16, 28)     # 28.4 -> 28 (patch 4)
  assert "width 28.4444 -> 28" in caplog.text
  assert shape(aspect_ratio=0.5, width=16) == (2, 32, 16)
  assert shape(seconds=0.5, fps=6) == (3, 16, 16)
  assert shape(seconds=0) == (1, 16, 16)
  assert shape(height=18, width=16, round_sizes=True) == (2, 16, 16)
  with pytest.raises(ValueError, match="multiples of the patch size"):   # explicit: checked
    sim.sample(height=18, width=16, progress=False)
  # A latent-space model's rules (VAE 4x in time, 8x in space; patch 1 x 2 x 2) on a stub.
  latent = types.SimpleNamespace(
      config=sim.config, patch_size=(1, 2, 2),
      factors=(4, 8), round_shape=lambda s: sampling.WorldSim.round_shape(latent, s))
  assert sampling.WorldSim.video_shape(latent, seconds=1.0, fps=8, aspect_ratio="16:9",
                                       size=64) == (9, 64, 112)
  assert sampling.WorldSim.round_shape(latent, (6, 20, 7)) == (5, 16, 16)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(height=0), ValueError, "height=0"),
    (dict(width=-16), ValueError, "width=-16"),
    (dict(num_frames=2.5), ValueError, "num_frames=2.5"),
    (dict(seconds=-1), ValueError, "seconds=-1"),
    (dict(seconds=1, num_frames=3), ValueError, "give one of them"),
    (dict(aspect_ratio="wide", size=16), ValueError, "aspect_ratio='wide'"),
    (dict(size=16, height=16), ValueError, "size=16"),
    (dict(sampler="rk4"), ValueError, "sampler='rk4'"),
    (dict(steps=0), ValueError, "steps=0"),
    (dict(draft=dict(height=8), refine_t=0.0), ValueError, "refine_t=0.0"),
    (dict(draft=dict(depth=8)), ValueError, "draft="),
    (dict(actions=np.zeros((2, 3))), ValueError, "no action conditioning"),
])
def test_impossible_requests_name_the_argument(sim, kwargs, error, match):
  with pytest.raises(error, match=match):
    sim.sample("a ball", **{"steps": 1, "progress": False, **kwargs})


def test_the_bundled_model_is_the_default_and_a_bad_path_is_named(tmp_path, monkeypatch):
  from worldsim import export
  assert export.is_export(sampling.DEFAULT_CHECKPOINT)          # shipped in the package
  assert sampling.resolve_checkpoint(None) == (sampling.DEFAULT_CHECKPOINT, None)
  with pytest.raises(FileNotFoundError, match="neither a trained workdir"):
    worldsim.sample("a ball", checkpoint=str(tmp_path))
  monkeypatch.setattr(sampling, "DEFAULT_CHECKPOINT", None)
  with pytest.raises(ValueError, match="checkpoint is required"):
    worldsim.sample("a ball")


def test_an_exported_release_samples_like_the_model(sim, tmp_path):
  from worldsim import export
  release = export.export(sim, tmp_path / "release")
  assert sorted(p.name for p in release.iterdir()) == ["config.json", "dit.npz", "export.json"]
  size = dict(num_frames=2, height=16, width=16, steps=2, seed=3, progress=False)
  np.testing.assert_array_equal(worldsim.load(str(release)).sample("a ball", **size),
                                sim.sample("a ball", **size))


def test_drafts_are_refined_at_the_final_size(sim):
  # Every sampler through the model: a dpmpp_2m draft refined by heun (euler: other tests).
  draft = sim.sample("a ball", sampler="dpmpp_2m", steps=2, seed=5, progress=False, **SIZE)
  args = dict(num_frames=2, height=32, width=32, sampler="heun", steps=4, seed=5,
              draft=dict(height=16, width=16, steps=2, sampler="dpmpp_2m"), progress=False)
  final = sim.sample("a ball", refine_t=0.6, **args)
  assert final.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(final, sim.sample("a ball", refine_t=0.6, **args))
  assert not np.array_equal(final, sim.sample("a ball", refine_t=0.6, **{**args, "seed": 6}))
  # Refined from t -> 0, the final is the draft upsampled (in the model's space, here pixels;
  # compared where no pixel the upsampling read was clipped to [0, 255] in the draft).
  kept = sim.sample("a ball", refine_t=1e-3, **args)
  upsampled = np.asarray(jax.image.resize(draft.astype(np.float32), (2, 32, 32, 3), "linear"))
  inside = np.asarray(jax.image.resize(((draft > 0) & (draft < 255)).astype(np.float32),
                                       (2, 32, 32, 3), "linear")) > 1 - 1e-6
  assert inside.mean() > 0.05
  assert np.abs(kept - upsampled)[inside].max() <= 2
  # refine() of a given clip: t -> 0 keeps it (resized), and it is seeded.
  video = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  near = sim.refine(video, 1e-3, height=32, width=32, sampler="heun", steps=4, progress=False)
  reference = np.asarray(jax.image.resize(video.astype(np.float32), (2, 32, 32, 3), "linear"))
  assert near.shape == (2, 32, 32, 3) and np.abs(near - reference).max() <= 2
  far = sim.refine(video, 0.7, steps=4, seed=1, progress=False)
  assert far.shape == video.shape and np.abs(far.astype(int) - video).mean() > 2
  np.testing.assert_array_equal(far, sim.refine(video, 0.7, steps=4, seed=1, progress=False))


def test_save_video_writes_mp4_and_gif_that_read_back(tmp_path):
  video = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
  mp4 = worldsim.save_video(tmp_path / "clip.mp4", video, fps=8)
  with av.open(str(mp4)) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  assert len(frames) == 5 and frames[0].shape == (16, 24, 3)
  gif = worldsim.save_video(video, tmp_path / "clip.gif", 8)      # the older order works too
  with Image.open(gif) as image:
    assert image.n_frames == 5 and image.size == (24, 16)
  odd = worldsim.save_video(str(tmp_path / "odd.mp4"), video[:, :15, :7], 8, scale=2)
  with av.open(str(odd)) as container:
    assert container.streams.video[0].codec_context.height == 30
    assert container.streams.video[0].codec_context.width == 14
  with pytest.raises(TypeError, match="no path"):
    worldsim.save_video(video, video)


def test_show_renders_html_outside_a_notebook(capsys):
  video = np.zeros((3, 16, 16, 3), np.uint8)
  html = worldsim.show(video, return_html=True)
  assert "<video" in html
  assert worldsim.show(np.stack([video, video])) is None       # displays (prints) and returns
