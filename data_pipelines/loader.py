"""grain pipelines from a clip source to the trainer's packed token batches.

  clip indices -> seeded shuffle (a new order every epoch) -> this host's shard
    -> ClipToTokens: read, random temporal crop, resize policy, pixels -> latent, patchify
    -> skip bad records (counted) -> pack into rows of token_budget tokens (grain best-fit)
    -> PackedRow: per-clip metadata -> batch [-> mp_prefetch worker processes]

Clips keep their native resolution, aspect ratio and duration; packing many into one row of a
fixed token budget gives every batch the same static shape, so one compiled step serves them
all. A batch of B = batch_size // process_count rows, with M = max_clips_per_row:

  tokens         float32 (B, budget, P)  patch tokens, clips back to back, zeros in padding
  positions      int32 (B, budget, 3)    each token's (t, h, w) patch coordinate in its clip
  segment_ids    int32 (B, budget)       1, 2, ... for the clips of a row; 0 = padding
  -- per clip, host-side only (absent clips: zeros, '' or -1):
  clip_grid      int32 (B, M, 3)         (gt, gh, gw) patch grid of segment m + 1
  captions       object (B, M)           str
  -- captions for the device, when the model reads them (make_dataset's `text`, config.model.text):
  text           int32 (B, M * L)        'bytes': slot m holds clip m's caption as byte tokens
                                         (models/text.py), L = config.data.caption_len
                 float32 (B, M * L, E)   'embeddings': clip m's precomputed `caption_embedding`
                                         rows (any external encoder, E wide), cut to L rows
  text_segment_ids int32 (B, M * L)      m + 1 on clip m's caption, 0 on padding
  actions        float32 (B, M, max_frames, A)  per frame of the crop, zero-padded; A is the
                                         source's (physics 2, atari 1 = the action id), or in
                                         latent space t x that (see below); absent for
                                         sources without actions
  rewards        float32 (B, M, max_frames, k)  per frame of the crop, zero-padded, as actions:
                                         k = 1, or t in latent space; rewards[f] is what the
                                         game paid for actions[f] (atari/episodes.py); present
                                         when the source's records have `rewards` (atari)
  terminals      float32 (B, M, max_frames, k)  1 where the episode ended (game over) after
                                         that frame's action, else 0; with rewards (zeros for
                                         a source with rewards but no terminals)
  clip_index     int32 (B, M)            the clip's index in the source
  clip_epoch     int32 (B, M)            the pass over the data that drew it
  num_skipped    int32 (B,)              bad records skipped just before this row's clips
  num_truncated  int32 (B,)              clips of this row cut beyond the random crop to fit

Only tokens, positions, segment_ids (and text, text_segment_ids) go to the devices; the rest
is for logging and conditioning on the host.

Latent space (config.data.space='latent'): the source is the latent dataset the `latents`
stage built from config.data.source under <data_dir>/latents/<latents_name>, read through
latents.LatentClips: normalised latents (T', H', W', C) in place of pixels, the actions (and
rewards, terminals) of each latent frame's t pixel frames side by side. The frame range
(min/max_frames, in pixel frames) becomes the latent frames of those lengths; every crop
starts at latent frame 0 (the frame coded from a single image, which is what a generated
clip's first frame decodes as); and the 'cap' policy, or a latent frame over budget, shrinks
frames by a random spatial crop, since box-filtered latents do not decode to a box-filtered
video.

Resize policy (config.data.resize): 'native' keeps every pixel (frames centre-cropped to whole
patches); a clip over the row's budget is shortened in time, and a single latent frame over
the budget is downscaled. 'cap' downscales frames (aspect kept, box filter) until the clip has
at most max_tokens_per_clip tokens. Nothing is dropped for being too big. The random crop of
clip `index` in pass `epoch` draws from crop_rng(seed, epoch, index), so anyone can recompute
a clip with `prepare_clip`.

The iterator is a grain DatasetIterator, whose state the checkpoint saves with the model.
With worker processes each worker packs its own slice of the stream, so a checkpoint resumes
the same stream only with the same worker_count.

The VAE trains on fixed-size pixel crops instead (`make_clip_dataset`), from the same sources
and the same shuffled, sharded index stream:

  clip indices -> seeded shuffle -> this host's shard
    -> ClipCrop: read, random (frames, height, width) crop in time and space, pixels -> [-1, 1]
    -> skip bad records (counted) -> batch [-> mp_prefetch worker processes]

  video          float32 (B, frames, height, width, C) in [-1, 1]
  clip_index     int32 (B,)   clip_epoch  int32 (B,)   num_skipped  int32 (B,)

A clip shorter or smaller than the crop is skipped and counted (num_skipped), never padded or
upscaled: repeated frames would teach the VAE that nothing moves, upscaled ones that the world
is blurry. The crop of clip `index` in pass `epoch` draws from crop_rng(seed, epoch, index)
(`crop_clip` recomputes it).
"""
import dataclasses
import functools
import json
import os
import pathlib
from typing import NamedTuple, Optional, Sequence

