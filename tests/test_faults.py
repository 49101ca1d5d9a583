"""Training that survives: kill -9 and SIGTERM, saves cut off halfway, corrupt checkpoints,
NaN batches, incompatible workdirs, a full disk, bad records, and nothing unpickled.

One small DiT (depth 1, width 32, one device) is built once per module and its compiled step
shared by every in-process run; one subprocess is killed with SIGKILL. The data holds a few poisoned
records throughout (`PoisonedShapes`), so every run here also shows bad data skipped and
counted without crashing.
"""
import errno
import functools
import logging as py_logging
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import loader, shapes
from experiments import physics_tiny
from worldsim import config as config_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint, metrics, step as step_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 8, 2
POISONED = {2: "unreadable", 5: "no frames", 9: "one channel", 13: "NaN pixels",
            17: "int64 pixels"}


class PoisonedShapes(shapes.ShapesSource):
  """Procedural clips with a few records broken in the ways real datasets break."""

  def __getitem__(self, index):
    kind = POISONED.get(int(index))
    if kind == "unreadable":
      raise OSError(f"simulated read error in record {index}")
    record = super().__getitem__(index)
    video = record["video"]
    if kind == "no frames":
      record["video"] = video[:0]
    elif kind == "one channel":
      record["video"] = video[..., :1]
    elif kind == "NaN pixels":
      record["video"] = np.where(video > 100, np.nan, video.astype(np.float32))
    elif kind == "int64 pixels":
      record["video"] = video.astype(np.int64)
    return record


def poison_source():
  loader.make_source = lambda d, seed: PoisonedShapes(
      d.num_clips, d.min_frames, d.max_frames, d.min_side, d.max_side, d.max_shapes, seed)


def fault_config():
  """conftest's tiny pixel-space config with a smaller model: 8 steps, a save every 2."""
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages = ("dit",)
    config.data.space, config.data.source = "pixel", "shapes"
    config.data.num_clips = 24
    config.data.min_side, config.data.max_side = 16, 32
    config.data.min_frames, config.data.max_frames = 2, 8
    config.data.max_tokens_per_clip, config.data.token_budget = 128, 256
    config.data.batch_size = 8
    config.model.patch_size = (1, 4, 4)
    config.model.depth, config.model.width, config.model.num_heads = 1, 32, 2
    config.model.text = "none"
    config.sample.num_frames, config.sample.height, config.sample.width = 4, 16, 16
    config.train.steps, config.train.save_every = STEPS, SAVE_EVERY
    config.train.log_every, config.train.keep_checkpoints = 1, 5
    config.optim.warmup_steps = 2
  return config


def one_device_mesh(config):
  """Runs here use one device (it compiles and steps faster than eight; sharded restores are
  test_trainer's)."""
  return mesh_lib.make_mesh(config.mesh, jax.devices()[:1])


def run_dit(setup, config, workdir):
  """trainer.train with a prebuilt Setup, so one compiled step serves every run here (and
  no MFU: measuring the peak takes seconds of matmuls)."""
  stage = trainer.dit_stage(config, workdir, setup)._replace(mfu=False)
  return trainer.run(setup, stage, trainer.open_data(config, workdir), config)


def train_until_killed(workdir, kill_before_step: int):
  """The subprocess: trains as the tests here do (one device of eight: the same compiled
  program, so the same bits; a client of one device orders float sums differently), and
  SIGKILLs itself just before step
  `kill_before_step`, once the checkpoint of step kill_before_step - 2 is committed."""
  jax.config.update("jax_default_matmul_precision", "highest")     # as conftest sets it
  poison_source()
  calls = [0]
  global_batch = mesh_lib.global_batch

  def kill_on_cue(*args):
    calls[0] += 1
    if calls[0] == kill_before_step:
      saved = pathlib.Path(workdir, "checkpoints", str(kill_before_step - 2))
      while not saved.exists():
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return global_batch(*args)

  mesh_lib.global_batch = kill_on_cue
  config = fault_config()
  run_dit(trainer.build(config, one_device_mesh(config)), config, workdir)


