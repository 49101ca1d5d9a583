"""The diffusion transformer over spacetime-patch tokens.

Inputs are token sequences, not grids, so one compiled model serves clips of every size:
  tokens      (B, L, P)  noisy latent patches
  positions   (B, L, 3)  per-token (t, h, w) patch coordinates, read by the 3D RoPE
  segment_ids (B, L)     which clip of the packed row a token belongs to (0 = padding)
  noise_level (B, L)     per-token t in [0, 1]; per-clip or per-frame t is a broadcast of it
Output: the predicted velocity (B, L, P).
With captions (DiTConfig.text = 'bytes' or 'embeddings', see models/text.py) it also takes
  text              (B, Lt) int32 byte tokens, or (B, Lt, E) float embeddings of any width E
  text_segment_ids  (B, Lt)  the clip each caption token belongs to (0 = padding)
and every block cross-attends from each video token to its own clip's caption.
With actions (DiTConfig.action_dim > 0, see models/conditioning.py) it also takes per-token
  actions (B, L, action_dim) and actions_known (B, L), added to the timestep condition.
With reward heads (DiTConfig.reward_heads) `DiT.heads` gives each token's [reward, terminal
logit] (B, L, 2), read off the last block by a small MLP (`RewardHeads`).

Positions and sizes never seen in training. A token's position is its integer (t, h, w)
patch index in its own clip, from (0, 0, 0) at the clip's first latent frame and top-left
patch; positions are never rescaled to a reference size. RoPE makes attention depend on
position differences only, so a clip of an unseen size or length meets the same local
offsets it trained on, plus longer-range offsets than any training clip had (a trained size
range of n patches on an axis covers offsets below n); those are extrapolated, which works for
moderate growth (a few times the trained extent) and degrades beyond. Rollouts keep counting
t (the k-th latent frame of a rollout has t = k), so within one attention window only the
offsets matter. With theta = 10^4 the slowest rotation has a wavelength of about 10^4 patches
on every axis, so no practical size wraps around.

Conditioning is adaLN-Zero in its "single" form (PixArt-alpha): the timestep embedding is
projected to the six modulation vectors once per token, and each block adds a learned table
of its own. Per-block projections of a per-token condition would cost 6 D^2 multiply-adds
per token per layer (a quarter of the block); the shared projection costs that once. The
shared projection and the output layer start at zero, so every block is the identity at
initialisation, as adaLN-Zero intends.

Captions enter as in PixArt-alpha: the text is encoded once per forward (a small bidirectional
byte-level TextEncoder, or a Dense projection of precomputed embeddings), and each block
cross-attends to it between self-attention and the MLP. The cross-attention's output
projection starts at zero, so a fresh model ignores its caption and training starts from the
unconditional identity blocks.

Block-causal rollouts (`causal=True`) keep a KV cache of the clean past, so a new chunk of
frames costs attention over the past, not a forward pass of it:
  cache = empty_cache(cfg, batch, capacity)
  cache = model.apply(v, context, pos, seg, cache, method=DiT.append_to_cache)  # noise level 0
  velocity = model.apply(v, chunk, chunk_pos, chunk_seg, t, kv_cache=cache)    # per Euler step
  cache = model.apply(v, done_chunk, chunk_pos, chunk_seg, cache, method=DiT.append_to_cache)
which gives the velocities of the full block-causal forward over [past; chunk]. `rollout` runs
that loop with Euler steps per chunk.
"""
import dataclasses
import math
from typing import NamedTuple, Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from worldsim.diffusion import samplers
from worldsim.models import attention as attention_lib
from worldsim.models import layers
from worldsim.models import conditioning
from worldsim.models import text as text_lib
from worldsim.parallel import context as context_lib

