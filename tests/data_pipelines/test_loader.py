"""The packing loader: every token of every clip exactly once, in its own segment with its own
(t, h, w) positions; bad records skipped and counted; resumable iterators; disjoint host shards;
the physics world flowing through at native resolution."""
import itertools

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import loader, shapes
from worldsim.models import patches

PATCH = (2, 4, 4)  # two frames per patch, so temporal patching is exercised too
SEED = 5


def data_config_for_tests(**overrides) -> ml_collections.ConfigDict:
  """Shapes clips of 2-6 frames and 8-28 pixels a side: 4 to 147 tokens each."""
  d = ml_collections.ConfigDict(dict(
      source="shapes", data_dir="", num_clips=40, batch_size=4, token_budget=256,
      max_clips_per_row=12, packing_bins=8, min_frames=2, max_frames=6, min_side=8,
      max_side=28, max_tokens_per_clip=0, resize="native", worker_count=0, channels=3,
      max_shapes=2))
  d.update(overrides)
  return d


def _batches(d, n, process_index=0, process_count=1):
  ds = loader.make_dataset(d, PATCH, SEED, process_index, process_count)
  return list(itertools.islice(iter(ds), n))


def _clips(batches):
  """(epoch, index, row tokens of the segment, positions, grid) for every clip of the batches."""
  for batch in batches:
    for row in range(len(batch["tokens"])):
      for m in np.nonzero(batch["clip_index"][row] >= 0)[0]:
        in_clip = batch["segment_ids"][row] == m + 1
        yield (batch["clip_epoch"][row, m], batch["clip_index"][row, m],
               batch["tokens"][row][in_clip], batch["positions"][row][in_clip],
               tuple(batch["clip_grid"][row, m]))


def _assert_segments_well_formed(batch, d):
  for seg, grid, index in zip(batch["segment_ids"], batch["clip_grid"], batch["clip_index"]):
    n = int((index >= 0).sum())
    assert (index[n:] == -1).all() and (grid[n:] == 0).all()
    # Clips are contiguous runs numbered 1..n in order; 0 only as the trailing padding.
    expected = np.repeat(np.arange(1, n + 1), [int(np.prod(g)) for g in grid[:n]])
    np.testing.assert_array_equal(seg[:len(expected)], expected)
    assert (seg[len(expected):] == 0).all()
  assert batch["tokens"].shape == (d.batch_size, d.token_budget, patches.token_dim(PATCH, 3))
  assert batch["tokens"].dtype == np.float32 and batch["positions"].dtype == np.int32
  assert (batch["tokens"][batch["segment_ids"] == 0] == 0).all()


@pytest.mark.parametrize("overrides", [
    dict(),                                              # native resolution
    dict(resize="cap", max_tokens_per_clip=24),          # downscaled to at most 24 tokens
    dict(token_budget=20, max_clips_per_row=4),          # native, most clips over the budget
], ids=["native", "cap", "over_budget"])
def test_every_token_of_every_clip_is_packed_exactly_once(overrides):
  d = data_config_for_tests(**overrides)
  spec = loader.clip_spec(d, PATCH)
  source = loader.make_source(d, SEED)
  batches = _batches(d, 4 if d.token_budget > 100 else 24)
  seen = []
  for batch in batches:
    _assert_segments_well_formed(batch, d)
  for epoch, index, tokens, positions, grid in _clips(batches):
    seen.append((epoch, index))
    np.testing.assert_array_equal(positions, patches.positions(grid))
    clip = loader.prepare_clip(source[index], spec, loader.crop_rng(SEED, epoch, index))
    assert np.prod(grid) <= spec.max_tokens
    np.testing.assert_array_equal(patches.unpatchify(tokens, grid, PATCH, 3), clip["latent"])
  assert len(seen) == len(set(seen))
  # The first two passes over the data are complete: nothing dropped, nothing twice.
  for epoch in (0, 1):
    assert sorted(i for e, i in seen if e == epoch) == list(range(d.num_clips))
  truncated = sum(int(b["num_truncated"].sum()) for b in batches)
  assert truncated > 0 if d.token_budget == 20 else truncated == 0
  if d.resize == "cap":  # frames really were downscaled, keeping whole patches
    assert any(g[1] * PATCH[1] < 24 for *_, g in _clips(batches))


