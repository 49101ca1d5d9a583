"""Analytic FLOPs of the diffusion transformer, and a matmul peak measured in-process.

Counts multiply-adds of matrix products as 2 FLOPs and ignores elementwise work (norms,
activations, softmax), the usual MFU convention. A train step costs three forwards (the
backward pass is two: gradients for activations and for weights).
"""
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from worldsim.models.dit import DiTConfig

TIME_FREQ_DIM = 256   # the sinusoidal timestep embedding width in dit.py


def dit_forward_flops(cfg: DiTConfig, seq_len: int, attended_pairs: Optional[int] = None) -> float:
  """Forward FLOPs of one row of `seq_len` tokens.

  attended_pairs: the (query, key) pairs whose attention is useful work; the default is the
  whole row (seq_len^2, dense attention over one clip).
  """
  d, l, p, m = cfg.width, seq_len, cfg.token_dim, cfg.mlp_dim
  pairs = l * l if attended_pairs is None else attended_pairs
  embed = 2 * l * p * d + 2 * l * (TIME_FREQ_DIM * d + d * d) + 2 * l * d * 6 * d
  projections = 2 * l * d * 3 * d + 2 * l * d * d         # q, k, v and the output projection
  mlp = 2 * 2 * l * d * m
  attention = 2 * 2 * pairs * d                            # logits and weighted values
  head = 2 * l * d * p
  return float(embed + cfg.depth * (projections + mlp + attention) + head)


def dit_train_flops(cfg: DiTConfig, seq_len: int, batch_size: int) -> float:
  return 3.0 * batch_size * dit_forward_flops(cfg, seq_len)


def packed_train_flops(cfg: DiTConfig, segment_ids: np.ndarray) -> float:
  """Train FLOPs of a packed batch (B, L), attention counted only within each clip.

  A packed row's cross-clip and padding pairs are masked out, so they are no model work,
  whatever the attention implementation spends on them.
  """
  rows, seq_len = segment_ids.shape
  pairs = 0
  for row in segment_ids:
    counts = np.bincount(row[row > 0])
    pairs += int(np.sum(counts.astype(np.int64) ** 2))
  return 3.0 * (rows * dit_forward_flops(cfg, seq_len, attended_pairs=0) +
                cfg.depth * 2 * 2 * pairs * cfg.width)


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of an (n, n) @ (n, n) matmul on the default device: the peak MFU is measured against."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / float(np.median(times))