def call_on_step(monkeypatch, step: int, action):
  """Runs `action(host_batch)` when the loop assembles the batch of `step` (1-based)."""
  calls = [0]
  global_batch = mesh_lib.global_batch

  def wrapped(host_batch, shardings):
    calls[0] += 1
    if calls[0] >= step:
      host_batch = action(host_batch) or host_batch
    return global_batch(host_batch, shardings)

  monkeypatch.setattr(mesh_lib, "global_batch", wrapped)


@pytest.fixture(scope="module")
def setup():
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loader, "make_source", loader.make_source)   # restored after the module
    poison_source()
    config = fault_config()
    yield trainer.build(config, one_device_mesh(config))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
  """An uninterrupted run: (workdir, final state on the host)."""
  workdir = tmp_path_factory.mktemp("faults") / "reference"
  state = run_dit(setup, fault_config(), workdir)
  return workdir, jax.device_get(state)


def restored(setup, workdir, step=None):
  return jax.device_get(checkpoint.restore_state_only(workdir, setup.abstract_state, step)[1])


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read(workdir)}


def test_bad_records_are_skipped_counted_and_logged(reference):
  rows = metrics.read(reference[0])
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert rows[-1]["skipped_clips"] >= len(POISONED)     # every bad record met at least once
  assert rows[-1]["nonfinite_skips"] == 0 and all(np.isfinite(r["loss"]) for r in rows)


def test_the_vae_crops_skip_bad_records_too(monkeypatch):
  d = fault_config().data
  monkeypatch.setattr(loader, "pixel_source", lambda d, seed: PoisonedShapes(
      d.num_clips, d.min_frames, d.max_frames, d.min_side, d.max_side, d.max_shapes, seed))
  it = iter(loader.make_clip_dataset(d, 2, 16, 16, 4, seed=0))
  batches = [next(it) for _ in range(8)]               # 32 crops: more than one pass
  assert all(np.isfinite(b["video"]).all() for b in batches)
  seen = {int(i) for b in batches for i in b["clip_index"]}
  assert not seen & set(POISONED) and sum(int(b["num_skipped"].sum()) for b in batches) >= 5


def test_killed_run_resumes_to_bitwise_identical_parameters(setup, reference, tmp_path):
  workdir = tmp_path / "killed"
  driver = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
            f"import test_faults; test_faults.train_until_killed({str(workdir)!r}, 6)")
  result = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert checkpoint.Checkpointer(workdir, SAVE_EVERY, 5).latest_step() == 4
  final = run_dit(setup, fault_config(), workdir)      # restarts on its own from step 4
  chex.assert_trees_all_equal(jax.device_get(final), reference[1])
  assert losses(workdir) == losses(reference[0])        # the same data, noise and updates
  assert [r["step"] for r in metrics.read(workdir)] == list(range(1, STEPS + 1))  # one row each


def test_sigterm_saves_the_current_step_and_exits(setup, reference, tmp_path, monkeypatch):
  workdir = tmp_path / "preempted"
  previous = signal.getsignal(signal.SIGTERM)
  call_on_step(monkeypatch, 3, lambda b: os.kill(os.getpid(), signal.SIGTERM) if
               not (workdir / "checkpoints" / "3").exists() else None)
  with pytest.raises(trainer.Preempted, match="saved step 3") as info:
    run_dit(setup, fault_config(), workdir)
  assert info.value.step == 3 and trainer.PREEMPTED_EXIT_CODE == 143
  assert signal.getsignal(signal.SIGTERM) is previous
  assert checkpoint.Checkpointer(workdir, SAVE_EVERY, 5).latest_step() == 3   # off-interval
  monkeypatch.undo()
  final = run_dit(setup, fault_config(), workdir)
  chex.assert_trees_all_equal(jax.device_get(final), reference[1])


def test_a_save_cut_off_halfway_leaves_the_previous_checkpoint(reference, tmp_path):
  workdir = tmp_path / "cut"
  shutil.copytree(reference[0], workdir)
  ckpts = workdir / "checkpoints"
  # What a kill during the async write of step 10 leaves: an uncommitted tmp directory.
  partial = ckpts / "10.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(ckpts / "8", partial)
  shutil.rmtree(partial / "state")
  ckpt = checkpoint.Checkpointer(workdir, SAVE_EVERY, 5)
  assert ckpt.latest_step() == 8
  ckpt.close()
  for _ in range(100):                   # orbax removes it in the background on reopening
    if not partial.exists():
      break
    time.sleep(0.05)
  assert not partial.exists()