def test_crop_and_resize_policies():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (9, 30, 45, 3), np.uint8)
  record = {"video": video, "actions": np.arange(9, dtype=np.float32)}
  # Native: an even number of frames in [2, 6], centre-cropped to whole patches (28 x 44).
  native = loader.clip_spec(data_config_for_tests(), PATCH)
  for seed in range(8):
    clip = loader.prepare_clip(record, native, np.random.default_rng(seed))
    t = len(clip["latent"])
    assert t in (2, 4, 6) and clip["latent"].shape == (t, 28, 44, 3) and not clip["truncated"]
    start = int(clip["actions"][0, 0])
    np.testing.assert_array_equal(clip["actions"][:, 0], np.arange(start, start + t))
    np.testing.assert_array_equal(clip["latent"],
                                  loader.pixels_to_latent(video[start:start + t, 1:29, 0:44]))
  # Cap: the frames shrink to at most 24 tokens, the aspect (3:2) and duration kept.
  cap = loader.clip_spec(data_config_for_tests(resize="cap", max_tokens_per_clip=24), PATCH)
  flat = {"video": np.full((6, 30, 45, 3), 200, np.uint8)}
  clip = loader.prepare_clip(flat, cap, np.random.default_rng(0))
  t = len(clip["latent"])
  grid = patches.grid_shape(clip["latent"].shape, PATCH)
  assert np.prod(grid) <= 24 and grid[2] / grid[1] == 1.5 and not clip["truncated"]
  np.testing.assert_allclose(clip["latent"], 200 / 127.5 - 1, rtol=1e-6)  # box filter: flat stays flat
  # Native over the budget: shortened to one latent frame, then that frame shrunk to fit.
  tight = loader.clip_spec(data_config_for_tests(token_budget=20), PATCH)
  clip = loader.prepare_clip({"video": video}, tight, np.random.default_rng(0))
  assert clip["truncated"] and clip["latent"].shape[0] == 2
  assert np.prod(patches.grid_shape(clip["latent"].shape, PATCH)) <= 20


def test_rewards_and_terminals_are_cut_with_the_actions():
  video = np.zeros((9, 8, 8, 3), np.uint8)
  steps = np.arange(9)
  record = {"video": video, "actions": steps, "rewards": steps * 10.0, "terminals": steps == 8}
  spec = loader.clip_spec(data_config_for_tests(), PATCH)
  for seed in range(8):
    clip = loader.prepare_clip(record, spec, np.random.default_rng(seed))
    t = len(clip["latent"])
    assert clip["rewards"].shape == clip["terminals"].shape == (t, 1)
    np.testing.assert_array_equal(clip["rewards"], clip["actions"] * 10)
    np.testing.assert_array_equal(clip["terminals"], clip["actions"] == 8)
  rewards_only = loader.prepare_clip({"video": video, "rewards": steps}, spec,
                                     np.random.default_rng(0))
  assert not rewards_only["terminals"].any() and rewards_only["terminals"].shape[1] == 1
  neither = loader.prepare_clip({"video": video}, spec, np.random.default_rng(0))
  assert neither["rewards"].shape[1] == neither["terminals"].shape[1] == 0
  for field, value in (("rewards", steps[:8]), ("terminals", steps[1:] == 8),
                       ("rewards", np.float32(0)), ("rewards", steps * np.nan)):
    with pytest.raises(loader.BadRecord, match=field):
      loader.prepare_clip({**record, field: value}, spec, np.random.default_rng(0))


