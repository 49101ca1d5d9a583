"""Memory and step time of `chunked` (flash) attention against the dense `xla` reference.

  python -m benchmarks.attention_memory
  python -m benchmarks.attention_memory --lengths=1024,4096 --timed_lengths=1024

Temporary memory is XLA's memory analysis of the compiled forward + backward of attention
alone (compiled, never run, so dense at 16k tokens costs nothing but compile time). Reports
the log-log slope of chunked's memory against length (fitted, and over the longest step), the
dense/chunked ratio at the longest length, and the median forward + backward time of both at
the timed lengths, one segment per row and no causal mask (chunked's worst case: no tile can
be skipped), as ratios measured in one process (the machine may be shared). The last line is
one JSON object.
"""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from worldsim.models import attention as attention_lib

GOALS = {"chunked_slope_max": 1.15, "memory_ratio_min": 10.0, "time_ratio_max": 1.3}


def forward_backward(implementation):
  """(q, k, v, d_out, segment_ids) -> (dq, dk, dv): one training pass of attention."""
  def run(q, k, v, d_out, segment_ids):
    attend = functools.partial(attention_lib.attention, segment_ids=segment_ids,
                               implementation=implementation)
    _, vjp = jax.vjp(attend, q, k, v)
    return vjp(d_out)
  return jax.jit(run)


def example_args(length, heads, head_dim):
  shape = (1, length, heads, head_dim)
  return ((jax.ShapeDtypeStruct(shape, jnp.float32),) * 4
          + (jax.ShapeDtypeStruct((1, length), jnp.int32),))


def temp_bytes(implementation, length, heads, head_dim):
  compiled = forward_backward(implementation).lower(*example_args(length, heads, head_dim)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def median_seconds(implementations, length, heads, head_dim, repeats):
  """Median forward + backward time of each implementation; runs alternate between them so
  that load from other users of the machine falls on all alike."""
  keys = jax.random.split(jax.random.key(0), 4)
  args = [jax.random.normal(key, (1, length, heads, head_dim)) for key in keys]
  args.append(jnp.ones((1, length), jnp.int32))
  compiled = {impl: forward_backward(impl).lower(*args).compile() for impl in implementations}
  times = {impl: [] for impl in implementations}
  for _ in range(repeats + 1):                                   # the first round warms up
    for impl, run in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(run(*args))
      times[impl].append(time.perf_counter() - start)
  return {impl: float(np.median(t[1:])) for impl, t in times.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  p.add_argument("--timed_lengths", default="1024,2048")
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  timed = [int(x) for x in args.timed_lengths.split(",")]

  memory = {impl: [temp_bytes(impl, n, args.heads, args.head_dim) for n in lengths]
            for impl in ("xla", "chunked")}
  for i, n in enumerate(lengths):
    print(f"L={n:6d}  temp MiB  xla {memory['xla'][i] / 2**20:10.1f}"
          f"  chunked {memory['chunked'][i] / 2**20:8.1f}")
  slope = {impl: float(np.polyfit(np.log(lengths), np.log(m), 1)[0]) for impl, m in memory.items()}
  # At short lengths chunked's fixed tile buffers dominate; the last step shows the trend.
  tail_slope = float(np.log(memory["chunked"][-1] / memory["chunked"][-2])
                     / np.log(lengths[-1] / lengths[-2]))
  memory_ratio = memory["xla"][-1] / memory["chunked"][-1]

  per_length = [median_seconds(("xla", "chunked"), n, args.heads, args.head_dim, args.repeats)
                for n in timed]
  seconds = {impl: [t[impl] for t in per_length] for impl in ("xla", "chunked")}
  time_ratio = [c / x for c, x in zip(seconds["chunked"], seconds["xla"])]
  for n, x, c, r in zip(timed, seconds["xla"], seconds["chunked"], time_ratio):
    print(f"L={n:6d}  fwd+bwd s  xla {x:.3f}  chunked {c:.3f}  chunked/xla {r:.2f}")

  print(json.dumps({
      "device": jax.devices()[0].device_kind,
      "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
      "lengths": lengths,
      "temp_bytes": memory,
      "chunked_slope": round(slope["chunked"], 3), "xla_slope": round(slope["xla"], 3),
      "chunked_slope_longest_step": round(tail_slope, 3),
      "memory_ratio_at_longest": round(memory_ratio, 1),
      "timed_lengths": timed,
      "seconds": {impl: [round(s, 4) for s in v] for impl, v in seconds.items()},
      "time_ratio_chunked_over_xla": [round(r, 3) for r in time_ratio],
      "goals": GOALS,
      "met": {"slope": slope["chunked"] <= GOALS["chunked_slope_max"],
              "memory": memory_ratio >= GOALS["memory_ratio_min"],
              "time": max(time_ratio) <= GOALS["time_ratio_max"]},
  }))


if __name__ == "__main__":
  main()
