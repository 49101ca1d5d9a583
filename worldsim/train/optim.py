"""optax chains and schedules."""
import jax
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to a tenth of it by the last step."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.learning_rate * 0.1)


def make_optimizer(optim_cfg, total_steps: int):
  """AdamW with global-norm clipping; decay only on matrices (not norms, biases or tables)."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return tx, schedule
