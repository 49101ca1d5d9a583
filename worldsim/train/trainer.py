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

What a run survives (docs: BUILD_NOTES.md, "Training that survives"):
  preemption     SIGTERM (or, on several hosts, JAX's preemption sync point) saves the
                 current step and raises Preempted; worldsim.main exits with
                 PREEMPTED_EXIT_CODE (143, as if killed by the signal) and a rerun resumes
  kill -9        a restart resumes from the newest committed checkpoint: the state (with its
                 RNG), the grain iterator and the step come back, so the result is bitwise
                 that of an uninterrupted run; a save cut off halfway is never committed
  bad state      a corrupt newest checkpoint is set aside (checkpoint.py) and the one before
                 used; a checkpoint of another model's shapes is a ConfigError
  NaN / Inf      the step skips the update (step.skip_if_nonfinite); after
                 max_nonfinite_skips skips in a row the run stops with NonFiniteError
  bad data       the loader skips and counts bad records (skipped_clips in the log)
"""
import collections
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import threading
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
# Per clip, per model frame (B, M, F, n): actions (model.actions != 'none'), rewards and
# terminals (model.reward_heads); small, whole on every device of a batch shard.
FRAME_AXES = ("batch", None, None, None)
VAE_BATCH_AXES = {"video": vae_lib.PIXEL_AXES}
LATENT_STATS = "latent_stats.json"
# Config fields that set the shapes of a stage's state: named when a workdir's checkpoint
# does not fit the current config.
VAE_SHAPE_FIELDS = tuple(f"vae.{k}" for k in (
    "variant", "base_channels", "num_res_blocks", "channel_multipliers", "latent_channels",
    "temporal_factor", "spatial_factor", "norm", "disc_start", "disc_channels", "disc_layers"))
DIT_SHAPE_FIELDS = tuple(f"model.{k}" for k in (
    "variant", "width", "depth", "num_heads", "mlp_ratio", "patch_size", "text", "text_depth",
    "text_embed_dim", "actions", "action_size", "reward_heads")) + (
    "data.space", "data.channels", "data.caption_len")
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM    # what a shell reports for a SIGTERM'd process


class Preempted(Exception):
  """The run was asked to stop (SIGTERM); the state of `step` is saved and committed."""

  def __init__(self, step: int, directory):
    super().__init__(f"preempted: saved step {step} in {directory}; run again to resume")
    self.step = step


class NonFiniteError(FloatingPointError):
  """Too many updates in a row had a NaN or Inf loss or gradient."""


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
  shape_fields: tuple = ()     # config fields that set the state's shapes
  max_nonfinite_skips: int = 10   # updates skipped in a row (NaN / Inf) before the run stops


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

def frame_widths(config) -> dict:
  """The loader's per-clip, per-model-frame arrays the DiT reads, by name: their widths n in
  (B, M, F, n). A model frame holds k pixel frames (the VAE's temporal factor, else 1), each
  with its raw actions (ActionSpec.raw_width values), a reward and a terminal flag."""
  k = config_lib.pixel_frames_per_model_frame(config)
  width = step_lib.action_spec(config.model).raw_width
  widths = {"actions": k * width} if width else {}
  if config.model.get("reward_heads", False):
    widths.update(rewards=k, terminals=k)
  return widths


def example_batch(config) -> dict:
  """Zeros shaped like one global packed batch (for shapes only); the null captions of
  max_clips_per_row clips when the model reads captions; the per-frame actions, rewards and
  terminals when it reads them (`frame_widths`)."""
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
  widths = frame_widths(config)
  if widths:
    # The loader pads every clip's frames to its longest crop, in model frames.
    frames = loader.clip_spec(d, m.patch_size, config_lib.latent_geometry(config)).max_frames
    batch.update({k: jnp.zeros((d.batch_size, d.max_clips_per_row, frames, n), jnp.float32)
                  for k, n in widths.items()})
  return batch


def build(config, mesh) -> Setup:
  """The DiT's Setup. With config.model.context_parallel='ulysses_ring' the mesh's context
  axis is split into (ring, ulysses) axes of config.model.ulysses_degree Ulysses devices."""
  rules = mesh_lib.rules(config.mesh)
  if config.model.get("context_parallel", "none") == "ulysses_ring":
    mesh = context_lib.factor_context_axis(mesh, config.model.ulysses_degree)
    rules = context_lib.factor_context_rules(rules)
  batch = example_batch(config)
  dit_cfg = dit.config_from(config.model, batch["tokens"].shape[-1],
                            config_lib.action_dim(config))
  model = dit.DiT(dit_cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  init_fn = functools.partial(step_lib.init_state, model, tx, batch)
  abstract_state, state_shardings = mesh_lib.abstract_sharded(
      init_fn, mesh, rules, jax.random.PRNGKey(0))
  axes = {**BATCH_AXES, **TEXT_AXES[dit_cfg.text],
          **{k: FRAME_AXES for k in frame_widths(config)}}
  batch_shardings = {k: mesh_lib.logical_sharding(mesh, rules, v) for k, v in axes.items()}
  update = functools.partial(step_lib.dit_train_step, model=model, tx=tx, schedule=schedule,
                             diffusion_cfg=config.diffusion, ema_decay=config.optim.ema_decay,
                             accum_steps=config.train.get("accum_steps", 1),
                             actions=step_lib.action_spec(config.model),
                             heads_weight=config.train.get("heads_weight", 1.0))
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
      mfu=True,
      shape_fields=DIT_SHAPE_FIELDS + (VAE_SHAPE_FIELDS
                                       if config_lib.space(config) == "latent" else ()),
      max_nonfinite_skips=t.get("max_nonfinite_skips", 10))


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
               totals=lambda b: {"skipped_clips": int(b["num_skipped"].sum())},
               shape_fields=VAE_SHAPE_FIELDS + ("data.channels",),
               max_nonfinite_skips=v.get("max_nonfinite_skips",
                                         config.train.get("max_nonfinite_skips", 10)
                                         if "train" in config else 10))


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
  Raises Preempted after saving when SIGTERM arrives, NonFiniteError after
  stage.max_nonfinite_skips skipped updates in a row.
  """
  ckpt = checkpoint.Checkpointer(stage.directory, stage.save_every, stage.keep_checkpoints)
  config_json = config.to_json_best_effort()
  latest = ckpt.latest_step()
  if latest is not None and latest >= stage.steps:
    logging.info("%s stage complete (step %d of %d); skipping", stage.name, latest, stage.steps)
    ckpt.close()
    return None

  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules), \
       PreemptionWatch(ckpt.manager) as preempted:
    state, start = init_or_restore(setup, stage, ckpt, data_iter, config)
    progress = tqdm(range(start, stage.steps), initial=start, total=stage.steps,
                    desc=stage.name, disable=jax.process_index() != 0)
    writer = MetricsLog(stage, metrics_lib.MetricsWriter(stage.directory), progress)
    nonfinite = NonFiniteGuard(stage.max_nonfinite_skips, ckpt)
    pending, stop = None, False      # pending: (step, metrics) of the step before
    for step in progress:
      host_batch = next(data_iter)
      writer.count(host_batch)
      batch = mesh_lib.global_batch(host_batch, setup.batch_shardings)
      state, step_metrics = setup.train_step(state, batch)
      if pending is not None:        # the previous step's metrics, ready by now
        report(*pending, writer, nonfinite)
      pending = (step + 1, step_metrics)
      stop = preempted(step + 1)
      # A skipped update left the state as it was, so every checkpoint holds finite weights.
      ckpt.save(step + 1, state, data_iter, config_json, force=stop or step + 1 == stage.steps)
      if stop:
        break
    report(*pending, writer, nonfinite, final=True)
  ckpt.close()                       # waits for the last save to commit
  writer.close()
  if stop:
    raise Preempted(pending[0], ckpt.directory)
  return state


def report(step: int, step_metrics, writer, nonfinite, final: bool = False) -> None:
  """Logs a finished step's metrics (waiting for them) and counts a skipped update; raises
  NonFiniteError, after logging, once too many came in a row."""
  row = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  nonfinite.count(step, row)
  writer.write(step, row, nonfinite.totals(), final)
  nonfinite.raise_if_stuck(step)


def init_or_restore(setup: Setup, stage: Stage, ckpt, data_iter, config):
  """(state, step): the newest readable checkpoint's, data_iter rewound to it; else a fresh
  state at step 0. A checkpoint of other shapes raises ConfigError before anything compiles."""
  current = json.loads(config.to_json_best_effort())
  describe = lambda saved: differing_fields(saved, current, stage.shape_fields)
  step, state = ckpt.restore_latest(setup.abstract_state, data_iter, describe)
  if step is None:
    return setup.init(jax.random.PRNGKey(config.seed)), 0
  logging.info("resuming from the checkpoint of step %d in %s", step, ckpt.directory)
  forget_metrics_after(stage.directory, step)
  return state, step


def forget_metrics_after(directory, step: int) -> None:
  """Drops the metrics.jsonl rows of steps after `step`: a run killed after its last save
  logged steps it now trains again, and each step should have one row."""
  path = pathlib.Path(directory) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):    # a row cut off by the kill
      pass
  if len(kept) < len(lines):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def differing_fields(saved: dict, current: dict, fields) -> list:
  """'model.width: 64 saved, 32 now' for each of `fields` (dotted paths) that differs."""
  def lookup(tree, path):
    for key in path.split("."):
      tree = tree.get(key) if isinstance(tree, dict) else None
    return tree
  return [f"{f}: {lookup(saved, f)!r} saved, {lookup(current, f)!r} now" for f in fields
          if lookup(saved, f) != lookup(current, f)]


