"""Every attention implementation against the dense `xla` reference (float32)."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from worldsim.models import attention as attention_lib

HEADS, HEAD_DIM = 2, 8
BLOCKS = dict(block_q=32, block_kv=48)  # lengths below divide neither


def packed_ids(length, clip_lengths, tokens_per_frame):
  """Segment ids (1, 2, ... per clip, 0 after them) and per-clip frame indices, (length,)."""
  segments, frames = np.zeros(length, np.int32), np.zeros(length, np.int32)
  start = 0
  for segment, clip_length in enumerate(clip_lengths, start=1):
    segments[start:start + clip_length] = segment
    frames[start:start + clip_length] = np.arange(clip_length) // tokens_per_frame
    start += clip_length
  return segments, frames


def batch_ids(length, rows, tokens_per_frame=6):
  """(B, length) segment ids and frames; `rows` lists the clip lengths of each row."""
  ids = [packed_ids(length, clips, tokens_per_frame) for clips in rows]
  return tuple(jnp.asarray(np.stack(x)) for x in zip(*ids))


def qkv(batch, lq, lk, heads=HEADS, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, lq, heads, HEAD_DIM)),
          jax.random.normal(kk, (batch, lk, heads, HEAD_DIM)),
          jax.random.normal(kv, (batch, lk, heads, HEAD_DIM)))


def output_and_grads(attend, q, k, v):
  """attend(q, k, v) and the gradients of a fixed random projection of it w.r.t. q, k, v."""
  d_out = jax.random.normal(jax.random.key(1), q.shape)

  @jax.jit  # one compilation instead of one per primitive
  def run(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out)

  return run(q, k, v)


def assert_matches_reference(attend_with, implementation, q, k, v):
  out, grads = output_and_grads(functools.partial(attend_with, implementation), q, k, v)
  ref_out, ref_grads = output_and_grads(functools.partial(attend_with, "xla"), q, k, v)
  chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  chex.assert_tree_all_finite((out, grads))
  return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("implementation", ["chunked", "cudnn", "splash"])
def test_self_attention_matches_reference(implementation, causal):
  # Row 0: two clips and padding; row 1: one clip. Frames (6 tokens) straddle the blocks.
  segment_ids, frames = batch_ids(100, [(37, 45), (100,)])

  def attend(impl, q, k, v):
    return attention_lib.attention(q, k, v, segment_ids, implementation=impl, q_frames=frames,
                                   causal=causal, **BLOCKS)

  assert_matches_reference(attend, implementation, *qkv(2, 100, 100))


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_reference(causal):
  """Queries over a different key sequence; clip 3 of the queries has no key, so gets 0."""
  q_segment_ids, q_frames = batch_ids(70, [(20, 30, 15)])
  kv_segment_ids, kv_frames = batch_ids(100, [(50, 40)])

  def attend(impl, q, k, v):
    return attention_lib.attention(
        q, k, v, q_segment_ids, implementation=impl, kv_segment_ids=kv_segment_ids,
        q_frames=q_frames, kv_frames=kv_frames, causal=causal, **BLOCKS)

  out = assert_matches_reference(attend, "chunked", *qkv(1, 70, 100))
  np.testing.assert_array_equal(out[q_segment_ids == 3], 0.0)


@pytest.mark.parametrize("implementation", attention_lib.IMPLEMENTATIONS)
def test_padding_rows_are_finite(implementation):
  """A row of padding only (segment 0 everywhere), block-causal, in every implementation."""
  segment_ids = jnp.zeros((1, 50), jnp.int32)
  frames = jnp.zeros((1, 50), jnp.int32)
  attend = functools.partial(attention_lib.attention, segment_ids=segment_ids, q_frames=frames,
                             causal=True, implementation=implementation, **BLOCKS)
  chex.assert_tree_all_finite(output_and_grads(attend, *qkv(1, 50, 50)))


def test_chunked_partitions_over_batch_and_heads():
  """Batch over 'data', heads over 'tensor' (mesh (2, 4)): the result matches the reference and
  the only collective is the one reduction of the tile table over the batch."""
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  segment_ids, frames = batch_ids(100, [(37, 45), (100,)])
  q, k, v = qkv(2, 100, 100, heads=4)

  def train_pass(implementation, q, k, v, d_out, segment_ids, frames):
    attend = functools.partial(attention_lib.attention, segment_ids=segment_ids, q_frames=frames,
                               causal=True, implementation=implementation, **BLOCKS)
    return jax.vjp(attend, q, k, v)[1](d_out)

  tokens = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
  ids = NamedSharding(mesh, PartitionSpec("data", None))
  sharded = jax.jit(functools.partial(train_pass, "chunked"),
                    in_shardings=(tokens,) * 4 + (ids,) * 2, out_shardings=tokens)
  args = (q, k, v, jax.random.normal(jax.random.key(1), q.shape), segment_ids, frames)
  compiled = sharded.lower(*args).compile()
  collectives = re.findall(r"\b(?:all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(",
                           compiled.as_text())
  assert len(collectives) <= 1, collectives
  chex.assert_trees_all_close(compiled(*args), train_pass("xla", *args), atol=1e-4, rtol=1e-4)


def test_splash_kernel_interpreted():
  """The TPU kernel itself, run by the Pallas interpreter: padding to 128-wide blocks,
  segment ids, scaling and layout, without a TPU."""
  segment_ids, _ = batch_ids(150, [(60, 70)])
  splash = functools.partial(attention_lib.splash_attention, q_segment_ids=segment_ids,
                             kv_segment_ids=segment_ids, block_q=128, block_kv=128,
                             interpret=True)

  def attend(impl, q, k, v):
    if impl == "xla":
      return attention_lib.attention(q, k, v, segment_ids)
    return splash(q, k, v)

  assert_matches_reference(attend, "splash", *qkv(1, 150, 150))


def test_fallbacks_warn_once(caplog):
  attention_lib._warn_once.cache_clear()
  q, k, v = qkv(1, 16, 16)
  segment_ids = jnp.ones((1, 16), jnp.int32)
  for _ in range(2):
    attention_lib.attention(q, k, v, segment_ids, implementation="cudnn")
  assert sum("'cudnn' needs a GPU" in r.getMessage() for r in caplog.records) == 1


def test_bad_arguments_name_the_fix():
  q, k, v = qkv(1, 16, 16)
  segment_ids = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="not one of"):
    attention_lib.attention(q, k, v, segment_ids, implementation="flash")
  with pytest.raises(ValueError, match="needs q_frames"):
    attention_lib.attention(q, k, v, segment_ids, causal=True)
  with pytest.raises(ValueError, match="bfloat16"):
    attention_lib.cudnn_attention(q, k, v, attention_lib.attention_mask(segment_ids, segment_ids))


def forward_backward_temp_bytes(implementation, length):
  """Temporary memory of the compiled forward + backward (compiled only, never run)."""
  shape = jax.ShapeDtypeStruct((1, length, HEADS, 16), jnp.float32)
  segment_ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def train_pass(q, k, v, d_out, segment_ids):
    attend = functools.partial(attention_lib.attention, segment_ids=segment_ids,
                               implementation=implementation, block_q=128, block_kv=128)
    return jax.vjp(attend, q, k, v)[1](d_out)

  compiled = jax.jit(train_pass).lower(shape, shape, shape, shape, segment_ids).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly():
  growth = {impl: forward_backward_temp_bytes(impl, 4096) / forward_backward_temp_bytes(impl, 1024)
            for impl in ("chunked", "xla")}
  assert growth["chunked"] < 6, growth
  assert growth["xla"] > 12, growth
