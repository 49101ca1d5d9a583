"""The diffusion transformer over spacetime-patch tokens.

Inputs are token sequences, not grids, so one compiled model serves clips of every size:
  tokens      (B, L, P)  noisy latent patches
  positions   (B, L, 3)  per-token (t, h, w) patch coordinates, read by the 3D RoPE
  segment_ids (B, L)     which clip of the packed row a token belongs to (0 = padding)
  noise_level (B, L)     per-token t in [0, 1]; per-clip or per-frame t is a broadcast of it
Output: the predicted velocity (B, L, P).

Conditioning is adaLN-Zero in its "single" form (PixArt-alpha): the timestep embedding is
projected to the six modulation vectors once per token, and each block adds a learned table
of its own. Per-block projections of a per-token condition would cost 6 D^2 multiply-adds
per token per layer (a quarter of the block); the shared projection costs that once. The
shared projection and the output layer start at zero, so every block is the identity at
initialisation, as adaLN-Zero intends.
"""
import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from worldsim.models import attention as attention_lib

# name: (width, depth, heads); the DiT paper's S/B/L/XL, and a CPU-sized tiny.
VARIANTS = {
    "tiny": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  token_dim: int            # P = pt * ph * pw * latent channels
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "xla"
  causal: bool = False      # block-causal by latent frame: a frame sees itself and the past
  dtype: str = "float32"
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def rope_dims(self):
    """Head dims given to (t, h, w): h and w get equal even shares, t the rest."""
    spatial = (self.head_dim // 3) // 2 * 2
    return (self.head_dim - 2 * spatial, spatial, spatial)


def config_from(model_cfg, token_dim: int) -> DiTConfig:
  """A DiTConfig from the `model` block of an experiment config (variant plus overrides)."""
  width, depth, heads = VARIANTS[model_cfg.variant]
  return DiTConfig(
      token_dim=token_dim,
      width=model_cfg.width or width,
      depth=model_cfg.depth or depth,
      num_heads=model_cfg.num_heads or heads,
      mlp_ratio=model_cfg.mlp_ratio,
      attention=model_cfg.attention,
      causal=model_cfg.causal,
      dtype=model_cfg.dtype)


def _param(init, names):
  return nn.with_logical_partitioning(init, names)


def rope_3d(x, positions, dims, theta):
  """Rotary embedding over (t, h, w): each axis rotates its own slice of the head dim.

  x (B, L, N, H), positions (B, L, 3). Pairs are (i, i + d/2) within each slice.
  """
  out, start = [], 0
  for axis, d in enumerate(dims):
    part = x[..., start:start + d]
    start += d
    if d == 0:
      continue
    half = d // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., axis, None].astype(jnp.float32) * freqs          # (B, L, half)
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]       # (B, L, 1, half)
    a, b = part[..., :half].astype(jnp.float32), part[..., half:].astype(jnp.float32)
    out += [(a * cos - b * sin).astype(x.dtype), (a * sin + b * cos).astype(x.dtype)]
  return jnp.concatenate(out, axis=-1)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT). (...,) -> (..., dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class RMSNorm(nn.Module):
  """Normalises the last dim; used on queries and keys (QK-norm keeps logits bounded)."""
  names: tuple = ("kv",)

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _param(nn.initializers.ones, self.names), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (x32 * scale).astype(x.dtype)


class Einsum(nn.Module):
  """A projection written as an einsum, its kernel created with logical axis names."""
  equation: str
  shape: tuple
  names: tuple
  init: Callable = nn.initializers.lecun_normal()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _param(self.init, self.names), self.shape)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


def _layer_norm(x):
  """LayerNorm without affine parameters: adaLN supplies scale and shift."""
  return nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=x.dtype)(x)


def _modulate(x, shift, scale):
  return x * (1 + scale) + shift


