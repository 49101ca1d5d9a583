"""Samplers that integrate the learned velocity field from noise (t = 1) to data (t = 0)."""
from typing import Callable

import jax
import jax.numpy as jnp

from worldsim.diffusion import flow


def time_grid(steps: int, shift):
  """steps + 1 decreasing times from 1 to 0, spaced like the shifted training times."""
  return flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def euler(velocity_fn: Callable, x1, steps: int, shift=1.0):
  """Euler integration of dx/dt = v(x, t) from t = 1 to 0.

  velocity_fn(x, t) -> v, with t a float32 scalar; x1 is pure noise.
  """
  ts = time_grid(steps, shift)

  def step(x, t_pair):
    t, t_next = t_pair
    return x + (t_next - t) * velocity_fn(x, t), None

  x0, _ = jax.lax.scan(step, x1, (ts[:-1], ts[1:]))
  return x0
