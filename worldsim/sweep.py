"""Scaling-law sweeps: every point of a sweep config trained as its own `worldsim.main` run.

  python -m worldsim.sweep --sweep=experiments/sweeps/physics_sizes.py --workdir=runs/sweep
  python -m worldsim.sweep --sweep=... --workdir=runs/sweep --parallel=2      # 2 points at once
  python -m worldsim.sweep --sweep=... --workdir=gs://bucket/sweep --launch=print --tpu=my-tpu \
      --zone=us-central2-b                   # one Cloud TPU launch line per point, nothing run

A sweep file defines `get_sweep(arg)` returning a `Sweep`: the experiment config every point
starts from (as --config takes it), overrides shared by all points, and each point's own
overrides (dotted config fields -> values). A point is named by its own overrides, so the same
point always lands in the same directory, <workdir>/<point>/.

Each point runs as subprocesses, so one point's crash (or OOM) does not end the sweep:
  1. python -m worldsim.main --config=<file> --config.<field>=<value> ... --workdir=<point>
     (resumes from the trainer's own checkpoint when a previous sweep was cut off)
  2. python -m worldsim.sweep ... --record=<point>: measures the finished checkpoint
     (worldsim/scaling/measure.py) and writes <point>/result.json.
A point with a result.json is finished and never rerun (delete it to measure the point again:
its training finds the final checkpoint and stops at once). When every point has one, the
fits and plots go to <workdir>/report/ or --report_dir (worldsim/scaling/fit.py, plots.py),
and the last line printed is the report's headline as JSON.
"""
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags, logging

RESULT = "result.json"
REPORT_DIR = "report"


@dataclasses.dataclass(frozen=True)
class Sweep:
  config: str                 # the experiment config, "path.py[:arg]", as --config takes it
  base: dict                  # overrides every point gets: "model.width" -> 64
  points: Sequence[dict]      # each point's own overrides; they name the point


def grid(*axes: Sequence[dict]) -> list:
  """The product of axes, each a list of override dicts (one dict may set several fields
  that belong together, e.g. a model size and the learning rate tuned for it)."""
  return [dict(itertools.chain.from_iterable(d.items() for d in combo))
          for combo in itertools.product(*axes)]


