"""Clips -> VAE posterior means: the frame and crop rule, batched sharded streaming encode, and
the per-channel statistics of the latents.

Frame rule. The causal VAE codes 1 + t*k pixel frames (t = temporal_factor, 4) into 1 + k
latent frames, so a clip of T frames is cut to its first 1 + t * ((T - 1) // t) frames (the
largest valid length; the last (T - 1) % t frames are dropped, never padded). A 1-frame clip
is valid (one latent frame); a clip with no frames is skipped and counted. Latent frame 0
comes from pixel frame 0 alone, latent frame j > 0 from pixel frames t(j-1)+1 .. tj (4j-3 ..
4j); per-frame fields (actions, states, rewards, terminals) are cut to the same first frames
and stay at the pixel frame rate, so their row i is still pixel frame i (a dropped terminal
moves to the last kept frame: builder.py).

Crop rule. Height and width are cut down to multiples of the spatial factor s by dropping the
last rows and columns (at most s - 1 of each): the top-left corner stays the origin, so pixel
coordinates in the record (physics positions) keep their meaning; flags computed from the
full frame (physics `visible`) are not recomputed for the few dropped rows and columns. A
frame smaller than s on a side is skipped and counted.

Encoding. Clips are padded in time (their last frame repeated, which the causal encoder
cannot see from earlier frames) to the next chunk boundary (coded_frames), and clips of one
coded (frames, height, width) are grouped into batches of up to `batch_size`; each batch is
coded in temporal chunks with the VAE's streaming cache (the first chunk 1 + chunk_frames
frames, then chunk_frames at a time), so device memory depends on batch_size x chunk_frames
x frame size and never on the clip length; a clip no longer than 1 + chunk_frames is coded
in one call. The batch is split over the local devices along the mesh's (data, fsdp) axes
(the VAE's data sharding, from its logical rules) and filled up to batch_size (rounded up to
a multiple of that many devices) with copies of its last clip, so every batch of one frame
size has one shape; the parameters are replicated. One jit per
(batch, chunk shape) is compiled and reused, also across builds in one process. Host memory
holds at most max_buffered source clips and their latents.
"""
import dataclasses
import functools
import math
import types
from typing import Iterable, Iterator, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from worldsim.models import vae as vae_lib
from worldsim.parallel import mesh as mesh_lib


# ----------------------------------------------------------------------------- rules

def kept_frames(num_frames: int, temporal_factor: int) -> int:
  """The largest valid length 1 + t*k <= num_frames (0 when the clip has no frames)."""
  if num_frames < 1:
    return 0
  return 1 + (num_frames - 1) // temporal_factor * temporal_factor


def kept_size(size: int, spatial_factor: int) -> int:
  return size // spatial_factor * spatial_factor


def pixel_frames_of(latent_frame: int, temporal_factor: int) -> range:
  """The pixel frames latent frame j summarises: (0,) for j = 0, t(j-1)+1 .. tj after."""
  if latent_frame == 0:
    return range(0, 1)
  return range(temporal_factor * (latent_frame - 1) + 1, temporal_factor * latent_frame + 1)


def chunk_bounds(num_frames: int, first: int, rest: int) -> list:
  """[start, stop) of the streaming chunks: `first` frames, then `rest` at a time."""
  bounds, start = [(0, min(first, num_frames))], min(first, num_frames)
  while start < num_frames:
    bounds.append((start, min(start + rest, num_frames)))
    start += rest
  return bounds


def to_unit_range(video: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]; float videos are taken to be in [-1, 1] already."""
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 127.5 - 1.0
  return video.astype(np.float32)


# ----------------------------------------------------------------------------- statistics

@dataclasses.dataclass
class ChannelStats:
  """Running per-channel count, mean and sum of squared deviations (Chan et al.'s parallel
  update, in float64), so shards and batches combine exactly and without cancellation."""
  count: np.ndarray       # (C,) elements seen per channel
  mean: np.ndarray        # (C,)
  m2: np.ndarray          # (C,) sum of (x - mean)^2

  @classmethod
  def zeros(cls, channels: int) -> "ChannelStats":
    return cls(np.zeros(channels), np.zeros(channels), np.zeros(channels))

  def update(self, latent: np.ndarray) -> None:
    x = np.asarray(latent, np.float64).reshape(-1, latent.shape[-1])
    if not len(x):
      return
    self.merge(ChannelStats(np.full(x.shape[1], float(len(x))), x.mean(0),
                            ((x - x.mean(0)) ** 2).sum(0)))

  def merge(self, other: "ChannelStats") -> None:
    count = self.count + other.count
    safe = np.maximum(count, 1)
    delta = other.mean - self.mean
    self.mean = self.mean + delta * other.count / safe
    self.m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / safe
    self.count = count

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.m2 / np.maximum(self.count, 1))

  def to_json(self) -> dict:
    return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

  @classmethod
  def from_json(cls, d: dict) -> "ChannelStats":
    return cls(*(np.asarray(d[k], np.float64) for k in ("count", "mean", "m2")))


# ----------------------------------------------------------------------------- encoder

def local_mesh(devices: Optional[list] = None) -> jax.sharding.Mesh:
  """Every local device on the batch ('data') axis: the mesh one host encodes its shard on."""
  axes = types.SimpleNamespace(data=-1, fsdp=1, tensor=1, context=1)
  return mesh_lib.make_mesh(axes, devices if devices is not None else jax.local_devices())


def _host_copy(leaf):
  """A parameter as this host can use it on its own devices (global arrays are gathered)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return multihost_utils.process_allgather(leaf, tiled=True)
  return leaf


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_chunk(model: vae_lib.VAE, rules: tuple, params, x, cache):
  """One chunk's posterior mean and the cache for the next. `rules` is static because the
  model's logical constraints are traced under them (and jit's cache key does not see flax's
  rules context); the mesh comes with the arguments' shardings."""
  del rules
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x
  variables = params if cache is None else {**params, "cache": cache}
  (mean, _), updated = model.apply(variables, x, method=vae_lib.VAE.encode_frames,
                                   mutable=["cache"])
  return mean, updated["cache"]