def _truncate(directory: pathlib.Path):
  for f in directory.rglob("*"):
    if f.is_file() and f.stat().st_size > 64 and "d" in f.parent.name:
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def test_a_corrupt_checkpoint_is_set_aside_and_the_one_before_used(setup, reference, tmp_path,
                                                                  caplog):
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference[0], workdir)
  ckpts = workdir / "checkpoints"
  _truncate(ckpts / "8" / "state")
  (ckpts / "6" / "config" / "metadata").write_text('{"seed": ')      # truncated JSON
  config = fault_config()
  with config.unlocked():
    config.train.steps = 10        # resume: the newest readable checkpoint is 4
  with caplog.at_level(py_logging.WARNING):
    final = run_dit(setup, config, workdir)
  warnings = " ".join(r.getMessage() for r in caplog.records)
  assert re.search(r"checkpoint of step 8 .* cannot be restored", warnings)
  assert re.search(r"checkpoint of step 6 .* cannot be restored", warnings)
  assert (ckpts / "8.corrupt").is_dir() and (ckpts / "6.corrupt").is_dir()
  assert int(final.step) == 10 and sorted(losses(workdir))[-1] == 10
  assert checkpoint.Checkpointer(workdir, SAVE_EVERY, 5).latest_step() == 10


def test_nan_batches_skip_the_update_and_stop_the_run_after_k(setup, reference, tmp_path,
                                                             monkeypatch):
  workdir = tmp_path / "nan"
  config = fault_config()
  with config.unlocked():
    config.train.max_nonfinite_skips = 2
  poison = lambda b: dict(b, tokens=np.full_like(b["tokens"], np.nan))
  call_on_step(monkeypatch, 5, poison)                  # steps 5, 6, ...: NaN tokens
  with pytest.raises(trainer.NonFiniteError, match=r"steps 5 to 6 .*\(step 6 in"):
    run_dit(setup, config, workdir)
  rows = metrics.read(workdir)
  assert [r["update_skipped"] for r in rows[4:6]] == [1.0, 1.0]
  assert rows[5]["nonfinite_skips"] == 2
  # The checkpoint of step 6 holds step 4's weights untouched: the skipped updates left
  # parameters, optimizer state and EMA bitwise as they were; only the step moved on.
  at_6, at_4 = restored(setup, workdir, 6), restored(setup, reference[0], 4)
  assert int(at_6.step) == 6
  chex.assert_trees_all_equal(at_6.replace(step=at_4.step, rng=at_4.rng), at_4)


class _PixelScale(nn.Module):
  """A stand-in with the VAE's call signature (reconstruction, mean, logvar): one weight, so
  the real vae_train_step compiles in a moment."""

  @nn.compact
  def __call__(self, video, rng):
    del rng
    w = self.param("w", nn.initializers.ones, (1,))
    return video * w, video.mean(-1) * w, jnp.zeros(video.shape[:-1])


def test_vae_step_skips_a_nan_update():
  import optax
  model, tx = _PixelScale(), optax.adam(1e-2)
  video = jnp.zeros((1, 2, 4, 4, 3))
  params = model.init(jax.random.PRNGKey(0), video, None)["params"]
  state = step_lib.VAEState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), disc_params=None, disc_opt_state=None,
                            rng=jax.random.PRNGKey(1))
  train_step = jax.jit(functools.partial(
      step_lib.vae_train_step, model=model, tx=tx, schedule=lambda step: 1e-2, kl_weight=1.0,
      l2_weight=1.0, disc_weight=0.0), donate_argnums=0)
  before = jax.device_get(state)
  state, step_metrics = train_step(state, {"video": video.at[0, 1, 2, 3].set(jnp.inf)})
  assert float(step_metrics["update_skipped"]) == 1.0 and int(state.step) == 1
  chex.assert_trees_all_equal(jax.device_get(state).replace(step=before.step), before)
  state, step_metrics = train_step(state, {"video": video + 0.5})     # finite: it learns
  assert float(step_metrics["update_skipped"]) == 0.0
  assert not np.array_equal(jax.device_get(state.params["w"]), before.params["w"])


