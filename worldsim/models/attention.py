"""One attention function; the implementation is a config choice.

`xla` is the dense reference: it materialises the (L, L) logits, so its memory grows with
the square of the sequence length. Tokens attend only to tokens of the same segment (a packed
row holds several clips; segment 0 is padding), so attention never crosses clips.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def segment_mask(q_segment_ids, kv_segment_ids):
  """(B, Lq), (B, Lk) -> bool (B, 1, Lq, Lk): True where a query may see a key."""
  return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids):
  """Dense softmax attention. q (B, Lq, N, H), k and v (B, Lk, N, H) -> (B, Lq, N, H).

  Heads are moved ahead of length first: the two batched matmuls then run on contiguous
  (L, H) panels, which is markedly faster on CPU than contracting in the token-major layout.
  """
  scale = q.shape[-1] ** -0.5
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * scale, k, v))                # (B, N, L, H)
  logits = jnp.einsum("bnlh,bnmh->bnlm", q, k).astype(jnp.float32)
  logits = jnp.where(segment_mask(q_segment_ids, kv_segment_ids), logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnlm,bnmh->bnlh", weights, v).transpose(0, 2, 1, 3)


def attention(q, k, v, segment_ids, *, implementation: str = "xla", kv_segment_ids=None):
  """Attention of q over (k, v), masked to equal segment ids."""
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  if implementation == "xla":
    return xla_attention(q, k, v, segment_ids, kv_segment_ids)
  raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
