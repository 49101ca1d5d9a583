"""Layers the DiT and its text encoder share: projections as einsums with logical axis
names, QK-norm, and rotary position embeddings."""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Projections from the model width into heads: fan-in is the width (axis 0), not the head
# count that lecun_normal's default (axis -2) would take for a (D, N, H) kernel.
INTO_HEADS = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
OUT_OF_HEADS = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


def param(init, names):
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


class RMSNorm(nn.Module):
  """Normalises the last dim; used on queries and keys (QK-norm keeps logits bounded)."""
  names: tuple = ("kv",)

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", param(nn.initializers.ones, self.names), (x.shape[-1],))
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
    kernel = self.param("kernel", param(self.init, self.names), self.shape)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
