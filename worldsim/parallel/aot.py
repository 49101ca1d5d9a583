"""Ahead-of-time memory check: will a config's train steps fit a mesh of N devices?

The DiT step (and the VAE step, when the config trains a VAE) is lowered with abstract
state and batch (ShapeDtypeStructs carrying their shardings) and compiled for the mesh; the
compiled program's memory analysis gives what one device holds. Nothing is initialised or
run, so a config for hundreds of chips is checked on a laptop:

  report = aot.memory_report(config, 8, memory_gb=16)   # the first 8 of jax.devices()
  report["fits"], report["steps"]["dit"]["total"]
  aot.require_fit(config, jax.devices(), memory_gb=95)  # raises ConfigError if it cannot

The devices are real ones, N fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, set before JAX starts; `python -m worldsim.aot`
does it), or a Cloud TPU topology compiled for without the chips (`tpu_topology_devices`,
needs libtpu). On fake CPU devices the figures are the CPU compiler's: the same shardings
and (float32) buffer sizes as on an accelerator, but its own fusion and scheduling, so
temporaries differ by some tens of percent; a topology compile gives the TPU's own.

Per device and step (bytes):
  arguments       the inputs: the sharded train state and the batch
  outputs         the new state and the metrics
  aliased         outputs written over donated inputs (the state): counted once
  temporaries     activations kept for the backward, gradients, collectives' buffers
  generated_code  the executable itself
  total           arguments + outputs - aliased + temporaries + generated_code: the peak
                  XLA plans for, what must fit
and from the state's shardings: params, optimizer (its moments), ema, and the same
unsharded (what one device would hold without sharding).
"""
import dataclasses
import importlib.util
import math
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax

from worldsim import config as config_lib
from worldsim.parallel import mesh as mesh_lib

GIB = 2 ** 30
MEMORY_FIELDS = ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total")
STATE_FIELDS = {"params": "params", "opt_state": "optimizer", "ema_params": "ema",
                "disc_params": "disc_params", "disc_opt_state": "disc_optimizer"}

# Cloud TPU slice name -> (topology, chip config, wrap-around links), as in maxtext's
# accelerator_to_spec_map.py. Other slices: pass the topology itself, e.g. 'v5:4x4x8'.
TPU_SLICES = {
    "v5p-8": ("v5:2x2x1", "megacore", (False, False, False)),
    "v5p-16": ("v5:2x2x2", "megacore", (False, False, False)),
    "v5p-32": ("v5:2x2x4", "megacore", (False, False, False)),
    "v5p-64": ("v5:2x4x4", "megacore", (False, False, False)),
    "v5p-128": ("v5:4x4x4", "megacore", (True, True, True)),
    "v5p-256": ("v5:4x4x8", "megacore", (True, True, True)),
    "v5p-512": ("v5:4x8x8", "megacore", (True, True, True)),
    "v5p-1024": ("v5:8x8x8", "megacore", (True, True, True)),
    "v6e-4": ("v6e:2x2", "default", (False, False, False)),
    "v6e-8": ("v6e:2x4", "default", (False, False, False)),
    "v6e-16": ("v6e:4x4", "default", (False, False, False)),
    "v6e-32": ("v6e:4x8", "default", (False, False, False)),
    "v6e-64": ("v6e:8x8", "default", (False, False, False)),
    "v6e-128": ("v6e:8x16", "default", (False, True, False)),
    "v6e-256": ("v6e:16x16", "default", (True, True, False)),
}


class TopologyUnavailable(RuntimeError):
  """Compiling for a TPU topology needs libtpu, which this machine lacks (or it failed)."""


def tpu_topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only devices of a Cloud TPU slice ('v5p-128', 'v6e-256' or a topology such as
  'v5:4x4x8'), for jit(...).lower(...).compile() without the chips (maxtext's
  train_compile.py does the same). Raises TopologyUnavailable without libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyUnavailable(
        f"compiling for the TPU topology {name!r} needs libtpu, which is not installed here "
        f"(pip install -U 'jax[tpu]'); without it, check on N fake CPU devices: --devices=N")
  topology, chip_config, wrap = TPU_SLICES.get(name, (name, "megacore" if name.startswith(
      ("v4", "v5:", "v5p")) else "default", (False, False, False)))
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(
        topology_name=topology, platform="tpu", chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1), num_slices=num_slices, wrap=wrap).devices)
  except Exception as e:          # libtpu's errors are plain RuntimeErrors / JaxRuntimeErrors
    raise TopologyUnavailable(f"libtpu could not describe the TPU topology {name!r} "
                              f"({topology}, {chip_config}): {e}") from e


def _devices(devices: Union[int, Sequence, None]) -> list:
  available = jax.devices()
  if devices is None:
    return available
  if not isinstance(devices, int):
    return list(devices)
  if devices > len(available):
    raise ValueError(
        f"{devices} devices asked for, {len(available)} available: for N fake CPU devices set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts (python -m "
        f"worldsim.aot --devices=N does), or pass TPU topology devices")
  return available[:devices]


