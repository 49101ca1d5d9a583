"""Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0; t = 1 is noise.

Training draws t from a logit-normal (mass in the middle, where the velocity is hardest to
predict), then shifts it towards noise for clips with many tokens: a larger clip keeps more
of its structure at a given t, so it needs more noise to be destroyed (SD3, Open-Sora 2.0).
"""
import jax
import jax.numpy as jnp


def shift_for_tokens(tokens_per_clip, base_tokens: int, max_shift: float):
  """The time shift for a clip of `tokens_per_clip` tokens: sqrt(tokens / base), in [1, max]."""
  ratio = jnp.asarray(tokens_per_clip, jnp.float32) / base_tokens
  return jnp.clip(jnp.sqrt(ratio), 1.0, max_shift)


def shift_time(t, shift):
  """Maps t in [0, 1] to shift * t / (1 + (shift - 1) t); shift > 1 moves t towards noise."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng, shape, mean: float, std: float):
  """Logit-normal t in (0, 1)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))


def noise(x0, eps, t):
  """The interpolant x_t; t broadcasts against x0's leading dims."""
  t = t[..., None]
  return (1.0 - t) * x0 + t * eps


def velocity_target(x0, eps):
  return eps - x0