def format_value(value) -> str:
  """A value as config_flags parses it: tuples comma-joined ("1,4,4"), floats shortest."""
  if isinstance(value, (tuple, list)):
    return ",".join(format_value(v) for v in value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def point_name(overrides: dict) -> str:
  """A directory name from a point's overrides, independent of their order: each field's
  last name and its value, e.g. depth2_learning_rate0.002_steps300_width64."""
  leaves = [key.rsplit(".", 1)[-1] for key in overrides]
  parts = []
  for key in sorted(overrides):
    leaf = key.rsplit(".", 1)[-1]
    label = leaf if leaves.count(leaf) == 1 else key.replace(".", "-")  # keep names unique
    parts.append(label + format_value(overrides[key]).replace(",", "x"))
  return "_".join(parts).replace("/", "-") or "base"


def load_sweep(spec: str) -> Sweep:
  """`path.py[:arg]` -> the file's get_sweep(arg) (get_sweep() without an arg)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("worldsim_sweep_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  names = [point_name(p) for p in sweep.points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"sweep {spec}: points {duplicates} appear more than once")
  return sweep


def points(sweep: Sweep) -> dict:
  """name -> the point's full overrides (base first, then its own)."""
  return {point_name(p): {**sweep.base, **p} for p in sweep.points}


def point_args(sweep: Sweep, overrides: dict, point_dir: str, data_dir: str) -> list:
  """The flags of worldsim.main for one point. All points share one data_dir (built once)
  unless the sweep sets config.data.data_dir itself."""
  overrides = {"data.data_dir": data_dir, **overrides}
  return ([f"--config={sweep.config}"]
          + [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
          + [f"--workdir={point_dir}"])


def load_point_config(args: Sequence[str]):
  """The config worldsim.main builds from these flags (parsed the same way, by config_flags,
  into a fresh FlagValues): what a point trains, and a check that its overrides exist."""
  from ml_collections import config_flags
  argv = ["worldsim.main", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", lock_config=True, flag_values=values,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_bool("distributed", False, "", flag_values=values)
  values(argv)
  return values.config, values.workdir


def _module_command(module: str, args: Sequence[str]) -> list:
  return [sys.executable, "-m", module, *args]


def tpu_launch_line(args: Sequence[str], tpu: str, zone: str, project: str = "",
                    remote_dir: str = "") -> str:
  """A gcloud line running one point's training on every worker of a Cloud TPU VM (from
  the worldsim checkout at remote_dir, where the config paths resolve)."""
  remote = shlex.join(["python", "-m", "worldsim.main", "--distributed", *args])
  if remote_dir:     # unquoted, so that ~ expands on the worker
    remote = f"cd {remote_dir} && {remote}"
  project = f" --project={shlex.quote(project)}" if project else ""
  return (f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu)} --zone={shlex.quote(zone)}"
          f"{project} --worker=all --command={shlex.quote(remote)}")


def launch_lines(spec: str, workdir: str, tpu: str, zone: str, project: str = "",
                 remote_dir: str = "") -> list:
  """One Cloud TPU line per point, workdirs under `workdir` (a gs:// path). The results are
  recorded afterwards, from the checkpoints, by a local run of the same sweep with the same
  --workdir: its points' trainings find their final checkpoints and train no further."""
  sweep = load_sweep(spec)
  return [tpu_launch_line(point_args(sweep, overrides, f"{workdir}/{name}", f"{workdir}/data"),
                          tpu, zone, project, remote_dir)
          for name, overrides in points(sweep).items()]


# ----------------------------------------------------------------------------- running

def execute(command: Sequence[str], log_path: pathlib.Path) -> int:
  """Runs a command with its output in log_path; returns its exit status."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with log_path.open("a") as log:
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_point(spec: str, sweep: Sweep, name: str, workdir: pathlib.Path,
              run: Callable = execute) -> bool:
  """Trains (or resumes) one point, then records it; True when its result.json exists."""
  point_dir = workdir / name
  if (point_dir / RESULT).exists():
    return True
  args = point_args(sweep, points(sweep)[name], os.fspath(point_dir), os.fspath(workdir / "data"))
  logging.info("sweep: training %s", name)
  if run(_module_command("worldsim.main", args), point_dir / "train.log") != 0:
    logging.error("sweep: %s failed; see %s", name, point_dir / "train.log")
    return False
  record = ["--sweep", spec, "--workdir", os.fspath(workdir), "--record", name]
  if run(_module_command("worldsim.sweep", record), point_dir / "record.log") != 0:
    logging.error("sweep: recording %s failed; see %s", name, point_dir / "record.log")
    return False
  return (point_dir / RESULT).exists()


def prepare(spec: str, workdir: pathlib.Path, run: Callable = execute) -> bool:
  """Builds the shared datasets once (in a subprocess), so parallel points do not race to
  build them."""
  return run(_module_command("worldsim.sweep", ["--sweep", spec, "--workdir", os.fspath(workdir),
                                                "--prepare"]), workdir / "prepare.log") == 0


def run_sweep(spec: str, workdir, parallel: int = 1, run: Callable = execute) -> dict:
  """Runs every unfinished point, `parallel` at a time; name -> finished (bool)."""
  sweep, workdir = load_sweep(spec), pathlib.Path(workdir)
  names = list(points(sweep))
  todo = [n for n in names if not (workdir / n / RESULT).exists()]
  logging.info("sweep: %d points, %d to run", len(names), len(todo))
  if todo and not prepare(spec, workdir, run):
    raise RuntimeError(f"building the sweep's datasets failed; see {workdir / 'prepare.log'}")
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    done = dict(zip(todo, pool.map(lambda n: run_point(spec, sweep, n, workdir, run), todo)))
  return {n: done.get(n, True) for n in names}


def read_results(workdir, names: Optional[Sequence[str]] = None) -> list:
  """The finished points' result.json (with their names), in name order: those of `names`,
  or every point under workdir."""
  paths = sorted(pathlib.Path(workdir).glob(f"*/{RESULT}"))
  return [dict(json.loads(p.read_text()), name=p.parent.name) for p in paths
          if names is None or p.parent.name in names]


def write_report(workdir, out_dir=None, names: Optional[Sequence[str]] = None) -> dict:
  """Fits the finished points (of `names`, default all) and writes report.json and plots."""
  from worldsim.scaling import fit, plots
  results = read_results(workdir, names)
  out_dir = pathlib.Path(out_dir or pathlib.Path(workdir) / REPORT_DIR)
  out_dir.mkdir(parents=True, exist_ok=True)
  report = fit.fit_sweep(results)
  (out_dir / "report.json").write_text(json.dumps(report, indent=2))
  plots.plot_report(report, results, out_dir)
  return report


# ----------------------------------------------------------------------------- subprocesses

def record(spec: str, name: str, workdir: pathlib.Path) -> None:
  """Measures a trained point and writes its result.json (atomically: it marks the point
  finished)."""
  from worldsim.scaling import measure
  sweep = load_sweep(spec)
  overrides = points(sweep)[name]
  args = point_args(sweep, overrides, os.fspath(workdir / name), os.fspath(workdir / "data"))
  config, point_dir = load_point_config(args)
  result = {"point": name, "overrides": overrides, **measure.measure_point(config, point_dir)}
  path = pathlib.Path(point_dir) / RESULT
  tmp = path.with_name(f".{RESULT}.tmp")
  tmp.write_text(json.dumps(result, indent=2))
  os.replace(tmp, path)


def build_datasets(spec: str, workdir: pathlib.Path) -> None:
  """The training and held-out pixel datasets of the sweep's points (every point shares
  them; built sources such as physics_world are built here, once)."""
  from worldsim.scaling import measure
  sweep = load_sweep(spec)
  seen = set()
  for name, overrides in points(sweep).items():
    args = point_args(sweep, overrides, os.fspath(workdir / name), os.fspath(workdir / "data"))
    config, point_dir = load_point_config(args)
    key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
    if key not in seen:
      seen.add(key)
      measure.build_datasets(config, point_dir)


# ----------------------------------------------------------------------------- entry

FLAGS = flags.FLAGS


def define_flags():
  """The entry's flags; defined only when run as the entry, since sweep files import this
  module (for Sweep and grid) and flags may be defined once."""
  flags.DEFINE_string("sweep", None, "sweep file, path.py[:arg] (get_sweep(arg))")
  flags.DEFINE_string("workdir", None, "the sweep's directory: one subdirectory per point")
  flags.DEFINE_enum("launch", "local", ["local", "print"],
                    "local: run the points here; print: print a Cloud TPU launch line per point")
  flags.DEFINE_integer("parallel", 1, "points run at once (local)")
  flags.DEFINE_string("tpu", "my-tpu", "TPU VM name (--launch=print)")
  flags.DEFINE_string("zone", "us-central2-b", "TPU zone (--launch=print)")
  flags.DEFINE_string("project", "", "GCP project (--launch=print); '' = gcloud's default")
  flags.DEFINE_string("remote_dir", "", "the worldsim checkout on the TPU VM (--launch=print); "
                      "'' = the login directory")
  flags.DEFINE_bool("report", True, "fit and plot once every point has finished")
  flags.DEFINE_string("report_dir", None, "where report.json and the plots go "
                      "(default <workdir>/report)")
  flags.DEFINE_string("record", None, "internal: measure this finished point")
  flags.DEFINE_bool("prepare", False, "internal: build the shared datasets")
  flags.mark_flags_as_required(["sweep", "workdir"])


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir)
  if FLAGS.record:
    return record(FLAGS.sweep, FLAGS.record, workdir)
  if FLAGS.prepare:
    return build_datasets(FLAGS.sweep, workdir)
  if FLAGS.launch == "print":
    print("\n".join(launch_lines(FLAGS.sweep, FLAGS.workdir, FLAGS.tpu, FLAGS.zone,
                                  FLAGS.project, FLAGS.remote_dir)))
    return None
  finished = run_sweep(FLAGS.sweep, workdir, FLAGS.parallel)
  failed = [n for n, ok in finished.items() if not ok]
  if failed:
    logging.error("sweep: %d points failed: %s", len(failed), ", ".join(failed))
  if FLAGS.report and not failed:
    report = write_report(workdir, FLAGS.report_dir, list(finished))
    print(json.dumps(report["headline"]))    # the last line: the sweep's figures
  return 1 if failed else None


if __name__ == "__main__":
  define_flags()
  app.run(main)