# name: (width, depth, heads); the DiT paper's S/B/L/XL, and a CPU-sized tiny.
VARIANTS = {
    "tiny": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

# What DiTConfig.text may be: no captions, byte tokens for the built-in TextEncoder, or
# precomputed embeddings from any external encoder.
TEXT_INPUTS = ("none", "bytes", "embeddings")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  token_dim: int            # P = pt * ph * pw * latent channels
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "xla"
  causal: bool = False      # block-causal by latent frame: a frame sees itself and the past
  dtype: str = "float32"
  rope_theta: float = 10000.0
  text: str = "none"        # one of TEXT_INPUTS
  text_depth: int = 2       # TextEncoder layers (text='bytes')
  # Self-attention over a sequence sharded on the mesh's context axis: 'none' (XLA gathers
  # what it needs), or one of parallel/context.py's STRATEGIES ('ulysses', 'ring',
  # 'ulysses_ring'), run inside the mesh set by jax.set_mesh.
  context_parallel: str = "none"
  remat: str = "none"       # what the backward recomputes per block: one of REMAT_POLICIES
  # Per-token action width (conditioning.token_actions: pt frames x the source's actions per
  # model frame); 0 = no action conditioning.
  action_dim: int = 0
  # A per-token head for [reward, terminal logit] read off the last block (`DiT.heads`).
  reward_heads: bool = False

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def rope_dims(self):
    """Head dims given to (t, h, w): h and w get equal even shares, t the rest."""
    spatial = (self.head_dim // 3) // 2 * 2
    return (self.head_dim - 2 * spatial, spatial, spatial)


def config_from(model_cfg, token_dim: int, action_dim: int = 0) -> DiTConfig:
  """A DiTConfig from the `model` block of an experiment config (variant plus overrides);
  action_dim from the data when model.actions is on (config.action_dim)."""
  width, depth, heads = VARIANTS[model_cfg.variant]
  return DiTConfig(
      token_dim=token_dim,
      width=model_cfg.width or width,
      depth=model_cfg.depth or depth,
      num_heads=model_cfg.num_heads or heads,
      mlp_ratio=model_cfg.mlp_ratio,
      attention=model_cfg.attention,
      causal=model_cfg.causal,
      dtype=model_cfg.dtype,
      # Read with defaults: configs written before captions existed stay valid.
      text=model_cfg.get("text", "none"),
      text_depth=model_cfg.get("text_depth", 2),
      context_parallel=model_cfg.get("context_parallel", "none"),
      remat=model_cfg.get("remat", "none"),
      action_dim=action_dim,
      reward_heads=model_cfg.get("reward_heads", False))


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT). (...,) -> (..., dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x):
  """LayerNorm without affine parameters: adaLN supplies scale and shift."""
  return nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=x.dtype)(x)


def _modulate(x, shift, scale):
  return x * (1 + scale) + shift


# The segment id of unwritten cache slots. Real ids are >= 0, so no query sees an empty slot.
_EMPTY_SLOT = -1


@flax.struct.dataclass
class KVCache:
  """The clean past of a block-causal rollout: every block's keys and values, preallocated.

  The capacity C is fixed when the cache is made, so every rollout step has one static shape
  and compiles once; each write lands at the running `length` (dynamic_update_slice).
    keys, values  tuples over blocks of (B, C, N, H); keys after QK-norm and RoPE, so a cached
                  key never needs its position again
    segment_ids   (B, C) int32, the clip of each cached token; _EMPTY_SLOT where unwritten
    frames        (B, C) int32, the latent frame of each cached token (the block-causal mask)
    length        () int32, the slots written so far
  Segment ids and frames are the same in every block, so they are kept once.
  """
  keys: tuple
  values: tuple
  segment_ids: jax.Array
  frames: jax.Array
  length: jax.Array

  @property
  def capacity(self) -> int:
    return self.segment_ids.shape[1]


def empty_cache(cfg: DiTConfig, batch: int, capacity: int) -> KVCache:
  """A cache with room for `capacity` tokens per row: the past plus one chunk, since a chunk's
  own keys are written next to the past while it is denoised."""
  zeros = jnp.zeros((batch, capacity, cfg.num_heads, cfg.head_dim), cfg.dtype)
  return KVCache(keys=(zeros,) * cfg.depth, values=(zeros,) * cfg.depth,
                 segment_ids=jnp.full((batch, capacity), _EMPTY_SLOT, jnp.int32),
                 frames=jnp.zeros((batch, capacity), jnp.int32),
                 length=jnp.zeros((), jnp.int32))


