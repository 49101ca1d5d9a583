"""Captions for the DiT: a byte-level tokenizer, packing by clip, and a small text encoder.

Bytes, not a learned vocabulary (ByT5): no vocabulary file to ship or version, every caption
in every language encodes, and captions are short, so the longer sequences cost little.
  token 0      padding
  token 1      BOS, first in every caption: an empty caption is BOS alone, which is also the
               null caption of classifier-free guidance (`null_text`)
  2 + byte     the caption's UTF-8 bytes

A packed DiT row holds M clips; its text holds M caption slots of max_len tokens each:
  text              int32 (B, M * max_len)  slot m holds clip m's tokens
  text_segment_ids  int32 (B, M * max_len)  m + 1 on clip m's tokens, 0 on padding
Video tokens of segment s attend only to text tokens of segment s, so each clip reads its own
caption. Text from an external encoder takes the place of the tokens as float embeddings
(B, M * max_len, E) with the same segment ids (DiTConfig.text = 'embeddings').
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from worldsim.models import attention as attention_lib
from worldsim.models import layers

PAD, BOS = 0, 1
_BYTE_OFFSET = 2
VOCAB_SIZE = _BYTE_OFFSET + 256


# ----------------------------------------------------------------------------- tokens (host)

def tokenize(captions: Sequence[str], max_len: int) -> np.ndarray:
  """Captions -> int32 (N, max_len): BOS, then UTF-8 bytes + 2, cut at max_len, then PAD."""
  if max_len < 1:
    raise ValueError(f"max_len must be at least 1 (room for BOS), not {max_len}")
  out = np.full((len(captions), max_len), PAD, np.int32)
  for i, caption in enumerate(captions):
    data = np.frombuffer(caption.encode("utf-8"), np.uint8)[:max_len - 1]
    out[i, 0] = BOS
    out[i, 1:1 + len(data)] = data.astype(np.int32) + _BYTE_OFFSET
  return out


def detokenize(tokens: np.ndarray) -> list:
  """int (N, L) -> captions; a multi-byte character cut by truncation is dropped."""
  return [bytes(int(t) - _BYTE_OFFSET for t in row if t >= _BYTE_OFFSET)
          .decode("utf-8", errors="ignore") for row in np.asarray(tokens)]


def pack_captions(captions, max_len: int, present: Optional[np.ndarray] = None):
  """Per-row captions (B, M) (object array or nested lists of str) -> (text, text_segment_ids),
  both int32 (B, M * max_len), clip m in slot m with segment id m + 1.

  present: bool (B, M), which clips exist (e.g. the loader's clip_grid.any(-1)); by default
  every caption that is not None. An absent clip's slot is all padding (segment 0). A present
  clip with an empty caption gets BOS alone, the null caption: an uncaptioned clip trains the
  unconditional model that guidance samples from.
  """
  captions = np.asarray(captions, dtype=object)
  rows, clips = captions.shape
  if present is None:
    present = np.vectorize(lambda c: c is not None, otypes=[bool])(captions)
  tokens = tokenize([c or "" for c in captions.ravel()], max_len).reshape(rows, clips, max_len)
  segment_ids = np.where(tokens != PAD, np.arange(1, clips + 1, dtype=np.int32)[:, None], 0)
  keep = np.asarray(present, bool)[..., None]
  return (np.where(keep, tokens, PAD).reshape(rows, clips * max_len).astype(np.int32),
          np.where(keep, segment_ids, 0).reshape(rows, clips * max_len).astype(np.int32))


def null_text(batch: int, num_clips: int, max_len: int, embed_dim: Optional[int] = None):
  """The unconditional text of classifier-free guidance, shaped like the conditional text so
  both halves of a guided batch share one compiled forward: (text, text_segment_ids).

  Byte tokens (embed_dim None): BOS alone in every clip's slot, int32 (B, M * max_len).
  Embeddings (embed_dim E): one zero row per slot, float32 (B, M * max_len, E); this is what
  caption dropout trains for the 'embeddings' input (see step.drop_captions).
  """
  text, segment_ids = pack_captions(np.full((batch, num_clips), "", object), max_len)
  if embed_dim is None:
    return text, segment_ids
  return np.zeros((*text.shape, embed_dim), np.float32), segment_ids


# ----------------------------------------------------------------------------- masks (device)

def key_segment_ids(segment_ids):
  """Segment ids of text used as keys: padding (0) becomes -1, which no query carries.

  Video padding carries segment 0 as well; without this it would attend to text padding. With
  it, a query whose clip has no caption token sees no key, and every attention implementation
  returns zeros (not NaN) for such a query.
  """
  return jnp.where(segment_ids > 0, segment_ids, -1)


def first_of_segment(segment_ids):
  """(B, L) -> bool (B, L): True on the first token of each segment (> 0): BOS for bytes."""
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return (segment_ids > 0) & (segment_ids != previous)


def positions_in_segment(segment_ids):
  """(B, L) -> int32 (B, L): each token's index within its own run of equal segment ids."""
  index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  run_start = jax.lax.cummax(jnp.where(segment_ids != previous, index, 0), axis=1)
  return index - run_start


# ----------------------------------------------------------------------------- encoder

def _rms_norm(names, name, dtype):
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype,
                    scale_init=layers.param(nn.initializers.ones, names), name=name)


