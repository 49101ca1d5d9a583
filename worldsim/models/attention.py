"""One attention function; the implementation is a config choice.

Tokens attend only to tokens of the same segment (a packed row holds several clips; segment 0
is padding), so attention never crosses clips. With `causal=True` attention is also
block-causal over frames: a query at frame f sees the keys of its segment at frames <= f, which
is what autoregressive rollouts of frame chunks train against. A query that sees no key at all
(possible only when queries and keys carry different segment ids, as when attending into a
cache) gets zeros from every implementation.

  xla      dense reference: materialises the (Lq, Lk) logits, so memory is quadratic.
  chunked  flash attention in pure JAX: an online softmax over (query block, key block) tiles
           and a hand-written backward that recomputes the tiles from (out, logsumexp), so
           memory is linear in length for training too. Runs on every backend. The online
           softmax (online_softmax_init / _step / _finish) is also the ring's, in
           worldsim/parallel/context.py.
  cudnn    cuDNN's fused kernel through jax.nn.dot_product_attention (GPU; else xla).
  splash   the Pallas splash-attention kernel (TPU, no block-causal mask; else chunked).
"""
import functools

from absl import logging
import chex
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")

# Tokens added to fill the last block get this segment id. Real ids are >= 0, so no real
# query sees a padded key.
_PAD_SEGMENT = -1
# splash tiles are multiples of the TPU's 128 lanes.
_TPU_LANES = 128


def attention_mask(q_segment_ids, kv_segment_ids, q_frames=None, kv_frames=None):
  """(B, Lq), (B, Lk) -> bool (B, 1, Lq, Lk): True where a query may see a key.

  Frames are given for block-causal attention only: a key must then also be no later than
  the query's frame.
  """
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if q_frames is not None:
    mask &= q_frames[:, :, None] >= kv_frames[:, None, :]
  return mask[:, None]


def _visible(q_mask, kv_mask):
  """attention_mask of (segment ids, frames or None) pairs."""
  (q_segment_ids, q_frames), (kv_segment_ids, kv_frames) = q_mask, kv_mask
  return attention_mask(q_segment_ids, kv_segment_ids, q_frames, kv_frames)


def xla_attention(q, k, v, mask):
  """Dense softmax attention. q (B, Lq, N, H), k and v (B, Lk, N, H) -> (B, Lq, N, H).

  Heads are moved ahead of length first: the two batched matmuls then run on contiguous
  (L, H) panels, which is markedly faster on CPU than contracting in the token-major layout.
  """
  scale = q.shape[-1] ** -0.5
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * scale, k, v))                # (B, N, L, H)
  logits = jnp.einsum("bnlh,bnmh->bnlm", q, k).astype(jnp.float32)
  weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(v.dtype)
  # A row that sees no key would get the mean of every value; zero it. (softmax's `where=`
  # does the same but keeps one more (Lq, Lk) array alive for the backward pass.)
  out = jnp.einsum("bnlm,bnmh->bnlh", weights, v) * mask.any(-1)[..., None].astype(v.dtype)
  return out.transpose(0, 2, 1, 3)


