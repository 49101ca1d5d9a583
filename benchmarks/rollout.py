"""Long rollouts of a trained workdir: time per chunk along a minute, and memory against length.

  python -m benchmarks.rollout --workdir=runs/physics_tiny [--seconds=60 --short_seconds=15]

Each length runs in its own process (so its peak resident memory is its own), rolling out
`seconds` of video at the model's fps (config.sample.fps) chunk by chunk with
worldsim/rollout.py, decoding every chunk through the streaming VAE and dropping it (as a
writer would). Reports one JSON line:
  time_ratio      median seconds per chunk over the last 10% of chunks / over the first 10%
                  (the first chunk, which compiles, excluded); goal <= 1.2
  memory_ratio    peak RSS of the long rollout / the short one; goal within 10%
  seconds_per_chunk, chunks, frames, peak_rss_mb per length
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def child(workdir: str, seconds: float, steps: int) -> dict:
  from worldsim import rollout, sampling
  sim = sampling.load(workdir)
  times, frames = [], 0
  start = time.perf_counter()
  for chunk in rollout.rollout_frames(sim, seconds=seconds, steps=steps, progress=False):
    now = time.perf_counter()
    times.append(now - start)
    frames += len(chunk)
    start = now
  return {"seconds": seconds, "fps": sim.config.sample.fps, "frames": frames,
          "chunks": len(times), "chunk_times": times,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(workdir: str, seconds: float, steps: int) -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.rollout", f"--workdir={workdir}",
                        f"--seconds={seconds}", f"--steps={steps}", "--child"],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seconds", type=float, default=60.0)
  parser.add_argument("--short_seconds", type=float, default=15.0)
  parser.add_argument("--steps", type=int, default=8, help="denoising steps per chunk")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.workdir, args.seconds, args.steps)))
    return
  long = run_child(args.workdir, args.seconds, args.steps)
  short = run_child(args.workdir, args.short_seconds, args.steps)
  times = np.asarray(long["chunk_times"][1:])                  # the first chunk compiles
  tenth = max(1, len(times) // 10)
  first, last = float(np.median(times[:tenth])), float(np.median(times[-tenth:]))
  result = {
      "benchmark": "rollout", "workdir": args.workdir, "steps": args.steps,
      "fps": long["fps"], "chunks": long["chunks"], "frames": long["frames"],
      "seconds_per_chunk_first10": first, "seconds_per_chunk_last10": last,
      "time_ratio": last / first, "time_goal_met": last / first <= 1.2,
      "peak_rss_mb": {f"{short['seconds']:g}s": short["peak_rss_mb"],
                      f"{long['seconds']:g}s": long["peak_rss_mb"]},
      "memory_ratio": long["peak_rss_mb"] / short["peak_rss_mb"],
      "memory_goal_met": abs(long["peak_rss_mb"] / short["peak_rss_mb"] - 1) <= 0.10,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
