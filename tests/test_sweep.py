"""The sweep runner: point names, resuming, and launch lines (a fake runner: no training)."""
import json
import pathlib
import shlex

import pytest

from worldsim import config as config_lib
from worldsim import sweep as sweep_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = "experiments/sweeps/physics_sizes.py"

SWEEP_FILE = """
from worldsim.sweep import Sweep, grid
def get_sweep():
  return Sweep("experiments/physics_tiny.py:tiny", {"stages": ("dit",), "data.space": "pixel"},
               grid([{"model.width": 16}, {"model.width": 32}], [{"train.steps": 5}]) +
               [{"model.width": 8, "train.steps": 7}])
"""


def test_point_names_are_deterministic_and_distinct():
  a = sweep_lib.point_name({"model.width": 64, "optim.learning_rate": 1e-3,
                            "model.patch_size": (1, 4, 4)})
  b = sweep_lib.point_name({"model.patch_size": (1, 4, 4), "optim.learning_rate": 1e-3,
                            "model.width": 64})
  assert a == b == "patch_size1x4x4_width64_learning_rate0.001"
  # Same leaf name in two blocks: spelled out in full, so the names stay distinct.
  assert sweep_lib.point_name({"optim.learning_rate": 1e-3, "vae.optim.learning_rate": 1e-4}) == (
      "optim-learning_rate0.001_vae-optim-learning_rate0.0001")
  names = list(sweep_lib.points(sweep_lib.load_sweep(SIZES)))
  assert len(names) == len(set(names)) >= 12


class FakeRunner:
  """Stands in for subprocesses: counts trainings, writes result.json for records, and
  fails the trainings of the points named in `fail`."""

  def __init__(self, fail=()):
    self.trained, self.fail = [], set(fail)

  def __call__(self, command, log_path):
    point_dir = log_path.parent
    point_dir.mkdir(parents=True, exist_ok=True)
    if "worldsim.main" in command:
      self.trained.append(point_dir.name)
      return 1 if point_dir.name in self.fail else 0
    if "--record" in command:
      (point_dir / sweep_lib.RESULT).write_text(json.dumps({"val_loss": 1.0}))
    return 0


def test_sweep_resumes_without_rerunning_finished_points(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  spec = tmp_path / "sweep.py"
  spec.write_text(SWEEP_FILE)
  workdir = tmp_path / "runs"
  names = list(sweep_lib.points(sweep_lib.load_sweep(str(spec))))
  assert names == ["width16_steps5", "width32_steps5", "width8_steps7"]

  first = FakeRunner(fail={"width32_steps5"})
  finished = sweep_lib.run_sweep(str(spec), workdir, parallel=2, run=first)
  assert sorted(first.trained) == sorted(names)
  assert finished == {"width16_steps5": True, "width32_steps5": False, "width8_steps7": True}

  second = FakeRunner()
  assert all(sweep_lib.run_sweep(str(spec), workdir, run=second).values())
  assert second.trained == ["width32_steps5"]        # only the point without a result

  third = FakeRunner()
  sweep_lib.run_sweep(str(spec), workdir, run=third)
  assert third.trained == []
  assert [r["name"] for r in sweep_lib.read_results(workdir)] == sorted(names)


def _remote_args(line: str) -> list:
  """The worldsim.main flags inside a gcloud ... --command='python -m worldsim.main ...'."""
  words = shlex.split(line)
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in words
  command = [w for w in words if w.startswith("--command=")][0][len("--command="):]
  remote = shlex.split(command)
  if remote[0] == "cd":
    assert remote[1:3] == ["~/worldsim", "&&"]
    remote = remote[3:]
  assert remote[:4] == ["python", "-m", "worldsim.main", "--distributed"]
  return remote[4:]


@pytest.mark.parametrize("variant", ["", ":patch"])
def test_launch_lines_are_valid_main_commands(variant, monkeypatch):
  """`--launch=print`'s lines, one per point, carry flags worldsim.main accepts: the config
  file loads, every override names an existing field, and the result validates."""
  monkeypatch.chdir(REPO)
  out = sweep_lib.launch_lines(SIZES + variant, "gs://bucket/sweep", "pod", "us-central2-b",
                               remote_dir="~/worldsim")
  sweep = sweep_lib.load_sweep(SIZES + variant)
  expected = sweep_lib.points(sweep)
  assert len(out) == len(expected)
  for line, (name, overrides) in zip(out, expected.items()):
    args = _remote_args(line)
    config, workdir = sweep_lib.load_point_config(args)
    assert workdir == f"gs://bucket/sweep/{name}"
    assert config.data.data_dir == "gs://bucket/sweep/data"
    for key, value in overrides.items():
      *blocks, field = key.split(".")
      block = config
      for part in blocks:
        block = block[part]
      assert block[field] == value, key
    config_lib.validate(config, num_devices=1)   # the sweep is sized for one CPU host


def test_unknown_override_is_refused():
  with pytest.raises(AttributeError):
    sweep_lib.load_point_config(["--config=experiments/physics_tiny.py:tiny",
                                 "--config.model.not_a_field=3", "--workdir=x"])
