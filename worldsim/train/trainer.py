"""The DiT training loop, read top to bottom: build, init or restore, step, log, save.

Everything that depends on the mesh is built by `build`, so tests can compare meshes by
calling it with different ones. The loop fetches each step's metrics one step late, so the
host never waits for the device to finish a step before dispatching the next.
"""
import functools
import os
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines import loader
from worldsim import config as config_lib
from worldsim.models import dit, patches
from worldsim.parallel import mesh as mesh_lib
from worldsim.scaling import flops
from worldsim.train import checkpoint, metrics as metrics_lib, optim, step as step_lib

BATCH_AXES = {"tokens": ("batch", "length", "patch"), "positions": ("batch", "length", None),
              "segment_ids": ("batch", "length")}


class Setup(NamedTuple):
  mesh: Any
  rules: tuple
  model: dit.DiT
  dit_cfg: dit.DiTConfig
  abstract_state: Any          # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_shardings: dict
  init: Callable               # rng -> sharded TrainState
  train_step: Callable         # (state, batch) -> (state, metrics); donates state
  seq_len: int                 # tokens per packed row


def example_batch(config) -> dict:
  """Zeros shaped like one global packed batch (for shapes only)."""
  d = config.data
  token_dim = patches.token_dim(tuple(config.model.patch_size), d.channels)
  return {"tokens": jnp.zeros((d.batch_size, d.token_budget, token_dim), jnp.float32),
          "positions": jnp.zeros((d.batch_size, d.token_budget, 3), jnp.int32),
          "segment_ids": jnp.ones((d.batch_size, d.token_budget), jnp.int32)}


def data_config(config, workdir):
  """config.data with data_dir resolved (<workdir>/data when the config leaves it empty)."""
  d = config.data.copy_and_resolve_references()
  with d.unlocked():
    d.data_dir = d.data_dir or os.path.join(os.fspath(workdir), "data")
  return d


def open_data(config, workdir):
  """This host's iterator over packed batches; process 0 builds a missing dataset first."""
  d = data_config(config, workdir)
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      loader.make_source(d, config.seed)
    multihost_utils.sync_global_devices("worldsim: dataset built")
  return iter(loader.make_dataset(d, config.model.patch_size, config.seed,
                                  jax.process_index(), jax.process_count()))


def build(config, mesh) -> Setup:
  rules = mesh_lib.rules(config.mesh)
  batch = example_batch(config)
  dit_cfg = dit.config_from(config.model, batch["tokens"].shape[-1])
  model = dit.DiT(dit_cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  init_fn = functools.partial(step_lib.init_state, model, tx, batch)
  abstract_state, state_shardings = mesh_lib.abstract_sharded(
      init_fn, mesh, rules, jax.random.PRNGKey(0))
  batch_shardings = {k: mesh_lib.logical_sharding(mesh, rules, v) for k, v in BATCH_AXES.items()}
  update = functools.partial(step_lib.dit_train_step, model=model, tx=tx, schedule=schedule,
                             diffusion_cfg=config.diffusion, ema_decay=config.optim.ema_decay)
  train_step = jax.jit(update, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  init = mesh_lib.sharded_init(init_fn, state_shardings)
  return Setup(mesh, rules, model, dit_cfg, abstract_state, state_shardings, batch_shardings,
               init, train_step, batch["tokens"].shape[1])


def train(config, workdir) -> None:
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = build(config, mesh)
  total_steps = config.train.steps
  data_iter = open_data(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.train.save_every, config.train.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(workdir)

  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    start = ckpt.latest_step()
    if start is None:
      state, start = setup.init(jax.random.PRNGKey(config.seed)), 0
    else:
      logging.info("resuming from the checkpoint of step %d in %s", start, workdir)
      state = ckpt.restore(start, setup.abstract_state, data_iter)
    if start >= total_steps:
      logging.info("dit stage complete (step %d of %d); skipping", start, total_steps)
      ckpt.close()
      return

    step_flops = flops.dit_train_flops(setup.dit_cfg, setup.seq_len, config.data.batch_size)
    peak_flops = flops.measure_matmul_flops() * jax.device_count()
    pending, last_log = None, None         # last_log: (step, time) when its metrics arrived
    real_tokens = skipped = truncated = 0  # host-side counts since the last log / the start
    progress = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="dit",
                    disable=jax.process_index() != 0)
    for step in progress:
      host_batch = next(data_iter)
      real_tokens += int((host_batch["segment_ids"] > 0).sum())
      skipped += int(host_batch["num_skipped"].sum())
      truncated += int(host_batch["num_truncated"].sum())
      batch = mesh_lib.global_batch(host_batch, setup.batch_shardings)
      state, step_metrics = setup.train_step(state, batch)
      if pending is not None:                      # the previous step's metrics, now ready
        done_step, done_metrics = pending
        row = {k: float(v) for k, v in jax.device_get(done_metrics).items()}
        now = time.perf_counter()
        if done_step % config.train.log_every == 0 or last_log is None:
          if last_log is not None:                 # no rate for the step that compiled
            seconds = now - last_log[1]
            rate = (done_step - last_log[0]) / seconds
            # tokens_per_sec counts real tokens (padding excluded), over the same window.
            row.update(steps_per_sec=rate, tokens_per_sec=real_tokens / seconds,
                       mfu=rate * step_flops / peak_flops)
          row.update(skipped_clips=skipped, truncated_clips=truncated)
          real_tokens = 0
          writer.write(done_step, row)
          progress.set_postfix(loss=f"{row['loss']:.4f}")
          last_log = (done_step, now)
      pending = (step + 1, step_metrics)
      ckpt.save(step + 1, state, data_iter, config.to_json_best_effort(),
                force=step + 1 == total_steps)
    done_step, done_metrics = pending
    writer.write(done_step, {k: float(v) for k, v in jax.device_get(done_metrics).items()})
  ckpt.close()
  writer.close()
