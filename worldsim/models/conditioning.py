"""Action conditioning: each token reads the actions of the frames it covers.

The loader hands the device per-clip, per-frame actions (B, M, F, A) (models frames: latent
frames in latent space, each holding its t pixel frames' actions side by side). `token_actions`
gathers, for every token, the actions of its clip (segment id) and of the pt frames its patch
spans (its t position), so a packed row of clips of any size conditions token by token.

`ActionEmbedder` turns them into a (B, L, D) vector that the DiT adds to the timestep
condition, so actions reach every block through adaLN, like the noise level. A "known" flag
rides along with the actions: dropped actions (action dropout, for guidance) are zeros with
the flag off, which the model learns to read as "any action", distinct from "no push" (zeros
with the flag on). The output layer starts at zero, so a fresh model ignores actions and
training starts from the unconditional model.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from worldsim.models import layers

# config.model.actions: what a source's per-frame actions are.
#   none        no action conditioning
#   continuous  config.model.action_size floats per pixel frame (physics world: an impulse, 2)
#   discrete    one id per pixel frame out of config.model.action_size (Atari: 18), one-hot
ACTION_MODES = ("none", "continuous", "discrete")


def action_features(actions, mode: str, size: int):
  """Raw per-frame actions as the loader ships them -> the model's action features.

  actions (..., n * k): n pixel frames side by side (a latent frame holds its t pixel frames'
  actions), k = size floats each (continuous) or k = 1 id each (discrete).
  Returns (..., n * size): continuous unchanged, discrete one-hot per frame.
  """
  if mode == "continuous":
    if actions.shape[-1] % size:
      raise ValueError(f"actions of width {actions.shape[-1]} are not whole frames of "
                       f"config.model.action_size={size} values")
    return actions.astype(jnp.float32)
  if mode == "discrete":
    ids = jnp.round(actions).astype(jnp.int32)
    one_hot = jax.nn.one_hot(ids, size, dtype=jnp.float32)       # (..., n, size)
    return one_hot.reshape(*actions.shape[:-1], actions.shape[-1] * size)
  raise ValueError(f"config.model.actions={mode!r}; choose from {ACTION_MODES}")


def token_action_dim(mode: str, size: int, frames_per_patch: int, frames_per_model_frame: int = 1):
  """The DiT's action_dim: a token spans frames_per_patch model frames (the patch's pt), each
  holding frames_per_model_frame pixel frames (the VAE's temporal factor in latent space, else
  1), each with `size` action features. 0 when mode is 'none'."""
  if mode == "none":
    return 0
  return frames_per_patch * frames_per_model_frame * size


def token_actions(actions, segment_ids, positions, frames_per_patch: int = 1):
  """(B, M, F, A) per-clip frame actions -> (B, L, pt * A) per token.

  Token l of row b takes actions[b, segment_ids - 1, t * pt : (t + 1) * pt] (t = its frame
  position), flattened; padding tokens (segment 0) and frames past F get zeros.
  """
  b, m, f, a = actions.shape
  pt = frames_per_patch
  clip = jnp.clip(segment_ids - 1, 0, m - 1)                             # (B, L)
  frame = positions[..., 0][..., None] * pt + jnp.arange(pt)             # (B, L, pt)
  rows = jnp.arange(b)[:, None, None]
  picked = actions[rows, clip[..., None], jnp.clip(frame, 0, f - 1)]     # (B, L, pt, A)
  valid = (segment_ids > 0)[..., None] & (frame < f)
  picked = jnp.where(valid[..., None], picked, 0.0)
  return picked.reshape(*segment_ids.shape, pt * a)


def drop_actions(rng, segment_ids, max_clips: int, rate: float):
  """(B, L) float 'known' flags: per clip, 0 with probability `rate` (action dropout)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (segment_ids.shape[0], max_clips + 1))
  return jnp.take_along_axis(keep, segment_ids, axis=1).astype(jnp.float32)


class ActionEmbedder(nn.Module):
  """(B, L, A) actions and (B, L) known flags -> (B, L, D), zero at initialisation."""
  width: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, actions, known):
    x = jnp.concatenate([actions * known[..., None], known[..., None]], axis=-1)
    x = nn.Dense(self.width, name="action_in",
                 kernel_init=layers.param(nn.initializers.lecun_normal(), (None, "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(x)
    x = nn.Dense(self.width, name="action_out",
                 kernel_init=layers.param(nn.initializers.zeros, ("mlp", "embed")),
                 bias_init=layers.param(nn.initializers.zeros, ("embed",)))(nn.silu(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
