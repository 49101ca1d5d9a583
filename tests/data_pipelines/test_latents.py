"""latents: a physics world encoded by a tiny VAE, sharded over 8 CPU devices, read back as a
TFDS/ArrayRecord dataset without TensorFlow; latents equal a direct encode of the same clip."""
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import latents, physics_world
from tests.random_params import random_params
from worldsim.models import vae

MODEL = vae.VAE(vae.VAEConfig.from_variant("tiny"))
CHANNELS = MODEL.cfg.latent_channels


@jax.jit
def _direct_encode(params, pixels):
  """The reference: encode() of one whole clip, no mesh, no chunks."""
  x = pixels.astype(jnp.float32) / 127.5 - 1.0
  return MODEL.apply(params, x[None], method=vae.VAE.encode)[0][0]


@pytest.fixture(scope="module")
def params():
  return random_params(MODEL, jnp.zeros((1, 1, 8, 8, 3)))


@pytest.fixture(scope="module")
def physics(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("physics_world")
  # seed 33: 9, 5, 8 and 6 frames; clips 1 and 2 are both 5 x 16 x 16 once cut (one batch)
  physics_world.build(data_dir, num_clips=4, seed=33, min_side=16, max_side=32, min_frames=5,
                      max_frames=9, num_workers=1)
  return physics_world.load(data_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory, physics, params):
  # <data dir>/latents/<name>, where the loader looks for latent datasets in latent space
  data_dir = tmp_path_factory.mktemp("data") / "latents"
  # chunk_frames=4: clips of 9 frames are coded in two chunks (5 + 4) with the streaming cache.
  # Two of the 8 CPU devices: the batch is sharded for real, and padded only to 2.
  mesh = latents.encode.local_mesh(jax.local_devices()[:2])
  latents.build(data_dir, physics, MODEL, params, name="physics", chunk_frames=4, batch_size=2,
                mesh=mesh)
  return data_dir


def _assert_equal(a, b):
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      _assert_equal(a[k], b[k])
  else:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_latents_follow_the_frame_rule_and_equal_a_direct_encode(built, physics, params):
  source = latents.load(built, name="physics")
  assert len(source) == len(physics) == 4          # 5..9 frames: every clip is encodable
  assert [source[i]["source_index"] for i in range(len(source))] == [0, 1, 2, 3]
  streamed = 0
  for i in range(len(source)):
    record, original = source[i], physics[i]
    frames, height, width, _ = original["video"].shape
    kept = 1 + (frames - 1) // 4 * 4
    streamed += kept > 5
    h, w = height // 4 * 4, width // 4 * 4
    latent = record["latent"]
    assert latent.dtype == np.float32
    assert latent.shape == (1 + (kept - 1) // 4, height // 4, width // 4, CHANNELS)
    assert latent.shape == MODEL.cfg.latent_shape(frames - (frames - 1) % 4, h, w)
    np.testing.assert_allclose(
        latent, _direct_encode(params, original["video"][:kept, :h, :w]), atol=1e-5, rtol=1e-5)
    # every other field as the source has it, per-frame fields cut to the kept frames
    assert "video" not in record
    assert record["caption"] == original["caption"] and isinstance(record["caption"], bytes)
    np.testing.assert_array_equal(record["actions"], original["actions"][:kept])
    _assert_equal(record["states"], {k: v[:kept] for k, v in original["states"].items()})
    for name in ("params", "object_names", "fps", "scene", "seed", "index", "action_object"):
      _assert_equal(record[name], original[name])
    assert set(record) == set(original) - {"video"} | {"latent", "source_index"}
  assert streamed, "no clip was long enough to be coded in two chunks"


def test_stats_are_the_per_channel_moments_of_the_latents(built):
  stats = latents.load_stats(built, name="physics")
  assert stats["shift"].shape == stats["scale"].shape == (CHANNELS,)
  voxels = np.concatenate([r["latent"].reshape(-1, CHANNELS)
                           for r in map(latents.load(built, name="physics").__getitem__,
                                        range(4))])
  np.testing.assert_allclose(stats["shift"], voxels.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["scale"], voxels.std(0), rtol=1e-4)
  assert stats["voxels_per_channel"] == len(voxels) and stats["num_clips"] == 4
  assert stats["vae"]["latent_channels"] == CHANNELS
  on_disk = json.loads(pathlib.Path(built, "physics", latents.STATS_NAME).read_text())
  assert len(on_disk["shift"]) == len(on_disk["scale"]) == CHANNELS


class _Untouchable:
  """A source that fails if anything reads a record."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    raise AssertionError("the source was read: the build was not skipped")


def test_building_again_is_a_no_op(built):
  stats_file = pathlib.Path(built, "physics", latents.STATS_NAME)
  before = stats_file.stat().st_mtime_ns
  builder = latents.build(built, _Untouchable(4), MODEL, None, name="physics")
  assert stats_file.stat().st_mtime_ns == before
  assert builder.info.splits["train"].num_examples == 4
  with pytest.raises(ValueError, match="another VAE or source"):
    latents.build(built, _Untouchable(5), MODEL, None, name="physics")


def test_any_source_short_clips_and_odd_sizes(tmp_path, params):
  """A plain list source (spec inferred), on every local device: a clip of no frames and a
  3-pixel-high one are skipped and counted; 1 frame is valid, 3 frames keep 1, 10 pixels are
  cropped to 8; the two 1 x 8 x 8 clips share one batch (padded to the 8 devices)."""
  rng = np.random.default_rng(1)

  def record(frames, height, width):
    return {"video": rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
            "caption": f"{frames} frames", "actions": np.arange(frames, dtype=np.int32),
            "fps": np.float32(8.0)}

  source = [record(0, 8, 8), record(1, 8, 10), record(3, 3, 8), record(3, 8, 8)]
  latents.build(tmp_path, source, MODEL, params, name="list", batch_size=2)
  stats = latents.load_stats(tmp_path, name="list")
  assert stats["skipped"] == {"no_frames": 1, "too_small": 1}
  assert stats["num_clips"] == 2 and stats["frames_dropped"] == 2
  assert stats["cropped_clips"] == 1
  out = latents.load(tmp_path, name="list")
  assert [out[i]["source_index"] for i in range(len(out))] == [1, 3]
  for r in (out[0], out[1]):
    original = source[r["source_index"]]
    assert r["latent"].shape == (1, 2, 2, CHANNELS)
    np.testing.assert_allclose(r["latent"], _direct_encode(params, original["video"][:1, :, :8]),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(r["actions"], original["actions"][:1])
    assert r["caption"] == original["caption"].encode() and r["fps"] == 8.0


def test_rewards_and_terminals_reach_latent_records_and_batches(tmp_path, params):
  """Atari-like records (rewards = 10 x the step, the episode's last step terminal): cut with
  the frames, except that a terminal the 1 + 4k rule drops moves to the last kept frame;
  grouped per latent frame like actions; and batched by the loader as (B, M, F', 4). Frames
  of 8 x 8 in batches of 2, as the test above: the same compiled encoder."""
  import ml_collections
  from data_pipelines import loader
  rng = np.random.default_rng(2)

  def record(frames, ends_episode):
    steps = np.arange(frames)
    return {"video": rng.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8),
            "actions": steps.astype(np.int32), "rewards": (steps * 10).astype(np.float32),
            "terminals": (steps == frames - 1) & ends_episode, "fps": np.float32(15.0)}

  source = [record(7, True), record(9, True), record(6, False)]   # 5, 9 and 5 frames kept
  latents.build(tmp_path / "latents", source, MODEL, params, name="atari", batch_size=2)
  raw = latents.load(tmp_path / "latents", name="atari")
  np.testing.assert_array_equal(raw[0]["terminals"], [0, 0, 0, 0, 1])       # moved from 6
  np.testing.assert_array_equal(raw[1]["terminals"], np.arange(9) == 8)
  assert not raw[2]["terminals"].any()
  for r in (raw[0], raw[1], raw[2]):
    np.testing.assert_array_equal(r["rewards"], r["actions"] * 10)
  clips = latents.LatentClips(tmp_path / "latents", "atari")
  np.testing.assert_array_equal(clips[0]["rewards"], [[0, 0, 0, 0], [10, 20, 30, 40]])
  np.testing.assert_array_equal(clips[0]["terminals"], [[0, 0, 0, 0], [0, 0, 0, 1]])
  assert clips[1]["terminals"].dtype == np.float32 and clips[1]["terminals"].shape == (3, 4)
  d = ml_collections.ConfigDict(dict(
      source="atari", space="latent", data_dir=str(tmp_path), latents_name="atari",
      min_frames=1, max_frames=9, resize="native", max_tokens_per_clip=0, token_budget=16,
      max_clips_per_row=4, packing_bins=2, batch_size=2, channels=3, worker_count=0))
  batch = next(iter(loader.make_dataset(d, (1, 2, 2), seed=0)))
  for name in ("actions", "rewards", "terminals"):
    assert batch[name].shape == (2, 4, 3, 4) and batch[name].dtype == np.float32
  for row, m in np.argwhere(batch["clip_index"] >= 0):
    clip, frames = clips[batch["clip_index"][row, m]], batch["clip_grid"][row, m, 0]
    for name in ("actions", "rewards", "terminals"):
      np.testing.assert_array_equal(batch[name][row, m, :frames], clip[name][:frames])
      assert not batch[name][row, m, frames:].any()


def test_build_and_read_do_not_import_tensorflow(built):
  """In process: the build and reads above ran in this interpreter (the physics_world tests
  check a fresh one); nothing in the suite imports TensorFlow."""
  assert len(latents.load(built, name="physics")) == 4
  assert "tensorflow" not in sys.modules, "tensorflow was imported"


def test_equal_shapes_share_a_batch_and_waiting_clips_are_bounded():
  clips = [(i, np.zeros(shape)) for i, shape in
           enumerate([(5, 8, 8), (1, 8, 8), (5, 8, 8), (9, 4, 4), (1, 4, 4), (5, 8, 8)])]
  groups = [[k for k, _ in g] for g in latents.encode.group_by_shape(clips, 2, 3)]
  # (5, 8, 8) is full at clip 2; clip 5 is the fourth waiting and pushes out the oldest of the
  # fullest groups (clip 1's); the rest leave at the end
  assert groups == [[0, 2], [1], [3], [4], [5]]
  for g in latents.encode.group_by_shape(clips, 3, 100):
    assert len({clips[k][1].shape for k, _ in g}) == 1
  assert [len(g) for g in latents.encode.group_by_shape(clips, 3, 100)] == [3, 1, 1, 1]


def test_a_fixed_frame_count_in_the_source_spec_becomes_unknown():
  import tensorflow_datasets as tfds  # noqa: PLC0415  (the spec classes only)
  spec = tfds.features.FeaturesDict({
      "video": tfds.features.Tensor(shape=(16, 64, 64, 3), dtype=np.uint8, encoding="zlib"),
      "actions": tfds.features.Tensor(shape=(16,), dtype=np.int32, minimum=0, maximum=17),
      "states": {"position": tfds.features.Tensor(shape=(16, 3, 2), dtype=np.float32)},
      "params": tfds.features.Tensor(shape=(16,), dtype=np.float32),   # not per frame
  })
  source = type("Source", (), {"dataset_info": type("Info", (), {"features": spec})})()
  features = latents.features.latent_features(source, None, CHANNELS, latents.FRAME_FIELDS)
  assert features["actions"].shape == (None,) and features["params"].shape == (16,)
  assert features["states"]["position"].shape == (None, 3, 2)
  assert features["latent"].shape == (None, None, None, CHANNELS) and "video" not in features


def test_latent_clips_are_normalised_with_actions_per_latent_frame(built, physics):
  clips = latents.LatentClips(built, "physics")
  raw, stats = latents.load(built, name="physics"), latents.load_stats(built, "physics")
  assert len(clips) == len(raw) and clips.geometry == (CHANNELS, 4)
  for i in range(len(clips)):
    record = clips[i]
    np.testing.assert_allclose(record["video"],
                               (raw[i]["latent"] - stats["shift"]) / stats["scale"], rtol=1e-6)
    np.testing.assert_allclose(clips.denormalise(record["video"]), raw[i]["latent"], atol=1e-5)
    actions = raw[i]["actions"]                       # (1 + 4k, 2) per pixel frame
    grouped = record["actions"]                       # (1 + k, 8) per latent frame
    assert grouped.shape == (len(record["video"]), 4 * actions.shape[1])
    np.testing.assert_array_equal(grouped[0, :6], 0)  # frame 0 is coded alone
    np.testing.assert_array_equal(grouped[0, 6:], actions[0])
    np.testing.assert_array_equal(grouped[1:].reshape(-1, actions.shape[1]), actions[1:])
    assert record["caption"] == physics[i]["caption"]


def test_per_latent_frame_needs_one_plus_4k_rows():
  with pytest.raises(ValueError, match="1 \\+ 4k"):
    latents.per_latent_frame(np.zeros((6, 2)), 4)
  np.testing.assert_array_equal(latents.per_latent_frame(np.arange(5), 4),
                                [[0, 0, 0, 0], [1, 2, 3, 4]])


def test_the_loader_packs_latent_clips_from_their_first_frame(built):
  """In latent space the loader reads LatentClips: tokens are normalised latent patches,
  every crop starts at latent frame 0, and the cap crops (never resamples) latents."""
  import ml_collections
  from data_pipelines import loader
  from worldsim.models import patches
  d = ml_collections.ConfigDict(dict(
      source="physics_world", space="latent", data_dir=str(pathlib.Path(built).parent),
      latents_name="physics", min_frames=1, max_frames=9, resize="cap",
      max_tokens_per_clip=8, token_budget=64, max_clips_per_row=8, packing_bins=4,
      batch_size=2, channels=3, worker_count=0))
  clips = latents.LatentClips(built, "physics")
  batch = next(iter(loader.make_dataset(d, (1, 2, 2), seed=0)))
  assert batch["tokens"].shape == (2, 64, 4 * CHANNELS)
  spec = loader.clip_spec(d, (1, 2, 2), clips.geometry)
  assert (spec.min_frames, spec.max_frames, spec.channels, spec.latent) == (1, 3, CHANNELS, True)
  for row in range(2):
    for m, index in enumerate(batch["clip_index"][row]):
      if index < 0:
        continue
      gt, gh, gw = batch["clip_grid"][row, m]
      assert gt * gh * gw <= 8
      tokens = batch["tokens"][row][batch["segment_ids"][row] == m + 1]
      clip = patches.unpatchify(tokens, (gt, gh, gw), (1, 2, 2), CHANNELS)
      full = clips[index]["video"]
      # The crop starts at frame 0 and is a window of the latent (found among all windows).
      windows = [full[:gt, y:y + 2 * gh, x:x + 2 * gw]
                 for y in range(full.shape[1] - 2 * gh + 1)
                 for x in range(full.shape[2] - 2 * gw + 1)]
      assert any(np.array_equal(clip, w) for w in windows)