def test_a_workdir_of_another_model_is_a_config_error_before_compiling(reference, tmp_path):
  workdir = tmp_path / "other"
  shutil.copytree(reference[0], workdir)
  config = fault_config()
  with config.unlocked():
    config.model.depth, config.train.steps = 2, 10
  other = trainer.build(config, one_device_mesh(config))
  with pytest.raises(config_lib.ConfigError, match=r"model\.depth: 1 saved, 2 now.*fresh "
                                                   r"--workdir"):
    run_dit(other, config, workdir)
  assert not list((workdir / "checkpoints").glob("*.corrupt"))    # nothing set aside


def _tiny_save_args(tmp_path):
  state = {"w": jnp.arange(4.0)}
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  return checkpoint.Checkpointer(tmp_path, 1, 3), state, data_iter


@pytest.mark.parametrize("where", ["save", "background write"])
def test_a_full_disk_names_the_directory_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                      where):
  ckpt, state, data_iter = _tiny_save_args(tmp_path)
  ckpt.save(1, state, data_iter, "{}")
  ckpt.wait()
  if where == "save":
    error = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(error))
    call = lambda: ckpt.save(2, state, data_iter, "{}")
  else:            # tensorstore reports ENOSPC from the writer thread as text
    error = ValueError("Error writing 'd/1f2e': [OS error 28: No space left on device]")
    monkeypatch.setattr(ckpt.manager, "wait_until_finished",
                        lambda: (_ for _ in ()).throw(error))
    call = ckpt.wait
  (ckpt.directory / "2.orbax-checkpoint-tmp-99").mkdir()     # the partial write
  with pytest.raises(checkpoint.DiskFullError, match=r"under .*checkpoints \(\d+ bytes free"
                                                     r" now\); the checkpoint of step 1"):
    call()
  assert not (ckpt.directory / "2.orbax-checkpoint-tmp-99").exists()
  monkeypatch.undo()
  assert ckpt.latest_step() == 1
  ckpt.close()


class _Boom:
  """Unpickling this creates the file `marker`: proof that something unpickled it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_nothing_is_unpickled_or_executed_from_checkpoints_or_data(setup, reference,
                                                                   tmp_path, monkeypatch):
  # Static: no unpickling or eval on any path of the package.
  pattern = re.compile(r"^\s*import (pickle|dill|cloudpickle|marshal|shelve)\b|pickle\.loads?\(|"
                       r"allow_pickle\s*=\s*True|(?<![\w.])(eval|exec)\(|yaml\.(unsafe_)?load\(|"
                       r"np\.load\((?![^)]*allow_pickle\s*=\s*False)", re.M)
  sources = [p for d in ("worldsim", "data_pipelines") for p in (ROOT / d).rglob("*.py")]
  assert not [(str(p), m.group()) for p in sources for m in pattern.finditer(p.read_text())]
  # Dynamic: poisoned pickles beside every item of a checkpoint; loading it (and the data)
  # with pickle disarmed must neither create the marker nor call pickle.
  workdir, marker = tmp_path / "poisoned", tmp_path / "pwned"
  shutil.copytree(reference[0], workdir)
  for item in (workdir / "checkpoints" / "8").iterdir():
    if item.is_dir():
      (item / "payload.pkl").write_bytes(pickle.dumps(_Boom(marker)))
  def refuse(*args, **kwargs):
    raise AssertionError("something unpickled")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  monkeypatch.setattr(np, "load", lambda *a, **k: refuse() if k.get("allow_pickle") else None)
  restored(setup, workdir)
  checkpoint.load_config(workdir)
  config = fault_config()
  it = trainer.open_data(config, workdir)
  next(it)
  assert not marker.exists()
  # A dataset whose TFDS metadata names a module to import is refused before TFDS opens it.
  data_dir = tmp_path / "data"
  features = data_dir / "physics_world" / "evil" / "1.0.0" / "features.json"
  features.parent.mkdir(parents=True)
  features.write_text('{"featuresDict": {"features": {"video": {"pythonClassName": '
                      '"runs.evil.Feature"}}}}')
  with config.unlocked():
    config.data.source, config.data.data_dir = "physics_world", str(data_dir)
  with pytest.raises(loader.UnsafeMetadata, match="runs.evil.Feature"):
    loader.pixel_source(config.data, 0)
