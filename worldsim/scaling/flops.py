"""Analytic FLOPs of the diffusion transformer, and a matmul peak measured in-process.

Counts multiply-adds of matrix products as 2 FLOPs and ignores elementwise work (norms,
activations, softmax), the usual MFU convention; the action embedder and reward heads count
when the config has them. A train step costs three forwards (the backward pass is two:
gradients for activations and for weights). Attention is counted over
the (query, key) pairs its mask lets through: within a clip of a packed row, within frames
<= the query's for block-causal models, and, for captioned models, between a clip's video
tokens and its own caption's tokens (cross-attention) and within a caption (text encoder).
"""
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from worldsim.models.dit import HEAD_OUTPUTS, DiTConfig

TIME_FREQ_DIM = 256   # the sinusoidal timestep embedding width in dit.py


def _linear_flops(cfg: DiTConfig, seq_len: int, text_len: int, text_embed_dim: int) -> float:
  """The matmuls with weights of one row: every token pays them, padding included."""
  d, l, p, m, lt = cfg.width, seq_len, cfg.token_dim, cfg.mlp_dim, text_len
  embed = 2 * l * p * d + 2 * l * (TIME_FREQ_DIM * d + d * d) + 2 * l * d * 6 * d
  projections = 2 * l * d * 3 * d + 2 * l * d * d         # q, k, v and the output projection
  mlp = 2 * 2 * l * d * m
  head = 2 * l * d * p
  if cfg.action_dim:
    # ActionEmbedder: each token's actions and known flag -> width -> width.
    embed += 2 * l * (cfg.action_dim + 1) * d + 2 * l * d * d
  if cfg.reward_heads:
    head += 2 * l * d * d + 2 * l * d * len(HEAD_OUTPUTS)     # RewardHeads: hidden, out
  total = embed + cfg.depth * (projections + mlp) + head
  if cfg.text != "none":
    # Cross-attention: video queries and output, caption keys and values (in every block).
    total += cfg.depth * (2 * l * d * 2 * d + 2 * lt * d * 2 * d)
  if cfg.text == "bytes":
    total += cfg.text_depth * (2 * lt * d * 4 * d + 2 * 2 * lt * d * m)
  elif cfg.text == "embeddings":
    if text_embed_dim <= 0:
      raise ValueError("config.model.text='embeddings' needs text_embed_dim, the width E of "
                       "the precomputed caption embeddings")
    total += 2 * lt * text_embed_dim * d
  return float(total)


def _attention_flops(cfg: DiTConfig, pairs: int, text_pairs: int, cross_pairs: int) -> float:
  """Logits and weighted values of the attended (query, key) pairs: video self-attention and
  cross-attention in every block, caption self-attention in every TextEncoder layer."""
  per_pair = 2 * 2 * cfg.width
  total = cfg.depth * pairs
  if cfg.text != "none":
    total += cfg.depth * cross_pairs
  if cfg.text == "bytes":
    total += cfg.text_depth * text_pairs
  return float(per_pair * total)


def dit_forward_flops(cfg: DiTConfig, seq_len: int, attended_pairs: Optional[int] = None, *,
                      text_len: int = 0, text_pairs: Optional[int] = None,
                      cross_pairs: Optional[int] = None, text_embed_dim: int = 0) -> float:
  """Forward FLOPs of one row of `seq_len` video tokens and `text_len` caption tokens.

  attended_pairs: the video (query, key) pairs whose attention is useful work; the default is
  the whole row (seq_len^2, dense attention over one clip).
  text_pairs: caption pairs of the TextEncoder (cfg.text='bytes'), default text_len^2.
  cross_pairs: (video, caption) pairs of cross-attention, default seq_len * text_len.
  text_embed_dim: the width E of precomputed embeddings (cfg.text='embeddings').
  Text arguments count only when cfg.text is not 'none'.
  """
  pairs = seq_len * seq_len if attended_pairs is None else attended_pairs
  text_pairs = text_len * text_len if text_pairs is None else text_pairs
  cross_pairs = seq_len * text_len if cross_pairs is None else cross_pairs
  return (_linear_flops(cfg, seq_len, text_len, text_embed_dim)
          + _attention_flops(cfg, pairs, text_pairs, cross_pairs))


