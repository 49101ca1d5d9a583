"""The samplers against rectified flow's exact solution for Gaussian data.

Data x0 ~ N(mu, s^2) per dimension, eps ~ N(0, 1), x_t = (1 - t) x0 + t eps. With a = 1 - t,
x_t is Gaussian with mean a mu and variance V(t) = a^2 s^2 + t^2, jointly Gaussian with x0
and eps, so the regressions are linear:
  E[x0  | x_t = x] = mu + (a s^2 / V) (x - a mu)
  E[eps | x_t = x] = (t / V) (x - a mu)
and the velocity the model learns, v(x, t) = E[eps - x0 | x_t = x], is
  v(x, t) = ((t - a s^2) / V) (x - a mu) - mu.
The flow of dx/dt = v maps noise x1 = z to x_t = a mu + sqrt(V(t)) z (differentiate: V' =
2 (t - a s^2), so d/dt sqrt(V) z = ((t - a s^2) / V) (x_t - a mu)), and at t = 0 to
x0 = mu + s z: the exact sample a perfect sampler gives for the same noise.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldsim.diffusion import samplers

MU = np.array([-1.0, 0.5, 2.0])
S = np.array([0.5, 1.0, 1.5])


def gaussian_velocity(x, t):
  a = 1.0 - t
  var = a * a * S * S + t * t
  return (t - a * S * S) / var * (x - a * MU) - MU


def gaussian_flow(z, t):
  """The exact flow from noise z (t = 1) to time t."""
  a = 1.0 - t
  return a * MU + np.sqrt(a * a * S * S + t * t) * np.asarray(z)


def _noise(n=2048):
  return np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32)


def test_the_closed_form_velocity_is_the_regression_of_eps_minus_x0():
  rng = np.random.default_rng(0)
  x0 = MU + S * rng.standard_normal((200_000, 3))
  eps = rng.standard_normal((200_000, 3))
  for t in (0.2, 0.5, 0.9):
    xt = (1 - t) * x0 + t * eps
    for d in range(3):                  # least squares of (eps - x0) on [x_t, 1]
      design = np.stack([xt[:, d], np.ones(len(xt))], axis=1)
      coef = np.linalg.lstsq(design, eps[:, d] - x0[:, d], rcond=None)[0]
      probe = np.array([-1.0, 0.0, 1.0])
      v = gaussian_velocity(np.broadcast_to(probe[:, None], (3, 3)).astype(np.float32), t)
      np.testing.assert_allclose(coef[0] * probe + coef[1], v[:, d], atol=0.02)


def test_the_flow_map_solves_the_ode_and_ends_at_the_data():
  z = _noise(8).astype(np.float64)
  for t in (0.1, 0.5, 0.95):
    dt = 1e-4
    derivative = (gaussian_flow(z, t + dt) - gaussian_flow(z, t - dt)) / (2 * dt)
    np.testing.assert_allclose(derivative, gaussian_velocity(gaussian_flow(z, t), t),
                               atol=1e-5)
  np.testing.assert_allclose(gaussian_flow(z, 1.0), z, atol=1e-6)
  np.testing.assert_allclose(gaussian_flow(z, 0.0), MU + S * z, atol=1e-6)


@pytest.mark.parametrize("name,low,high", [("euler", 0.9, 1.1), ("heun", 1.85, 2.2),
                                           # log-SNR steps near t = 0 and 1 stay O(1) on a
                                           # grid uniform in t, so 2M nears 2 slowly
                                           ("dpmpp_2m", 1.5, 2.2)])
def test_samplers_converge_to_the_exact_flow_at_their_order(name, low, high):
  z = _noise()
  exact = MU + S * z
  run = jax.jit(lambda z, ts: _integrate(name, z, ts))
  for shift, steps_list in ((1.0, (32, 64, 128, 256)), (3.0, (256,))):   # one compile
    errors = [float(np.abs(run(z, samplers.time_grid(n, shift)) - exact).max())
              for n in steps_list]
    assert errors[-1] < {"euler": 0.04, "heun": 1e-3, "dpmpp_2m": 3e-3}[name], (shift, errors)
    if len(errors) > 1:
      assert all(a > b for a, b in zip(errors, errors[1:])), errors
      order = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
      assert low < order < high, (order, errors)


def _integrate(name, x, ts):
  """samplers.sample's loop on a given grid (one compile for every step count)."""
  s = samplers.get(name)
  carry = jax.lax.fori_loop(0, len(ts) - 1,
                            lambda i, c: s.step(gaussian_velocity, c, *samplers.step_times(ts, i)),
                            s.init(x))
  return carry.x


def test_time_grid_runs_from_t_start_to_zero_on_the_shifted_schedule():
  full = samplers.time_grid(8, 3.0)
  assert full[0] == 1.0 and full[-1] == 0.0 and bool(jnp.all(jnp.diff(full) < 0))
  tail = samplers.time_grid(4, 3.0, t_start=float(full[4]))
  np.testing.assert_allclose(tail, full[4:], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(samplers.unshift_time(samplers.flow.shift_time(0.3, 3.0), 3.0),
                             0.3, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_each_sampler_reports_its_model_evaluations(name):
  calls = []

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return gaussian_velocity(x, t)

  x, nfe = jax.jit(lambda z: samplers.sample(counted, z, 5, 2.0, name))(_noise(4))
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert nfe == len(calls) == {"euler": 5, "heun": 9, "dpmpp_2m": 5}[name]
  assert samplers.SAMPLERS[name].nfe(5) == nfe


def test_python_step_loop_equals_the_fori_loop_and_refine_starts_at_t():
  # worldsim.sample runs one jitted step at a time (for its progress bar): same numbers.
  z = _noise(16)
  x_t = gaussian_flow(z, 0.4)
  ts = samplers.time_grid(6, 2.0)
  for name in samplers.SAMPLERS:
    s = samplers.get(name)
    step = jax.jit(lambda c, times: s.step(gaussian_velocity, c, *times))
    carry = s.init(z)
    for i in range(6):
      carry = step(carry, tuple(np.float32(t) for t in samplers.step_times(np.asarray(ts), i)))
    # ... and from the exact x_t at t = 0.4 (SDEdit's start) the tail of the schedule lands
    # on the same exact sample.
    whole, from_t = jax.jit(lambda z, x_t: (
        samplers.sample(gaussian_velocity, z, 6, 2.0, name)[0],
        samplers.sample(gaussian_velocity, x_t, 64, 2.0, name, t_start=0.4)[0]))(z, x_t)
    np.testing.assert_allclose(carry.x, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_t, MU + S * z, atol={"euler": 0.05}.get(name, 5e-3))
  with pytest.raises(ValueError, match="sampler='rk4'"):
    samplers.get("rk4")
