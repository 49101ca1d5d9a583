"""Context parallelism: attention over a sequence sharded across devices.

The DiT shards its activations along the sequence ("length" -> the mesh axis `context`, C
devices), so each device holds L / C tokens of every row. Attention needs every key of a
row, so it must move data. Three strategies, each a `jax.shard_map` (manual over every mesh
axis) around the single-device `worldsim.models.attention`; shapes below are per device,
with b = B / batch degree and n = N / tensor degree local rows and heads.

  ulysses  (DeepSpeed-Ulysses) C = U devices on `ulysses_axis`.
    holds      q, k, v (b, L/U, n, H): a slice of the sequence, every local head
    all_to_all q, k, v (b, L, n/U, H): the whole sequence, a slice of the heads
               segment ids and frames are all-gathered to (b, L): they are tiny
    attention  any single-device implementation (chunked by default) on those heads
    all_to_all out (b, L/U, n, H): back to a slice of the sequence, every local head
    Two all-to-alls of 4 activations' worth, whatever C; needs N divisible by tensor x U.

  ring     (Ring Attention) C = R devices on `ring_axis`.
    holds      q (b, L/R, n, H) for good; k, v and their ids start as the local block
    R steps    attend q to the block held (the chunked attention's online softmax, from
               worldsim.models.attention: running max, denominator and output in float32),
               then ppermute the block to ring neighbour r + 1, so at step s device r holds
               the block of device r - s. The last step sends nothing.
    out        (b, L/R, n, H), already where it belongs
    No head constraint and memory linear in L / R; R - 1 hops of k and v. Each step is
    rematerialised (jax.checkpoint), so the backward keeps one block's logits at a time.
    Blocks a device's queries cannot see (other clips, later frames) skip their matmuls.

  ulysses_ring  C = R x U devices on two mesh axes, (`ring_axis`, `ulysses_axis`).
    holds      q, k, v (b, L/(R U), n, H); the sequence is sharded ring-major, so the U
               devices of one ring group together hold the contiguous block L/R of group r
    all_to_all over `ulysses_axis`: (b, L/R, n/U, H), the group's block, a slice of heads
    ring       as above over `ring_axis` (devices sharing a Ulysses index form a ring)
    all_to_all back: (b, L/(R U), n, H)
    Ulysses inside a group (put it on the fast interconnect), ring across groups: the head
    constraint of Ulysses without its all-to-all spanning every device.

Why two mesh axes for the combination, and not groups inside the one `context` axis: the
collectives then act on whole mesh axes, which is all `jax.lax.all_to_all` and `ppermute`
support well inside shard_map (axis_index_groups is legacy there). `factor_context_axis`
splits `context` into ('context_ring', 'context_ulysses') without moving a device, so an
array sharded over 'context' has the same per-device data sharded over the pair, and
`factor_context_rules` rewrites the logical rules to match.

Lengths that do not divide the context degree are padded inside the wrapper with segment id
-1, which no real token matches, and the padding is cut from the output. (Padding a sharded
array reshuffles it, so keep the token budget a multiple of C; the config checks that.) Head
and batch counts that do not divide raise a ValueError naming the fix, before any tracing.
"""
import functools
import math
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from worldsim.models import attention as attention_lib

STRATEGIES = ("ulysses", "ring", "ulysses_ring")
RING_AXIS, ULYSSES_AXIS = "context_ring", "context_ulysses"

# Real segment ids are >= 0 (0 = the row's own padding, which attends to itself as in the
# reference); tokens added to fill the last shard must match nothing real.
_PAD_SEGMENT = -1


# ---------------------------------------------------------------------------------------
# The mesh


