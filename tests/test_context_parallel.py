"""Context-parallel attention (Ulysses, ring, both) against the single-device dense reference,
on meshes of the 8 fake CPU devices."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from tests.test_attention import HEAD_DIM, output_and_grads, qkv
from worldsim.models import attention as attention_lib
from worldsim.parallel import context as context_lib
from worldsim.parallel import mesh as mesh_lib

TOKENS_PER_FRAME = 6


def make_mesh(data=1, fsdp=1, tensor=1, context=1):
  """The trainer's mesh layout: (data, fsdp, tensor, context), Auto axes."""
  sizes = (data, fsdp, tensor, context)
  devices = jax.devices()[:int(np.prod(sizes))]
  return jax.make_mesh(sizes, mesh_lib.AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def packed_ids(length, rows):
  """(B, length) segment ids (1, 2, ... per clip, 0 after them) and per-clip frames."""
  segments, frames = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
  for row, clips in enumerate(rows):
    start = 0
    for segment, clip_length in enumerate(clips, start=1):
      segments[row, start:start + clip_length] = segment
      frames[row, start:start + clip_length] = np.arange(clip_length) // TOKENS_PER_FRAME
      start += clip_length
  return jnp.asarray(segments), jnp.asarray(frames)


def assert_matches_reference(parallel, q, k, v, **attention_kwargs):
  """parallel(q, k, v, **kwargs) against attention(..., 'xla'): outputs 1e-5, grads 1e-4."""
  reference = functools.partial(attention_lib.attention, implementation="xla", **attention_kwargs)
  out, grads = output_and_grads(functools.partial(parallel, **attention_kwargs), q, k, v)
  ref_out, ref_grads = output_and_grads(reference, q, k, v)
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  return out


# Row 0: two clips and padding; row 1: one clip. Frames (6 tokens) straddle the shards.
ROWS = [(37, 45), (96,)]

CASES = [  # (strategy, mesh sizes, heads)
    ("ulysses", dict(data=2, context=4), 4),
    ("ulysses", dict(data=2, tensor=2, context=2), 4),
    ("ulysses", dict(context=8), 8),
    ("ring", dict(context=8), 4),
    ("ring", dict(data=2, tensor=2, context=2), 4),
    ("ulysses_ring", dict(data=2, context=4), 4),   # ring 2 x Ulysses 2
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("strategy,sizes,heads", CASES)
def test_self_attention_matches_reference(strategy, sizes, heads, causal):
  mesh = make_mesh(**sizes)
  if strategy == "ulysses_ring":
    mesh = context_lib.factor_context_axis(mesh, ulysses_degree=2)
  segment_ids, frames = packed_ids(96, ROWS)
  parallel = functools.partial(context_lib.context_attention, strategy=strategy, mesh=mesh,
                               block_q=32, block_kv=48)
  assert_matches_reference(parallel, *qkv(2, 96, 96, heads), segment_ids=segment_ids,
                           q_frames=frames, causal=causal)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_cross_attention_and_unseen_queries(strategy):
  """Queries over another sequence; clip 3 of the queries has no key, so gets exactly 0."""
  q_segment_ids, q_frames = packed_ids(64, [(20, 30, 14)] * 2)
  kv_segment_ids, kv_frames = packed_ids(96, [(50, 40)] * 2)
  parallel = functools.partial(context_lib.context_attention, strategy=strategy,
                               mesh=make_mesh(data=2, context=4))
  out = assert_matches_reference(
      parallel, *qkv(2, 64, 96, 4), segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      q_frames=q_frames, kv_frames=kv_frames, causal=True)
  np.testing.assert_array_equal(out[q_segment_ids == 3], 0.0)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_indivisible_length_is_padded(strategy):
  """90 tokens on 4 context devices: padded to 92 inside, cut back to 90."""
  segment_ids, frames = packed_ids(90, [(37, 45), (90,)])
  parallel = functools.partial(context_lib.context_attention, strategy=strategy,
                               mesh=make_mesh(data=2, context=4))
  out = assert_matches_reference(parallel, *qkv(2, 90, 90, 4), segment_ids=segment_ids,
                                 q_frames=frames, causal=True)
  chex.assert_shape(out, (2, 90, 4, HEAD_DIM))


def collectives(mesh, strategy, *args):
  """The kinds of collective in the compiled function, called under jax.set_mesh(mesh)."""
  with jax.set_mesh(mesh):
    attend = jax.jit(functools.partial(context_lib.context_attention, strategy=strategy))
    hlo = attend.lower(*args).compile().as_text()
  return set(re.findall(r"\b(all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(",
                        hlo))


def test_under_set_mesh_and_collectives():
  """With jax.set_mesh (as the DiT runs) no mesh is passed; ring moves k and v only by
  collective-permute, Ulysses only by all-to-all (plus the all-gather of the ids), and the
  combination by both."""
  mesh = make_mesh(data=2, context=4)
  segment_ids, _ = packed_ids(96, ROWS)
  args = (*qkv(2, 96, 96, 4), segment_ids)
  assert collectives(mesh, "ring", *args) == {"collective-permute"}
  assert collectives(mesh, "ulysses", *args) == {"all-to-all", "all-gather"}
  factored = context_lib.factor_context_axis(mesh, ulysses_degree=2)
  assert collectives(factored, "ulysses_ring", *args) == {
      "all-to-all", "all-gather", "collective-permute"}


def test_heads_replicated_over_tensor():
  """heads_axes=(): the tensor axis is left out of the specs, so the attention is computed
  twice and shard_map's transpose must not double the gradients."""
  segment_ids, frames = packed_ids(96, ROWS)
  parallel = functools.partial(context_lib.ulysses_attention, heads_axes=(),
                               mesh=make_mesh(data=2, tensor=2, context=2))
  assert_matches_reference(parallel, *qkv(2, 96, 96, 4), segment_ids=segment_ids,
                           q_frames=frames, causal=True)


def test_bad_arguments_name_the_fix():
  q, k, v = qkv(2, 32, 32, 4)
  segment_ids = jnp.ones((2, 32), jnp.int32)
  with pytest.raises(ValueError, match=r"head count 4 is not divisible by 8.*divisible by 8"):
    context_lib.ulysses_attention(q, k, v, segment_ids, mesh=make_mesh(tensor=2, context=4))
  with pytest.raises(ValueError, match=r"batch 2 is not divisible by 4"):
    context_lib.ring_attention(q, k, v, segment_ids, mesh=make_mesh(data=4, context=2))
  with pytest.raises(ValueError, match="not one of"):
    context_lib.context_attention(q, k, v, segment_ids, strategy="striped",
                                  mesh=make_mesh(context=4))
  with pytest.raises(ValueError, match="factor_context_axis"):
    context_lib.context_attention(q, k, v, segment_ids, strategy="ulysses_ring",
                                  mesh=make_mesh(context=4), ulysses_axis="context",
                                  ring_axis="context")
  with pytest.raises(ValueError, match="must divide"):
    context_lib.factor_context_axis(make_mesh(context=4), ulysses_degree=3)
  with pytest.raises(ValueError, match="jax.set_mesh"):
    context_lib.ring_attention(q, k, v, segment_ids)


def test_factored_mesh_keeps_devices_and_rules():
  mesh = make_mesh(data=2, context=4)
  factored = context_lib.factor_context_axis(mesh, ulysses_degree=2)
  assert factored.axis_names == ("data", "fsdp", "tensor", "context_ring", "context_ulysses")
  np.testing.assert_array_equal(factored.devices.reshape(mesh.devices.shape), mesh.devices)
  rules = context_lib.factor_context_rules((("batch", ("data", "fsdp")), ("length", "context"),
                                            ("kv", None)))
  assert rules == (("batch", ("data", "fsdp")), ("length", ("context_ring", "context_ulysses")),
                   ("kv", None))
