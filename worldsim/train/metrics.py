"""Metrics: JSON lines in workdir/metrics.jsonl, and TensorBoard when tensorboardX is there."""
import json
import pathlib

import jax
from absl import logging


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      try:
        import tensorboardX  # optional extra: worldsim[tb]
        self.tb = tensorboardX.SummaryWriter(str(self.path.parent / "tb"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step":
          self.tb.add_scalar(k, v, step)
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read(workdir) -> list:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