class PreemptionWatch:
  """Whether the run has been asked to stop, checked once per step.

  One host: a SIGTERM handler sets a flag (a second SIGTERM kills at once, as without it).
  Several hosts: JAX's preemption service listens for the signal itself and names a sync
  point, the same step on every host (orbax's reached_preemption), so no handler is set.
  """

  def __init__(self, manager):
    self.manager, self.requested, self.previous = manager, False, None
    self.own_handler = (jax.process_count() == 1
                        and threading.current_thread() is threading.main_thread())

  def __enter__(self):
    if self.own_handler:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving at the end of this step, then exiting", signum)
    self.requested = True
    signal.signal(signal.SIGTERM, self.previous)

  def __call__(self, step: int) -> bool:
    if self.own_handler:
      return self.requested
    return self.manager.reached_preemption(step)

  def __exit__(self, *exc):
    if self.own_handler and not self.requested:
      signal.signal(signal.SIGTERM, self.previous)


class NonFiniteGuard:
  """Counts the updates the step skipped for a NaN / Inf loss or gradient
  (`update_skipped`); raises NonFiniteError once `limit` come in a row."""

  def __init__(self, limit: int, ckpt):
    self.limit, self.ckpt = limit, ckpt
    self.skips, self.in_a_row = 0, 0

  def totals(self) -> dict:
    return {"nonfinite_skips": self.skips}

  def count(self, step: int, row: dict) -> None:
    if not row.get("update_skipped"):
      self.in_a_row = 0
      return
    self.skips += 1
    self.in_a_row += 1
    logging.warning("step %d: non-finite loss or gradient (loss %s, grad_norm %s); update "
                    "skipped (%d in a row)", step, row.get("loss"), row.get("grad_norm"),
                    self.in_a_row)

  def raise_if_stuck(self, step: int) -> None:
    if self.in_a_row >= self.limit:
      self.ckpt.wait()               # the last save holds the weights from before the run
      raise NonFiniteError(
          f"steps {step - self.in_a_row + 1} to {step} all had a non-finite loss or gradient "
          f"and were skipped ({self.limit} in a row, config.train.max_nonfinite_skips); the "
          f"newest checkpoint (step {self.ckpt.latest_step()} in {self.ckpt.directory}) holds "
          f"the weights from before them. Lower the learning rate, check the data, or raise "
          f"the limit")


