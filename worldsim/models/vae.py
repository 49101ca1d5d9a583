"""The video compression network: a causal 3D convolutional VAE.

Clips are channels-last, (B, T, H, W, C), pixels in [-1, 1]. The encoder maps a clip of
1 + 4k frames (for a time factor of 4) to 1 + k latent frames, H / s x W / s, with
`latent_channels` channels; the decoder inverts it. Frame 0 is always compressed alone, so a
single image is a 1-frame clip and images and videos share one latent space.

Causal in time. Every temporal convolution pads only on the past side, replicating the first
frame (as CogVideoX's and Open-Sora's causal convs do), so latent frame j sees pixel frames
<= 4j and decoded frame t sees latent frames <= its own. Time is downsampled by a causal conv
of kernel 3, stride 2: output 0 sees only frame 0 (it is "kept alone"), output i sees frames
2i-2..2i. The decoder upsamples time by repeating every latent frame but the first twice
(1 + k -> 1 + 2k), then a causal conv.

Streaming. Because everything is causal, a clip can be coded in temporal chunks: each causal
conv keeps the last (kernel_t - stride_t) frames of its padded input in a `cache` variable
collection (kernel_t - 1 for the plain convs, which is also the time-downsampling state), and
each time upsampler keeps a flag saying frame 0 is done. The first chunk has 1 + 4m frames
and starts with no cache (None); later chunks have 4m frames and pass the cache along. The
result equals coding the whole clip at once, and memory does not grow with the length:

  (mean, logvar), cache = encode_chunk(model, params, x[:, :9])          # first: 1 + 4m
  (mean2, logvar2), cache = encode_chunk(model, params, x[:, 9:17], cache)  # later: 4m
  mean, logvar = stream_encode(model, params, x, chunk_frames=8)
  video = stream_decode(model, params, z, chunk_latent_frames=2)
  for frames in iter_decode(model, params, z, 2): ...                  # chunk by chunk
  video = tiled_decode(model, params, z, tile=16, overlap=4)            # big frames

Shortcuts (VAEConfig.shortcuts, the tiny recipe's): parameter-free residual paths around
every resampling, as DC-AE's residual autoencoding: average pooling (frame 0 alone, then frame
pairs, in time) beside each downsampling conv, nearest upsampling beside each upsampling, and
channel-group averages / repeats across the latent bottleneck. `upsample="subpixel"` makes the
decoder's upsampling a conv at the low rate followed by depth to space.

Normalisation is RMSNorm over the channels of each voxel (as the Wan 2.1 VAE does), not
GroupNorm. GroupNorm over (T, H, W) mixes statistics of future frames into the past, which
breaks causality and makes chunked coding inexact; per-frame GroupNorm would be causal, but
its statistics still span the whole frame, so spatial tiles (and height-sharded activations)
would normalise differently from the full frame and need cross-device reductions. A
per-voxel norm is exact under temporal chunking, identical inside spatial tiles (tiling error
comes only from conv receptive fields cut at tile borders), and needs no collective when
activations are sharded over height.

Sharding. Every parameter carries logical names: conv kernels (None, None, None, 'conv_in',
'conv_out'), biases and norm scales ('conv_out',), the pixel and latent sides None (3 and 16
channels do not split). Features are constrained to ('batch', 'frames', 'height', 'width',
'channels'). `RULES` below is the proposed rule set for the VAE (the config holds the copy
that is used).
"""
import dataclasses
import functools
import math
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name: (base_channels, channel_multipliers, num_res_blocks, latent_channels,
#        temporal_factor, spatial_factor)
VARIANTS = {
    "tiny": (8, (1, 2, 2), 1, 4, 4, 4),            # 4x4x4, CPU tests and the laptop recipe
    "small": (64, (1, 2, 4, 4), 1, 16, 4, 8),      # 4x8x8, one accelerator
    "standard": (128, (1, 2, 4, 4), 2, 16, 4, 8),  # 4x8x8, 16 channels (CogVideoX / Wan size)
}

# Logical axis -> mesh axes for the VAE. Batch over (data, fsdp); kernels ZeRO-sharded over
# fsdp on their input side and tensor-parallel on their output side, so feature channels
# live on `tensor`. Frames stay whole: the causal convs run along them. Height could go on
# `context` (XLA partitions convs spatially with halo exchanges, and the per-voxel norm
# needs no collective), but on jax 0.10.2 a conv with a height-sharded input and a
# tensor-sharded output channel gives wrong numbers (an SPMD partitioner bug, reproduced
# with one 2D conv on a (2, 2) mesh), so it stays None until that is fixed; it is correct
# when `tensor` has size 1.
RULES = (
    ("batch", ("data", "fsdp")),
    ("frames", None),
    ("height", None),
    ("width", None),
    ("channels", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
)

FEATURE_AXES = ("batch", "frames", "height", "width", "channels")
PIXEL_AXES = ("batch", "frames", "height", "width", None)    # also latents
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  base_channels: int = 8
  channel_multipliers: tuple = (1, 2, 2)
  num_res_blocks: int = 1
  latent_channels: int = 4
  temporal_factor: int = 4      # 1 + t*k frames -> 1 + k latent frames
  spatial_factor: int = 4       # H x W -> H / s x W / s
  in_channels: int = 3
  dtype: str = "float32"        # compute dtype; parameters stay float32
  disc_channels: int = 32       # the optional 3D patch discriminator
  disc_layers: int = 3
  # Training decodes a posterior sample (True, a VAE) or the posterior mean (False: the
  # decoder never sees the sampling noise; logvar then only feeds the KL term). Encoding for
  # latents and reconstruction use the mean either way.
  sample_posterior: bool = True
  # The feature norm before every conv of a ResBlock and before the output convs: "rms"
  # (ChannelRMSNorm, per voxel) or "none" (identity: no parameters; still per voxel, so
  # streaming and tiling stay exact). A per-voxel RMSNorm keeps only each voxel's direction
  # in channel space, so a small net sees brightness and saturation only once its biases
  # have grown; without it the tiny recipe learns faster (benchmarks/RESULTS.md).
  norm: str = "rms"
  # Parameter-free pooling / repetition paths around every resampling and the bottleneck
  # (module docstring): a net that starts as pooling and repetition passes flat colour and
  # position from step 0 and learns only the residual.
  shortcuts: bool = False
  # How the decoder doubles time and space: "nearest" (repeat, then a conv) or "subpixel"
  # (a conv, then depth to space; Upsample).
  upsample: str = "nearest"
  # Temporal kernel of the ResBlocks' convs: 3 (every block mixes neighbouring frames) or 1
  # (blocks are per-frame 2D convs; time is mixed by the in/out convs and the resampling
  # convs only). With 3, the stacked blocks see about 14 latent frames back, far more than a
  # training crop holds, and frames past the crop's length decode worse than the same frames
  # in a shorter clip; with 1 the receptive field is a few latent frames (and a block costs a
  # third of the FLOPs).
  res_kernel_t: int = 3
  # The sub-pixel upsampling conv: its temporal kernel (3, or 2: this latent frame and the one
  # before) and its output width, "level" (the width of the level it leaves) or "next" (the
  # width of the level it enters, which is all the next res block keeps). At the tiny recipe's
  # size the upsampling convs were the step's largest cost; 2 and "next" make it 16% faster.
  upsample_kernel_t: int = 3
  upsample_width: str = "level"
  # Start the last conv of every res block at zero, so each block starts as the identity and
  # a net with shortcuts as its parameter-free pooling / repetition codec (SkipInit-style);
  # only the initial values change, not the parameter tree.
  zero_init: bool = False

  def __post_init__(self):
    object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
    levels = len(self.channel_multipliers)
    if self.spatial_factor != 2 ** (levels - 1):
      raise ValueError(
          f"VAEConfig.spatial_factor={self.spatial_factor} must be 2 ** (levels - 1) = "
          f"{2 ** (levels - 1)} for channel_multipliers={self.channel_multipliers} (one 2x "
          f"spatial downsampling between levels); change one of them")
    if self.upsample not in ("nearest", "subpixel"):
      raise ValueError(f"VAEConfig.upsample={self.upsample!r} must be 'nearest' or 'subpixel'")
    if self.res_kernel_t not in (1, 3):
      raise ValueError(f"VAEConfig.res_kernel_t={self.res_kernel_t} must be 1 or 3")
    if self.upsample_kernel_t not in (2, 3):
      raise ValueError(f"VAEConfig.upsample_kernel_t={self.upsample_kernel_t} must be 2 or 3")
    if self.upsample_width not in ("level", "next"):
      raise ValueError(f"VAEConfig.upsample_width={self.upsample_width!r} must be 'level' or "
                       f"'next'")
    if self.norm not in ("rms", "none"):
      raise ValueError(f"VAEConfig.norm={self.norm!r} must be 'rms' or 'none'")
    if self.temporal_factor < 1 or self.temporal_factor & (self.temporal_factor - 1) or \
        self.temporal_factor > self.spatial_factor:
      raise ValueError(
          f"VAEConfig.temporal_factor={self.temporal_factor} must be a power of 2 no larger "
          f"than spatial_factor={self.spatial_factor} (time is halved at the deepest levels)")

  @classmethod
  def from_variant(cls, name: str, **overrides) -> "VAEConfig":
    if name not in VARIANTS:
      raise ValueError(f"VAE variant {name!r} is unknown; choose from {tuple(VARIANTS)}")
    base, mults, blocks, latent, tf, sf = VARIANTS[name]
    return cls(**{**dict(base_channels=base, channel_multipliers=mults, num_res_blocks=blocks,
                         latent_channels=latent, temporal_factor=tf, spatial_factor=sf),
                  **overrides})

  @property
  def time_downsamplings(self) -> int:
    return int(math.log2(self.temporal_factor))

  def downsamples_time(self, level: int) -> bool:
    """Whether the downsampling after encoder level `level` halves time (the deepest ones do)."""
    return level >= len(self.channel_multipliers) - 1 - self.time_downsamplings

  def latent_frames(self, num_frames: int) -> int:
    return 1 + (num_frames - 1) // self.temporal_factor

  def num_frames(self, latent_frames: int) -> int:
    return 1 + (latent_frames - 1) * self.temporal_factor

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple:
    return (self.latent_frames(num_frames), height // self.spatial_factor,
            width // self.spatial_factor, self.latent_channels)


def config_from(vae_cfg) -> VAEConfig:
  """A VAEConfig from the `vae` block of an experiment config: `variant` plus any non-None
  field of VAEConfig of the same name."""
  overrides = {f.name: vae_cfg[f.name] for f in dataclasses.fields(VAEConfig)
               if f.name in vae_cfg and vae_cfg[f.name] is not None}
  return VAEConfig.from_variant(vae_cfg.variant, **overrides)


def check_num_frames(num_frames: int, temporal_factor: int, what: str = "the clip") -> None:
  """Raises a ValueError naming the 1 + t*k rule and the nearest valid lengths."""
  t = temporal_factor
  if num_frames < 1:
    raise ValueError(f"{what} has {num_frames} frames; the causal VAE needs 1 + {t}k frames, "
                     f"at least 1")
  if (num_frames - 1) % t == 0:
    return
  lower = 1 + (num_frames - 1) // t * t
  upper = lower + t
  raise ValueError(
      f"{what} has {num_frames} frames, but the causal VAE needs 1 + {t}k frames (frame 0 is "
      f"coded alone, the rest {t}x compressed in time); the nearest valid lengths are {lower} "
      f"or {upper}. "
      f"Trim the clip, or encode with pad=True to repeat the last frame up to {upper}.")


def check_frame_size(height: int, width: int, spatial_factor: int) -> None:
  for name, size in (("height", height), ("width", width)):
    if size < 1 or size % spatial_factor:
      lower = size // spatial_factor * spatial_factor
      nearest = " or ".join(str(n) for n in (lower, lower + spatial_factor) if n > 0)
      raise ValueError(
          f"frame {name}={size} is not a multiple of the VAE's spatial factor {spatial_factor}; "
          f"crop or resize to {nearest}")


def pad_frames(x, temporal_factor: int):
  """Repeats the last frame until the clip has 1 + t*k frames. (B, T, H, W, C)."""
  extra = -(x.shape[1] - 1) % temporal_factor
  if extra == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[:, -1:], extra, axis=1)], axis=1)


