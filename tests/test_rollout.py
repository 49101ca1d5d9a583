"""Long rollouts (worldsim/rollout.py) on a small random-parameter DiT in pixel space."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import loader
from worldsim import rollout
from worldsim.models import dit, patches, text as text_lib
from tests.random_params import random_params

PATCH = (1, 4, 4)


def _sim(tiny_config, causal=True, text="none"):
  """What rollout reads of a WorldSim, with random parameters (no training, no checkpoint)."""
  config = tiny_config
  with config.unlocked():
    config.model.causal, config.model.text = causal, text
    config.model.patch_size = PATCH
    config.data.max_frames = 4               # window + chunk: 2 + 2 frames by default
    config.sample.height = config.sample.width = 8
  cfg = dit.DiTConfig(token_dim=patches.token_dim(PATCH, 3), width=32, depth=2, num_heads=2,
                      causal=causal, text=text, attention="xla")
  model = dit.DiT(cfg)
  row = (jnp.zeros((1, 8, cfg.token_dim)), jnp.zeros((1, 8, 3), jnp.int32),
         jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 8)))
  captions = text_lib.null_text(1, 1, config.data.caption_len) if text != "none" else ()
  params = random_params(model, *row, None, *map(jnp.asarray, captions))["params"]
  sim = types.SimpleNamespace(config=config, model=model, params=params, patch_size=PATCH,
                              factors=(1, 1), model_channels=3, vae=None,
                              _encode=loader.pixels_to_latent)
  length = config.data.caption_len
  sim._captions = lambda caption: None if text == "none" else (
      text_lib.pack_captions([[caption]], length), text_lib.null_text(1, 1, length))
  return sim


def test_kv_cache_chunk_equals_the_full_forward(tiny_config):
  """A block-causal model's chunk from the cached window equals the chunk from running window
  and chunk together (window held at its noise level), with captions and guidance."""
  sim = _sim(tiny_config, causal=True, text="bytes")
  per_frame, window, chunk = 4, 3, 2
  tokens = jax.random.normal(jax.random.PRNGKey(1), (1, window * per_frame, 48))
  valid = jnp.asarray([False, True, True])                   # one frame not made yet
  text = sim._captions("a red ball")
  kwargs = dict(frame_grid=(2, 2), window=window, chunk=chunk, steps=2, sampler="euler",
                guided=True)
  args = (sim.model, sim.params, tokens, valid, jax.random.PRNGKey(2), text, 2.0, 1.5, 0.05)
  cached = rollout.denoise_chunk(*args, use_cache=True, **kwargs)
  full = rollout.denoise_chunk(*args, use_cache=False, **kwargs)
  assert cached.shape == (1, chunk * per_frame, 48)
  np.testing.assert_allclose(cached, full, atol=2e-5)


def test_rollout_is_seeded_compiles_once_and_keeps_its_context(tiny_config):
  sim = _sim(tiny_config, causal=False)
  run = lambda **kw: rollout.rollout(sim, steps=2, progress=False, **kw)
  video = run(num_frames=11, seed=0)
  compiled = rollout.denoise_chunk._cache_size()
  longer = run(num_frames=23, seed=0)        # 12 chunks: the same compiled chunk every time
  assert rollout.denoise_chunk._cache_size() == compiled
  assert video.dtype == np.uint8 and video.shape == (11, 8, 8, 3)
  assert longer.shape == (23, 8, 8, 3)
  np.testing.assert_array_equal(longer[:11], video)          # chunk k draws from (seed, k)
  assert not np.array_equal(run(num_frames=11, seed=1), video)
  context = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), np.uint8)
  continued = run(num_frames=9, seed=0, context=context)
  assert continued.shape == (9, 8, 8, 3)
  np.testing.assert_array_equal(continued[:3], context)
  assert run(seconds=1.5, fps=4, seed=0).shape[0] == 6
  with pytest.raises(ValueError, match="seconds > 0"):
    run(seed=0)
  with pytest.raises(ValueError, match="multiples of 4"):
    run(num_frames=4, height=10)


def test_save_rollout_streams_an_mp4(tiny_config, tmp_path):
  import av
  sim = _sim(tiny_config, causal=False)          # the model the test above compiled
  path = rollout.save_rollout(tmp_path / "long.mp4", sim, num_frames=10, steps=2,
                              progress=False)
  with av.open(str(path)) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  assert len(frames) == 10 and frames[0].shape == (128, 128, 3)
