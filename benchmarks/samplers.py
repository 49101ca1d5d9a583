"""Samplers at equal quality: steps, model evaluations (NFE) and time to reach a fixed error.

  python -m benchmarks.samplers                 # shift 1 (the tiny recipe's clips), error 1e-2
  python -m benchmarks.samplers --shift=3 --target=1e-3

The check of tests/test_samplers.py, rotated: data x0 = Q^T y0 with y0 ~ N(m, diag(s^2)) in
--dims dimensions (m in [-2, 2], s in [0.25, 1.5], Q a random rotation), whose
rectified-flow velocity is known in closed form, v(x, t) = Q^T v_diag(Q x, t), so every
sampler's output can be compared with the exact flow map's sample for the same noise z,
Q^T (m + s * (Q z)). The rotation makes each evaluation cost two (samples x dims) @ (dims x
dims) matmuls, a stand-in for a model, so the time follows the NFE as it would with a DiT.
Error: the RMS over samples and dimensions of Q (x - exact) / s. For each sampler the fewest
steps that reach --target (doubling, then bisection; the error falls monotonically with
steps here), their NFE, and the wall time of a jitted run at that step count (median of
--repeats). Goal: Heun and DPM-Solver++(2M) reach the error with at most half Euler's NFE.
The last line is one JSON object.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from worldsim.diffusion import samplers


def gaussian(dims: int, seed: int = 0):
  """(m, s, Q, velocity): the rotated Gaussian's parameters and its exact velocity field."""
  rng = np.random.default_rng(seed)
  m = rng.uniform(-2.0, 2.0, dims).astype(np.float32)
  s = rng.uniform(0.25, 1.5, dims).astype(np.float32)
  q = np.linalg.qr(rng.standard_normal((dims, dims)))[0].astype(np.float32)

  def velocity(x, t):                    # E[eps - x0 | x_t = x]; see tests/test_samplers.py
    y, a = x @ q.T, 1.0 - t
    var = a * a * s * s + t * t
    return ((t - a * s * s) / var * (y - a * m) - m) @ q
  return m, s, q, velocity


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--target", type=float, default=1e-2)
  p.add_argument("--shift", type=float, default=1.0)
  p.add_argument("--dims", type=int, default=128)
  p.add_argument("--samples", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--max_steps", type=int, default=4096)
  args = p.parse_args()

  m, s, q, velocity = gaussian(args.dims)
  z = jax.random.normal(jax.random.PRNGKey(0), (args.samples, args.dims))
  exact = (m + s * (z @ q.T)) @ q
  runs = {}

  def run_fn(name, steps):
    if (name, steps) not in runs:
      runs[name, steps] = jax.jit(lambda z: samplers.sample(velocity, z, steps, args.shift,
                                                            name)[0])
    return runs[name, steps]

  def error(name, steps):
    x = run_fn(name, steps)(z)
    return float(jnp.sqrt(jnp.mean((((x - exact) @ q.T) / s) ** 2)))

  results = {}
  for name in samplers.SAMPLERS:
    hi = 1
    while error(name, hi) > args.target:
      hi *= 2
      if hi > args.max_steps:
        raise SystemExit(f"{name} does not reach {args.target} within {args.max_steps} steps")
    lo = hi // 2                          # error(lo) > target (or lo = 0)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if error(name, mid) <= args.target else (mid, hi)
    fn = run_fn(name, hi)
    fn(z).block_until_ready()
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn(z).block_until_ready()
      times.append(time.perf_counter() - start)
    results[name] = dict(steps=hi, nfe=samplers.SAMPLERS[name].nfe(hi),
                         error=round(error(name, hi), 6),
                         wall_ms=round(1e3 * float(np.median(times)), 3))
    print(f"{name:9s} {hi:5d} steps {results[name]['nfe']:5d} NFE  error "
          f"{results[name]['error']:.2e}  {results[name]['wall_ms']:.2f} ms", flush=True)

  euler_nfe = results["euler"]["nfe"]
  ratios = {name: round(euler_nfe / r["nfe"], 2) for name, r in results.items()}
  print(json.dumps({"benchmark": "samplers", "target_error": args.target, "shift": args.shift,
                    "dims": args.dims, "samples": args.samples, "results": results,
                    "nfe_saving_vs_euler": ratios,
                    "goal": "heun and dpmpp_2m need <= 1/2 of euler's NFE",
                    "met": bool(ratios["heun"] >= 2 and ratios["dpmpp_2m"] >= 2),
                    "device": jax.devices()[0].platform, "jax": jax.__version__}))


if __name__ == "__main__":
  main()