def _param(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x, axes=FEATURE_AXES):
  return nn.with_logical_constraint(x, axes)


class ChannelRMSNorm(nn.Module):
  """RMSNorm over the channels of each voxel: causal, and blind to tiles and shards."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _param(nn.initializers.ones, ("conv_out",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (x32 * scale).astype(x.dtype)


def _norm(norm: str, name: str):
  """The feature norm named by VAEConfig.norm: a ChannelRMSNorm or the identity."""
  return ChannelRMSNorm(name=name) if norm == "rms" else (lambda x: x)


class CausalConv3d(nn.Module):
  """A 3D conv that pads time on the past side only; spatial padding is symmetric zeros.

  Without a cache the past is the first frame replicated (kernel_t - 1 times). With the
  `cache` collection mutable (streaming), it stores the frames the next chunk's first output
  window still needs, kernel_t - stride_t of them, and reads them back next chunk.
  """
  features: int
  kernel: tuple = (3, 3, 3)
  strides: tuple = (1, 1, 1)
  names: tuple = ("conv_in", "conv_out")      # logical names of (input, output) channels
  dtype: str = "float32"
  zero_init: bool = False                      # start the kernel at zero (VAEConfig.zero_init)

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = self.kernel
    st = self.strides[0]
    if self.has_variable("cache", "past"):
      x = jnp.concatenate([self.get_variable("cache", "past").astype(x.dtype), x], axis=1)
    elif kt > 1:
      x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
    if kt > st and self.is_mutable_collection("cache") and not self.is_initializing():
      consumed = ((x.shape[1] - kt) // st + 1) * st
      self.put_variable("cache", "past", x[:, consumed:])
    return _TemporalTapConv(self.features, self.kernel, self.strides, self.names,
                            jnp.dtype(self.dtype), self.zero_init, name="conv")(x)


class _TemporalTapConv(nn.Module):
  """A 3D conv (no temporal padding; spatial 'same' zeros) computed as one 2D conv per
  temporal tap, summed. Same parameters and result as a 3D conv, but XLA's CPU backend runs
  it 3-4x faster (forward and backward, measured at 16 channels), and on accelerators it is
  the same matmul work with the adds fused."""
  features: int
  kernel: tuple
  strides: tuple
  names: tuple
  dtype: jnp.dtype
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = self.kernel
    st, sh, sw = self.strides
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param("kernel", _param(init,
                                         (None, None, None) + tuple(self.names)),
                        (kt, kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", _param(nn.initializers.zeros, (self.names[1],)), (self.features,))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    batch, frames = x.shape[:2]
    out_frames = (frames - kt) // st + 1
    out = None
    for a in range(kt):
      taps = x[:, a:a + st * (out_frames - 1) + 1:st]          # the frames tap a reads
      y = jax.lax.conv_general_dilated(
          taps.reshape(batch * out_frames, *x.shape[2:]), kernel[a], (sh, sw),
          ((kh // 2, kh // 2), (kw // 2, kw // 2)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      out = y if out is None else out + y
    out = out.reshape(batch, out_frames, *out.shape[1:]) + bias.astype(self.dtype)
    return out


def _match_channels(x, features: int):
  """x with `features` channels: consecutive channels averaged in groups, or each repeated."""
  channels = x.shape[-1]
  if channels % features == 0:
    return x.reshape(*x.shape[:-1], features, channels // features).mean(-1)
  if features % channels == 0:
    return jnp.repeat(x, features // channels, axis=-1)
  raise ValueError(f"a shortcut cannot map {channels} channels to {features}: one must divide "
                   f"the other (VAEConfig.shortcuts)")


def _pool_shortcut(x, time: bool, features: int):
  """The downsampling shortcut: 2x2 average pool in space and, if `time`, over causal frame
  pairs (frame 0 alone, then (1, 2), (3, 4), ...). A chunk with an odd number of frames holds
  frame 0 (the first chunk or a whole clip: 1 + 2m frames), a later chunk an even number, so
  streaming needs no cache here."""
  b, t, h, w, c = x.shape
  if time:
    if t % 2:
      x = jnp.concatenate([x[:, :1], x], axis=1)
    x = x.reshape(b, x.shape[1] // 2, 2, h, w, c).mean(2)
  x = x.reshape(x.shape[0], x.shape[1], h // 2, 2, w // 2, 2, c).mean((3, 5))
  return _match_channels(x, features)


class ResBlock(nn.Module):
  features: int
  dtype: str = "float32"
  norm: str = "rms"
  kernel_t: int = 3
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = (self.kernel_t, 3, 3)
    h = CausalConv3d(self.features, kernel, dtype=self.dtype, name="conv_1")(
        nn.silu(_norm(self.norm, "norm_1")(x)))
    h = CausalConv3d(self.features, kernel, dtype=self.dtype, zero_init=self.zero_init,
                     name="conv_2")(nn.silu(_norm(self.norm, "norm_2")(h)))
    if x.shape[-1] != self.features:
      x = CausalConv3d(self.features, kernel=(1, 1, 1), dtype=self.dtype, name="skip")(x)
    return _constrain(x + h)


class Upsample(nn.Module):
  """2x in space and, if `time`, in time except frame 0 (1 + k -> 1 + 2k).

  "nearest": repeat, then a conv at the new size. "subpixel": a conv at the old size gives
  every input voxel its (2 frames x) 2 x 2 outputs' features, rearranged into place (depth to
  space; frame 0's first frame is dropped): the frames that share a latent get their own
  weights instead of having to tell identical repeats apart.
  """
  features: int
  time: bool
  dtype: str = "float32"
  shortcut: bool = False       # add the nearest-upsampled input (VAEConfig.shortcuts)
  mode: str = "nearest"
  kernel_t: int = 3            # temporal kernel of the sub-pixel conv

  @nn.compact
  def __call__(self, x):
    first_chunk = self.time and not self.has_variable("cache", "started")
    if self.time and self.is_mutable_collection("cache") and not self.is_initializing():
      self.put_variable("cache", "started", jnp.ones((), jnp.bool_))
    st = 2 if self.time else 1
    up = None                                      # the repeated input, built only if used
    if self.mode == "nearest" or self.shortcut:
      up = jnp.repeat(jnp.repeat(jnp.repeat(x, st, axis=1), 2, axis=2), 2, axis=3)
      up = up[:, 1:] if first_chunk else up        # frame 0 stands for itself alone
    if self.mode == "subpixel":
      h = CausalConv3d(self.features * st * 4, (self.kernel_t, 3, 3), dtype=self.dtype,
                       name="conv")(x)
      b, t, height, width, _ = h.shape
      h = h.reshape(b, t, height, width, st, 2, 2, self.features)
      h = h.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(
          b, t * st, height * 2, width * 2, self.features)
      h = h[:, 1:] if first_chunk else h
    else:
      h = CausalConv3d(self.features, dtype=self.dtype, name="conv")(up)
    if self.shortcut:
      h = h + _match_channels(up, self.features)
    return _constrain(h)


class Encoder(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
    h = CausalConv3d(widths[0], names=(None, "conv_out"), dtype=cfg.dtype, name="conv_in")(x)
    h = _constrain(h)
    for level, width in enumerate(widths):
      for j in range(cfg.num_res_blocks):
        h = ResBlock(width, cfg.dtype, cfg.norm, cfg.res_kernel_t, cfg.zero_init,
                     name=f"level_{level}_block_{j}")(h)
      if level < len(widths) - 1:
        time = cfg.downsamples_time(level)
        down = CausalConv3d(width, strides=(2 if time else 1, 2, 2), dtype=cfg.dtype,
                            name=f"level_{level}_down")(h)
        h = _constrain(down + _pool_shortcut(h, time, width) if cfg.shortcuts else down)
    for j in range(2):
      h = ResBlock(widths[-1], cfg.dtype, cfg.norm, cfg.res_kernel_t, cfg.zero_init,
                   name=f"mid_block_{j}")(h)
    moments = CausalConv3d(2 * cfg.latent_channels, names=("conv_in", None), dtype=cfg.dtype,
                           name="conv_out")(nn.silu(_norm(cfg.norm, "norm_out")(h)))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    if cfg.shortcuts:
      mean = mean + _match_channels(h, cfg.latent_channels).astype(jnp.float32)
    return _constrain(mean, PIXEL_AXES), _constrain(jnp.clip(logvar, *LOGVAR_RANGE), PIXEL_AXES)


class Decoder(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
    h = CausalConv3d(widths[-1], names=(None, "conv_out"), dtype=cfg.dtype, name="conv_in")(z)
    if cfg.shortcuts:
      h = h + _match_channels(z, widths[-1]).astype(h.dtype)
    h = _constrain(h)
    for j in range(2):
      h = ResBlock(widths[-1], cfg.dtype, cfg.norm, cfg.res_kernel_t, cfg.zero_init,
                   name=f"mid_block_{j}")(h)
    for level in reversed(range(len(widths))):
      for j in range(cfg.num_res_blocks + 1):
        h = ResBlock(widths[level], cfg.dtype, cfg.norm, cfg.res_kernel_t, cfg.zero_init,
                     name=f"level_{level}_block_{j}")(h)
      if level > 0:      # mirrors the encoder's downsampling after level - 1
        width = widths[level - 1] if cfg.upsample_width == "next" else widths[level]
        h = Upsample(width, cfg.downsamples_time(level - 1), cfg.dtype, cfg.shortcuts,
                     cfg.upsample, cfg.upsample_kernel_t, name=f"level_{level}_up")(h)
    h = nn.silu(_norm(cfg.norm, "norm_out")(h))
    x = CausalConv3d(cfg.in_channels, names=("conv_in", None), dtype=cfg.dtype, name="conv_out")(h)
    return _constrain(x.astype(jnp.float32), PIXEL_AXES)


class VAE(nn.Module):
  """encode: (B, 1 + 4k, H, W, 3) -> mean, logvar (B, 1 + k, H/s, W/s, latent_channels);
  decode: the inverse. `__call__` (used by init and training) does both."""
  cfg: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def __call__(self, x, rng: Optional[jax.Array] = None):
    """Reconstruction, mean, logvar; decodes a posterior sample when given `rng` (and
    cfg.sample_posterior), else the posterior mean."""
    mean, logvar = self.encode(x)
    sample = rng is not None and self.cfg.sample_posterior
    z = sample_latent(rng, mean, logvar) if sample else mean
    return self.decode(z), mean, logvar

  def encode(self, x, pad: bool = False):
    """A whole clip of 1 + t*k frames (pad=True repeats the last frame up to that)."""
    chex.assert_rank(x, 5)
    if pad:
      x = pad_frames(x, self.cfg.temporal_factor)
    check_num_frames(x.shape[1], self.cfg.temporal_factor)
    return self.encode_frames(x)

  def decode(self, z):
    """Latents (B, 1 + k, h, w, C) -> pixels (B, 1 + t*k, h*s, w*s, 3)."""
    chex.assert_rank(z, 5)
    return self.decode_frames(z)

  def encode_frames(self, x):
    """No length check: a streaming chunk (1 + 4m frames first, 4m after) or a whole clip."""
    check_frame_size(x.shape[2], x.shape[3], self.cfg.spatial_factor)
    return self.encoder(x)

  def decode_frames(self, z):
    return self.decoder(z)


def sample_latent(rng, mean, logvar):
  """The reparameterised posterior sample z = mean + sigma * eps."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


