"""The device mesh, logical axis rules, sharded initialisation and global batches.

Mesh axes are always (data, fsdp, tensor, context), in that order, so rules and checkpoints
mean the same on every topology; an axis of size 1 costs nothing. Modules never see the mesh:
they name their axes logically and the rules in the config place them.
"""
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor", "context")


def axis_sizes(mesh_cfg, num_devices: int) -> tuple:
  """Sizes of (data, fsdp, tensor, context) from the config; one -1 takes what is left."""
  sizes = [int(getattr(mesh_cfg, a)) for a in AXES]
  fill = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: the fixed axes {dict(zip(AXES, sizes))} use {known} devices, "
                       f"which does not divide the {num_devices} devices available")
    sizes[AXES.index(fill[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"config.mesh: axes {dict(zip(AXES, sizes))} use {known} devices but "
                     f"{num_devices} are available; set one axis to -1 to fill the rest")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = axis_sizes(mesh_cfg, len(devices))
  # Auto axes: XLA's partitioner propagates the shardings we name with logical constraints.
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules(mesh_cfg) -> tuple:
  """The config's logical -> mesh axis rules as flax wants them (a tuple of pairs)."""
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax)
               for name, ax in mesh_cfg.rules)


def logical_sharding(mesh: Mesh, axis_rules, logical_names) -> NamedSharding:
  """NamedSharding of an array whose dimensions carry these logical names."""
  spec = nn.logical_to_mesh_axes(logical_names, axis_rules)
  return NamedSharding(mesh, spec)


def abstract_sharded(init_fn: Callable, mesh: Mesh, axis_rules, *args):
  """The shapes and shardings of what `init_fn(*args)` returns, without computing it.

  init_fn returns a tree boxed with logical names (nn.Partitioned); the result is unboxed:
  (tree of ShapeDtypeStructs carrying their shardings, tree of NamedShardings).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(init_fn, *args)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, axis_rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def sharded_init(init_fn: Callable, shardings) -> Callable:
  """A jitted `init_fn` that creates each shard on its own device (and unboxes the tree).

  jit with out_shardings materialises the tree directly in its sharded layout, so the full
  parameters never sit on one host.
  """
  return jax.jit(lambda *args: nn.unbox(init_fn(*args)), out_shardings=shardings)


def global_batch(local_batch: dict, shardings: dict) -> dict:
  """Assembles the per-host numpy arrays named in `shardings` into global jax.Arrays.

  Other keys of the batch (host-side metadata such as captions) are left out.
  """
  return {k: jax.make_array_from_process_local_data(s, np.asarray(local_batch[k]))
          for k, s in shardings.items()}