class ClipEncoder:
  """Posterior means of batches of equal-shape clips, streamed in time, on a local mesh."""

  def __init__(self, model: vae_lib.VAE, params, *, chunk_frames: int, batch_size: int,
               max_buffered: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
               rules=vae_lib.RULES):
    t = model.cfg.temporal_factor
    if chunk_frames < t or chunk_frames % t:
      raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of the VAE's "
                       f"temporal factor {t}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.mesh = mesh if mesh is not None else local_mesh()
    remote = [d for d in self.mesh.devices.flat if d.process_index != jax.process_index()]
    if remote:
      raise ValueError(f"the latents mesh must hold only this host's devices (each host "
                       f"encodes its own shard); it has {len(remote)} of other hosts")
    self.rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                       for name, axes in rules)     # hashable: a static argument of the jit
    self.model, self.chunk_frames = model, chunk_frames
    self.batch_sharding = mesh_lib.logical_sharding(self.mesh, self.rules, vae_lib.PIXEL_AXES)
    spec = self.batch_sharding.spec
    batch_axes = spec[0] if spec and spec[0] is not None else ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    self.batch_shards = math.prod(self.mesh.shape[a] for a in batch_axes)
    self.batch_size = batch_size
    self.max_buffered = max_buffered or 4 * batch_size
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.params = jax.device_put(jax.tree.map(_host_copy, params), replicated)

  def _encode_chunk(self, x: np.ndarray, cache):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return _encode_chunk(self.model, self.rules, self.params,
                           jax.device_put(x, self.batch_sharding), cache)

  def coded_frames(self, frames: int) -> int:
    """The frames a clip of `frames` frames is coded with: up to the next chunk boundary (at
    least 1 + chunk_frames) by repeating its last frame. The encoder is causal, so the clip's
    own latents are exactly what they would be alone, and the extra ones are dropped; every
    clip of one frame size then shares one compiled shape per chunk, whatever its length
    (a compile costs about 30 times an encode of a small clip on a CPU)."""
    c = self.chunk_frames
    return 1 + max(1, -(-(frames - 1) // c)) * c

  def _pad_frames(self, video: np.ndarray) -> np.ndarray:
    extra = self.coded_frames(len(video)) - len(video)
    return np.concatenate([video, np.repeat(video[-1:], extra, axis=0)]) if extra else video

  def encode_batch(self, videos: list) -> list:
    """Clips (T_i, H, W, 3) of one frame size, T_i = 1 + t*k, H and W multiples of s -> their
    means (T_i', H/s, W/s, C) as float32 numpy arrays."""
    n = len(videos)
    frames = [len(v) for v in videos]
    for f in frames:
      vae_lib.check_num_frames(f, self.model.cfg.temporal_factor)
    videos = [self._pad_frames(v) for v in videos]
    # A partial batch is filled up to batch_size too: one compiled batch shape, not one per
    # group size.
    size = max(n, self.batch_size)
    padded = size + (-size % self.batch_shards)
    batch = np.stack(list(videos) + [videos[-1]] * (padded - n))
    if batch.dtype != np.uint8:        # uint8 travels as is and is scaled on the device
      batch = to_unit_range(batch)
    vae_lib.check_num_frames(batch.shape[1], self.model.cfg.temporal_factor)
    cache, means = None, []
    for a, b in chunk_bounds(batch.shape[1], 1 + self.chunk_frames, self.chunk_frames):
      mean, cache = self._encode_chunk(batch[:, a:b], cache)
      means.append(np.asarray(mean))
    latent = np.concatenate(means, axis=1)
    chex.assert_shape(latent, (padded, *self.model.cfg.latent_shape(*batch.shape[1:4])))
    return [latent[i, :self.model.cfg.latent_frames(f)] for i, f in enumerate(frames)]

  def encode_all(self, clips: Iterable) -> Iterator:
    """(key, video) pairs -> (key, latent) pairs, in batches of clips coded with one shape
    (see group_by_shape and coded_frames; the output order differs from the input order)."""
    def coded_shape(video):
      return (self.coded_frames(len(video)), *video.shape[1:])
    for group in group_by_shape(clips, self.batch_size, self.max_buffered, coded_shape):
      keys, videos = zip(*group)
      yield from zip(keys, self.encode_batch(list(videos)))


def group_by_shape(clips: Iterable, batch_size: int, max_buffered: int,
                   shape_of=lambda array: array.shape) -> Iterator[list]:
  """(key, array) pairs -> lists of up to batch_size pairs whose arrays have one shape (or
  one `shape_of`).

  A group leaves as soon as it is full. At most `max_buffered` clips wait for company: when
  more do, the fullest group leaves at once, so host memory stays bounded whatever the mix of
  shapes. What is left leaves at the end.
  """
  groups: dict = {}
  waiting = 0
  for key, video in clips:
    shape = shape_of(video)
    group = groups.setdefault(shape, [])
    group.append((key, video))
    waiting += 1
    if len(group) < batch_size:
      if waiting <= max_buffered:
        continue
      shape = max(groups, key=lambda s: len(groups[s]))    # the fullest group leaves
    waiting -= len(groups[shape])
    yield groups.pop(shape)
  yield from groups.values()
