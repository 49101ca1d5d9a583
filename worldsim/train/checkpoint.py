"""One orbax CheckpointManager per workdir: train state, grain iterator and config together.

Saves are asynchronous (training continues while the previous step is written) and atomic
(a step directory only counts once orbax has committed it). The state is restored straight
into the shardings of the current mesh, so no host ever holds the full parameters.
"""
import json
import pathlib
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

ITEMS = ("state", "data_iter", "config")


class Checkpointer:

  def __init__(self, workdir, save_every: int, keep: int):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config_json: str, force: bool = False) -> bool:
    """Starts an async save if `step` is on the save interval (or `force`)."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(json.loads(config_json))))

  def restore(self, step: int, abstract_state, data_iter) -> Any:
    """Restores the state into `abstract_state`'s shardings and rewinds `data_iter` in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
