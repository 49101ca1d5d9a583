"""The training loop, read top to bottom: build, init or restore, step, log, save.

One loop (`run`) trains both networks of the recipe:

  train(config, workdir)      stage 'dit': the DiT on packed token rows
                              -> <workdir>/checkpoints, <workdir>/metrics.jsonl
  train_vae(config, workdir)  stage 'vae': the causal VAE on fixed-size pixel crops
                              -> <workdir>/vae/checkpoints, <workdir>/vae/metrics.jsonl,
                                 and last <workdir>/vae/latent_stats.json

What differs between the two is built by `build` (the DiT) and `build_vae` into a `Setup`
(model, sharded abstract state, jitted init and step, the shardings of the batch's device
arrays) and described by a `Stage` (where it writes, how long it trains, what it counts).
Everything that depends on the mesh is built there, so tests can compare meshes by calling
them with different ones. The loop fetches each step's metrics one step late, so the host
never waits for the device to finish a step before dispatching the next.
"""
import collections
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines import loader
from worldsim import config as config_lib
from worldsim.models import dit, patches, text as text_lib, vae as vae_lib
from worldsim.parallel import context as context_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.scaling import flops
from worldsim.train import checkpoint, metrics as metrics_lib, optim, step as step_lib

BATCH_AXES = {"tokens": ("batch", "length", "patch"), "positions": ("batch", "length", None),
              "segment_ids": ("batch", "length")}
# Captions (config.model.text != 'none'): whole on every device of a batch shard.
TEXT_AXES = {"bytes": {"text": ("batch", None), "text_segment_ids": ("batch", None)},
             "embeddings": {"text": ("batch", None, None), "text_segment_ids": ("batch", None)},
             "none": {}}
VAE_BATCH_AXES = {"video": vae_lib.PIXEL_AXES}
LATENT_STATS = "latent_stats.json"


class Setup(NamedTuple):
  mesh: Any
  rules: tuple
  model: nn.Module             # dit.DiT or vae.VAE
  model_cfg: Any               # its dit.DiTConfig or vae.VAEConfig
  abstract_state: Any          # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_shardings: dict        # the batch's device arrays; other keys stay on the host
  init: Callable               # rng -> sharded train state
  train_step: Callable         # (state, batch) -> (state, metrics); donates state
  seq_len: int = 0             # DiT: tokens per packed row

  @property
  def dit_cfg(self):
    return self.model_cfg


class Stage(NamedTuple):
  """What the loop needs to know about a stage besides its Setup."""
  name: str                    # 'dit' or 'vae': log lines and the progress bar
  directory: pathlib.Path      # checkpoints/ and metrics.jsonl go here
  steps: int
  log_every: int
  save_every: int
  keep_checkpoints: int
  throughput: Callable         # host batch -> amounts logged per second, e.g. {'tokens': n}
  totals: Callable             # host batch -> amounts logged as running totals
  mfu: bool = False            # throughput counts 'model_flops': log MFU against a matmul


# ----------------------------------------------------------------------------- data

def latents_name(config) -> str:
  """The latent dataset of this config: config.data.latents_name, else one named for the
  source and the VAE that encodes it, so a retrained or resized VAE gets a new dataset."""
  name = config.data.get("latents_name", "")
  return name or f"{config.data.source}_vae_{config.vae.variant}_step{config.vae.steps}"


def data_config(config, workdir):
  """config.data with data_dir (<workdir>/data when the config leaves it empty) and, in latent
  space, latents_name resolved."""
  d = config.data.copy_and_resolve_references()
  with d.unlocked():
    d.data_dir = d.data_dir or os.path.join(os.fspath(workdir), "data")
    if config_lib.space(config) == "latent":
      d.latents_name = latents_name(config)
  return d


