"""The latents TFDS builder: a clip dataset encoded once by a frozen VAE, for the DiT.

Record (one source clip; read back as numpy arrays, text as bytes):
  latent        float32 (T', H', W', C)  the VAE's posterior mean of the clip's first
                                         T = 1 + 4(T' - 1) frames and first H = s H', W = s W'
                                         rows and columns (s: spatial factor). Raw: the
                                         per-channel shift and scale are NOT applied (see
                                         latent_stats.json below).
  source_index  int64 ()                 the record's index in the source.
  every other field of the source record, with the source's own feature spec (caption,
  fps, params, object_names, index, ...), unchanged; the per-frame fields (`frame_fields`:
  actions, rewards, terminals, states by default) cut to the same T frames and still one row
  per pixel frame. Latent frame 0 <- pixel frame 0; latent frame j > 0 <- pixel frames
  4j-3 .. 4j. The one exception to the cut: a terminal (Atari's game over) among the dropped
  frames moves to the last kept frame, so a clip that ends its episode still ends in a
  terminal, at most 3 frames early (the game over is what a terminal head must learn, and an
  episode's only terminal is its last frame, which the 1 + 4k rule drops 3 times in 4).
  Rewards of dropped frames are dropped with them.
  The frame and crop rules are in encode.py: clips are cut to the largest 1 + 4k frames
  (never padded; a 1-frame clip is kept, a clip with no frames is skipped and counted) and
  frames to multiples of s (or of build()'s size_multiple) by dropping the last rows / columns
  (positions keep their origin).

Layout under data_dir/<name>/ (name: one latent dataset = one source x one VAE):
  latents/host{i}of{n}/1.0.0/   TFDS build (ArrayRecord) of host i's shard: source indices
                                i, i + n, i + 2n, ... in increasing order; also
                                shard_stats.json (that shard's channel moments and counts).
  latent_stats.json             written last, by process 0, once every shard is built; its
                                presence marks the dataset complete. shift (C,) and scale (C,):
                                the per-channel mean and standard deviation of `latent` over
                                every latent voxel of the dataset; the DiT trains on
                                (latent - shift) / scale and decodes z * scale + shift. Also
                                the counts (clips encoded, skipped, frames dropped), the VAE
                                config and the shard list.

Multi-host: every process calls build() with the same arguments. Each encodes its own shard
of the source indices (process_index::process_count) on its local devices and writes its own
TFDS build (no cross-host traffic but two barriers), so data_dir must be a filesystem all
hosts see (GCS). A host whose shard is already built skips it, so a preempted build resumes
per shard; a dataset built by n hosts is read (and skipped) the same by any other number.
Only single-host builds are tested.

Written as ArrayRecord and read back without TensorFlow (TFDS encodes Tensor, Scalar and Text
features with numpy; the latent is stored as raw bytes, float data hardly compresses).
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines.latents import encode as encode_lib
from data_pipelines.latents import features as features_lib
from worldsim.models import vae as vae_lib

STATS_NAME = "latent_stats.json"
SHARD_STATS_NAME = "shard_stats.json"
FRAME_FIELDS = ("actions", "rewards", "terminals", "states")  # one row per pixel frame
END_FLAGS = ("terminals",)   # per-frame flags that a cut moves onto the last kept frame
_COUNTS = ("encoded", "no_frames", "too_small", "frames_dropped", "cropped")


def _shard_name(process_index: int, process_count: int) -> str:
  return f"host{process_index}of{process_count}"


def cut_frames(value, num_frames: int, kept: int, field: str):
  """A per-frame field (an array or a dict of them) cut to its first `kept` rows (END_FLAGS:
  set on the last kept row when set on a dropped one)."""
  if isinstance(value, dict):
    return {k: cut_frames(v, num_frames, kept, f"{field}/{k}") for k, v in value.items()}
  array = np.asarray(value)
  if array.ndim == 0 or len(array) != num_frames:
    raise ValueError(f"per-frame field {field!r} has shape {array.shape}, but the clip has "
                     f"{num_frames} frames; leave it out of frame_fields if it is not per frame")
  if field not in END_FLAGS or not 0 < kept < num_frames:
    return array[:kept]
  cut = array[:kept].copy()                   # the source's array may be read-only
  cut[-1] = array[kept - 1:].max(axis=0)      # a flag in the dropped frames moves here
  return cut


class Latents(tfds.core.GeneratorBasedBuilder):
  """One host's shard of a latent dataset; construct through build()."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, source=None, encoder: Optional[encode_lib.ClipEncoder] = None,
               frame_fields: Sequence[str] = FRAME_FIELDS, process_index: int = 0,
               process_count: int = 1, label: str = "", size_multiple: int = 0, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._source, self._encoder, self._frame_fields = source, encoder, tuple(frame_fields)
    self._process_index, self._process_count = process_index, process_count
    self._label, self._size_multiple = label, size_multiple
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if self._source is None or self._encoder is None:
      raise ValueError("Latents needs source= and encoder=; use latents.build() to write a "
                       "dataset and latents.load() to read one")
    first = self._source[0] if getattr(self._source, "dataset_info", None) is None else None
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=features_lib.latent_features(
            self._source, first, self._encoder.model.cfg.latent_channels, self._frame_fields),
        disable_shuffling=True)  # integer keys = source indices: records in source order

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _examine(self, index: int, record: dict, counts: dict):
    """(pixels to encode, the record's other fields cut to the kept frames), or None."""
    cfg = self._encoder.model.cfg
    video = np.asarray(record["video"])
    if video.ndim != 4 or video.shape[-1] != cfg.in_channels:
      raise ValueError(f"record {index}: video of shape {video.shape}; the VAE takes "
                       f"(T, H, W, {cfg.in_channels})")
    frames, height, width, _ = video.shape
    kept = encode_lib.kept_frames(frames, cfg.temporal_factor)
    multiple = self._size_multiple or cfg.spatial_factor
    h, w = encode_lib.kept_size(height, multiple), encode_lib.kept_size(width, multiple)
    if kept == 0:
      counts["no_frames"] += 1
      return None
    if h == 0 or w == 0:
      counts["too_small"] += 1
      return None
    counts["frames_dropped"] += frames - kept
    counts["cropped"] += (h, w) != (height, width)
    rest = {k: v for k, v in record.items() if k != "video"}
    for name in self._frame_fields:
      if name in rest:
        rest[name] = cut_frames(rest[name], frames, kept, name)
    return video[:kept, :h, :w], rest

  def _generate_examples(self):
    source, encoder = self._source, self._encoder
    indices = range(self._process_index, len(source), self._process_count)
    counts = dict.fromkeys(_COUNTS, 0)
    stats = encode_lib.ChannelStats.zeros(encoder.model.cfg.latent_channels)
    waiting = {}    # index -> the record's other fields, until its latent is ready

    def clips():
      desc = (f"Encoding latents {self._label} (host {self._process_index + 1} of "
              f"{self._process_count})")
      for index in tqdm.tqdm(indices, unit="clip", desc=desc):
        examined = self._examine(index, source[index], counts)
        if examined is not None:
          pixels, waiting[index] = examined
          yield index, pixels

    for index, latent in encoder.encode_all(clips()):
      stats.update(latent)
      counts["encoded"] += 1
      yield index, {**waiting.pop(index), features_lib.LATENT: latent,
                    features_lib.SOURCE_INDEX: index}
    if not counts["encoded"]:
      raise ValueError(f"host {self._process_index}: none of its {len(indices)} clips could "
                       f"be encoded ({counts}); a TFDS split cannot be empty")
    # During download_and_prepare data_dir is the temporary directory that becomes the
    # shard's, so these land beside its records, atomically with them.
    Path(self.data_dir, SHARD_STATS_NAME).write_text(
        json.dumps({"counts": counts, "channels": stats.to_json()}))


