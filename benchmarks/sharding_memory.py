"""Per-device memory of the DiT train step under fsdp and context parallelism, 8 CPU devices.

  python -m benchmarks.sharding_memory
  python -m benchmarks.sharding_memory --budget_mib=512 --strategy=ring

Every figure is XLA's memory analysis of the train step compiled for a mesh of 8 simulated
CPU devices (worldsim/parallel/aot.py); nothing is run, so long sequences cost only compile
time. Three figures:
  state    per-device params + optimizer moments under fsdp=8 (data 1), against 1/8 of the
           unsharded state (goal <= 1.1x)
  context  per-device temporaries (activations kept for the backward, gradients) of one
           row of --length tokens under context=8 with --strategy, against one device's / 8
           (goal <= 1.25x); the model is small and the row long, so activations dominate
  longest  the longest row whose step fits --budget_mib per device (total: state, batch,
           temporaries) for context degree 1, 2, 4, 8 (goal: about linear growth): memory is
           affine in the length, so two compiles fit the line, the predicted length is
           rounded down and checked by compiling it (and, if it does not fit, the next step
           down)
The last line is one JSON object.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    os.environ.get("XLA_FLAGS", "").split() + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402  (after the device flags)
import json  # noqa: E402

import jax  # noqa: E402

from experiments import physics_tiny  # noqa: E402
from worldsim.parallel import aot  # noqa: E402

GOALS = {"state_ratio_max": 1.1, "context_temp_ratio_max": 1.25, "longest_growth_min": 0.8}
MIB = 2 ** 20


def config_for(mesh_shape, *, variant, depth, width=None, heads=None, length, batch,
               strategy="none"):
  """A pixel-space DiT config (stage dit only) on a mesh (data, fsdp, tensor, context)."""
  c = physics_tiny.get_config(variant)
  with c.unlocked():
    c.stages = ("dit",)
    c.data.space, c.data.source, c.model.text = "pixel", "shapes", "none"
    c.model.patch_size = (1, 4, 4)
    c.data.min_side, c.data.max_side, c.data.max_tokens_per_clip = 16, 32, 128
    c.data.token_budget, c.data.batch_size = length, batch
    c.model.depth = depth
    if width:
      c.model.width, c.model.num_heads = width, heads
    c.model.context_parallel = strategy
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = mesh_shape
  return c


def dit_memory(config, devices):
  return aot.measure(config, devices)["steps"]["dit"]


def state_figure(args):
  """fsdp=8: per-device params + optimizer vs (unsharded) / 8."""
  config = config_for((1, 8, 1, 1), variant=args.state_variant, depth=args.state_depth,
                      length=256, batch=8)
  m = dit_memory(config, 8)
  per_device = m["params"] + m["optimizer"]
  unsharded = m["params_unsharded"] + m["optimizer_unsharded"]
  ratio = per_device / (unsharded / 8)
  print(f"fsdp=8 ({args.state_variant}, depth {args.state_depth}): params+optimizer "
        f"{per_device / MIB:.2f} MiB per device, unsharded {unsharded / MIB:.2f} MiB, "
        f"ratio to 1/8: {ratio:.3f}; XLA arguments {m['arguments'] / MIB:.2f} MiB")
  return {"variant": args.state_variant, "depth": args.state_depth,
          "per_device_bytes": per_device, "unsharded_bytes": unsharded,
          "xla_argument_bytes": m["arguments"], "ratio_to_eighth": round(ratio, 4)}


def long_row(args, context: int, length: int, strategy: str):
  mesh = (1, 1, 1, context)
  return config_for(mesh, variant="tiny", depth=args.depth, width=args.width, heads=args.heads,
                    length=length, batch=1, strategy=strategy if context > 1 else "none")


def context_figure(args):
  """context=8 vs one device: per-device temporaries of one long row, for --strategy and,
  for comparison, the other strategy."""
  one = dit_memory(long_row(args, 1, args.length, "none"), 1)
  out = {"length": args.length, "one_device": one}
  for strategy in (args.strategy, *({"ulysses", "ring"} - {args.strategy})):
    eight = dit_memory(long_row(args, 8, args.length, strategy), 8)
    ratio = eight["temporaries"] / (one["temporaries"] / 8)
    print(f"L={args.length}: temporaries one device {one['temporaries'] / MIB:.1f} MiB, "
          f"context=8 ({strategy}) {eight['temporaries'] / MIB:.1f} MiB per device, "
          f"ratio to 1/8: {ratio:.3f}")
    out[strategy] = {"context_8": eight, "temp_ratio_to_eighth": round(ratio, 4)}
  out["temp_ratio_to_eighth"] = out[args.strategy]["temp_ratio_to_eighth"]
  return out


def longest_fitting(args, context: int, budget: int) -> dict:
  """The longest row (a multiple of `quantum`) whose step fits `budget` bytes per device."""
  quantum = 512 * context
  devices = context

  def total(length):
    return dit_memory(long_row(args, context, length, args.strategy), devices)["total"]

  a, b = 2048 * context, 4096 * context
  ta, tb = total(a), total(b)
  slope = (tb - ta) / (b - a)
  guess = max(quantum, int((budget - ta) / slope + a) // quantum * quantum)
  compiles, length = 2, guess
  while True:
    t = total(length)
    compiles += 1
    if t <= budget or length <= quantum:
      break
    length -= quantum
  print(f"context={context}: longest row within {budget / MIB:.0f} MiB: {length} tokens "
        f"({t / MIB:.1f} MiB; line through L={a}: {ta / MIB:.1f}, L={b}: {tb / MIB:.1f} MiB)")
  return {"context": context, "longest": length, "total_bytes": t, "compiles": compiles,
          "bytes_per_token": round(slope, 1)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--state_variant", default="B")
  p.add_argument("--state_depth", type=int, default=2)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--depth", type=int, default=1)
  p.add_argument("--length", type=int, default=16384)
  # The strategy of the context and longest figures (the context figure shows both).
  p.add_argument("--strategy", default="ulysses", choices=("ulysses", "ring"))
  p.add_argument("--budget_mib", type=int, default=256)
  p.add_argument("--degrees", default="1,2,4,8")
  args = p.parse_args()

  state = state_figure(args)
  context = context_figure(args)
  degrees = [int(d) for d in args.degrees.split(",")]
  longest = [longest_fitting(args, c, args.budget_mib * MIB) for c in degrees]
  # Growth per doubling of the degree, as a share of perfect (2x): 1.0 = linear.
  growth = [(y["longest"] / x["longest"]) / (y["context"] / x["context"])
            for x, y in zip(longest, longest[1:])]

  print(json.dumps({
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated)",
      "model": {"width": args.width, "heads": args.heads, "depth": args.depth,
                "dtype": "float32", "batch": 1},
      "state_fsdp8": state,
      "context8": context,
      "budget_bytes": args.budget_mib * MIB,
      "longest": longest,
      "longest_growth_per_doubling": [round(g, 3) for g in growth],
      "goals": GOALS,
      "met": {"state": state["ratio_to_eighth"] <= GOALS["state_ratio_max"],
              "context": context["temp_ratio_to_eighth"] <= GOALS["context_temp_ratio_max"],
              "longest": min(growth, default=1.0) >= GOALS["longest_growth_min"]},
  }))


if __name__ == "__main__":
  main()