def _build_source_once(d, seed: int) -> None:
  """On several hosts, process 0 builds a missing pixel dataset while the others wait (a
  latent dataset is built by its own stage)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      loader.pixel_source(d, seed)
    multihost_utils.sync_global_devices("worldsim: dataset built")


def open_data(config, workdir):
  """This host's iterator over packed batches; process 0 builds a missing pixel dataset
  first. In latent space the `latents` stage must have built the latent dataset."""
  d = data_config(config, workdir)
  if config_lib.space(config) == "pixel":
    _build_source_once(d, config.seed)
  return iter(loader.make_dataset(d, config.model.patch_size, config.seed,
                                  jax.process_index(), jax.process_count(),
                                  text=config.model.get("text", "none")))


def open_clip_data(config, workdir):
  """This host's iterator over batches of the VAE's fixed-size crops."""
  d, v = data_config(config, workdir), config.vae
  _build_source_once(d, config.seed)
  return iter(loader.make_clip_dataset(d, v.crop_frames, v.crop_height, v.crop_width,
                                       v.batch_size, config.seed, jax.process_index(),
                                       jax.process_count()))


# ----------------------------------------------------------------------------- DiT

def example_batch(config) -> dict:
  """Zeros shaped like one global packed batch (for shapes only); the null captions of
  max_clips_per_row clips when the model reads captions."""
  d, m = config.data, config.model
  token_dim = patches.token_dim(tuple(m.patch_size), config_lib.model_channels(config))
  batch = {"tokens": jnp.zeros((d.batch_size, d.token_budget, token_dim), jnp.float32),
           "positions": jnp.zeros((d.batch_size, d.token_budget, 3), jnp.int32),
           "segment_ids": jnp.ones((d.batch_size, d.token_budget), jnp.int32)}
  mode = m.get("text", "none")
  if mode != "none":
    text, text_segment_ids = text_lib.null_text(
        d.batch_size, d.max_clips_per_row, d.caption_len,
        m.text_embed_dim if mode == "embeddings" else None)
    batch.update(text=jnp.asarray(text), text_segment_ids=jnp.asarray(text_segment_ids))
  return batch


def build(config, mesh) -> Setup:
  """The DiT's Setup. With config.model.context_parallel='ulysses_ring' the mesh's context
  axis is split into (ring, ulysses) axes of config.model.ulysses_degree Ulysses devices."""
  rules = mesh_lib.rules(config.mesh)
  if config.model.get("context_parallel", "none") == "ulysses_ring":
    mesh = context_lib.factor_context_axis(mesh, config.model.ulysses_degree)
    rules = context_lib.factor_context_rules(rules)
  batch = example_batch(config)
  dit_cfg = dit.config_from(config.model, batch["tokens"].shape[-1])
  model = dit.DiT(dit_cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  init_fn = functools.partial(step_lib.init_state, model, tx, batch)
  abstract_state, state_shardings = mesh_lib.abstract_sharded(
      init_fn, mesh, rules, jax.random.PRNGKey(0))
  axes = {**BATCH_AXES, **TEXT_AXES[dit_cfg.text]}
  batch_shardings = {k: mesh_lib.logical_sharding(mesh, rules, v) for k, v in axes.items()}
  update = functools.partial(step_lib.dit_train_step, model=model, tx=tx, schedule=schedule,
                             diffusion_cfg=config.diffusion, ema_decay=config.optim.ema_decay,
                             accum_steps=config.train.get("accum_steps", 1))
  train_step = jax.jit(update, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  init = mesh_lib.sharded_init(init_fn, state_shardings)
  return Setup(mesh, rules, model, dit_cfg, abstract_state, state_shardings, batch_shardings,
               init, train_step, batch["tokens"].shape[1])


def dit_stage(config, workdir, setup: Setup) -> Stage:
  t, cfg = config.train, setup.dit_cfg
  text_embed_dim = config.model.get("text_embed_dim", 0) if cfg.text == "embeddings" else 0
  return Stage(
      "dit", pathlib.Path(workdir), t.steps, t.log_every, t.save_every, t.keep_checkpoints,
      # tokens_per_sec counts real tokens (padding excluded). Model FLOPs count attention
      # only where the mask allows it: within clips (and their captions), and in a
      # block-causal model only towards the past.
      throughput=lambda b: {"tokens": int((b["segment_ids"] > 0).sum()),
                            "model_flops": flops.packed_train_flops(
                                cfg, b["segment_ids"], b.get("text_segment_ids"),
                                b["positions"][..., 0], text_embed_dim)},
      totals=lambda b: {"skipped_clips": int(b["num_skipped"].sum()),
                        "truncated_clips": int(b["num_truncated"].sum())},
      mfu=True)


def train(config, workdir) -> None:
  """Stage 'dit'. In latent space it first copies the latent dataset's statistics to
  <workdir>/latent_stats.json, so that the workdir alone (checkpoints, vae/ and that file)
  is what sampling needs."""
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = build(config, mesh)
  data_iter = open_data(config, workdir)
  if config_lib.space(config) == "latent" and jax.process_index() == 0:
    d = data_config(config, workdir)
    stats = pathlib.Path(d.data_dir, loader.LATENTS_DIR, d.latents_name, LATENT_STATS)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stats, pathlib.Path(workdir) / LATENT_STATS)
  run(setup, dit_stage(config, workdir, setup), data_iter, config)


# ----------------------------------------------------------------------------- VAE

def example_clips(config):
  """Zeros shaped like one global batch of the VAE's crops."""
  v = config.vae
  return jnp.zeros((v.batch_size, v.crop_frames, v.crop_height, v.crop_width,
                    config.data.channels), jnp.float32)