def test_bad_records_are_skipped_and_counted(monkeypatch):
  bad = {3, 7, 11, 15}

  class Corrupted(shapes.ShapesSource):
    def __getitem__(self, index):
      record = super().__getitem__(index)
      if index == 3:
        record["video"] = record["video"][..., :1]                   # one channel
      elif index == 7:
        record["video"] = record["video"][:1]                        # shorter than a patch
      elif index == 11:
        record["video"] = record["video"].astype(np.float32) * np.nan
      elif index == 15:
        record["actions"] = np.zeros((len(record["video"]) + 1, 2), np.float32)  # one too many
      return record

  monkeypatch.setattr(loader, "make_source", lambda d, seed: Corrupted(
      d.num_clips, d.min_frames, d.max_frames, d.min_side, d.max_side, d.max_shapes, seed))
  # One packing bin keeps the stream's order, so the count can be checked exactly.
  d = data_config_for_tests(packing_bins=1, batch_size=1)
  batches = _batches(d, 8)
  emitted = [(e, i) for e, i, *_ in _clips(batches)]
  assert not {i for _, i in emitted} & bad
  # (epoch, index) of every record in the order the loader reads them.
  order = grain.MapDataset.range(d.num_clips).shuffle(seed=SEED).repeat(None)
  epochs = max(e for e, _ in emitted) + 1
  stream = [(p // d.num_clips, order[p]) for p in range(epochs * d.num_clips)]
  last = stream.index(emitted[-1])
  assert emitted == [c for c in stream[:last + 1] if c[1] not in bad]
  expected = sum(i in bad for _, i in stream[:last])
  assert expected >= len(bad) and sum(int(b["num_skipped"].sum()) for b in batches) == expected


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.mark.parametrize("worker_count", [0, 1])
def test_iterator_state_round_trip_gives_identical_batches(worker_count):
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  d = data_config_for_tests(worker_count=worker_count)
  it = iter(loader.make_dataset(d, PATCH, SEED))
  list(itertools.islice(it, 3))
  state = it.get_state()
  expected = list(itertools.islice(it, 3))
  fresh = iter(loader.make_dataset(d, PATCH, SEED))
  fresh.set_state(state)
  _assert_batches_equal(list(itertools.islice(fresh, 3)), expected)
  for i in (it, fresh):
    if worker_count:
      i.close()


def test_orbax_checkpoint_of_the_iterator_gives_identical_batches(tmp_path):
  d = data_config_for_tests()
  it = iter(loader.make_dataset(d, PATCH, SEED))
  list(itertools.islice(it, 2))
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as manager:
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = list(itertools.islice(it, 3))
    fresh = iter(loader.make_dataset(d, PATCH, SEED))
    manager.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(list(itertools.islice(fresh, 3)), expected)


def test_two_hosts_cover_the_data_without_overlap():
  d = data_config_for_tests(batch_size=4)
  hosts = []
  for process_index in (0, 1):
    batches = _batches(d, 8, process_index, process_count=2)
    assert batches[0]["tokens"].shape[0] == 2                     # the local half of the batch
    seen = [(e, i) for e, i, *_ in _clips(batches)]
    assert len(seen) == len(set(seen))
    hosts.append({i for e, i in seen if e == 0})
  assert not hosts[0] & hosts[1]
  assert hosts[0] | hosts[1] == set(range(d.num_clips))


def test_physics_world_flows_through_with_varied_shapes(tmp_path):
  from data_pipelines import physics_world
  d = data_config_for_tests(source="physics_world", data_dir=str(tmp_path), num_clips=6,
                            min_side=16, max_side=32, min_frames=4, max_frames=8,
                            token_budget=512, packing_bins=2, batch_size=2)
  batches = _batches(d, 2)     # builds the dataset first: it is not there yet
  source = physics_world.load(tmp_path)
  assert len(source) == 6
  spec = loader.clip_spec(d, PATCH)
  grids = set()
  for batch in batches:
    _assert_segments_well_formed(batch, d)
    assert batch["actions"].shape == (2, d.max_clips_per_row, d.max_frames, 2)
    assert all(isinstance(c, str) for c in batch["captions"].ravel())
  for epoch, index, tokens, _, grid in _clips(batches):
    grids.add(grid)
    clip = loader.prepare_clip(source[index], spec, loader.crop_rng(SEED, epoch, index))
    np.testing.assert_array_equal(patches.unpatchify(tokens, grid, PATCH, 3), clip["latent"])
  assert len(grids) >= 3
  # Captions and actions ride along with their clip; actions are zero after its frames.
  batch = batches[0]
  row, m = np.argwhere(batch["clip_index"] >= 0)[0]
  epoch, index = batch["clip_epoch"][row, m], batch["clip_index"][row, m]
  record = source[int(index)]
  clip = loader.prepare_clip(record, spec, loader.crop_rng(SEED, epoch, index))
  frames = len(clip["actions"])
  assert frames == batch["clip_grid"][row, m, 0] * PATCH[0]
  assert batch["captions"][row, m] == record["caption"].decode()
  np.testing.assert_array_equal(batch["actions"][row, m, :frames], clip["actions"])
  assert (batch["actions"][row, m, frames:] == 0).all()


def _assert_source_flows_through(d, source, action_dim):
  batches = _batches(d, 2)
  spec = loader.clip_spec(d, PATCH)
  for batch in batches:
    _assert_segments_well_formed(batch, d)
    if action_dim:
      assert batch["actions"].shape[-1] == action_dim
  clips = list(_clips(batches))
  assert clips
  for epoch, index, tokens, _, grid in clips:
    clip = loader.prepare_clip(source[index], spec, loader.crop_rng(SEED, epoch, index))
    np.testing.assert_array_equal(patches.unpatchify(tokens, grid, PATCH, 3), clip["latent"])


def test_atari_episodes_flow_through(tmp_path):
  from data_pipelines import atari
  atari.build(tmp_path, games=("pong",), episodes_per_game=1, max_episode_steps=40,
              frame_shape=(32, 32), clip_frames=8, min_clip_frames=4)
  d = data_config_for_tests(source="atari", data_dir=str(tmp_path), min_frames=4, max_frames=8,
                            token_budget=512, packing_bins=2, batch_size=2)
  _assert_source_flows_through(d, atari.load(tmp_path), action_dim=1)
  batch = _batches(d, 1)[0]
  for name in ("actions", "rewards", "terminals"):
    assert batch[name].shape == (2, d.max_clips_per_row, 8, 1) and batch[name].dtype == np.float32


def test_rewards_and_terminals_ride_with_their_clips_frame_by_frame():
  """Per clip and frame, rewards and terminals stay beside the action of the same frame (the
  record's rewards are 10 x its action ids, its last frame is terminal); zeros after."""

  class Played(shapes.ShapesSource):
    def __getitem__(self, index):
      record = super().__getitem__(index)
      steps = np.arange(len(record["video"]))
      return {**record, "actions": steps + 100 * index, "rewards": (steps + 100 * index) * 10.0,
              "terminals": steps == steps[-1]}

  d = data_config_for_tests()
  source = Played(num_clips=d.num_clips, min_frames=d.min_frames, max_frames=d.max_frames,
                  min_side=d.min_side, max_side=d.max_side, max_shapes=2, seed=SEED)
  import unittest.mock
  with unittest.mock.patch.object(loader, "make_source", lambda d, seed: source):
    batch = next(iter(loader.make_dataset(d, PATCH, SEED)))
  shape = (d.batch_size, d.max_clips_per_row, d.max_frames, 1)
  assert batch["rewards"].shape == batch["terminals"].shape == batch["actions"].shape == shape
  terminals = 0
  for row, m in np.argwhere(batch["clip_index"] >= 0):
    index, frames = batch["clip_index"][row, m], batch["clip_grid"][row, m, 0] * PATCH[0]
    actions = batch["actions"][row, m, :frames, 0]
    np.testing.assert_array_equal(batch["rewards"][row, m, :frames, 0], actions * 10)
    last = len(source[int(index)]["video"]) - 1 + 100 * index
    np.testing.assert_array_equal(batch["terminals"][row, m, :frames, 0], actions == last)
    terminals += int((actions == last).sum())
    for name in ("rewards", "terminals"):
      assert not batch[name][row, m, frames:].any()
  assert terminals, "no crop reached a clip's last frame"
  assert not batch["rewards"][batch["clip_index"] < 0].any()


def test_video_folder_clips_flow_through(tmp_path):
  import av
  from data_pipelines import video_folder
  videos = tmp_path / "videos"
  videos.mkdir()
  rng = np.random.default_rng(0)
  for name, (h, w) in {"wide": (24, 40), "tall": (40, 24)}.items():
    with av.open(str(videos / f"{name}.mp4"), "w") as container:
      stream = container.add_stream("libx264", rate=8)
      stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
      for _ in range(12):
        frame = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      container.mux(stream.encode())
  video_folder.build(tmp_path / "data", videos, clip_frames=12, min_clip_frames=4)
  d = data_config_for_tests(source="video_folder", data_dir=str(tmp_path / "data"),
                            min_frames=4, max_frames=8, token_budget=512, packing_bins=2,
                            batch_size=2)
  _assert_source_flows_through(d, video_folder.load(tmp_path / "data"), action_dim=0)


def test_captions_travel_with_their_clips_as_bytes_or_embeddings():
  """Each clip's caption lands in its own slot of the row's text with the clip's segment id;
  precomputed embeddings (any width) travel the same way, cut to caption_len rows."""
  from worldsim.models import text as text_lib

  class Captioned(shapes.ShapesSource):
    def __getitem__(self, index):
      record = super().__getitem__(index)
      record["caption"] = f"clip {index}"
      record["caption_embedding"] = np.full((3 + index % 4, 5), float(index), np.float32)
      return record

  d = data_config_for_tests(caption_len=4)
  source = Captioned(num_clips=d.num_clips, min_frames=d.min_frames, max_frames=d.max_frames,
                     min_side=d.min_side, max_side=d.max_side, max_shapes=2, seed=SEED)
  import unittest.mock
  with unittest.mock.patch.object(loader, "make_source", lambda d, seed: source):
    as_bytes = next(iter(loader.make_dataset(d, PATCH, SEED, text="bytes")))
    as_rows = next(iter(loader.make_dataset(d, PATCH, SEED, text="embeddings")))
  slots = d.max_clips_per_row * 4
  assert as_bytes["text"].shape == as_bytes["text_segment_ids"].shape == (4, slots)
  assert as_rows["text"].shape == (4, slots, 5)
  for row in range(4):
    for m, index in enumerate(as_bytes["clip_index"][row]):
      slot = slice(4 * m, 4 * m + 4)
      if index < 0:       # no clip: an empty slot
        assert not as_bytes["text_segment_ids"][row, slot].any()
        continue
      np.testing.assert_array_equal(as_bytes["text"][row, slot],
                                    text_lib.tokenize([f"clip {index}"], 4)[0])
      np.testing.assert_array_equal(as_bytes["text_segment_ids"][row, slot], m + 1)
      assert as_bytes["captions"][row, m] == f"clip {index}"
      rows = min(3 + index % 4, 4)                                       # cut to caption_len
      np.testing.assert_array_equal(as_rows["text"][row, slot][:rows], index)
      np.testing.assert_array_equal(as_rows["text"][row, slot][rows:], 0)
      np.testing.assert_array_equal(as_rows["text_segment_ids"][row, slot],
                                    [m + 1] * rows + [0] * (4 - rows))