def factor_context_axis(mesh: Mesh, ulysses_degree: int, axis: str = "context") -> Mesh:
  """The same devices with `axis` (size C) split into (RING_AXIS, ULYSSES_AXIS) = (C / U, U).

  The devices array is only reshaped, so context index c is (ring r, ulysses u) with
  c = r U + u: an array sharded over `axis` sits on the same devices when sharded over
  (RING_AXIS, ULYSSES_AXIS), and neighbouring devices (the fast links) share a Ulysses group.
  """
  names = list(mesh.axis_names)
  if axis not in names:
    raise ValueError(f"mesh axes {tuple(names)} have no {axis!r} axis to factor")
  degree = mesh.shape[axis]
  if ulysses_degree < 1 or degree % ulysses_degree:
    raise ValueError(f"the Ulysses degree {ulysses_degree} must divide the {axis!r} axis "
                     f"({degree}); pick one of {_divisors(degree)}")
  i = names.index(axis)
  shape = list(mesh.devices.shape)
  shape[i:i + 1] = [degree // ulysses_degree, ulysses_degree]
  names[i:i + 1] = [RING_AXIS, ULYSSES_AXIS]
  types = list(mesh.axis_types)
  types[i:i + 1] = [types[i]] * 2
  return Mesh(mesh.devices.reshape(shape), tuple(names), axis_types=tuple(types))


def factor_context_rules(axis_rules, axis: str = "context") -> tuple:
  """Logical axis rules with `axis` replaced by (RING_AXIS, ULYSSES_AXIS), ring-major, to
  go with `factor_context_axis`."""

  def factored(mesh_axes):
    if mesh_axes is None:
      return None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    out = sum(((RING_AXIS, ULYSSES_AXIS) if a == axis else (a,) for a in mesh_axes), ())
    return out[0] if len(out) == 1 else out

  return tuple((name, factored(mesh_axes)) for name, mesh_axes in axis_rules)


def _divisors(n: int) -> list:
  return [d for d in range(1, n + 1) if n % d == 0]


def _resolve_mesh(mesh):
  """The given mesh, else the one set by `jax.set_mesh` (what a Flax module runs under)."""
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("context-parallel attention needs a mesh: pass mesh=, or call it "
                     "inside `with jax.set_mesh(mesh):`")
  return mesh


def _present(mesh, axes: Sequence[str]) -> tuple:
  return tuple(a for a in axes if a in mesh.axis_names)


def _degree(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


# ---------------------------------------------------------------------------------------
# Inside shard_map (per-device shapes)


def _sequence_to_heads(x, axis):
  """(b, l, n, H) holding a sequence slice -> (b, l U, n / U, H) holding a head slice."""
  return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_sequence(x, axis):
  """The inverse of _sequence_to_heads."""
  return jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)


def _gather_sequence(ids: dict, axis) -> dict:
  """Segment ids / frames (b, l) -> (b, l U): the whole sequence of the Ulysses group."""
  return {name: jax.lax.all_gather(x, axis, axis=1, tiled=True) for name, x in ids.items()}


def _visible(ids: dict, kv_ids: dict):
  """bool (b, 1, lq, lk) from the query ids and a key block's ids."""
  return attention_lib.attention_mask(ids["q_segment_ids"], kv_ids["kv_segment_ids"],
                                      ids.get("q_frames"), kv_ids.get("kv_frames"))


def _accumulate(q_t, ids, k, v, kv_ids, carry):
  """One online-softmax step (attention_lib.online_softmax_step): fold the key block
  (k, v (b, lk, n, H)) into the carry. q_t is (b, n, lq, H), pre-scaled."""
  visible = _visible(ids, kv_ids)

  def update(carry):
    return attention_lib.online_softmax_step(carry, q_t, k, v, visible, kv_layout="bknh")

  # Packed clips and block-causal masks leave many blocks invisible to a device's queries.
  return jax.lax.cond(visible.any(), update, lambda c: c, carry)


def _ring(q, k, v, ids: dict, kv_ids: dict, axis: str, ring_size: int):
  """Attention of the local queries over the keys of every device on `axis`, the key
  blocks passed around the ring. Shapes as attention_lib.attention, per device."""
  q_t = (q * q.shape[-1] ** -0.5).transpose(0, 2, 1, 3)                      # (b, n, lq, H)
  carry = attention_lib.online_softmax_init(q_t)
  # Rematerialised: the backward recomputes a step's logits instead of storing R of them.
  accumulate = jax.checkpoint(_accumulate)
  to_next = [(r, (r + 1) % ring_size) for r in range(ring_size)]

  def step(state, _):
    block, carry = state
    carry = accumulate(q_t, ids, *block, carry)
    # Independent of this step's matmuls, so the send can overlap them.
    return (jax.lax.ppermute(block, axis, to_next), carry), None

  block = (k, v, kv_ids)
  (block, carry), _ = jax.lax.scan(step, (block, carry), None, length=ring_size - 1)
  out, _ = attention_lib.online_softmax_finish(accumulate(q_t, ids, *block, carry))
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _split_ids(ids: dict):
  """{q_segment_ids, kv_segment_ids, q_frames?, kv_frames?} -> (query ids, key ids)."""
  return ({k: x for k, x in ids.items() if k.startswith("q_")},
          {k: x for k, x in ids.items() if k.startswith("kv_")})


def _local_attention(q, k, v, ids: dict, *, ulysses_axis, ring_axis, ring_size, causal,
                     implementation, block_q, block_kv):
  """The body of the shard_map: Ulysses all-to-all in, ring or single-device attention,
  all-to-all out. Either axis may be None."""
  if ulysses_axis is not None:
    q, k, v = (_sequence_to_heads(x, ulysses_axis) for x in (q, k, v))
    ids = _gather_sequence(ids, ulysses_axis)
  if ring_axis is not None:
    out = _ring(q, k, v, *_split_ids(ids), ring_axis, ring_size)
  else:
    out = attention_lib.attention(
        q, k, v, ids["q_segment_ids"], implementation=implementation,
        kv_segment_ids=ids["kv_segment_ids"], q_frames=ids.get("q_frames"),
        kv_frames=ids.get("kv_frames"), causal=causal, block_q=block_q, block_kv=block_kv)
  if ulysses_axis is not None:
    out = _heads_to_sequence(out, ulysses_axis)
  return out


# ---------------------------------------------------------------------------------------
# The wrappers


def _check_divisible(what: str, count: int, degree: int, fix: str):
  if count % degree:
    raise ValueError(f"context-parallel attention: {what} {count} is not divisible by "
                     f"{degree}; {fix}")


def _strategy_axes(strategy: str, axis: str, ulysses_axis, ring_axis) -> tuple:
  """(ulysses axis or None, ring axis or None) of a strategy."""
  if strategy not in STRATEGIES:
    raise ValueError(f"context-parallel strategy {strategy!r} is not one of {STRATEGIES}")
  if strategy == "ulysses":
    return ulysses_axis or axis, None
  if strategy == "ring":
    return None, ring_axis or axis
  ulysses_axis, ring_axis = ulysses_axis or ULYSSES_AXIS, ring_axis or RING_AXIS
  if ulysses_axis == ring_axis:
    raise ValueError(f"'ulysses_ring' needs two mesh axes, got {ulysses_axis!r} twice; "
                     f"split the context axis with factor_context_axis(mesh, ulysses_degree)")
  return ulysses_axis, ring_axis


def _check_shapes(mesh, q, ulysses_axis, batch_axes, heads_axes):
  """Batch and heads must split evenly over their mesh axes (Ulysses splits heads again)."""
  batch, _, heads, _ = q.shape
  batch_degree, tensor_degree = _degree(mesh, batch_axes), _degree(mesh, heads_axes)
  _check_divisible("the batch", batch, batch_degree,
                   f"use a batch size divisible by {batch_degree} (mesh axes {batch_axes})")
  if ulysses_axis is None:
    _check_divisible("the head count", heads, tensor_degree,
                     f"use a head count divisible by the tensor degree {tensor_degree}")
    return
  ulysses_degree = mesh.shape[ulysses_axis]
  _check_divisible(
      "the head count", heads, tensor_degree * ulysses_degree,
      f"use a head count divisible by {tensor_degree * ulysses_degree} (tensor "
      f"{tensor_degree} x Ulysses {ulysses_degree}), a smaller Ulysses degree, or 'ring'")


def _pad_to(x, length: int, value):
  """Pads axis 1 (the sequence) of x with `value` up to `length`."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


def _pad_sequence(x, ids: dict, prefix: str, degree: int):
  """x (B, L, N, H) and ids[prefix*] (B, L) padded to a multiple of `degree`; padding gets
  segment id -1 (frame 0), which no real token sees."""
  length = -(-x.shape[1] // degree) * degree
  if length == x.shape[1]:
    return x, ids
  ids = {name: _pad_to(a, length, _PAD_SEGMENT if name.endswith("segment_ids") else 0)
         if name.startswith(prefix) else a for name, a in ids.items()}
  return _pad_to(x, length, 0), ids


def context_attention(q, k, v, segment_ids, *, strategy: str = "ulysses",
                      mesh: Optional[Mesh] = None, axis: str = "context",
                      ulysses_axis: Optional[str] = None, ring_axis: Optional[str] = None,
                      batch_axes: Sequence[str] = ("data", "fsdp"),
                      heads_axes: Sequence[str] = ("tensor",),
                      implementation: str = "chunked", kv_segment_ids=None, q_frames=None,
                      kv_frames=None, causal: bool = False, block_q: int = 512,
                      block_kv: int = 512):
  """attention_lib.attention over a sequence sharded on the mesh; same arguments and result.

  q (B, Lq, N, H), k and v (B, Lk, N, H); segment ids and frames as attention_lib.attention.
  strategy: 'ulysses' and 'ring' use the mesh axis `axis`; 'ulysses_ring' uses `ring_axis`
    and `ulysses_axis` (default RING_AXIS and ULYSSES_AXIS, see factor_context_axis).
  mesh: default, the mesh set by jax.set_mesh.
  batch_axes, heads_axes: the mesh axes of the batch and the heads (those not in the mesh
    are ignored), as the logical rules place them, so entering the shard_map moves nothing.
  implementation, block_q, block_kv: the single-device attention Ulysses runs on its heads
    (ring runs attention_lib's online softmax over whole key blocks).
  """
  chex.assert_rank([q, k, v], 4)
  ulysses_axis, ring_axis = _strategy_axes(strategy, axis, ulysses_axis, ring_axis)
  mesh = _resolve_mesh(mesh)
  context_axes = tuple(a for a in (ring_axis, ulysses_axis) if a is not None)  # ring-major
  missing = [a for a in context_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"context-parallel strategy {strategy!r} needs mesh axes {missing}, "
                     f"but the mesh has {tuple(mesh.axis_names)}")
  batch_axes = tuple(a for a in _present(mesh, batch_axes) if a not in context_axes)
  heads_axes = tuple(a for a in _present(mesh, heads_axes) if a not in context_axes)
  _check_shapes(mesh, q, ulysses_axis, batch_axes, heads_axes)

  # The same argument handling as attention_lib.attention, before anything is traced.
  if causal and q_frames is None:
    raise ValueError("causal attention needs q_frames, the frame index of every query token")
  ids = {"q_segment_ids": segment_ids,
         "kv_segment_ids": segment_ids if kv_segment_ids is None else kv_segment_ids}
  if causal:
    ids.update(q_frames=q_frames, kv_frames=q_frames if kv_frames is None else kv_frames)

  lq, degree = q.shape[1], _degree(mesh, context_axes)
  q, ids = _pad_sequence(q, ids, "q_", degree)
  v = _pad_to(v, -(-v.shape[1] // degree) * degree, 0)
  k, ids = _pad_sequence(k, ids, "kv_", degree)

  def spec(*dims):
    return P(*(d if d else None for d in dims))

  tokens = spec(batch_axes, context_axes, heads_axes, None)
  body = functools.partial(
      _local_attention, ulysses_axis=ulysses_axis, ring_axis=ring_axis,
      ring_size=mesh.shape[ring_axis] if ring_axis else 1, causal=causal,
      implementation=implementation, block_q=block_q, block_kv=block_kv)
  # The single-device implementations start their scan and cond carries from constants,
  # which shard_map's varying-axes type check rejects; without the check, shard_map's
  # transpose stays correct (it psums cotangents over any mesh axis the specs leave out).
  # The ring's own loop is written to pass it, so the ring keeps the check.
  out = jax.shard_map(body, mesh=mesh,
                      in_specs=(tokens, tokens, tokens,
                                {name: spec(batch_axes, context_axes) for name in ids}),
                      out_specs=tokens, check_vma=ring_axis is not None)(q, k, v, ids)
  return out[:, :lq]


def ulysses_attention(q, k, v, segment_ids, *, mesh=None, axis: str = "context", **kwargs):
  """context_attention with strategy 'ulysses' over the mesh axis `axis`."""
  return context_attention(q, k, v, segment_ids, strategy="ulysses", mesh=mesh, axis=axis,
                           **kwargs)


def ring_attention(q, k, v, segment_ids, *, mesh=None, axis: str = "context", **kwargs):
  """context_attention with strategy 'ring' over the mesh axis `axis`."""
  return context_attention(q, k, v, segment_ids, strategy="ring", mesh=mesh, axis=axis,
                           **kwargs)