def _shard_bytes(abstract) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest
  shard where a dimension does not divide)."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.shape
    spec = leaf.sharding.spec if hasattr(leaf.sharding, "spec") else ()
    mesh_shape = leaf.sharding.mesh.shape
    for i, axes in enumerate(spec):
      if axes is None:
        continue
      degree = math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      shape = shape[:i] + (-(-shape[i] // degree),) + shape[i + 1:]
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _unsharded_bytes(abstract) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def state_bytes(abstract_state) -> dict:
  """Per-device and unsharded bytes of the train state's parts (params, optimizer, ...)."""
  out = {}
  for field in dataclasses.fields(abstract_state):
    name = STATE_FIELDS.get(field.name)
    part = getattr(abstract_state, field.name)
    if name and jax.tree.leaves(part):
      out[name] = _shard_bytes(part)
      out[f"{name}_unsharded"] = _unsharded_bytes(part)
  return out


def compiled_memory(compiled) -> dict:
  """Per-device bytes of a compiled program, from XLA's memory analysis."""
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["generated_code"])
  return out


def _abstract_batch(example: dict, shardings: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(example[k].shape, example[k].dtype, sharding=s)
          for k, s in shardings.items()}


def compile_step(setup, abstract_batch: dict, compiler_options: Optional[dict] = None):
  """The Setup's train step compiled for its mesh from abstract state and batch."""
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    lowered = setup.train_step.lower(setup.abstract_state, abstract_batch)
  return lowered.compile(compiler_options)


def step_report(setup, example_batch: dict, compiler_options: Optional[dict] = None) -> dict:
  """compiled_memory and state_bytes of one Setup's train step."""
  compiled = compile_step(setup, _abstract_batch(example_batch, setup.batch_shardings),
                          compiler_options)
  return {**compiled_memory(compiled), **state_bytes(setup.abstract_state)}


def measure(config, devices: Union[int, Sequence, None] = None,
            compiler_options: Optional[dict] = None) -> dict:
  """Per-device memory of the config's train steps on a mesh of `devices` (a count: the
  first N of jax.devices(); a list, e.g. tpu_topology_devices(...); None: all)."""
  from worldsim.train import trainer     # train imports parallel, not the other way round
  devices = _devices(devices)
  config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  steps = {}
  if "vae" in config.stages:
    example = jax.eval_shape(lambda: {"video": trainer.example_clips(config)})
    steps["vae"] = step_report(trainer.build_vae(config, mesh), example, compiler_options)
  if "dit" in config.stages:
    example = jax.eval_shape(lambda: trainer.example_batch(config))
    steps["dit"] = step_report(trainer.build(config, mesh), example, compiler_options)
  return {"devices": len(devices), "platform": devices[0].platform,
          "device_kind": devices[0].device_kind,
          "mesh": dict(zip(mesh_lib.AXES, mesh_lib.axis_sizes(config.mesh, len(devices)))),
          "steps": steps}


def with_budget(report: dict, memory_gb: Optional[float]) -> dict:
  """The report with its budget and verdict: `fits` is whether every step's total is within
  memory_gb GiB per device (None without a budget); `peak` the largest total."""
  peak = max((s["total"] for s in report["steps"].values()), default=0)
  budget = None if memory_gb is None else int(memory_gb * GIB)
  return {**report, "peak": peak, "budget": budget,
          "fits": None if budget is None else peak <= budget}


def memory_report(config, devices: Union[int, Sequence, None] = None,
                  memory_gb: Optional[float] = None,
                  compiler_options: Optional[dict] = None) -> dict:
  """measure() and with_budget(): per-device bytes of each train step and whether they fit
  memory_gb GiB per device."""
  return with_budget(measure(config, devices, compiler_options), memory_gb)


def verdict(report: dict) -> str:
  """One sentence: fits, does not fit (by how much), or no budget given."""
  peak = report["peak"] / GIB
  where = f"{report['devices']} x {report['device_kind']}, mesh {report['mesh']}"
  if report["fits"] is None:
    return f"peak {peak:.3f} GiB per device on {where}; no budget given (--memory_gb)"
  budget = report["budget"] / GIB
  if report["fits"]:
    return f"fits: peak {peak:.3f} GiB per device <= {budget:.3f} GiB on {where}"
  return (f"does not fit: peak {peak:.3f} GiB per device > {budget:.3f} GiB on {where}; "
          f"shard the state (--config.mesh.fsdp), split the sequence (--config.mesh.context "
          f"with --config.model.context_parallel), rematerialise (--config.model.remat=full), "
          f"or lower the batch (--config.data.batch_size, --config.train.accum_steps)")


def require_fit(config, devices=None, memory_gb: Optional[float] = None) -> dict:
  """memory_report, raising config.ConfigError when it does not fit: for callers that must
  refuse a config before they start it."""
  report = memory_report(config, devices, memory_gb)
  if report["fits"] is False:
    raise config_lib.ConfigError(verdict(report))
  return report


def table(report: dict) -> str:
  """The report as a fixed-width table, MiB per device, one column per step."""
  steps = list(report["steps"])
  rows = list(MEMORY_FIELDS)
  rows += [k for s in steps for k in report["steps"][s] if k not in rows]
  lines = [f"{'MiB per device':28s}" + "".join(f"{s:>14s}" for s in steps)]
  for row in rows:
    cells = [report["steps"][s].get(row) for s in steps]
    lines.append(f"{row:28s}" + "".join(
        f"{c / 2 ** 20:14.2f}" if c is not None else f"{'-':>14s}" for c in cells))
  return "\n".join(lines)
