"""One orbax CheckpointManager per workdir: train state, grain iterator and config together.

Saves are asynchronous (training continues while the previous step is written) and atomic
(a step is written under `<step>.orbax-checkpoint-tmp-*` and renamed to `<step>` only once
complete, so a save killed halfway leaves the previous checkpoint the latest; leftover tmp
directories are deleted when the next run opens the workdir). The state is restored straight
into the shardings of the current mesh, so no host ever holds the full parameters.

What goes wrong, and what happens then:
  incompatible  the workdir's checkpoint was written by a model of other shapes: ConfigError
                before anything compiles, naming the config fields that differ
  corrupt       a committed checkpoint that cannot be read (truncated or damaged files): a
                warning naming the step and the error, the directory renamed to
                `<step>.corrupt` (kept for inspection, never retried), the one before used
  disk full     a save that hits ENOSPC: DiskFullError naming the directory and its free
                bytes; the step's partial directory is removed, earlier checkpoints stay

Nothing here unpickles: the state is tensorstore arrays, the iterator state and config JSON.
"""
import errno
import json
import pathlib
import shutil
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from worldsim import config as config_lib

ITEMS = ("state", "data_iter", "config")
CORRUPT_SUFFIX = ".corrupt"


class DiskFullError(OSError):
  """A save ran out of disk space; the checkpoints before it are intact."""


def _handlers() -> dict:
  # Named handlers let the manager read an item's metadata (shapes) without its arrays.
  return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
          "data_iter": grain.checkpoint.CheckpointHandler()}


def _is_disk_full(error: BaseException) -> bool:
  """ENOSPC anywhere in the exception's chain (tensorstore reports it as text)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):       # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_shapes(tree) -> dict:
  """{'params/block_0/mlp_in/kernel': shape, ...}: the same names for a TrainState, its
  abstract ShapeDtypeStructs and the metadata orbax saved for it."""
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:

  def __init__(self, workdir, save_every: int, keep: int):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config_json: str, force: bool = False) -> bool:
    """Starts an async save if `step` is on the save interval (or `force`). Raises
    DiskFullError when this save, or the one still being written, hits a full disk."""
    try:
      return self.manager.save(step, force=force, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(json.loads(config_json))))
    except Exception as e:
      self._raise_if_disk_full(e, step)
      raise

  def wait(self) -> None:
    """Blocks until the save in flight is committed (or raises DiskFullError)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._raise_if_disk_full(e, None)
      raise

  def _raise_if_disk_full(self, error: Exception, step: Optional[int]) -> None:
    if not _is_disk_full(error):
      return
    for partial in self.directory.glob("*.orbax-checkpoint-tmp-*"):   # frees some space
      shutil.rmtree(partial, ignore_errors=True)
    self.manager.reload()
    free = shutil.disk_usage(self.directory).free
    raise DiskFullError(
        errno.ENOSPC,
        f"no space left on device while saving {'step %d' % step if step else 'a checkpoint'} "
        f"under {self.directory} ({free} bytes free now); the checkpoint of step "
        f"{self.latest_step()} is intact. Free space (or point --workdir elsewhere) and run "
        f"again to resume from it") from error

  def restore(self, step: int, abstract_state, data_iter) -> Any:
    """Restores the state into `abstract_state`'s shardings and rewinds `data_iter` in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def saved_shapes(self, step: int) -> dict:
    """The shapes of the state saved at `step`, read from its metadata (no arrays)."""
    return tree_shapes(self.manager.item_metadata(step)["state"])

  def restore_latest(self, abstract_state, data_iter,
                     describe: Callable[[dict], list]) -> tuple[Optional[int], Any]:
    """(step, state) of the newest readable checkpoint, `data_iter` rewound to it; (None,
    None) with `data_iter` untouched when there is none.

    A checkpoint whose saved shapes differ from `abstract_state`'s belongs to another model:
    that is the user's error, not corruption, so it raises ConfigError naming the fields
    `describe(saved_config)` finds different. A checkpoint that cannot be read is set aside
    as `<step>.corrupt` and the one before it tried.
    """
    initial = data_iter.get_state()      # a failed restore may have moved it
    while (step := self.latest_step()) is not None:
      try:
        saved_config, saved_shapes = self.saved_config(step), self.saved_shapes(step)
      except Exception as e:             # orbax and tensorstore raise many types
        self._set_aside(step, e)
        continue
      _check_compatible(step, self.directory, saved_shapes, tree_shapes(abstract_state),
                        describe(saved_config))
      try:
        return step, jax.block_until_ready(self.restore(step, abstract_state, data_iter))
      except Exception as e:
        self._set_aside(step, e)
    data_iter.set_state(initial)
    return None, None

  def _set_aside(self, step: int, error: Exception) -> None:
    path = self.directory / str(step)
    logging.warning("checkpoint of step %d in %s cannot be restored (%s: %s); moving it to "
                    "%s%s and trying the one before", step, self.directory,
                    type(error).__name__, error, path.name, CORRUPT_SUFFIX)
    if jax.process_index() == 0:
      target = path.with_name(path.name + CORRUPT_SUFFIX)
      shutil.rmtree(target, ignore_errors=True)     # an older copy of the same step
      path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"worldsim: set aside checkpoint {step}")
    self.manager.reload()

  def close(self):
    self.wait()
    self.manager.close()


def _check_compatible(step: int, directory, saved: dict, current: dict, fields: list) -> None:
  if saved == current:
    return
  differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
  what = (f"these config fields differ from the saved config: {'; '.join(fields)}" if fields
          else f"arrays of other shapes ({', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''})")
  raise config_lib.ConfigError(
      f"{directory} holds a checkpoint (step {step}) of a model of other shapes, so this config "
      f"cannot resume it: {what}. Train in a fresh --workdir, or set those fields back to the "
      f"saved values")


def restore_state_only(workdir, abstract_state, step: Optional[int] = None):
  """The train state of a workdir's latest (or given) checkpoint, for sampling."""
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                             item_names=ITEMS) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints; train first")
    return step, manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]


def load_config(workdir, step: Optional[int] = None) -> dict:
  """The config a workdir was trained with (saved as JSON beside every checkpoint)."""
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                             item_names=ITEMS) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints; train first")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
