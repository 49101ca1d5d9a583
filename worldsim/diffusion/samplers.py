"""Samplers that integrate the learned velocity field from noise (t = 1) to data (t = 0).

Rectified flow (flow.py): x_t = (1 - t) x0 + t eps, v = eps - x0, so the sample is the end of
the ODE dx/dt = v(x, t) run from t = 1 down to t = 0 on the shifted time grid (time_grid).

  euler     first order, one model evaluation (NFE) per step
  heun      second order (trapezoid predictor-corrector), two NFE per step; the last step,
            onto t = 0, is plain Euler (Karras et al. 2022), so 2 * steps - 1 NFE
  dpmpp_2m  DPM-Solver++(2M) (Lu et al. 2022) in rectified flow's terms: alpha_t = 1 - t,
            sigma_t = t, log-SNR lambda = log((1 - t) / t), data prediction x0 = x_t - t v;
            a two-step multistep method in lambda, one NFE per step. Its first steps (from
            t = 1, lambda = -inf) and its last (onto t = 0) are first order, and on a grid
            uniform in (shifted) t the lambda steps next to both ends do not shrink with the
            step count, so on tests/test_samplers.py's Gaussian its error falls as about
            steps^-1.6 at 32-256 steps (Heun: steps^-2), while it needs the fewest NFE for a
            given error (benchmarks/samplers.py)

Every sampler is an `init(x1) -> carry` and a `step(velocity_fn, carry, t_prev, t, t_next)
-> carry` moving x from t to t_next (t_prev: the previous step's start, 1 or more on the first
step; `step_times` reads the three off a grid), so a caller can run the steps in a
lax.fori_loop (`sample`) or one by one from Python with a jitted step that compiles once for
any number of steps (what worldsim.sample does, to show progress); both give the same
numbers. `Sampler.nfe(steps)` is the number of velocity_fn calls. A guided velocity_fn
(classifier-free guidance, in sampling.py) runs the caption's and the null caption's pass in
one batch of twice the rows: that doubles the batch of each evaluation, not the NFE counted
here.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from worldsim.diffusion import flow


def unshift_time(t, shift):
  """The inverse of flow.shift_time: the unshifted u with shift_time(u, shift) = t."""
  return t / (shift - (shift - 1.0) * t)


def time_grid(steps: int, shift, t_start=1.0):
  """steps + 1 decreasing times from t_start (1: pure noise) to 0, spaced like the shifted
  training times. A t_start < 1 (SDEdit, refine) takes the tail of the same schedule."""
  t_start = jnp.asarray(t_start, jnp.float32)
  u_start = jnp.where(t_start >= 1.0, 1.0, unshift_time(t_start, shift))   # 1 exactly
  return flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1) * u_start, shift)


class Carry(NamedTuple):
  x: jax.Array            # the current x_t
  x0_prev: jax.Array      # dpmpp_2m: the previous step's data prediction (unused otherwise)


def _init(x1) -> Carry:
  return Carry(x1, jnp.zeros_like(x1))


def step_times(ts, i):
  """(t_prev, t, t_next) of step i of the grid ts; t_prev = 1 (no previous step) for i = 0.
  A Python int i reads them on the host (a Python loop); a traced i, in the trace."""
  if isinstance(i, int):
    return (ts[i - 1] if i > 0 else 1.0), ts[i], ts[i + 1]
  return jnp.where(i > 0, ts[jnp.maximum(i - 1, 0)], 1.0), ts[i], ts[i + 1]


def _euler_step(velocity_fn, carry: Carry, t_prev, t, t_next) -> Carry:
  del t_prev
  return carry._replace(x=carry.x + (t_next - t) * velocity_fn(carry.x, t))


def _heun_step(velocity_fn, carry: Carry, t_prev, t, t_next) -> Carry:
  del t_prev
  x, dt = carry.x, t_next - t
  v = velocity_fn(x, t)
  predicted = x + dt * v

  def corrected():                    # trapezoid rule with the velocity at the prediction
    return x + dt * 0.5 * (v + velocity_fn(predicted, t_next))

  # lax.cond, not where: the step onto t = 0 really skips the second evaluation.
  return carry._replace(x=jax.lax.cond(t_next > 0, corrected, lambda: predicted))


def _log_snr(t):
  """lambda = log((1 - t) / t), finite for t in (0, 1); callers mask the ends."""
  t = jnp.clip(t, 1e-7, 1.0 - 1e-7)
  return jnp.log1p(-t) - jnp.log(t)


def _dpmpp_2m_step(velocity_fn, carry: Carry, t_prev, t, t_next) -> Carry:
  x = carry.x
  x0 = x - t * velocity_fn(x, t)                     # the data prediction at t
  # The second-order correction needs a finite previous step in lambda: not on the first step,
  # nor on the second when the first started at t = 1 (lambda = -inf, so h_prev = inf and the
  # correction vanishes), nor on the step onto t = 0 (lambda = +inf: the update is x0 itself).
  second = (t_prev < 1.0) & (t_next > 0.0)
  h = _log_snr(t_next) - _log_snr(t)
  h_prev = _log_snr(t) - _log_snr(t_prev)
  half_inv_r = jnp.where(second, h / (2.0 * jnp.where(second, h_prev, 1.0)), 0.0)  # h / 2h_prev
  d = (1.0 + half_inv_r) * x0 - half_inv_r * carry.x0_prev
  # DPM-Solver++ update x' = (sigma'/sigma) x - alpha' (e^-h - 1) D, with alpha = 1 - t and
  # sigma = t, simplifies to x' = (t'/t) x + (1 - t'/t) D: exact at t = 1 and at t' = 0.
  ratio = t_next / t
  return Carry(ratio * x + (1.0 - ratio) * d, x0)


class Sampler(NamedTuple):
  name: str
  order: int                          # the global order of accuracy in the step size
  step: Callable                      # (velocity_fn, carry, t_prev, t, t_next) -> carry
  nfe: Callable                       # steps -> number of velocity_fn calls
  init: Callable = _init              # x1 -> carry


SAMPLERS = {
    "euler": Sampler("euler", 1, _euler_step, lambda steps: steps),
    "heun": Sampler("heun", 2, _heun_step, lambda steps: max(2 * steps - 1, 0)),
    "dpmpp_2m": Sampler("dpmpp_2m", 2, _dpmpp_2m_step, lambda steps: steps),
}


def get(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"sampler={name!r} is not one of {sorted(SAMPLERS)}")
  return SAMPLERS[name]


def sample(velocity_fn: Callable, x1, steps: int, shift=1.0, sampler: str = "euler",
           t_start=1.0):
  """Integrates dx/dt = velocity_fn(x, t) from t_start (1: x1 is pure noise) to 0 in `steps`
  steps of `sampler`. Returns (x0, nfe): the sample and the number of velocity_fn calls.

  velocity_fn(x, t) -> v, with t a float32 scalar.
  """
  s = get(sampler)
  ts = time_grid(steps, shift, t_start)
  carry = jax.lax.fori_loop(0, steps, lambda i, c: s.step(velocity_fn, c, *step_times(ts, i)),
                            s.init(x1))
  return carry.x, s.nfe(steps)


def euler(velocity_fn: Callable, x1, steps: int, shift=1.0):
  """Euler integration of dx/dt = v(x, t) from t = 1 to 0; returns x0 alone."""
  return sample(velocity_fn, x1, steps, shift, "euler")[0]


def heun(velocity_fn: Callable, x1, steps: int, shift=1.0):
  """Heun's second-order method from t = 1 to 0 (last step Euler); returns x0 alone."""
  return sample(velocity_fn, x1, steps, shift, "heun")[0]


def dpmpp_2m(velocity_fn: Callable, x1, steps: int, shift=1.0):
  """DPM-Solver++(2M) from t = 1 to 0; returns x0 alone."""
  return sample(velocity_fn, x1, steps, shift, "dpmpp_2m")[0]
