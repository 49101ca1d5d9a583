"""Spacetime patches: latent grids (T, H, W, C) <-> token sequences with (t, h, w) positions.

A patch covers (pt, ph, pw) latent cells; its token holds the cells flattened in
(pt, ph, pw, C) order. Tokens are laid out frame-major (t, then h, then w), so the tokens of
one latent frame are contiguous, which per-frame noise and block-causal attention rely on.
Positions are in patch units: token (t, h, w) covers latent frames [t*pt, (t+1)*pt).
Works on numpy and jax arrays alike (the loader patchifies on the host).
"""
from typing import Sequence, Tuple

import numpy as np


def grid_shape(latent_shape: Sequence[int], patch_size: Sequence[int]) -> Tuple[int, int, int]:
  """Number of patches along (t, h, w) for a latent of shape (T, H, W, C)."""
  t, h, w = latent_shape[:3]
  pt, ph, pw = patch_size
  if t % pt or h % ph or w % pw:
    raise ValueError(f"latent of shape {tuple(latent_shape)} does not divide into patches of "
                     f"{tuple(patch_size)}: each of T, H, W must be a multiple of its patch size")
  return t // pt, h // ph, w // pw


def patchify(latent, patch_size: Sequence[int]):
  """(T, H, W, C) -> tokens (gt*gh*gw, pt*ph*pw*C); also accepts a leading batch dim."""
  batched = latent.ndim == 5
  x = latent if batched else latent[None]
  b, (gt, gh, gw), c = x.shape[0], grid_shape(x.shape[1:], patch_size), x.shape[-1]
  pt, ph, pw = patch_size
  x = x.reshape(b, gt, pt, gh, ph, gw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  x = x.reshape(b, gt * gh * gw, pt * ph * pw * c)
  return x if batched else x[0]


def unpatchify(tokens, grid: Sequence[int], patch_size: Sequence[int], channels: int):
  """Inverse of `patchify`: tokens (L, P) -> (T, H, W, C); accepts a leading batch dim."""
  batched = tokens.ndim == 3
  x = tokens if batched else tokens[None]
  gt, gh, gw = grid
  pt, ph, pw = patch_size
  x = x.reshape(x.shape[0], gt, gh, gw, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  x = x.reshape(x.shape[0], gt * pt, gh * ph, gw * pw, channels)
  return x if batched else x[0]


def positions(grid: Sequence[int]) -> np.ndarray:
  """Per-token (t, h, w) patch coordinates, int32 (gt*gh*gw, 3), in patchify's order."""
  gt, gh, gw = grid
  t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
  return np.stack([t, h, w], axis=-1).reshape(-1, 3).astype(np.int32)


def token_dim(patch_size: Sequence[int], channels: int) -> int:
  return int(np.prod(patch_size)) * channels