def _barrier(tag: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def _vae_json(model: vae_lib.VAE) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(model.cfg)))


def _write_stats(root: Path, shards: list, model: vae_lib.VAE, source_clips: int,
                 chunk_frames: int, size_multiple: int) -> None:
  counts, stats = dict.fromkeys(_COUNTS, 0), encode_lib.ChannelStats.zeros(
      model.cfg.latent_channels)
  for shard in shards:
    shard_stats = json.loads((root / shard / SHARD_STATS_NAME).read_text())
    counts = {k: counts[k] + shard_stats["counts"][k] for k in _COUNTS}
    stats.merge(encode_lib.ChannelStats.from_json(shard_stats["channels"]))
  std = stats.std
  summary = {
      "shift": stats.mean.tolist(),
      "scale": np.where(std > 0, std, 1.0).tolist(),
      "normalise": "(latent - shift) / scale; denormalise: z * scale + shift",
      "latent": "raw VAE posterior mean; shift and scale are not applied in the records",
      "voxels_per_channel": int(stats.count[0]),
      "num_clips": counts["encoded"],
      "source_clips": source_clips,
      "skipped": {"no_frames": counts["no_frames"], "too_small": counts["too_small"]},
      "frames_dropped": counts["frames_dropped"],
      "cropped_clips": counts["cropped"],
      "frame_rule": "first 1 + 4k frames kept; latent 0 <- frame 0, latent j <- frames 4j-3..4j",
      "chunk_frames": chunk_frames,
      "size_multiple": size_multiple,
      "vae": _vae_json(model),
      "version": str(Latents.VERSION),
      "shards": shards,
  }
  tmp = root / f".{STATS_NAME}.tmp"
  tmp.write_text(json.dumps(summary, indent=2))
  os.replace(tmp, root / STATS_NAME)   # atomic: the file exists only when it is whole
  logging.info("Encoded %d of %d clips into %s (skipped %s, %d frames dropped by the 1 + 4k "
               "rule, %d clips cropped to the spatial factor).", counts["encoded"],
               source_clips, root, summary["skipped"], counts["frames_dropped"],
               counts["cropped"])