class TextLayer(nn.Module):
  """A pre-norm bidirectional transformer layer, attention confined to each caption."""
  width: int
  num_heads: int
  mlp_dim: int
  attention: str = "xla"
  dtype: str = "float32"
  rope_theta: float = 10000.0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x (B, Lt, D), positions and segment_ids (B, Lt) -> (B, Lt, D)."""
    head_dim = self.width // self.num_heads

    shape, names = (self.width, self.num_heads, head_dim), ("embed", "heads", "kv")
    h = _rms_norm(("embed",), "attention_norm", self.dtype)(x)
    q, k, v = (layers.Einsum("btd,dnh->btnh", shape, names, layers.INTO_HEADS, self.dtype,
                             name=n)(h) for n in ("query", "key", "value"))   # (B, Lt, N, H)
    q = layers.RMSNorm(name="query_norm")(q)
    k = layers.RMSNorm(name="key_norm")(k)
    # 1D RoPE: the 3D one with every rotary pair on the position within the caption.
    q = layers.rope_3d(q, positions[..., None], (head_dim,), self.rope_theta)
    k = layers.rope_3d(k, positions[..., None], (head_dim,), self.rope_theta)
    o = attention_lib.attention(q, k, v, segment_ids, implementation=self.attention,
                                kv_segment_ids=key_segment_ids(segment_ids))
    x = x + layers.Einsum("btnh,nhd->btd", (self.num_heads, head_dim, self.width),
                          ("heads", "kv", "embed"), layers.OUT_OF_HEADS, self.dtype,
                          name="out")(o)
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))

    h = _rms_norm(("embed",), "mlp_norm", self.dtype)(x)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=layers.param(nn.initializers.zeros, ("mlp",)))(h)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", None, "mlp"))
    h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("mlp", "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(h)
    return nn.with_logical_constraint(x + h, ("batch", None, "embed"))


class TextEncoder(nn.Module):
  """Byte tokens (B, Lt) int32 and their segment ids (B, Lt) -> float (B, Lt, width).

  Captions are short, so each device keeps whole captions: the text length is never sharded
  (None where video activations say 'length').
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  attention: str = "xla"
  dtype: str = "float32"
  rope_theta: float = 10000.0

  @nn.compact
  def __call__(self, tokens, segment_ids):
    x = nn.Embed(VOCAB_SIZE, self.width, dtype=self.dtype, name="embed",
                 embedding_init=layers.param(nn.linear.default_embed_init, ("vocab", "embed")))(tokens)
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    positions = positions_in_segment(segment_ids)
    for i in range(self.depth):
      x = TextLayer(self.width, self.num_heads, self.mlp_dim, self.attention, self.dtype,
                    self.rope_theta, name=f"layer_{i}")(x, positions, segment_ids)
    return _rms_norm(("embed",), "final_norm", self.dtype)(x)