# ----------------------------------------------------------------------------- losses

def kl_loss(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element."""
  return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def l1_loss(reconstruction, target):
  return jnp.mean(jnp.abs(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))


def l2_loss(reconstruction, target):
  return jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))


def hinge_d_loss(real_logits, fake_logits):
  """The discriminator's hinge loss: push real logits above 1 and fake ones below -1."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))


def hinge_g_loss(fake_logits):
  """The generator's (decoder's) adversarial loss against a hinge discriminator."""
  return -jnp.mean(fake_logits)


class Discriminator(nn.Module):
  """A 3D patch discriminator: strided 3D convs -> one logit per spacetime patch.

  (B, T, H, W, 3) -> (B, T', H / 2**layers, W / 2**layers). Not causal (it only judges
  training reconstructions); the first conv keeps time, the later ones halve it ('SAME'
  padding, so a 1-frame image works too).
  """
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = x.astype(jnp.dtype(cfg.dtype))
    for i in range(cfg.disc_layers):
      names = (None if i == 0 else "conv_in", "conv_out")
      h = nn.Conv(cfg.disc_channels * 2 ** i, (3, 4, 4), (1 if i == 0 else 2, 2, 2),
                  padding="SAME", dtype=jnp.dtype(cfg.dtype), name=f"conv_{i}",
                  kernel_init=_param(nn.initializers.lecun_normal(), (None, None, None) + names),
                  bias_init=_param(nn.initializers.zeros, ("conv_out",)))(h)
      if i > 0:
        h = ChannelRMSNorm(name=f"norm_{i}")(h)
      h = _constrain(nn.leaky_relu(h, 0.2))
    logits = nn.Conv(1, (3, 3, 3), padding="SAME", name="logits", dtype=jnp.dtype(cfg.dtype),
                     kernel_init=_param(nn.initializers.lecun_normal(),
                                        (None, None, None, "conv_in", None)),
                     bias_init=_param(nn.initializers.zeros, (None,)))(h)
    return logits[..., 0].astype(jnp.float32)


# ----------------------------------------------------------------------------- streaming

@functools.partial(jax.jit, static_argnums=0)
def _encode_chunk(model, params, x, cache):
  variables = params if cache is None else {**params, "cache": cache}
  moments, updated = model.apply(variables, x, method=VAE.encode_frames, mutable=["cache"])
  return moments, updated["cache"]


@functools.partial(jax.jit, static_argnums=0)
def _decode_chunk(model, params, z, cache):
  variables = params if cache is None else {**params, "cache": cache}
  x, updated = model.apply(variables, z, method=VAE.decode_frames, mutable=["cache"])
  return x, updated["cache"]


def encode_chunk(model: VAE, params, x, cache=None):
  """One temporal chunk: ((mean, logvar), cache). Start with cache=None and 1 + 4m frames;
  continue with the returned cache and 4m frames. Jitted (one compile per chunk shape)."""
  t = model.cfg.temporal_factor
  if cache is None:
    check_num_frames(x.shape[1], t, "the first chunk")
  elif x.shape[1] < t or x.shape[1] % t:
    raise ValueError(f"a later chunk has {x.shape[1]} frames; after the first chunk (1 + {t}m "
                     f"frames) every chunk needs a positive multiple of {t} frames")
  return _encode_chunk(model, params, jnp.asarray(x), cache)


def decode_chunk(model: VAE, params, z, cache=None):
  """One chunk of latent frames: (pixels, cache). The first chunk's 1 + m latents give
  1 + 4m frames, a later chunk's m latents give 4m frames."""
  if z.shape[1] < 1:
    raise ValueError("a chunk needs at least one latent frame")
  return _decode_chunk(model, params, jnp.asarray(z), cache)


def _chunk_bounds(total: int, first: int, rest: int):
  bounds, start = [(0, min(first, total))], min(first, total)
  while start < total:
    bounds.append((start, min(start + rest, total)))
    start += rest
  return bounds


def iter_encode(model: VAE, params, x, chunk_frames: int):
  """Yields (mean, logvar) chunk by chunk: the first from 1 + chunk_frames frames, then
  chunk_frames at a time (the last chunk may be shorter). `x` may be a host numpy array."""
  t = model.cfg.temporal_factor
  check_num_frames(x.shape[1], t)
  if chunk_frames < t or chunk_frames % t:
    raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of {t}")
  cache = None
  for a, b in _chunk_bounds(x.shape[1], 1 + chunk_frames, chunk_frames):
    moments, cache = encode_chunk(model, params, x[:, a:b], cache)
    yield moments


def iter_decode(model: VAE, params, z, chunk_latent_frames: int):
  """Yields pixel chunks: 1 + 4m frames first, then 4m (m = chunk_latent_frames)."""
  if chunk_latent_frames < 1:
    raise ValueError(f"chunk_latent_frames={chunk_latent_frames} must be >= 1")
  cache = None
  for a, b in _chunk_bounds(z.shape[1], 1 + chunk_latent_frames, chunk_latent_frames):
    frames, cache = decode_chunk(model, params, z[:, a:b], cache)
    yield frames


def stream_encode(model: VAE, params, x, chunk_frames: int):
  """encode() of a clip of any length in chunks; equal to encoding it whole."""
  means, logvars = zip(*iter_encode(model, params, x, chunk_frames))
  return jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1)