def _check_built(root: Path, model: vae_lib.VAE, source) -> dict:
  stats = json.loads((root / STATS_NAME).read_text())
  if stats["vae"] != _vae_json(model) or stats["source_clips"] != len(source):
    raise ValueError(
        f"{root} already holds latents of another VAE or source (VAE {stats['vae']}, "
        f"{stats['source_clips']} clips; now {_vae_json(model)}, {len(source)} clips): "
        "build under another name, or delete that directory")
  return stats


def build(data_dir, source, vae_model: vae_lib.VAE, vae_params, *, name: str,
          chunk_frames: int = 32, batch_size: int = 8, size_multiple: int = 0,
          frame_fields: Sequence[str] = FRAME_FIELDS, mesh: Optional[jax.sharding.Mesh] = None,
          rules=vae_lib.RULES, max_buffered: Optional[int] = None) -> tfds.core.DatasetBuilder:
  """Encodes `source` into the latent dataset data_dir/<name> (skipped when already built).

  source: random access (len(), [i] -> dict of numpy arrays with `video` (T, H, W, 3), uint8
    in [0, 255] or float in [-1, 1]), e.g. physics_world.load(...); a TFDS source lends its
    feature spec, any other has one inferred from its first record.
  vae_model, vae_params: the frozen VAE (`params` as for model.apply: {'params': ...}); global
    (multi-host) arrays are gathered, then replicated over this host's devices.
  name: the dataset's directory; one per (source, VAE). Building again under a name that is
    complete does nothing (and raises if the VAE config or source length differ).
  chunk_frames: clips are coded in chunks of this many pixel frames (a multiple of 4; the
    first chunk has one more), so memory does not grow with the clip length.
  batch_size: equal-shape clips coded together (padded to a multiple of the batch devices).
  size_multiple: frames are cut to multiples of this many pixels (a multiple of the spatial
    factor s; 0 = s). Every distinct clip shape costs one compile of the encoder, so a
    coarser multiple (the DiT's patch in pixels, which the DiT crops to anyway) encodes a
    dataset of many sizes several times faster.
  frame_fields: top-level fields with one row per pixel frame, cut with the video.
  mesh: this host's devices, axes (data, fsdp, tensor, context); default every local device
    on `data`. rules: the VAE's logical axis rules.
  Every process must call this (see the module docstring). Returns this host's shard builder.
  """
  if not name or os.sep in name or name.startswith("."):
    raise ValueError(f"name={name!r} must be a plain directory name")
  root = Path(data_dir, name)
  index, count = jax.process_index(), jax.process_count()
  if (root / STATS_NAME).exists():
    shards = _check_built(root, vae_model, source)["shards"]
    return tfds.builder_from_directory(root / shards[min(index, len(shards) - 1)])
  if len(source) < count:
    raise ValueError(f"the source has {len(source)} clips, fewer than the {count} hosts that "
                     "would each write a shard")
  s = vae_model.cfg.spatial_factor
  size_multiple = size_multiple or s
  if size_multiple % s:
    raise ValueError(f"size_multiple={size_multiple} must be a multiple of the VAE's spatial "
                     f"factor {s}")
  encoder = encode_lib.ClipEncoder(vae_model, vae_params, chunk_frames=chunk_frames,
                                   batch_size=batch_size, max_buffered=max_buffered,
                                   mesh=mesh, rules=rules)
  builder = Latents(data_dir=root, config=tfds.core.BuilderConfig(name=_shard_name(index, count)),
                    source=source, encoder=encoder, frame_fields=frame_fields,
                    process_index=index, process_count=count, label=name,
                    size_multiple=size_multiple)
  builder.download_and_prepare()    # a no-op for a shard already built
  _barrier(f"latents {root}: shards written")
  if index == 0:
    shards = [f"{Latents.name}/{_shard_name(i, count)}/{Latents.VERSION}" for i in range(count)]
    _write_stats(root, shards, vae_model, len(source), chunk_frames, size_multiple)
  _barrier(f"latents {root}: stats written")
  return builder