from absl import logging
import grain
import numpy as np

from data_pipelines.shapes import ShapesSource
from worldsim.models import patches
from worldsim.models import text as text_lib

SOURCES = ("shapes", "physics_world", "video_folder", "atari")
SPACES = ("pixel", "latent")   # what the DiT models: pixels in [-1, 1], or the VAE's latents
LATENTS_DIR = "latents"        # latent datasets live in <data_dir>/latents/<latents_name>
RESIZE_POLICIES = ("native", "cap")
# grain's defaults (16 threads, 500 clips read ahead) suit small records on remote disks; decoded
# clips are large and CPU-bound, so a few threads and a short queue hold less and contend less.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
# Per-clip fields that ride through the packer as lists, one entry per clip of a row.
_FRAME_FIELDS = ("actions", "rewards", "terminals")   # per frame of the clip, cropped alike
_CLIP_FIELDS = ("clip_grid", "caption", *_FRAME_FIELDS, "clip_index", "clip_epoch", "skipped",
                "truncated")
CAPTION_EMBEDDING = "caption_embedding"   # a source's precomputed caption, float (L, E)


def pixels_to_latent(video: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]: the model's input in pixel space (data.space='pixel')."""
  return video.astype(np.float32) / 127.5 - 1.0


def latent_to_pixels(latent) -> np.ndarray:
  return np.clip((np.asarray(latent) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class BadRecord(ValueError):
  """A record that cannot become a clip (unreadable, no video, too short or small, wrong
  channels or dtype, NaN or Inf, actions or rewards that do not match the frames)."""


def read_record(source, index: int) -> dict:
  """source[index], or BadRecord when it cannot be read: a damaged file or a record that fails
  to decode must cost one clip, not the run. (Sources decode with TFDS feature decoders,
  numpy and JSON; nothing on this path unpickles.)"""
  try:
    record = source[index]
  except Exception as e:            # decoders raise many types (zlib, tensorstore, OSError...)
    raise BadRecord(f"unreadable record ({type(e).__name__}: {e})") from e
  if not isinstance(record, dict) or "video" not in record:
    raise BadRecord(f"record of type {type(record).__name__} has no 'video' field")
  return record


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """How a record becomes a clip."""
  patch_size: tuple[int, int, int]
  channels: int
  min_frames: int        # temporal crop length range, in pixel frames
  max_frames: int
  max_tokens: int        # no clip has more tokens (the row's budget, or the 'cap' policy's)
  downscale: bool        # True ('cap'): shrink frames to fit; False ('native'): shorten first
  # Latent clips: every crop starts at latent frame 0 (the one coded from a single image, as
  # a generated clip's first frame is decoded), and frames shrink by a random spatial crop,
  # since resampled latents do not decode to a resampled video.
  latent: bool = False


class LatentGeometry(NamedTuple):
  """What a latent space changes for the loader: channels, and frames per latent frame."""
  channels: int
  temporal_factor: int

  def frames(self, pixel_frames: int) -> int:
    """Latent frames of a clip of `pixel_frames` frames (its first 1 + t*k are coded)."""
    return 1 + (max(pixel_frames, 1) - 1) // self.temporal_factor


def clip_spec(data_cfg, patch_size: Sequence[int],
              latent: Optional[LatentGeometry] = None) -> ClipSpec:
  """How records become clips. With `latent`, records hold latents (a LatentClips source):
  config.data.min_frames / max_frames, given in pixel frames, become latent frames."""
  d = data_cfg
  if d.resize not in RESIZE_POLICIES:
    raise ValueError(f"config.data.resize={d.resize!r}; choose from {RESIZE_POLICIES}")
  if not 1 <= d.min_frames <= d.max_frames:
    raise ValueError(f"need 1 <= config.data.min_frames ({d.min_frames}) <= "
                     f"config.data.max_frames ({d.max_frames})")
  max_tokens = d.token_budget
  if d.resize == "cap":
    if not 0 < d.max_tokens_per_clip <= d.token_budget:
      raise ValueError(f"resize='cap' needs 0 < config.data.max_tokens_per_clip "
                       f"({d.max_tokens_per_clip}) <= config.data.token_budget ({d.token_budget})")
    max_tokens = d.max_tokens_per_clip
  if latent is None:
    return ClipSpec(tuple(int(p) for p in patch_size), d.channels, d.min_frames, d.max_frames,
                    max_tokens, d.resize == "cap")
  return ClipSpec(tuple(int(p) for p in patch_size), latent.channels,
                  latent.frames(d.min_frames), latent.frames(d.max_frames), max_tokens,
                  d.resize == "cap", latent=True)


def crop_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return np.random.default_rng((seed, epoch, index))


def _fit_area(height: float, width: float, area: int) -> tuple[int, int]:
  """The largest patch grid of about height:width (in patches) with at most `area` patches."""
  scale = min(1.0, np.sqrt(area / (height * width)))
  gh = int(np.clip(np.floor(height * scale), 1, area))
  return gh, int(np.clip(np.floor(width * scale), 1, area // gh))


@functools.lru_cache(maxsize=4096)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) box filter: output pixel j averages the input span it covers."""
  edges = np.linspace(0, n_in, n_out + 1)
  cells = np.arange(n_in)
  overlap = np.minimum(edges[1:, None], cells + 1) - np.maximum(edges[:-1, None], cells)
  return (np.maximum(overlap, 0) * (n_out / n_in)).astype(np.float32)


def _resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Centre-crops (T, H, W, C) to the aspect of height:width, then box-filters to that size."""
  t, h, w, c = video.shape
  if h * width > w * height:                # taller than the target: trim rows
    crop_h, crop_w = round(w * height / width), w
  else:                                     # wider: trim columns
    crop_h, crop_w = h, round(h * width / height)
  top, left = (h - crop_h) // 2, (w - crop_w) // 2
  video = video[:, top:top + crop_h, left:left + crop_w].astype(np.float32)
  # Two plain matmuls: np.einsum's path search costs more than the work on small clips.
  rows = _area_weights(crop_h, height) @ video.reshape(t, crop_h, crop_w * c)   # (T, p, W*C)
  rows = rows.reshape(t, height, crop_w, c).transpose(0, 1, 3, 2)             # (T, p, C, W)
  return (rows @ _area_weights(crop_w, width).T).transpose(0, 1, 3, 2)        # (T, p, q, C)


def _check(record: dict, spec: ClipSpec) -> np.ndarray:
  video = np.asarray(record["video"])
  pt, ph, pw = spec.patch_size
  if video.ndim != 4 or video.shape[-1] != spec.channels:
    raise BadRecord(f"video of shape {video.shape}; expected (T, H, W, {spec.channels})")
  if video.dtype != np.uint8 and video.dtype.kind != "f":
    raise BadRecord(f"video of dtype {video.dtype}; expected uint8 pixels or float latents")
  if video.shape[0] < pt or video.shape[1] < ph or video.shape[2] < pw:
    raise BadRecord(f"video of shape {video.shape} is smaller than one patch {spec.patch_size}")
  if video.dtype.kind == "f" and not np.isfinite(video).all():
    raise BadRecord("video holds NaN or infinite values")
  return video


def _frame_rows(record: dict, name: str, frames: int, absent_width: int = 0) -> np.ndarray:
  """Record field `name` as float32 (frames, k), one row per frame (absent: absent_width zero
  columns). Raises BadRecord when its rows are not the frames or hold NaN or Inf."""
  if name not in record:
    return np.zeros((frames, absent_width), np.float32)
  values = np.asarray(record[name], np.float32)
  if values.ndim == 0 or len(values) != frames:
    raise BadRecord(f"{name} of shape {values.shape} for {frames} frames")
  if not np.isfinite(values).all():
    raise BadRecord(f"{name} hold NaN or infinite values")
  return values.reshape(frames, -1)


def prepare_clip(record: dict, spec: ClipSpec, rng: np.random.Generator) -> dict:
  """A record -> its cropped, resized latent clip (T, H, W, C), divisible into patches.

  Returns latent; actions (T, A), rewards and terminals (T, k) of the same frames (k = 0
  without rewards; terminals are zeros where a record has rewards only); and truncated
  (whether the clip had to be cut beyond its random crop to fit max_tokens). Raises BadRecord.
  """
  video = _check(record, spec)
  (t, h, w, _), (pt, ph, pw) = video.shape, spec.patch_size
  rows = {"actions": _frame_rows(record, "actions", t),
          "rewards": _frame_rows(record, "rewards", t)}
  rows["terminals"] = _frame_rows(record, "terminals", t, rows["rewards"].shape[1])
  frames = int(rng.integers(min(spec.min_frames, t), min(spec.max_frames, t) + 1))
  gt, gh, gw = max(frames // pt, 1), h // ph, w // pw
  truncated = False
  if gt * gh * gw > spec.max_tokens:
    if spec.downscale:                      # keep the duration, shrink the frames
      if gt > spec.max_tokens:
        gt, truncated = spec.max_tokens, True
      gh, gw = _fit_area(h / ph, w / pw, spec.max_tokens // gt)
    elif gh * gw <= spec.max_tokens:        # native: keep the frames, shorten the clip
      gt, truncated = spec.max_tokens // (gh * gw), True
    else:                                   # one latent frame is over budget: shrink it
      gt, truncated = 1, True
      gh, gw = _fit_area(h / ph, w / pw, spec.max_tokens)
  start = 0 if spec.latent else int(rng.integers(0, t - gt * pt + 1))
  video = video[start:start + gt * pt]
  # Pixels to [-1, 1] (latent records are float already); the resize below is linear.
  video = pixels_to_latent(video) if video.dtype == np.uint8 else video.astype(np.float32)
  if (gh, gw) == (h // ph, w // pw):        # native: centre-crop to whole patches
    top, left = (h - gh * ph) // 2, (w - gw * pw) // 2
    video = video[:, top:top + gh * ph, left:left + gw * pw]
  elif spec.latent:                         # latents: a random window of the fitted size
    top = int(rng.integers(0, h - gh * ph + 1))
    left = int(rng.integers(0, w - gw * pw + 1))
    video = video[:, top:top + gh * ph, left:left + gw * pw]
  else:
    video = _resize(video, gh * ph, gw * pw)
  return {"latent": video, **{k: v[start:start + gt * pt] for k, v in rows.items()},
          "truncated": truncated}


class ClipToTokens(grain.transforms.Map):
  """(epoch, clip index) -> the clip's tokens, positions and metadata, or a bad-record marker."""

  def __init__(self, source, spec: ClipSpec, seed: int, embeddings: bool = False):
    self.source, self.spec, self.seed, self.embeddings = source, spec, seed, embeddings

  def map(self, epoch_and_index) -> dict:
    epoch, index = (int(i) for i in epoch_and_index)
    try:
      record = read_record(self.source, index)
      clip = prepare_clip(record, self.spec, crop_rng(self.seed, epoch, index))
    except BadRecord as e:
      logging.log_first_n(logging.WARNING, "Skipping clip %d: %s", 10, index, e)
      return {"bad": str(e)}
    grid = patches.grid_shape(clip["latent"].shape, self.spec.patch_size)
    caption = record.get("caption", b"")
    extra = {}
    if self.embeddings:
      embedding = np.asarray(record.get(CAPTION_EMBEDDING, np.nan), np.float32)
      if embedding.ndim != 2 or not np.isfinite(embedding).all():       # missing: ndim 0
        logging.log_first_n(logging.WARNING, "Skipping clip %d: no finite %s rows", 10, index,
                            CAPTION_EMBEDDING)
        return {"bad": f"no finite {CAPTION_EMBEDDING}"}
      extra[CAPTION_EMBEDDING] = embedding
    return {**extra,"tokens": patches.patchify(clip["latent"], self.spec.patch_size),
            "positions": patches.positions(grid),
            "clip_grid": np.array(grid, np.int32),
            "caption": caption.decode() if isinstance(caption, bytes) else str(caption),
            **{k: clip[k] for k in _FRAME_FIELDS}, "clip_index": index, "clip_epoch": epoch,
            "truncated": int(clip["truncated"])}


class _SkipBadRecords(grain.IterDataset):
  """Drops the records ClipToTokens marked bad; each clip carries the number dropped just
  before it (`skipped`), so the count survives worker processes, and the state is the
  parent's alone (nothing is pending between two clips)."""

  def __init__(self, parent: grain.IterDataset, max_in_a_row: int):
    super().__init__(parent)
    self.max_in_a_row = max_in_a_row

  def __iter__(self):
    return _SkipBadRecordsIterator(self._parent.__iter__(), self.max_in_a_row)


class _SkipBadRecordsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, max_in_a_row: int):
    super().__init__(parent)
    self.max_in_a_row = max_in_a_row

  def __next__(self) -> dict:
    skipped = 0
    while "bad" in (element := next(self._parent)):
      skipped += 1
      if skipped >= self.max_in_a_row:    # better to stop than to spin forever
        raise ValueError(f"{skipped} records in a row were bad (last: {element['bad']}); "
                         "check config.data.source, channels and the patch size")
    return element | {"skipped": skipped}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class PackedRow(grain.transforms.Map):
  """A row of grain's packer -> the batch contract: segment ids, our own (t, h, w) positions
  (grain's are 1-D), per-clip metadata padded to max_clips, and the captions as the model
  reads them (`text`: 'none', 'bytes' or 'embeddings'; caption_len tokens or rows per clip)."""

  def __init__(self, max_clips: int, max_frames: int, text: str = "none", caption_len: int = 0):
    self.max_clips, self.max_frames = max_clips, max_frames
    self.text, self.caption_len = text, caption_len

  def _embeddings(self, per_clip: list):
    """Clip m's (L_m, E) rows -> slot m of (M * caption_len, E), and their segment ids."""
    width = per_clip[0].shape[-1]
    out = np.zeros((self.max_clips, self.caption_len, width), np.float32)
    segment_ids = np.zeros((self.max_clips, self.caption_len), np.int32)
    for m, rows in enumerate(per_clip):
      n = min(len(rows), self.caption_len)
      out[m, :n], segment_ids[m, :n] = rows[:n], m + 1
    return out.reshape(-1, width), segment_ids.reshape(-1)

  def _pad(self, values, fill, dtype) -> np.ndarray:
    values = np.asarray(values, dtype)
    out = np.full((self.max_clips, *values.shape[1:]), fill, dtype)
    out[:len(values)] = values
    return out

  def map(self, row: dict) -> dict:
    batch_row = {"tokens": row["tokens"], "positions": row["positions"],
                 "segment_ids": row["tokens_segment_ids"],
                 "clip_grid": self._pad(row["clip_grid"], 0, np.int32),
                 "captions": self._pad(row["caption"], "", object),
                 "clip_index": self._pad(row["clip_index"], -1, np.int32),
                 "clip_epoch": self._pad(row["clip_epoch"], -1, np.int32),
                 "num_skipped": np.int32(sum(row["skipped"])),
                 "num_truncated": np.int32(sum(row["truncated"]))}
    if self.text == "bytes":
      text, text_segment_ids = text_lib.pack_captions(
          batch_row["captions"][None], self.caption_len, (batch_row["clip_grid"] > 0).all(-1)[None])
      batch_row.update(text=text[0], text_segment_ids=text_segment_ids[0])
    elif self.text == "embeddings":
      batch_row["text"], batch_row["text_segment_ids"] = self._embeddings(row[CAPTION_EMBEDDING])
    for name in _FRAME_FIELDS:
      width = row[name][0].shape[1]
      if width:  # worker processes cannot ship empty arrays (zero-byte shared memory)
        values = np.zeros((self.max_clips, self.max_frames, width), np.float32)
        for m, clip_values in enumerate(row[name]):
          values[m, :len(clip_values)] = clip_values
        batch_row[name] = values
    return batch_row


class UnsafeMetadata(ValueError):
  """A dataset's metadata names code to import."""


def _class_names(tree):
  """Every feature class a TFDS features.json names ('pythonClassName', legacy 'type')."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if key in ("pythonClassName", "type") and isinstance(value, str):
        yield value
      else:
        yield from _class_names(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _class_names(value)


def check_metadata_is_data(data_dir) -> None:
  """Raises UnsafeMetadata when a features.json under data_dir names a feature class outside
  TFDS: TFDS imports such a module by name when it opens the dataset (and, run from a
  checkout, `runs.<...>.evil` would import a file planted beside the data), so a dataset
  could run code. Our builders only write TFDS's own feature classes."""
  for path in sorted(pathlib.Path(data_dir).rglob("features.json")):
    for name in _class_names(json.loads(path.read_text())):
      if not name.startswith("tensorflow_datasets."):
        raise UnsafeMetadata(f"{path} names the feature class {name!r}, which TFDS would "
                             f"import; only tensorflow_datasets.* classes are loaded. Rebuild "
                             f"the dataset, or remove it if you did not write it")


def make_source(data_cfg, seed: int):
  """The random-access source the DiT reads: the latent dataset of config.data.source when
  config.data.space is 'latent' (built by the `latents` stage), else its pixel clips."""
  d = data_cfg
  if d.get("space", "pixel") == "latent":
    from data_pipelines import latents
    check_metadata_is_data(os.path.join(d.data_dir, LATENTS_DIR, d.latents_name))
    return latents.LatentClips(os.path.join(d.data_dir, LATENTS_DIR), d.latents_name)
  return pixel_source(d, seed)


def pixel_source(data_cfg, seed: int):
  """The random-access source of pixel clips that config.data.source names (built on first
  use where the source is built)."""
  d = data_cfg
  if d.source == "shapes":
    return ShapesSource(num_clips=d.num_clips, min_frames=d.min_frames, max_frames=d.max_frames,
                        min_side=d.min_side, max_side=d.max_side, max_shapes=d.max_shapes,
                        seed=seed)
  # The TFDS sources import TFDS (and pymunk / PyAV / ALE) only when used.
  if os.path.isdir(d.data_dir):
    check_metadata_is_data(d.data_dir)
  if d.source == "physics_world":
    from data_pipelines import physics_world
    pushes = {k: d[k] for k in ("active_fraction", "push_probability") if k in d}
    builder = physics_world.build(d.data_dir, num_clips=d.num_clips, seed=seed,  # no-op if built
                                  min_side=d.min_side, max_side=d.max_side,
                                  min_frames=d.min_frames, max_frames=d.max_frames, **pushes)
    return physics_world.load(builder.data_dir)
  if d.source == "video_folder":
    from data_pipelines import video_folder
    return video_folder.load(d.data_dir)
  if d.source == "atari":
    from data_pipelines import atari
    return atari.load(d.data_dir)
  raise ValueError(f"config.data.source={d.source!r} is not a known source; choose from {SOURCES}")


def _clip_stream(num_clips: int, seed: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
  """Endless (epoch, clip index) pairs: reshuffled every epoch, this host's share only."""
  return (grain.MapDataset.range(num_clips)
          .shuffle(seed=seed)
          .repeat(None)      # after shuffle: every epoch is shuffled with its own seed
          .map_with_index(lambda position, index: (position // num_clips, index))
          [process_index::process_count])


def make_dataset(data_cfg, patch_size, seed: int, process_index: int = 0,
                 process_count: int = 1, text: str = "none") -> grain.IterDataset:
  """The training stream of this host: an endless IterDataset of local packed batches, with
  the captions as `text` says the model reads them ('none', 'bytes', 'embeddings')."""
  d = data_cfg
  if d.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={d.batch_size} must divide over "
                     f"{process_count} hosts")
  source = make_source(d, seed)
  spec = clip_spec(d, patch_size, getattr(source, "geometry", None))
  ds = (_clip_stream(len(source), seed, process_index, process_count)
        .map(ClipToTokens(source, spec, seed, embeddings=text == "embeddings"))
        .to_iter_dataset(_READ_OPTIONS))
  ds = _SkipBadRecords(ds, max_in_a_row=len(source))
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct={"tokens": d.token_budget, "positions": d.token_budget},
      num_packing_bins=d.packing_bins, seed=seed,
      meta_features=_CLIP_FIELDS + ((CAPTION_EMBEDDING,) if text == "embeddings" else ()),
      max_sequences_per_bin=d.max_clips_per_row)
  ds = (ds.map(PackedRow(d.max_clips_per_row, spec.max_frames, text, d.get("caption_len", 0)))
        .batch(d.batch_size // process_count, drop_remainder=True))
  if d.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return ds


# ----------------------------------------------------------------------------- VAE crops

def crop_clip(record: dict, frames: int, height: int, width: int, channels: int,
              rng: np.random.Generator) -> np.ndarray:
  """A record -> a random crop, float32 (frames, height, width, channels) in [-1, 1].

  Raises BadRecord for a clip shorter or smaller than the crop (or of the wrong channels,
  or holding NaN).
  """
  video = np.asarray(record["video"])
  if video.ndim != 4 or video.shape[-1] != channels:
    raise BadRecord(f"video of shape {video.shape}; expected (T, H, W, {channels})")
  if video.dtype != np.uint8 and video.dtype.kind != "f":
    raise BadRecord(f"video of dtype {video.dtype}; expected uint8 pixels")
  t, h, w, _ = video.shape
  if t < frames or h < height or w < width:
    raise BadRecord(f"video of shape {video.shape} is smaller than the crop "
                    f"({frames}, {height}, {width})")
  start, top, left = (int(rng.integers(0, n - c + 1))
                      for n, c in ((t, frames), (h, height), (w, width)))
  video = video[start:start + frames, top:top + height, left:left + width]
  if video.dtype.kind == "f" and not np.isfinite(video).all():
    raise BadRecord("video holds NaN or infinite values")
  return pixels_to_latent(video)


class ClipCrop(grain.transforms.Map):
  """(epoch, clip index) -> the clip's random crop, or a bad-record marker."""

  def __init__(self, source, crop_shape: tuple[int, int, int], channels: int, seed: int):
    self.source, self.crop_shape, self.channels, self.seed = source, crop_shape, channels, seed

  def map(self, epoch_and_index) -> dict:
    epoch, index = (int(i) for i in epoch_and_index)
    try:
      video = crop_clip(read_record(self.source, index), *self.crop_shape, self.channels,
                        crop_rng(self.seed, epoch, index))
    except BadRecord as e:
      logging.log_first_n(logging.WARNING, "Skipping clip %d: %s", 10, index, e)
      return {"bad": str(e)}
    return {"video": video, "clip_index": np.int32(index), "clip_epoch": np.int32(epoch)}


def _name_skipped(element: dict) -> dict:
  """_SkipBadRecords' per-clip `skipped` -> the batch's `num_skipped` (as packed rows name it)."""
  element = dict(element)
  element["num_skipped"] = np.int32(element.pop("skipped"))
  return element


def make_clip_dataset(data_cfg, frames: int, height: int, width: int, batch_size: int,
                      seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.IterDataset:
  """The VAE's training stream of this host: an endless IterDataset of local batches of
  fixed-size crops, {'video': float32 (batch_size // process_count, frames, height, width,
  C) in [-1, 1], 'clip_index', 'clip_epoch', 'num_skipped'}. Its iterator is checkpointable."""
  d = data_cfg
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must divide over {process_count} hosts")
  source = pixel_source(d, seed)
  ds = (_clip_stream(len(source), seed, process_index, process_count)
        .map(ClipCrop(source, (frames, height, width), d.channels, seed))
        .to_iter_dataset(_READ_OPTIONS))
  ds = (_SkipBadRecords(ds, max_in_a_row=len(source))
        .map(_name_skipped)
        .batch(batch_size // process_count, drop_remainder=True))
  if d.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return ds