def stream_decode(model: VAE, params, z, chunk_latent_frames: int):
  """decode() of any number of latent frames in chunks; equal to decoding them whole."""
  return jnp.concatenate(list(iter_decode(model, params, z, chunk_latent_frames)), axis=1)


# ----------------------------------------------------------------------------- spatial tiles

@functools.partial(jax.jit, static_argnums=0)
def _decode(model, params, z):
  return model.apply(params, z, method=VAE.decode)


def _tile_starts(size: int, tile: int, overlap: int):
  if size <= tile:
    return [0]
  return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _blend_ramp(length: int, overlap: int, fade_in: bool, fade_out: bool):
  """Tile weights along one axis. On an edge shared with a neighbour, the outer quarter of
  the overlap (where the cut-off receptive field hurts most) is dropped and the weight ramps
  linearly over the middle half, so two neighbours' weights sum to 1 across the overlap."""
  w = np.ones(length, np.float32)
  if overlap > 0:
    margin = overlap // 4
    up = (np.arange(overlap, dtype=np.float32) + 0.5 - margin) / (overlap - 2 * margin)
    up = np.clip(up, 1e-3, 1.0)           # never 0, so every pixel has some weight
    if fade_in:
      w[:overlap] = np.minimum(w[:overlap], up)
    if fade_out:
      w[-overlap:] = np.minimum(w[-overlap:], up[::-1])
  return w


