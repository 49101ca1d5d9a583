"""Tokens per second the packing loader delivers (0, 1 and 2 worker processes), against the
tokens per second the DiT train step of the tiny recipe consumes.

  python -m benchmarks.loader                 # shapes clips, no build needed
  python -m benchmarks.loader --source=physics_world --data_dir=/tmp/pw --num_clips=512

Loader: a fresh iterator per worker count; the first batches (worker start-up, the first
packing round) are a warm-up, then `--batches` batches are timed. Step: trainer.build on a
1-device mesh, fed one of the loader's batches; the median of `--steps` steps after compiling.
Slots are rows x token_budget (what a step consumes); tokens are the non-padding slots.
Headroom = loader slots/s / step slots/s. Goal: >= 5x with the in-process loader (0 workers),
the recipe's default. The last line is one JSON object.
"""
import argparse
import itertools
import json
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import loader
from experiments import physics_tiny
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import trainer


def loader_rates(data_cfg, patch_size, num_batches: int, warmup: int = 4) -> dict:
  it = iter(loader.make_dataset(data_cfg, patch_size, seed=0))
  list(itertools.islice(it, warmup))
  start, slots, tokens = time.perf_counter(), 0, 0
  for batch in itertools.islice(it, num_batches):
    slots += batch["segment_ids"].size
    tokens += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  if data_cfg.worker_count:
    it.close()
  return {"slots_per_s": slots / seconds, "tokens_per_s": tokens / seconds}


def step_rate(config, batch: dict, num_steps: int) -> float:
  """Slots per second of the tiny recipe's train step on one device."""
  with config.unlocked():
    config.data.batch_size = len(batch["tokens"])
    config.mesh.data = 1
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = trainer.build(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    device_batch = mesh_lib.global_batch(batch, setup.batch_shardings)
    state = setup.init(jax.random.PRNGKey(0))
    state, metrics = setup.train_step(state, device_batch)   # compiles
    jax.block_until_ready(metrics)
    times = []
    for _ in range(num_steps):
      start = time.perf_counter()
      state, metrics = setup.train_step(state, device_batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  return batch["segment_ids"].size / float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--source", default="shapes")
  p.add_argument("--data_dir", default="")
  p.add_argument("--num_clips", type=int, default=4096)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--workers", default="0,1,2")
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

  # The recipe's DiT and data in pixel space (as first measured): the loader then decodes,
  # crops and resizes pixel clips, its costliest path (latent records skip the resize).
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages, config.data.space, config.model.text = ("dit",), "pixel", "none"
    config.model.patch_size, config.data.max_tokens_per_clip = (1, 4, 4), 128
  patch_size = tuple(config.model.patch_size)
  data_cfg = config.data.copy_and_resolve_references()   # the tiny recipe's data, as trained
  with data_cfg.unlocked():
    data_cfg.source, data_cfg.num_clips = args.source, args.num_clips
    data_cfg.data_dir = args.data_dir or "runs/bench_data"
  rates = {}
  for workers in (int(w) for w in args.workers.split(",")):
    data_cfg.worker_count = workers
    rates[workers] = loader_rates(data_cfg, patch_size, args.batches)
    print(f"loader, {workers} workers: {rates[workers]['slots_per_s']:,.0f} slots/s, "
          f"{rates[workers]['tokens_per_s']:,.0f} tokens/s")
  data_cfg.worker_count = 0
  batch = next(iter(loader.make_dataset(data_cfg, patch_size, seed=0)))
  step = step_rate(config, batch, args.steps)
  headroom = {w: r["slots_per_s"] / step for w, r in rates.items()}
  print(f"train step ({tuple(batch['tokens'].shape)}): {step:,.0f} slots/s; headroom "
        + ", ".join(f"{h:.1f}x with {w} workers" for w, h in headroom.items()))
  print(json.dumps({
      "benchmark": "loader", "device": jax.devices()[0].device_kind, "source": args.source,
      "batch_shape": list(batch["tokens"].shape),
      "loader_slots_per_s": {str(w): round(r["slots_per_s"]) for w, r in rates.items()},
      "loader_tokens_per_s": {str(w): round(r["tokens_per_s"]) for w, r in rates.items()},
      "step_slots_per_s": round(step),
      "headroom": {str(w): round(h, 1) for w, h in headroom.items()},
      "goal": "headroom >= 5 with 0 workers", "met": bool(headroom.get(0, 0) >= 5)}))


if __name__ == "__main__":
  main()