def _check_room(cache: KVCache, new_tokens: int):
  """Fails loudly where it can: dynamic_update_slice clamps its start index, so writing past
  the capacity would silently overwrite the newest cached tokens. Under jit `length` is traced
  and the caller must size the cache (as `rollout` does)."""
  try:
    length = int(cache.length)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return
  if length + new_tokens > cache.capacity:
    raise ValueError(f"the KV cache holds {length} of {cache.capacity} tokens and cannot take "
                     f"{new_tokens} more: make it with empty_cache(..., capacity) of at least "
                     f"the past plus one chunk")


class _BlockCache(NamedTuple):
  """What one block reads of a KVCache; segment ids and frames already include the chunk."""
  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  frames: jax.Array
  start: jax.Array       # where the chunk's own keys and values go


def _write(buffer, update, start):
  """Writes update (B, Lc, ...) into buffer (B, C, ...) at slot `start` of the length axis."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype), start, axis=1)


class EncodedText(NamedTuple):
  """The captions as every block's cross-attention reads them."""
  embeddings: jax.Array    # (B, Lt, D) at the DiT's width
  segment_ids: jax.Array   # (B, Lt) as keys: text_lib.key_segment_ids (padding -> -1)


class CrossAttention(nn.Module):
  """Video tokens (queries) attend to the caption tokens of their own clip (keys, values).

  No RoPE: a caption has no place in the video's (t, h, w) grid, and a caption token's place
  in the caption is already in its encoding. The output projection starts at zero, so the
  block stays the identity at initialisation whatever the caption.
  """
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, segment_ids, text: EncodedText):
    """x (B, L, D), segment_ids (B, L) -> (B, L, D), the update to add to x.

    A video token whose clip has no caption token (padding, segment 0) sees no key and gets
    zeros (see text_lib.key_segment_ids).
    """
    cfg = self.cfg
    shape, names = (cfg.width, cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv")
    h = _layer_norm(x)
    q = layers.Einsum("bld,dnh->blnh", shape, names, layers.INTO_HEADS, cfg.dtype, name="query")(h)
    k, v = (layers.Einsum("btd,dnh->btnh", shape, names, layers.INTO_HEADS, cfg.dtype,
                   name=n)(text.embeddings) for n in ("key", "value"))
    q, k = layers.RMSNorm(name="query_norm")(q), layers.RMSNorm(name="key_norm")(k)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", None, "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", None, "heads", "kv"))
    o = attention_lib.attention(q, k, v, segment_ids, implementation=cfg.attention,
                                kv_segment_ids=text.segment_ids)
    return layers.Einsum("blnh,nhd->bld", (cfg.num_heads, cfg.head_dim, cfg.width),
                  ("heads", "kv", "embed"), dtype=cfg.dtype, name="out",
                  init=nn.initializers.zeros)(o)


class Block(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, modulation, positions, segment_ids, cache: Optional[_BlockCache] = None,
               text: Optional[EncodedText] = None):
    """-> (x, (keys, values)): the keys and values attended to, i.e. the tokens' own, or with a
    cache, the cache's buffers with the tokens' own written in. With `text`, cross-attention to
    the captions follows self-attention."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    table = self.param("modulation_table", layers.param(nn.initializers.zeros, (None, "embed")),
                       (6, cfg.width))
    mod = modulation + table.astype(modulation.dtype)                      # (B, L, 6, D)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod.astype(dtype), 6, axis=2)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
        m[:, :, 0] for m in (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m))

    h = _modulate(_layer_norm(x), shift_a, scale_a)
    q, k, v = (layers.Einsum("bld,dnh->blnh", (cfg.width, cfg.num_heads, cfg.head_dim),
                      ("embed", "heads", "kv"), layers.INTO_HEADS, cfg.dtype, name=n)(h)
               for n in ("query", "key", "value"))
    q, k = layers.RMSNorm(name="query_norm")(q), layers.RMSNorm(name="key_norm")(k)
    q = layers.rope_3d(q, positions, cfg.rope_dims, cfg.rope_theta)
    k = layers.rope_3d(k, positions, cfg.rope_dims, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    # positions[..., 0] is each token's latent frame within its own clip.
    if cache is None and cfg.context_parallel != "none":
      o = context_lib.context_attention(q, k, v, segment_ids, strategy=cfg.context_parallel,
                                        implementation=cfg.attention,
                                        q_frames=positions[..., 0], causal=cfg.causal)
    elif cache is None:
      o = attention_lib.attention(q, k, v, segment_ids, implementation=cfg.attention,
                                  q_frames=positions[..., 0], causal=cfg.causal)
    else:                     # a rollout's chunk: short, its cache held whole on each device
      # The chunk's keys join the past in the buffer, so attention runs over one static length;
      # unwritten slots are masked by their segment id, later frames by the causal mask.
      k = nn.with_logical_constraint(_write(cache.keys, k, cache.start),
                                     ("batch", "length", "heads", "kv"))
      v = nn.with_logical_constraint(_write(cache.values, v, cache.start),
                                     ("batch", "length", "heads", "kv"))
      o = attention_lib.attention(q, k, v, segment_ids, implementation=cfg.attention,
                                  kv_segment_ids=cache.segment_ids, q_frames=positions[..., 0],
                                  kv_frames=cache.frames, causal=cfg.causal)
    o = layers.Einsum("blnh,nhd->bld", (cfg.num_heads, cfg.head_dim, cfg.width),
               ("heads", "kv", "embed"), layers.OUT_OF_HEADS, cfg.dtype, name="out")(o)
    x = x + gate_a * o
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if text is not None:
      x = x + CrossAttention(cfg, name="cross_attention")(x, segment_ids, text)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    h = _modulate(_layer_norm(x), shift_m, scale_m)
    h = nn.Dense(cfg.mlp_dim, dtype=dtype, name="mlp_in",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=layers.param(nn.initializers.zeros, ("mlp",)))(h)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dense(cfg.width, dtype=dtype, name="mlp_out",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("mlp", "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(h)
    x = x + gate_m * h
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), (k, v)


# What DiT.heads predicts for each token, in this order (Atari world models, as in DIAMOND).
HEAD_OUTPUTS = ("reward", "terminal_logit")


class RewardHeads(nn.Module):
  """The last block's hidden state (B, L, D) -> (B, L, 2): [reward, terminal logit] per token.

  It reads the state before the output adaLN, which shapes it for the velocity at the token's
  noise level, through an MLP of its own. The output layer starts at zero: a fresh head says
  reward 0 and terminal probability 1/2, and the trunk only feels it once it has learned.
  """
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    h = nn.Dense(cfg.width, dtype=dtype, name="hidden",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=layers.param(nn.initializers.zeros, ("mlp",)))(_layer_norm(x))
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    out = nn.Dense(len(HEAD_OUTPUTS), dtype=dtype, name="out",
                   kernel_init=layers.param(nn.initializers.zeros, ("mlp", None)),
                   bias_init=layers.param(nn.initializers.zeros, (None,)))(h)
    return out.astype(jnp.float32)


# Rematerialisation of each block in the backward pass:
#   none     keep every activation (fastest, most memory)
#   full     keep only each block's input; recompute the block (least memory, ~1.3x time)
#   dots     keep the matmul outputs that have no batch dimension (the projections and MLP),
#            recompute the rest (norms, activations, attention's softmax)
#   offload  as dots, but the kept outputs wait in pinned host memory (accelerators with a
#            host memory space; XLA moves them back for the backward)
REMAT_POLICIES = ("none", "full", "dots", "offload")


def remat_block(policy: str):
  """The Block class, wrapped in nn.remat under `policy` (REMAT_POLICIES)."""
  if policy == "none":
    return Block
  if policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={policy!r} is unknown; choose from {REMAT_POLICIES}")
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }
  return nn.remat(Block, policy=policies[policy], prevent_cse=True)


class DiT(nn.Module):
  cfg: DiTConfig

  def __call__(self, tokens, positions, segment_ids, noise_level,
               kv_cache: Optional[KVCache] = None, text=None, text_segment_ids=None,
               actions=None, actions_known=None):
    """The velocity (B, L, P) float32.

    With kv_cache (causal models only), the tokens are a chunk that also attends to the cached
    past, and the velocity equals the full block-causal forward's over [past; chunk] at these
    tokens. The cache is read, not changed: `append_to_cache` adds a finished chunk.
    text, text_segment_ids: the captions, required exactly when cfg.text is not 'none' (module
    docstring). The cache holds no caption keys: they are recomputed from `text` on every call.
    actions (B, L, action_dim), actions_known (B, L): each token's actions and whether they are
    given (0: dropped or unknown); required exactly when cfg.action_dim > 0
    (models/conditioning.py).
    """
    return self._forward(tokens, positions, segment_ids, noise_level, kv_cache, text,
                         text_segment_ids, actions, actions_known)[0]

  def heads(self, tokens, positions, segment_ids, noise_level, kv_cache: Optional[KVCache] = None,
            text=None, text_segment_ids=None, actions=None, actions_known=None):
    """(B, L, 2) float32 per token: [reward, terminal logit] (HEAD_OUTPUTS) of the model frame
    the token lies in, for a model with cfg.reward_heads; the arguments are __call__'s. Each
    token of a frame predicts on its own: a caller averages the tokens of a frame."""
    return self.velocity_and_heads(tokens, positions, segment_ids, noise_level, kv_cache, text,
                                   text_segment_ids, actions, actions_known)[1]

  def velocity_and_heads(self, tokens, positions, segment_ids, noise_level,
                         kv_cache: Optional[KVCache] = None, text=None, text_segment_ids=None,
                         actions=None, actions_known=None):
    """(__call__'s velocity, `heads`) from one forward pass: what training reads."""
    if not self.cfg.reward_heads:
      raise ValueError("this model has no reward heads: set config.model.reward_heads=True "
                       "(a source with rewards, e.g. atari) and train it")
    velocity, _, heads = self._forward(tokens, positions, segment_ids, noise_level, kv_cache,
                                       text, text_segment_ids, actions, actions_known)
    return velocity, heads

  def append_to_cache(self, tokens, positions, segment_ids, kv_cache: KVCache, text=None,
                      text_segment_ids=None, noise_level=None, actions=None,
                      actions_known=None) -> KVCache:
    """Runs clean tokens (noise level 0) attending to the cache and to themselves, and returns
    the cache with their keys and values appended: the context frames at the start of a
    rollout (into an empty cache), then each finished chunk. Under jit the unused velocity is
    dead code, so this costs the blocks' forward up to the last block's keys and values.
    A captioned model needs the captions here too: later blocks' keys depend on them.
    noise_level (B, L): for context that was noised on purpose (worldsim/rollout.py)."""
    if noise_level is None:
      noise_level = jnp.zeros(segment_ids.shape, jnp.float32)
    return self._forward(tokens, positions, segment_ids, noise_level, kv_cache, text,
                         text_segment_ids, actions, actions_known)[1]

  def _encode_text(self, text, text_segment_ids) -> Optional[EncodedText]:
    """The captions at the DiT's width, once per forward; None for an uncaptioned model."""
    cfg = self.cfg
    if cfg.text not in TEXT_INPUTS:
      raise ValueError(f"config.model.text={cfg.text!r} is not one of {TEXT_INPUTS}")
    if cfg.text == "none":
      if text is not None:
        raise ValueError("captions were given to a model without text conditioning: set "
                         "config.model.text='bytes' or 'embeddings', or leave the text out")
      return None
    if text is None or text_segment_ids is None:
      raise ValueError(f"config.model.text={cfg.text!r} needs text and text_segment_ids; "
                       f"for an unconditional forward pass, pass text.null_text(...)")
    chex.assert_shape(text_segment_ids, text.shape[:2])
    if cfg.text == "bytes":
      chex.assert_rank(text, 2)
      chex.assert_type(text, int)
      embeddings = text_lib.TextEncoder(
          cfg.width, cfg.text_depth, cfg.num_heads, cfg.mlp_dim, cfg.attention, cfg.dtype,
          cfg.rope_theta, name="text_encoder")(text, text_segment_ids)
    else:
      chex.assert_rank(text, 3)
      embeddings = nn.Dense(cfg.width, dtype=jnp.dtype(cfg.dtype), name="text_projection",
                            kernel_init=layers.param(nn.initializers.lecun_normal(), (None, "embed")),
                            bias_init=layers.param(nn.initializers.zeros, ("embed",)))(text)
    embeddings = nn.with_logical_constraint(embeddings, ("batch", None, "embed"))
    return EncodedText(embeddings, text_lib.key_segment_ids(text_segment_ids))

  @nn.compact
  def _forward(self, tokens, positions, segment_ids, noise_level, kv_cache, text=None,
               text_segment_ids=None, actions=None, actions_known=None):
    """-> (velocity, kv_cache with the tokens appended or None without a cache, the reward
    heads' (B, L, 2) or None without them)."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    if kv_cache is not None:
      if not cfg.causal:
        raise ValueError("a KV cache needs a block-causal model (config.model.causal=True): in "
                         "a bidirectional one the past attends to the future, so its cached "
                         "keys would change with every new chunk")
      _check_room(kv_cache, segment_ids.shape[1])
    encoded_text = self._encode_text(text, text_segment_ids)
    d = cfg.width
    x = nn.Dense(d, dtype=dtype, name="patch_embed",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), ("patch", "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(tokens.astype(dtype))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # Timestep -> condition c (B, L, D) -> shared modulation (B, L, 6, D).
    c = timestep_embedding(noise_level, 256)
    c = nn.Dense(d, name="time_in", kernel_init=layers.param(nn.initializers.normal(0.02), (None, "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(c)
    c = nn.Dense(d, name="time_out", kernel_init=layers.param(nn.initializers.normal(0.02), ("mlp", "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(nn.silu(c))
    if cfg.action_dim:            # actions join the noise level in every block's adaLN
      if actions is None or actions_known is None:
        raise ValueError(f"this model is action-conditioned (action_dim={cfg.action_dim}): "
                         "pass actions and actions_known (zeros to leave them unknown)")
      chex.assert_shape(actions, (*segment_ids.shape, cfg.action_dim))
      c = c + conditioning.ActionEmbedder(d, name="actions")(actions, actions_known)
    elif actions is not None:
      raise ValueError("actions were given to a model without action conditioning: set "
                       "config.model.actions='continuous' or 'discrete', or leave them out")
    c = nn.with_logical_constraint(c, ("batch", "length", "embed"))
    # In the compute dtype: per token it costs 6 D^2, half a block, and the blocks cast its
    # output to that dtype anyway. The time MLP above stays float32 (2 D^2 once per token):
    # its sinusoidal input needs the precision.
    modulation = layers.Einsum("bld,dke->blke", (d, 6, d), ("embed", None, "mlp"), name="modulation",
                        init=nn.initializers.zeros, dtype=cfg.dtype)(nn.silu(c))
    modulation = nn.with_logical_constraint(modulation, ("batch", "length", None, "embed"))

    if kv_cache is not None:
      chunk_length = segment_ids.shape[1]
      start = kv_cache.length
      kv_cache = kv_cache.replace(
          segment_ids=_write(kv_cache.segment_ids, segment_ids.astype(jnp.int32), start),
          frames=_write(kv_cache.frames, positions[..., 0].astype(jnp.int32), start),
          length=start + chunk_length)

    keys, values = [], []
    block = remat_block(cfg.remat)
    for i in range(cfg.depth):
      block_cache = None if kv_cache is None else _BlockCache(
          kv_cache.keys[i], kv_cache.values[i], kv_cache.segment_ids, kv_cache.frames, start)
      x, (k, v) = block(cfg, name=f"block_{i}")(x, modulation, positions, segment_ids,
                                                 block_cache, encoded_text)
      keys.append(k)
      values.append(v)
    if kv_cache is not None:
      kv_cache = kv_cache.replace(keys=tuple(keys), values=tuple(values))

    heads = RewardHeads(cfg, name="reward_heads")(x) if cfg.reward_heads else None
    final_table = self.param("final_table", layers.param(nn.initializers.zeros, (None, "embed")), (2, d))
    final = (c[:, :, None].astype(jnp.float32) + final_table).astype(dtype)  # (B, L, 2, D)
    shift, scale = final[:, :, 0], final[:, :, 1]
    x = _modulate(_layer_norm(x), shift, scale)
    out = nn.Dense(cfg.token_dim, name="head", dtype=dtype,
                   kernel_init=layers.param(nn.initializers.zeros, ("embed", "patch")),
                   bias_init=layers.param(nn.initializers.zeros, ("patch",)))(x)
    return out.astype(jnp.float32), kv_cache, heads


def rollout(model: DiT, variables, context, positions, segment_ids, noise, *, steps: int,
            shift=1.0, text=None, text_segment_ids=None):
  """Generates a clip chunk by chunk after clean context frames, with a KV cache.

    context      (B, Lx, P) clean tokens of the first latent frames (Lx may be 0)
    positions    (B, Lx + n Lc, 3), segment_ids (B, Lx + n Lc): the whole clip, frame-major
    noise        (B, n, Lc, P): the starting noise of each of n chunks of Lc tokens
    text, text_segment_ids: the captions of a captioned model (DiT.__call__), read by every
                 chunk; their segment ids must match `segment_ids`
  Diffusion forcing: each chunk is integrated from its noise with `steps` Euler steps while
  attending to the cached past at noise level 0; the finished chunk is then run clean once
  and appended to the cache. Returns (B, Lx + n Lc, P): the context as given, then the chunks.
  Jit it with `model` and `steps` static (e.g. functools.partial before jax.jit).
  """
  b, n, chunk_length, token_dim = noise.shape
  context_length = context.shape[1]
  total = context_length + n * chunk_length
  chex.assert_shape(context, (b, context_length, token_dim))
  chex.assert_shape(positions, (b, total, 3))
  chex.assert_shape(segment_ids, (b, total))

  def per_chunk(x):                                           # (B, n Lc, ...) -> (n, B, Lc, ...)
    return x.reshape(b, n, chunk_length, *x.shape[2:]).swapaxes(0, 1)

  chunks = (noise.swapaxes(0, 1), per_chunk(positions[:, context_length:]),
            per_chunk(segment_ids[:, context_length:]))
  # Room for every chunk: the last one's append is wasted work (one clean forward of a chunk in
  # a rollout of n * steps), but one scan body compiles once.
  cache = empty_cache(model.cfg, b, total)
  captions = dict(text=text, text_segment_ids=text_segment_ids)
  if context_length:
    cache = model.apply(variables, context, positions[:, :context_length],
                        segment_ids[:, :context_length], cache, method=DiT.append_to_cache,
                        **captions)

  def generate_and_append(cache, chunk):
    chunk_noise, chunk_positions, chunk_segment_ids = chunk

    def velocity(x, t):
      noise_level = jnp.full(chunk_segment_ids.shape, t, jnp.float32)
      return model.apply(variables, x, chunk_positions, chunk_segment_ids, noise_level,
                         kv_cache=cache, **captions)

    x0 = samplers.euler(velocity, chunk_noise, steps, shift)
    cache = model.apply(variables, x0, chunk_positions, chunk_segment_ids, cache,
                        method=DiT.append_to_cache, **captions)
    return cache, x0

  _, generated = jax.lax.scan(generate_and_append, cache, chunks)       # (n, B, Lc, P)
  generated = generated.swapaxes(0, 1).reshape(b, n * chunk_length, token_dim)
  return jnp.concatenate([context, generated.astype(context.dtype)], axis=1)