def tiled_decode(model: VAE, params, z, tile, overlap, chunk_latent_frames: Optional[int] = None):
  """decode() of large frames in overlapping spatial tiles, linearly blended.

  tile, overlap: latent pixels (an int, or (height, width)). Each tile is decoded alone (and
  streamed in time when chunk_latent_frames is given), so peak memory is one tile's. A tile
  differs from the whole decode only near its edges, where its receptive field was cut off;
  the blend drops the outer quarter of each overlap and ramps linearly over the middle half
  (see _blend_ramp), so more overlap gives smaller seams.
  """
  th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
  oh, ow = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
  if not (0 <= oh < th and 0 <= ow < tw):
    raise ValueError(f"overlap={overlap} must be >= 0 and smaller than tile={tile}")
  s, t = model.cfg.spatial_factor, model.cfg.temporal_factor
  batch, frames, h, w, _ = z.shape
  th, tw = min(th, h), min(tw, w)
  out = np.zeros((batch, 1 + (frames - 1) * t, h * s, w * s, model.cfg.in_channels), np.float32)
  total = np.zeros((h * s, w * s, 1), np.float32)
  for y in _tile_starts(h, th, oh):
    for x in _tile_starts(w, tw, ow):
      piece = z[:, :, y:y + th, x:x + tw]
      if chunk_latent_frames is None:
        pixels = _decode(model, params, jnp.asarray(piece))
      else:
        pixels = stream_decode(model, params, piece, chunk_latent_frames)
      weight = (_blend_ramp(th * s, oh * s, y > 0, y + th < h)[:, None, None] *
                _blend_ramp(tw * s, ow * s, x > 0, x + tw < w)[None, :, None])
      out[:, :, y * s:(y + th) * s, x * s:(x + tw) * s] += np.asarray(pixels) * weight
      total[y * s:(y + th) * s, x * s:(x + tw) * s] += weight
  return jnp.asarray(out / total)
