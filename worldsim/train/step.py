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


def dit_loss(params, model, batch, rng, diffusion_cfg):
  """Rectified-flow loss: mean squared velocity error over the real (non-padding) tokens."""
  x0, segment_ids = batch["tokens"], batch["segment_ids"]
  t_rng, eps_rng = jax.random.split(rng)
  # One t per clip (segment); column s of t_segment belongs to segment id s.
  t_segment = flow.sample_time(t_rng, segment_ids.shape, diffusion_cfg.logit_normal_mean,
                               diffusion_cfg.logit_normal_std)
  shift = flow.shift_for_tokens(tokens_per_segment(segment_ids), diffusion_cfg.shift_base_tokens,
                                diffusion_cfg.max_shift)
  t = flow.shift_time(per_token(t_segment, segment_ids), shift)
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