def _tiling(length: int, block: int, multiple: int = 1):
  """The block size (clipped to the length, rounded up to `multiple`) and the padded length."""
  block = min(block, -(-length // multiple) * multiple)
  return block, -(-length // block) * block


def _pad_length(x, padded_length: int, value=0):
  """Pads axis 1 (length) of x up to padded_length."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, padded_length - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


def _to_blocks(x, mask_ids, block: int):
  """Pads and tiles the length axis.

  x (B, L, N, H) -> (nb, B, N, block, H); mask_ids (segment ids, frames or None), each
  (B, L) -> (nb, B, block), padding marked with _PAD_SEGMENT.
  """
  b, length, n, h = x.shape
  block, padded = _tiling(length, block)
  x = _pad_length(x, padded).reshape(b, padded // block, block, n, h).transpose(1, 0, 3, 2, 4)
  mask_ids = jax.tree.map(
      lambda ids: _pad_length(ids, padded, _PAD_SEGMENT).reshape(b, -1, block).transpose(1, 0, 2),
      mask_ids)
  return x, mask_ids


def _from_blocks(x, length: int):
  """(nb, B, N, block, H) -> (B, length, N, H), dropping the padding."""
  nb, b, n, block, h = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, n, h)[:, :length]


def _tile_logits(q_i, k_j, visible, kv_layout="bnkh"):
  """q (B, N, bq, H), k (B, N, bk, H) (or as kv_layout says) -> float32 logits
  (B, N, bq, bk), -inf where masked."""
  logits = jnp.einsum(f"bnqh,{kv_layout}->bnqk", q_i, k_j, preferred_element_type=jnp.float32)
  return jnp.where(visible, logits, -jnp.inf)


def _tile_visibility(q_mask, kv_mask):
  """Blocked masks -> bool (nq, nk), False only where no query of tile (i, j) sees its keys.

  With packed clips and block-causal masks most tiles see nothing, and skipping them is the
  sparsity dense attention cannot use. The test is conservative, from per-block ranges (the
  segment ranges overlap; the latest query frame is no earlier than the earliest key frame),
  which is tight for contiguous clips and costs O(L). It is reduced over the batch once, up
  front, so the loops branch on a replicated scalar instead of reducing a batch-sharded tile
  mask across devices at every step.
  """
  (q_ids, q_frames), (kv_ids, kv_frames) = q_mask, kv_mask                  # (nb, B, block)
  q_lo, q_hi = q_ids.min(-1)[:, None], q_ids.max(-1)[:, None]                # (nq, 1, B)
  kv_lo, kv_hi = kv_ids.min(-1)[None], kv_ids.max(-1)[None]                  # (1, nk, B)
  may_see = (q_lo <= kv_hi) & (kv_lo <= q_hi)                                # (nq, nk, B)
  if q_frames is not None:
    may_see &= q_frames.max(-1)[:, None] >= kv_frames.min(-1)[None]
  return may_see.any(-1)


def _skip_unless(tile_visible, update, carry):
  """update(carry) for a tile that may see something, carry unchanged for one that cannot."""
  return jax.lax.cond(tile_visible, update, lambda c: c, carry)


def online_softmax_init(q):
  """The empty carry of an online softmax over queries q (..., lq, H): running max (..., lq),
  denominator (..., lq) and output (..., lq, H), all float32.

  The running max starts at float32's lowest, finite, so a key block a query cannot see gives
  exp(-inf - max) = 0, not NaN. The carry is derived from q rather than built with jnp.full,
  so inside a shard_map it varies over the mesh axes as q does (the varying-axes check).
  """
  zeros = q.astype(jnp.float32) * 0
  return zeros[..., 0] + jnp.finfo(jnp.float32).min, zeros[..., 0], zeros


def online_softmax_step(carry, q, k, v, visible, *, kv_layout: str = "bnkh"):
  """Folds one key block into an online-softmax carry (see online_softmax_init).

  q (B, N, lq, H), pre-scaled; k, v (B, N, lk, H), or (B, lk, N, H) with kv_layout="bknh"
  (the ring's token-major blocks, contracted as they lie); visible bool, broadcastable to
  (B, N, lq, lk). Logits, max, denominator and output accumulate in float32 whatever the
  inputs' dtype; the probabilities meet v in v's dtype. Shared by the chunked forward here and
  the ring of worldsim/parallel/context.py.
  """
  running_max, total, acc = carry
  logits = _tile_logits(q, k, visible, kv_layout)
  # The result does not depend on the shift, so its gradient is zero: stop it, which also
  # keeps -inf and the finite start value out of a backward pass taken by autodiff (the
  # ring's; the chunked backward is hand-written).
  new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(-1)))
  p = jnp.exp(logits - new_max[..., None])
  rescale = jnp.exp(running_max - new_max)
  total = total * rescale + p.sum(-1)
  acc = acc * rescale[..., None] + jnp.einsum(
      f"bnqk,{kv_layout}->bnqh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return new_max, total, acc


def online_softmax_finish(carry):
  """Normalises an online-softmax carry: (output (..., lq, H), logsumexp (..., lq)), float32.

  total >= 1 wherever a query saw a key; a query that saw none has total 0 and gets output 0
  (and logsumexp float32's lowest, whose exp is 0). The guard is a `where`, not
  max(total, tiny), so the gradient of acc / total stays finite for such a query when autodiff
  differentiates through it.
  """
  running_max, total, acc = carry
  total = jnp.where(total > 0, total, 1.0)
  return acc / total[..., None], running_max + jnp.log(total)


def _flash_forward(q, k, v, q_mask, kv_mask, tiles):
  """Blocked q (nq, B, N, bq, H), k and v (nk, B, N, bk, H), q pre-scaled; tiles (nq, nk) ->
  out like q and logsumexp (nq, B, N, bq) float32."""

  def query_block(args):
    q_i, q_mask_i, tiles_i = args

    def key_block(carry, args):
      k_j, v_j, kv_mask_j, tile_visible = args

      def update(carry):
        return online_softmax_step(carry, q_i, k_j, v_j, _visible(q_mask_i, kv_mask_j))

      return _skip_unless(tile_visible, update, carry), None

    carry, _ = jax.lax.scan(key_block, online_softmax_init(q_i), (k, v, kv_mask, tiles_i))
    out, logsumexp = online_softmax_finish(carry)
    return out.astype(q_i.dtype), logsumexp

  return jax.lax.map(query_block, (q, q_mask, tiles))


@jax.custom_vjp
def _flash(q, k, v, q_mask, kv_mask, tiles):
  return _flash_forward(q, k, v, q_mask, kv_mask, tiles)[0]


def _flash_fwd(q, k, v, q_mask, kv_mask, tiles):
  out, logsumexp = _flash_forward(q, k, v, q_mask, kv_mask, tiles)
  return out, (q, k, v, q_mask, kv_mask, tiles, out, logsumexp)


def _flash_bwd(residuals, d_out):
  """FlashAttention-2's backward: each tile's probabilities are recomputed from the saved
  logsumexp instead of being stored, which is what keeps training memory linear.

  Key blocks are the outer loop, so dk and dv of a block finish in one pass; every query
  block's share of dq comes out of the inner loop and is summed into the dq carry.
  """
  q, k, v, q_mask, kv_mask, tiles, out, logsumexp = residuals
  # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij, the softmax Jacobian's correction term.
  d_sum = jnp.einsum("ibnqh,ibnqh->ibnq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(dq, args):
    k_j, v_j, kv_mask_j, tiles_j = args

    def query_block(carry, args):
      q_i, d_out_i, logsumexp_i, d_sum_i, q_mask_i, tile_visible = args

      def update(carry):
        dk_j, dv_j, _ = carry
        logits = _tile_logits(q_i, k_j, _visible(q_mask_i, kv_mask_j))
        p = jnp.exp(logits - logsumexp_i[..., None])
        dv_j += jnp.einsum("bnqk,bnqh->bnkh", p.astype(d_out_i.dtype), d_out_i,
                           preferred_element_type=jnp.float32)
        dp = jnp.einsum("bnqh,bnkh->bnqk", d_out_i, v_j, preferred_element_type=jnp.float32)
        ds = (p * (dp - d_sum_i[..., None])).astype(q_i.dtype)
        dk_j += jnp.einsum("bnqk,bnqh->bnkh", ds, q_i, preferred_element_type=jnp.float32)
        dq_i = jnp.einsum("bnqk,bnkh->bnqh", ds, k_j, preferred_element_type=jnp.float32)
        return dk_j, dv_j, dq_i

      init = carry + (jnp.zeros(q_i.shape, jnp.float32),)
      dk_j, dv_j, dq_i = _skip_unless(tile_visible, update, init)
      return (dk_j, dv_j), dq_i

    init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
    (dk_j, dv_j), dq_shares = jax.lax.scan(
        query_block, init, (q, d_out, logsumexp, d_sum, q_mask, tiles_j))
    return dq + dq_shares, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (k, v, kv_mask, tiles.T))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, q_mask, kv_mask, *, block_q: int, block_kv: int):
  """Linear-memory attention. q (B, Lq, N, H), k and v (B, Lk, N, H) -> (B, Lq, N, H).

  q_mask and kv_mask are (segment ids, frames or None), each (B, L). Lengths need not divide
  the block sizes: the tail is padded with a segment no real query matches, then cropped.
  """
  scale = q.shape[-1] ** -0.5
  q_blocks, q_mask = _to_blocks(q * scale, q_mask, block_q)
  k_blocks, kv_mask_blocks = _to_blocks(k, kv_mask, block_kv)
  v_blocks, _ = _to_blocks(v, kv_mask, block_kv)
  tiles = _tile_visibility(q_mask, kv_mask_blocks)
  out = _flash(q_blocks, k_blocks, v_blocks, q_mask, kv_mask_blocks, tiles)
  return _from_blocks(out, q.shape[1])


def cudnn_attention(q, k, v, mask):
  """cuDNN's fused attention (GPU only). Shapes as xla_attention.

  The public API takes segments and frames only as a dense (B, 1, Lq, Lk) mask, which it turns
  into an additive bias of q's dtype: memory stays quadratic in length (2 bytes per entry, not
  per head), though the logits themselves are never materialised.
  """
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention implementation 'cudnn' runs in bfloat16 or float16, not "
                     f"{q.dtype}: set config.model.dtype='bfloat16', or use 'chunked' or 'xla'.")
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  # cuDNN turns the mask into a bias, so a row seeing no key would average every value.
  return out * mask.any(-1).transpose(0, 2, 1)[..., None].astype(out.dtype)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, block_q: int, block_kv: int,
                     interpret: bool = False):
  """The Pallas splash-attention kernel (TPU; `interpret` runs it anywhere, slowly).

  Shapes as xla_attention. Lengths are padded to whole blocks of multiples of 128.
  """
  # Imported here: the module is TPU-specific and may move between jax versions.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  (_, lq, n, h), lk = q.shape, k.shape[1]
  block_q, padded_q = _tiling(lq, block_q, _TPU_LANES)
  block_kv, padded_kv = _tiling(lk, block_kv, _TPU_LANES)
  kernel = splash.make_splash_mha(
      masks.MultiHeadMask([masks.FullMask((padded_q, padded_kv))] * n),
      block_sizes=splash.BlockSizes(
          block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
          block_q_dq=block_q, block_kv_dq=block_kv),
      head_shards=1, q_seq_shards=1, interpret=interpret)
  q = _pad_length(q * h ** -0.5, padded_q).transpose(0, 2, 1, 3)               # (B, N, Lq, H)
  k, v = (_pad_length(x, padded_kv).transpose(0, 2, 1, 3) for x in (k, v))     # (B, N, Lk, H)
  segment_ids = splash.SegmentIds(_pad_length(q_segment_ids, padded_q, _PAD_SEGMENT),
                                  _pad_length(kv_segment_ids, padded_kv, _PAD_SEGMENT))
  out = jax.vmap(kernel)(q, k, v, segment_ids).transpose(0, 2, 1, 3)[:, :lq]
  # The kernel's finite mask value would give a row seeing no key the mean of every value.
  sees_any = attention_mask(q_segment_ids, kv_segment_ids).any(-1).transpose(0, 2, 1)
  return out * sees_any[..., None].astype(out.dtype)


@functools.cache
def _warn_once(message: str):
  logging.warning(message)


def attention(q, k, v, segment_ids, *, implementation: str = "xla", kv_segment_ids=None,
              q_frames=None, kv_frames=None, causal: bool = False,
              block_q: int = 512, block_kv: int = 512):
  """Attention of q (B, Lq, N, H) over k, v (B, Lk, N, H), masked to equal segment ids.

  segment_ids (B, Lq) int32 >= 0 (0 = padding); kv_segment_ids (B, Lk) defaults to them.
  causal: block-causal by frame: q_frames (B, Lq) int32 required, kv_frames defaults to them.
  block_q, block_kv: tile sizes of `chunked` and `splash` (clipped to the lengths).
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  chex.assert_shape(segment_ids, q.shape[:2])
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if causal and q_frames is None:
    raise ValueError("causal attention needs q_frames, the frame index of every query token")
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  chex.assert_shape(kv_segment_ids, k.shape[:2])
  if causal:
    kv_frames = q_frames if kv_frames is None else kv_frames
  else:
    q_frames = kv_frames = None
  q_mask, kv_mask = (segment_ids, q_frames), (kv_segment_ids, kv_frames)

  backend = jax.default_backend()
  if implementation == "splash" and (backend != "tpu" or causal):
    _warn_once(f"attention 'splash' needs a TPU and no block-causal mask (backend {backend}, "
               f"causal={causal}); using 'chunked'.")
    implementation = "chunked"
  if implementation == "cudnn" and backend != "gpu":
    _warn_once(f"attention 'cudnn' needs a GPU (backend {backend}); using 'xla'.")
    implementation = "xla"

  if implementation == "xla":
    return xla_attention(q, k, v, _visible(q_mask, kv_mask))
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, _visible(q_mask, kv_mask))
  if implementation == "chunked":
    return chunked_attention(q, k, v, q_mask, kv_mask, block_q=block_q, block_kv=block_kv)
  return splash_attention(q, k, v, segment_ids, kv_segment_ids,
                          block_q=block_q, block_kv=block_kv)
