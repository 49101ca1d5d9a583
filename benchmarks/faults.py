"""kill -9 at random moments, restart until done: are the final parameters bitwise those of
an uninterrupted run, and how many steps does a kill cost?

  python benchmarks/faults.py [--kills=10] [--steps=80] [--save_every=5] [--seed=0]

A tiny DiT trains in pixel space on procedural clips (`python -m worldsim.main`, stage dit,
one CPU device) once straight through, then again under fire: each attempt is SIGKILLed at a
random moment once it has logged a step past where it resumed, and started again on the same
workdir, --kills times; the last attempt is sent SIGTERM instead (it must save its step and
exit with code 143), and a final attempt runs to the end. Restarts share a JAX compilation
cache, as a real restart loop would. Lost steps per kill = the last step logged before the
kill - the step the next attempt resumed from (metrics are logged one step late, so this is
a lower bound by at most one step).

Prints one JSON line last: kills, resumes, lost steps per kill (the goal: at most
save_every), whether SIGTERM saved its step, and whether the final state (parameters,
optimizer state, EMA, step, RNG) and every step's loss match the uninterrupted run bitwise.
"""
import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main_args(workdir, steps: int, save_every: int) -> list:
  return [sys.executable, "-m", "worldsim.main", "--config=experiments/physics_tiny.py",
          f"--workdir={workdir}", "--config.stages=dit", "--config.data.space=pixel",
          "--config.data.source=shapes", "--config.data.num_clips=64",
          "--config.data.min_side=16", "--config.data.max_side=32",
          "--config.data.min_frames=2", "--config.data.max_frames=8",
          "--config.data.max_tokens_per_clip=128", "--config.data.token_budget=256",
          "--config.data.batch_size=8", "--config.model.patch_size=(1,4,4)",
          "--config.model.depth=1", "--config.model.width=32", "--config.model.num_heads=2",
          "--config.model.text=none", "--config.optim.warmup_steps=5",
          f"--config.train.steps={steps}", f"--config.train.save_every={save_every}",
          "--config.train.log_every=1", "--config.train.keep_checkpoints=3"]


def environment(cache_dir) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}     # one CPU device
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def logged_steps(workdir) -> list:
  path = pathlib.Path(workdir, "metrics.jsonl")
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:       # a line cut off by the kill
      pass
  return rows


def last_logged(workdir) -> int:
  rows = logged_steps(workdir)
  return rows[-1]["step"] if rows else 0


def resumed_from(stderr: str) -> int:
  match = re.search(r"resuming from the checkpoint of step (\d+)", stderr)
  return int(match.group(1)) if match else 0


def attempt(args, env, workdir, rng, kill_signal=None, max_wait_steps: float = 12.0):
  """One run; with kill_signal, sends it at a random moment after the run has logged a step
  past its start. Returns (return code, stderr, last step logged before the signal)."""
  start_logged = last_logged(workdir)
  with tempfile.TemporaryFile("w+") as err:
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    logged = None
    if kill_signal is not None:
      begun = None
      while process.poll() is None:
        if begun is None and last_logged(workdir) > start_logged:
          begun = time.perf_counter()
          t0 = last_logged(workdir)
        if begun is not None:
          # Steps take about the same time: wait a random number of them (0 .. max).
          elapsed = time.perf_counter() - begun
          if elapsed > 0.5:
            per_step = elapsed / max(last_logged(workdir) - t0, 1)
            delay = rng.uniform(0, max_wait_steps) * per_step
            time.sleep(delay)
            logged = last_logged(workdir)
            process.send_signal(kill_signal)
            break
        time.sleep(0.01)
    code = process.wait()
    err.seek(0)
    stderr = err.read()
  return code, stderr, logged


def final_state(workdir):
  import jax
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute(),
                             item_names=("state",)) as manager:
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  return step, {jax.tree_util.keystr(p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--save_every", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  flags = parser.parse_args()
  rng = random.Random(flags.seed)
  root = pathlib.Path(tempfile.mkdtemp(prefix="worldsim_faults_"))
  env = environment(root / "jax_cache")
  reference, faulty = root / "reference", root / "faulty"

  began = time.perf_counter()
  code, stderr, _ = attempt(main_args(reference, flags.steps, flags.save_every), env,
                            reference, rng)
  assert code == 0, stderr[-3000:]
  reference_seconds = time.perf_counter() - began

  args = main_args(faulty, flags.steps, flags.save_every)
  kills, lost, resumes, sigterm = 0, [], 0, {}
  pending_kill = None                   # last step logged before the latest kill
  while True:
    if kills < flags.kills:
      signal_to_send = signal.SIGKILL
    elif not sigterm:
      signal_to_send = signal.SIGTERM
    else:
      signal_to_send = None
    # SIGTERM soon after training resumes, so that it lands mid-run.
    code, stderr, logged = attempt(args, env, faulty, rng, signal_to_send,
                                   12.0 if signal_to_send == signal.SIGKILL else 1.0)
    start = resumed_from(stderr)
    resumes += start > 0
    if pending_kill is not None:
      lost.append(pending_kill - start)
      pending_kill = None
    if signal_to_send == signal.SIGKILL and code == -signal.SIGKILL:
      kills += 1
      pending_kill = logged
      print(f"kill {kills}: last logged step {logged}", file=sys.stderr)
    elif signal_to_send == signal.SIGTERM and code != 0:
      saved = re.search(r"saved step (\d+)", stderr)
      sigterm = {"exit_code": code, "saved_step": int(saved.group(1)) if saved else None,
                 "last_logged": last_logged(faulty)}
      print(f"SIGTERM: exit {code}, {sigterm}", file=sys.stderr)
    elif code == 0:
      break
    else:
      raise RuntimeError(f"attempt exited with {code}:\n{stderr[-3000:]}")

  step_ref, state_ref = final_state(reference)
  step_faulty, state_faulty = final_state(faulty)
  params_match = (step_ref == step_faulty == flags.steps and state_ref.keys() == state_faulty.keys()
                  and all(np.array_equal(state_ref[k], state_faulty[k]) for k in state_ref))
  # The faulty run logs some steps twice (redone after a kill); the last of each counts.
  loss = lambda w: {r["step"]: r["loss"] for r in logged_steps(w)}
  losses_match = loss(reference) == loss(faulty) and len(loss(reference)) == flags.steps
  print(json.dumps({
      "kills": kills, "resumes": resumes, "lost_steps_per_kill": lost,
      "max_lost_steps": max(lost) if lost else None, "save_every": flags.save_every,
      "goal_lost_at_most_save_every": bool(lost) and max(lost) <= flags.save_every,
      "sigterm_exit_code": sigterm.get("exit_code"),
      "sigterm_saved_step": sigterm.get("saved_step"),
      "sigterm_lost_steps": (sigterm["last_logged"] - sigterm["saved_step"]
                             if sigterm.get("saved_step") else None),
      "steps": flags.steps, "final_params_match": params_match,
      "losses_match": losses_match, "reference_seconds": round(reference_seconds, 1),
      "total_seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
  main()