def build_vae(config, mesh) -> Setup:
  """The VAE's Setup: the VAE and, when config.vae.disc_start >= 0, its discriminator, each
  with its own AdamW, in one state; sharded by the VAE's own rules (config.vae.rules)."""
  v = config.vae
  rules = mesh_lib.rules(v)
  video = example_clips(config)
  vae_cfg = dataclasses.replace(vae_lib.config_from(v), in_channels=config.data.channels)
  model = vae_lib.VAE(vae_cfg)
  disc = vae_lib.Discriminator(vae_cfg) if v.disc_start >= 0 else None
  tx, schedule = optim.make_optimizer(v.optim, v.steps)
  disc_tx = optim.make_optimizer(v.optim, v.steps)[0] if disc else None
  init_fn = functools.partial(step_lib.vae_init_state, model, tx, disc, disc_tx, video)
  abstract_state, state_shardings = mesh_lib.abstract_sharded(
      init_fn, mesh, rules, jax.random.PRNGKey(0))
  batch_shardings = {k: mesh_lib.logical_sharding(mesh, rules, axes)
                     for k, axes in VAE_BATCH_AXES.items()}
  update = functools.partial(step_lib.vae_train_step, model=model, tx=tx, schedule=schedule,
                             disc=disc, disc_tx=disc_tx, disc_start=v.disc_start,
                             kl_weight=v.kl_weight, l2_weight=v.l2_weight,
                             disc_weight=v.disc_weight)
  train_step = jax.jit(update, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  init = mesh_lib.sharded_init(init_fn, state_shardings)
  return Setup(mesh, rules, model, vae_cfg, abstract_state, state_shardings, batch_shardings,
               init, train_step)


def vae_stage(config, workdir) -> Stage:
  v = config.vae
  return Stage("vae", pathlib.Path(workdir) / "vae", v.steps, v.log_every, v.save_every,
               v.keep_checkpoints,
               throughput=lambda b: {"clips": len(b["video"])},
               totals=lambda b: {"skipped_clips": int(b["num_skipped"].sum())})


def train_vae(config, workdir) -> None:
  """Stage 'vae': train, then write latent_stats.json. Complete (skipped) when the final
  checkpoint and latent_stats.json both exist."""
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = build_vae(config, mesh)
  stage = vae_stage(config, workdir)
  state = run(setup, stage, open_clip_data(config, workdir), config)
  stats_path = stage.directory / LATENT_STATS
  if state is None:
    if stats_path.exists():
      return
    _, state = checkpoint.restore_state_only(stage.directory, setup.abstract_state)
  stats = latent_stats(setup, state.params, open_clip_data(config, workdir),
                       config.vae.stats_batches)
  stats.update(step=int(state.step), crop=[config.vae.crop_frames, config.vae.crop_height,
                                           config.vae.crop_width])
  if jax.process_index() == 0:
    tmp = stats_path.with_name(f".{LATENT_STATS}.tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, stats_path)      # atomic: the file exists only when it is whole
  logging.info("vae: latent shift %s, scale %s -> %s", stats["shift"], stats["scale"], stats_path)


def latent_stats(setup: Setup, params, clip_iter, num_batches: int) -> dict:
  """Per-channel mean and standard deviation of the VAE's posterior mean over `num_batches`
  batches: the shift and scale the DiT's latents are normalised with, (latent - shift) /
  scale (the format of data_pipelines/latents' latent_stats.json)."""
  encode = jax.jit(lambda p, video: setup.model.apply({"params": p}, video,
                                                      method=vae_lib.VAE.encode)[0])
  means = []
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for _ in range(num_batches):
      batch = mesh_lib.global_batch(next(clip_iter), setup.batch_shardings)
      mean = encode(params, batch["video"])
      means.append(np.asarray(multihost_utils.process_allgather(mean, tiled=True), np.float64))
  latents = np.concatenate(means).reshape(-1, setup.model_cfg.latent_channels)
  std = latents.std(axis=0)
  return {"shift": latents.mean(axis=0).tolist(),
          "scale": np.where(std > 0, std, 1.0).tolist(),
          "normalise": "(latent - shift) / scale; denormalise: z * scale + shift",
          "latent": "VAE posterior mean",
          "voxels_per_channel": len(latents),
          "num_clips": sum(len(m) for m in means),
          "vae": dataclasses.asdict(setup.model_cfg)}


# ----------------------------------------------------------------------------- the loop

def run(setup: Setup, stage: Stage, data_iter, config) -> Optional[Any]:
  """Init or restore, then step to stage.steps, logging one step late and saving on the way.

  Returns the final state, or None when the stage's checkpoint was already final (skipped).
  """
  ckpt = checkpoint.Checkpointer(stage.directory, stage.save_every, stage.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(stage.directory)
  config_json = config.to_json_best_effort()

  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    start = ckpt.latest_step()
    if start is None:
      state, start = setup.init(jax.random.PRNGKey(config.seed)), 0
    elif start < stage.steps:
      logging.info("resuming from the checkpoint of step %d in %s", start, stage.directory)
      state = ckpt.restore(start, setup.abstract_state, data_iter)
    else:
      logging.info("%s stage complete (step %d of %d); skipping", stage.name, start, stage.steps)
      ckpt.close()
      writer.close()
      return None

    peak_flops = flops.measure_matmul_flops() * jax.device_count() if stage.mfu else 0.0
    pending, last_log = None, None      # last_log: (step, time) when its metrics arrived
    # Host-side counts: `window` since the last log (logged as rates), `totals` since start.
    window, totals = collections.Counter(), collections.Counter()
    progress = tqdm(range(start, stage.steps), initial=start, total=stage.steps,
                    desc=stage.name, disable=jax.process_index() != 0)
    for step in progress:
      host_batch = next(data_iter)
      window.update(stage.throughput(host_batch))
      totals.update(stage.totals(host_batch))
      batch = mesh_lib.global_batch(host_batch, setup.batch_shardings)
      state, step_metrics = setup.train_step(state, batch)
      if pending is not None:                      # the previous step's metrics, now ready
        done_step, done_metrics = pending
        row = {k: float(v) for k, v in jax.device_get(done_metrics).items()}
        now = time.perf_counter()
        if done_step % stage.log_every == 0 or last_log is None:
          if last_log is not None:                 # no rate for the step that compiled
            seconds = now - last_log[1]
            rate = (done_step - last_log[0]) / seconds
            row.update(steps_per_sec=rate,
                       **{f"{k}_per_sec": n / seconds for k, n in window.items()})
            if stage.mfu:
              row.update(mfu=row["model_flops_per_sec"] / peak_flops)
          row.update(totals)
          window.clear()
          writer.write(done_step, row)
          progress.set_postfix(loss=f"{row['loss']:.4f}")
          last_log = (done_step, now)
      pending = (step + 1, step_metrics)
      ckpt.save(step + 1, state, data_iter, config_json, force=step + 1 == stage.steps)
    done_step, done_metrics = pending
    writer.write(done_step, {k: float(v) for k, v in jax.device_get(done_metrics).items()})
  ckpt.close()
  writer.close()
  return state