class ConcatSource:
  """Several random-access sources read as one (the shards of a multi-host build)."""

  def __init__(self, sources):
    self.sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index):
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self.sources[shard][index - int(self._starts[shard])]

  def __getitems__(self, indices):
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ConcatSource({len(self.sources)} shards, {len(self)} records)"


def _root(data_dir, name: str) -> Path:
  root = Path(data_dir, name)
  if not (root / STATS_NAME).exists():
    raise FileNotFoundError(f"no complete latent dataset at {root} ({STATS_NAME} is written "
                            "last): build it with latents.build()")
  return root


def load(data_dir, name: str, split: str = "train"):
  """A random-access source of the latent records of data_dir/<name> (len(), [i] -> dict of
  numpy arrays; text as bytes). Records are in source order within each host's shard."""
  root = _root(data_dir, name)
  shards = json.loads((root / STATS_NAME).read_text())["shards"]
  sources = [tfds.builder_from_directory(root / s).as_data_source(split) for s in shards]
  return sources[0] if len(sources) == 1 else ConcatSource(sources)


def load_stats(data_dir, name: str) -> dict:
  """latent_stats.json of data_dir/<name>, with `shift` and `scale` as float32 (C,) arrays."""
  stats = json.loads((_root(data_dir, name) / STATS_NAME).read_text())
  return {**stats, "shift": np.asarray(stats["shift"], np.float32),
          "scale": np.asarray(stats["scale"], np.float32)}