def dit_train_flops(cfg: DiTConfig, seq_len: int, batch_size: int, *, text_len: int = 0,
                    text_embed_dim: int = 0) -> float:
  """Train FLOPs of a batch of rows, each one clip with one caption (dense attention)."""
  return 3.0 * batch_size * dit_forward_flops(cfg, seq_len, text_len=text_len,
                                              text_embed_dim=text_embed_dim)


def _row_pairs(segment_ids: np.ndarray, frames: Optional[np.ndarray]) -> int:
  real = segment_ids > 0
  if not real.any():
    return 0
  ids = segment_ids[real]
  if frames is None:
    return int(np.sum(np.bincount(ids).astype(np.int64) ** 2))
  # tokens[s, f]: tokens of clip s at frame f; a token at frame f sees its clip's frames <= f.
  tokens = np.zeros((ids.max() + 1, frames[real].max() + 1), np.int64)
  np.add.at(tokens, (ids, frames[real]), 1)
  return int(np.sum(tokens * np.cumsum(tokens, axis=1)))


def attended_pairs(segment_ids: np.ndarray, frames: Optional[np.ndarray] = None) -> int:
  """The (query, key) pairs of a packed batch (B, L) that attention lets through: within each
  clip (segment > 0), and with frames (B, L), each token's latent frame in its clip, only keys
  at frames <= the query's (block-causal)."""
  segment_ids = np.asarray(segment_ids)
  rows = [None] * len(segment_ids) if frames is None else np.asarray(frames)
  return sum(_row_pairs(ids, f) for ids, f in zip(segment_ids, rows))


def cross_attended_pairs(segment_ids: np.ndarray, text_segment_ids: np.ndarray) -> int:
  """(video token, caption token) pairs of a packed batch: each clip's video tokens (B, L)
  times its caption tokens (B, Lt), matched by segment id (> 0)."""
  total = 0
  for video, text in zip(np.asarray(segment_ids), np.asarray(text_segment_ids)):
    clips = int(max(video.max(initial=0), text.max(initial=0))) + 1
    counts = [np.bincount(ids[ids > 0], minlength=clips).astype(np.int64) for ids in (video, text)]
    total += int(np.sum(counts[0] * counts[1]))
  return total


def packed_train_flops(cfg: DiTConfig, segment_ids: np.ndarray,
                       text_segment_ids: Optional[np.ndarray] = None,
                       frames: Optional[np.ndarray] = None, text_embed_dim: int = 0) -> float:
  """Train FLOPs of a packed batch (B, L), attention counted only where the mask allows it.

  A packed row's cross-clip and padding pairs are masked out, so they are no model work,
  whatever the attention implementation spends on them; nor are a block-causal model's
  (cfg.causal) pairs whose key is in a later frame than the query.
    text_segment_ids  (B, Lt): the captions' segment ids, needed when cfg.text is not 'none'
    frames            (B, L): each token's latent frame (positions[..., 0]); without it a
                      block-causal model is counted as bidirectional (an overcount)
    text_embed_dim    E of precomputed caption embeddings (cfg.text='embeddings')
  """
  rows, seq_len = np.shape(segment_ids)
  text_len, text_pairs, cross_pairs = 0, 0, 0
  if cfg.text != "none":
    if text_segment_ids is None:
      raise ValueError(f"config.model.text={cfg.text!r}: packed_train_flops needs the batch's "
                       f"text_segment_ids")
    text_len = np.shape(text_segment_ids)[1]
    text_pairs = attended_pairs(text_segment_ids)
    cross_pairs = cross_attended_pairs(segment_ids, text_segment_ids)
  pairs = attended_pairs(segment_ids, frames if cfg.causal else None)
  return 3.0 * (rows * _linear_flops(cfg, seq_len, text_len, text_embed_dim)
                + _attention_flops(cfg, pairs, text_pairs, cross_pairs))


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