class MetricsLog:
  """Rows of metrics.jsonl: a step's device metrics, throughput since the last row (rates),
  and host counts since the start (totals); every log_every steps and at the end."""

  def __init__(self, stage: Stage, writer, progress):
    self.stage, self.writer, self.progress = stage, writer, progress
    self.peak_flops = (flops.measure_matmul_flops() * jax.device_count() if stage.mfu
                       else 0.0)
    self.last = None                 # (step, time) of the last row
    self.window, self.totals = collections.Counter(), collections.Counter()

  def count(self, host_batch) -> None:
    self.window.update(self.stage.throughput(host_batch))
    self.totals.update(self.stage.totals(host_batch))

  def write(self, step: int, row: dict, totals: dict, final: bool = False) -> None:
    """Writes a finished step's metrics with the rates and totals, when a row is due."""
    if not (final or step % self.stage.log_every == 0 or self.last is None):
      return
    now = time.perf_counter()
    if self.last is not None and not final:     # no rate for the step that compiled
      seconds = now - self.last[1]
      row.update(steps_per_sec=(step - self.last[0]) / seconds,
                 **{f"{k}_per_sec": n / seconds for k, n in self.window.items()})
      if self.stage.mfu:
        row.update(mfu=row["model_flops_per_sec"] / self.peak_flops)
    self.window.clear()
    self.writer.write(step, {**row, **self.totals, **totals})
    self.progress.set_postfix(loss=f"{row['loss']:.4f}")
    self.last = (step, now)

  def close(self):
    self.writer.close()