class Block(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, modulation, positions, segment_ids):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    table = self.param("modulation_table", _param(nn.initializers.zeros, (None, "embed")),
                       (6, cfg.width))
    mod = modulation + table.astype(modulation.dtype)                      # (B, L, 6, D)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod.astype(dtype), 6, axis=2)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
        m[:, :, 0] for m in (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m))

    h = _modulate(_layer_norm(x), shift_a, scale_a)
    q, k, v = (Einsum("bld,dnh->blnh", (cfg.width, cfg.num_heads, cfg.head_dim),
                      ("embed", "heads", "kv"), dtype=cfg.dtype, name=n)(h)
               for n in ("query", "key", "value"))
    q, k = RMSNorm(name="query_norm")(q), RMSNorm(name="key_norm")(k)
    q = rope_3d(q, positions, cfg.rope_dims, cfg.rope_theta)
    k = rope_3d(k, positions, cfg.rope_dims, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    # positions[..., 0] is each token's latent frame within its own clip.
    o = attention_lib.attention(q, k, v, segment_ids, implementation=cfg.attention,
                                q_frames=positions[..., 0], causal=cfg.causal)
    o = Einsum("blnh,nhd->bld", (cfg.num_heads, cfg.head_dim, cfg.width),
               ("heads", "kv", "embed"), dtype=cfg.dtype, name="out",
               init=nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))(o)
    x = x + gate_a * o
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    h = _modulate(_layer_norm(x), shift_m, scale_m)
    h = nn.Dense(cfg.mlp_dim, dtype=dtype, name="mlp_in",
                 kernel_init=_param(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=_param(nn.initializers.zeros, ("mlp",)))(h)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dense(cfg.width, dtype=dtype, name="mlp_out",
                 kernel_init=_param(nn.initializers.lecun_normal(), ("mlp", "embed")),
                 bias_init=_param(nn.initializers.zeros, ("embed",)))(h)
    x = x + gate_m * h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DiT(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, tokens, positions, segment_ids, noise_level):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    d = cfg.width
    x = nn.Dense(d, dtype=dtype, name="patch_embed",
                 kernel_init=_param(nn.initializers.lecun_normal(), ("patch", "embed")),
                 bias_init=_param(nn.initializers.zeros, ("embed",)))(tokens.astype(dtype))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # Timestep -> condition c (B, L, D) -> shared modulation (B, L, 6, D).
    c = timestep_embedding(noise_level, 256)
    c = nn.Dense(d, name="time_in", kernel_init=_param(nn.initializers.normal(0.02), (None, "embed")),
                 bias_init=_param(nn.initializers.zeros, ("embed",)))(c)
    c = nn.Dense(d, name="time_out", kernel_init=_param(nn.initializers.normal(0.02), ("mlp", "embed")),
                 bias_init=_param(nn.initializers.zeros, ("embed",)))(nn.silu(c))
    c = nn.with_logical_constraint(c, ("batch", "length", "embed"))
    modulation = Einsum("bld,dke->blke", (d, 6, d), ("embed", None, "mlp"), name="modulation",
                        init=nn.initializers.zeros)(nn.silu(c))
    modulation = nn.with_logical_constraint(modulation, ("batch", "length", None, "embed"))

    for i in range(cfg.depth):
      x = Block(cfg, name=f"block_{i}")(x, modulation, positions, segment_ids)

    final_table = self.param("final_table", _param(nn.initializers.zeros, (None, "embed")), (2, d))
    final = (c[:, :, None].astype(jnp.float32) + final_table).astype(dtype)  # (B, L, 2, D)
    shift, scale = final[:, :, 0], final[:, :, 1]
    x = _modulate(_layer_norm(x), shift, scale)
    out = nn.Dense(cfg.token_dim, name="head", dtype=dtype,
                   kernel_init=_param(nn.initializers.zeros, ("embed", "patch")),
                   bias_init=_param(nn.initializers.zeros, ("patch",)))(x)
    return out.astype(jnp.float32)
