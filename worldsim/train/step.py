"""Pure update functions: the train state and the DiT rectified-flow step."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from worldsim.diffusion import flow


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array        # raw uint32 key data: checkpoints store it as a plain array


def init_state(model: nn.Module, tx: optax.GradientTransformation, batch: dict, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, batch["tokens"], batch["positions"], batch["segment_ids"],
                         jnp.zeros(batch["segment_ids"].shape, jnp.float32))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=state_rng)


def per_token(values, segment_ids):
  """Broadcasts per-segment values (B, S) to tokens (B, L) by segment id."""
  return jnp.take_along_axis(values, segment_ids, axis=1)


def tokens_per_segment(segment_ids):
  """(B, L) -> (B, L): the token count of each token's own segment."""
  counts = jax.vmap(lambda s: jnp.bincount(s, length=s.shape[0]))(segment_ids)
  return per_token(counts, segment_ids)


def frame_runs(segment_ids, frames):
  """(B, L) -> (B, L): a run index that changes wherever the (segment, latent frame) changes.

  Tokens are frame-major within a clip, so the tokens of one frame of one clip are a
  contiguous run; run r's values live in column r of a (B, L) table.
  """
  changed = (segment_ids[:, 1:] != segment_ids[:, :-1]) | (frames[:, 1:] != frames[:, :-1])
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]),
                          jnp.cumsum(changed, axis=1, dtype=segment_ids.dtype)], axis=1)


def sample_noise_levels(rng, segment_ids, frames, diffusion_cfg):
  """Per-token t: one t per clip, or (diffusion forcing) one t per latent frame of the clip.

  A share `per_frame_noise` of the clips draws a t for each latent frame, so one model learns
  to denoise a whole clip jointly, to continue clean frames and to roll out chunk by chunk.
  """
  d = diffusion_cfg
  clip_rng, frame_rng, choice_rng = jax.random.split(rng, 3)
  t_clip = per_token(flow.sample_time(clip_rng, segment_ids.shape, d.logit_normal_mean,
                                      d.logit_normal_std), segment_ids)
  t_frame = per_token(flow.sample_time(frame_rng, segment_ids.shape, d.logit_normal_mean,
                                       d.logit_normal_std), frame_runs(segment_ids, frames))
  use_frames = per_token(jax.random.uniform(choice_rng, segment_ids.shape) < d.per_frame_noise,
                         segment_ids)
  t = jnp.where(use_frames, t_frame, t_clip)
  shift = flow.shift_for_tokens(tokens_per_segment(segment_ids), d.shift_base_tokens, d.max_shift)
  return flow.shift_time(t, shift)


def dit_loss(params, model, batch, rng, diffusion_cfg):
  """Rectified-flow loss: mean squared velocity error over the real (non-padding) tokens."""
  x0, segment_ids = batch["tokens"], batch["segment_ids"]
  t_rng, eps_rng = jax.random.split(rng)
  t = sample_noise_levels(t_rng, segment_ids, batch["positions"][..., 0], diffusion_cfg)
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  v_pred = model.apply({"params": params}, flow.noise(x0, eps, t), batch["positions"],
                       segment_ids, t)
  err = jnp.mean(jnp.square(v_pred - flow.velocity_target(x0, eps)), axis=-1)
  valid = (segment_ids > 0).astype(jnp.float32)
  return jnp.sum(err * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def ema_update(ema, params, decay, step):
  # Warm the decay up so early EMA weights are not dominated by the random initialisation.
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def dit_train_step(state: TrainState, batch: dict, *, model, tx, schedule, diffusion_cfg,
                   ema_decay: float):
  """One optimiser update. Pure: jit it with the state donated."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = jax.value_and_grad(dit_loss)(state.params, model, batch, rng, diffusion_cfg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_decay, state.step))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step)}
  return new_state, metrics
