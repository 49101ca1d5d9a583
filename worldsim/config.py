"""Checks an experiment config before anything compiles; errors name the field and the fix."""
from absl import logging
import jax

from data_pipelines import loader
from worldsim.models import attention, conditioning, dit, vae as vae_lib
from worldsim.parallel import context as context_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import step as step_lib

STAGES = ("vae", "latents", "dit", "samples")
DIT_STAGES = ("dit", "samples")         # stages that read config.model, diffusion, optim, train
VAE_STAGES = ("vae", "latents")         # stages that read config.vae
# What a source's per-frame actions are (data_pipelines): (config.model.actions, and for
# continuous actions the floats per frame, for discrete ones the ids there are). The others
# (shapes, video_folder) have none.
SOURCE_ACTIONS = {"physics_world": ("continuous", 2),    # an impulse (x, y) on the agent
                  "atari": ("discrete", 18)}             # ALE's full action set
SOURCES_WITH_REWARDS = ("atari",)


class ConfigError(ValueError):
  pass


def space(config) -> str:
  """What the DiT models: 'latent' (the VAE's latents) or 'pixel' (clips in [-1, 1])."""
  return config.data.get("space", "pixel")


def model_channels(config) -> int:
  """Channels of what the DiT models: the VAE's latent channels, or the clips'."""
  if space(config) == "latent":
    return vae_lib.config_from(config.vae).latent_channels
  return config.data.channels


def latent_geometry(config):
  """The loader's LatentGeometry in latent space, else None."""
  if space(config) != "latent":
    return None
  v = vae_lib.config_from(config.vae)
  return loader.LatentGeometry(v.latent_channels, v.temporal_factor)


def pixel_frames_per_model_frame(config) -> int:
  """Pixel frames in one frame the DiT models: the VAE's temporal factor in latent space (a
  latent frame's per-frame actions and rewards lie side by side), else 1."""
  return latent_geometry(config).temporal_factor if space(config) == "latent" else 1


def action_dim(config) -> int:
  """The DiT's per-token action width (dit.DiTConfig.action_dim) for config.model.actions
  ('none' -> 0): the patch's frames x pixel frames per model frame x config.model.action_size."""
  spec = step_lib.action_spec(config.model)
  return conditioning.token_action_dim(spec.mode, spec.size, spec.frames_per_patch,
                                       pixel_frames_per_model_frame(config))


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config, num_devices: int = None) -> None:
  """Checks the blocks the config's stages use: `vae` for 'vae'; model, diffusion, optim,
  train and sample for 'dit' and 'samples'; data and mesh always."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  _check(all(s in STAGES for s in config.stages),
         f"config.stages={tuple(config.stages)} holds an unknown stage; choose from {STAGES}")
  _check(config.data.source in loader.SOURCES,
         f"config.data.source={config.data.source!r} is unknown; choose from {loader.SOURCES}")
  _check(space(config) in loader.SPACES,
         f"config.data.space={space(config)!r} is unknown; choose from {loader.SPACES}")
  needs_vae = any(s in VAE_STAGES for s in config.stages) or space(config) == "latent"
  _check(not needs_vae or "vae" in config,
         "this config needs a `vae` block (stages vae/latents, or config.data.space='latent'); "
         "add one, e.g. experiments.physics_tiny.vae_block()")
  if needs_vae:
    _validate_vae(config, num_devices, train="vae" in config.stages)
  if "latents" in config.stages:
    _validate_latents(config)
  if any(s in DIT_STAGES for s in config.stages):
    _validate_dit(config, num_devices)


def _mesh_sizes(config, num_devices: int) -> dict:
  try:
    return dict(zip(mesh_lib.AXES, mesh_lib.axis_sizes(config.mesh, num_devices)))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate_dit(config, num_devices: int) -> None:
  d, m = config.data, config.model
  _check(len(m.patch_size) == 3 and all(int(p) > 0 for p in m.patch_size),
         f"config.model.patch_size={tuple(m.patch_size)} must be three positive ints (t, h, w)")
  pt, ph, pw = m.patch_size
  geometry = latent_geometry(config)
  # In latent space a patch covers s x s pixels per latent pixel and t frames per latent frame.
  s = vae_lib.config_from(config.vae).spatial_factor if geometry else 1
  side = s * max(ph, pw)
  _check(d.min_side >= side,
         f"config.data.min_side={d.min_side} is smaller than one patch ({side} pixels); raise "
         f"--config.data.min_side to at least {side}")
  frames = geometry.frames(d.min_frames) if geometry else d.min_frames
  _check(frames >= pt,
         f"config.data.min_frames={d.min_frames} gives {frames} frames to model, fewer than "
         f"the patch's {pt}; raise --config.data.min_frames")
  try:
    loader.clip_spec(d, m.patch_size, geometry)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(d.token_budget > 0, f"config.data.token_budget={d.token_budget} must be positive")
  _check(m.variant in dit.VARIANTS,
         f"config.model.variant={m.variant!r} is unknown; choose from {tuple(dit.VARIANTS)}")
  width, _, heads = dit.VARIANTS[m.variant]
  width, heads = m.width or width, m.num_heads or heads
  _check(width % heads == 0,
         f"config.model.width={width} is not divisible by config.model.num_heads={heads}; "
         f"pick a width that is a multiple of the head count")
  _check((width // heads) % 2 == 0 and width // heads >= 6,
         f"head dim {width // heads} (config.model.width / num_heads) must be even and >= 6 "
         f"for the 3D RoPE; change --config.model.width or --config.model.num_heads")
  _check(m.attention in attention.IMPLEMENTATIONS,
         f"config.model.attention={m.attention!r} is unknown; choose from {attention.IMPLEMENTATIONS}")
  _check(m.dtype in ("float32", "bfloat16"),
         f"config.model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'")
  sizes = _mesh_sizes(config, num_devices)
  shards = sizes["data"] * sizes["fsdp"]
  _check(d.batch_size % shards == 0,
         f"config.data.batch_size={d.batch_size} must be divisible by data x fsdp = {shards} "
         f"(the batch is split over those mesh axes); use a multiple of {shards}")
  _check_hosts(sizes)
  _check(d.token_budget % sizes["context"] == 0,
         f"config.data.token_budget={d.token_budget} must be divisible by the context axis "
         f"({sizes['context']}), which splits each row's tokens")
  _validate_context_parallel(config, sizes, heads)
  _check(m.get("remat", "none") in dit.REMAT_POLICIES,
         f"config.model.remat={m.get('remat')!r} is unknown; choose from {dit.REMAT_POLICIES}")
  text = m.get("text", "none")
  _check(text in dit.TEXT_INPUTS,
         f"config.model.text={text!r} is unknown; choose from {dit.TEXT_INPUTS}")
  if text != "none":
    _check(d.get("caption_len", 0) >= 1,
           f"config.model.text={text!r} needs config.data.caption_len >= 1 (tokens or rows "
           f"kept per caption)")
    _check(0.0 <= config.diffusion.get("caption_dropout", 0.0) < 1.0,
           f"config.diffusion.caption_dropout={config.diffusion.get('caption_dropout')} is a "
           f"share of clips: set it in [0, 1)")
  if text == "embeddings":
    _check(m.get("text_embed_dim", 0) >= 1,
           "config.model.text='embeddings' needs config.model.text_embed_dim: the width of "
           "the source's caption_embedding rows")
  _validate_actions(config)
  _check(0.0 <= config.diffusion.per_frame_noise <= 1.0,
         f"config.diffusion.per_frame_noise={config.diffusion.per_frame_noise} is a share: "
         f"set it between 0 and 1")
  _check(config.optim.learning_rate > 0, "config.optim.learning_rate must be > 0")
  _check(config.train.steps > 0, "config.train.steps must be > 0")
  accum = config.train.get("accum_steps", 1)
  _check(accum >= 1 and d.batch_size % (accum * shards) == 0,
         f"config.train.accum_steps={accum}: each of its parts takes every accum_steps-th "
         f"row, so config.data.batch_size={d.batch_size} must be divisible by accum_steps x "
         f"data x fsdp = {accum} x {shards}")
  _check(config.train.save_every > 0, "config.train.save_every must be > 0")
  _check(config.train.get("max_nonfinite_skips", 10) >= 1,
         f"config.train.max_nonfinite_skips={config.train.get('max_nonfinite_skips')} must be "
         f">= 1 (updates skipped in a row for a NaN / Inf loss before the run stops)")
  sample = config.sample
  size = (sample.num_frames, sample.height, sample.width)
  if geometry:
    t = geometry.temporal_factor
    _check((sample.num_frames - 1) % t == 0 and sample.num_frames >= 1,
           f"config.sample.num_frames={sample.num_frames} is not 1 + {t}k (the VAE decodes "
           f"latent frame 0 to one frame, each later one to {t}); use "
           f"{_nearest(sample.num_frames, t, 1)}")
    latent = (geometry.frames(sample.num_frames), sample.height // s, sample.width // s)
    _check(sample.height % s == 0 and sample.width % s == 0 and all(
        n % p == 0 for n, p in zip(latent, m.patch_size)),
           f"config.sample size {size} must give latents {latent} (VAE factors {t}, {s}) "
           f"that divide into patches of {tuple(m.patch_size)}")
  else:
    _check(all(n % p == 0 for n, p in zip(size, m.patch_size)),
           f"config.sample size {size} must divide into patches of {tuple(m.patch_size)}")


def _validate_actions(config) -> None:
  """config.model.actions / action_size against what the source gives, action_dropout, and
  reward_heads only where there are rewards. Read with defaults: older configs have none."""
  d, m = config.data, config.model
  mode, size = m.get("actions", "none"), m.get("action_size", 0)
  _check(mode in conditioning.ACTION_MODES,
         f"config.model.actions={mode!r} is unknown; choose from {conditioning.ACTION_MODES}")
  if mode != "none":
    _check(d.source in SOURCE_ACTIONS,
           f"config.model.actions={mode!r}, but config.data.source={d.source!r} has no actions; "
           f"set --config.model.actions=none, or use a source with actions "
           f"({', '.join(SOURCE_ACTIONS)})")
    source_mode, source_size = SOURCE_ACTIONS[d.source]
    _check(mode == source_mode,
           f"config.model.actions={mode!r}, but {d.source}'s actions are {source_mode}; set "
           f"--config.model.actions={source_mode}")
    _check(size >= 1, f"config.model.actions={mode!r} needs config.model.action_size >= 1 "
           f"({d.source}: {source_size}); set --config.model.action_size={source_size}")
    if mode == "continuous":
      _check(size == source_size,
             f"config.model.action_size={size}, but {d.source} gives {source_size} floats per "
             f"frame; set --config.model.action_size={source_size}")
    else:
      _check(size >= source_size,
             f"config.model.action_size={size} is fewer than {d.source}'s {source_size} action "
             f"ids; set --config.model.action_size={source_size}")
    rate = config.diffusion.get("action_dropout", 0.0)
    _check(0.0 <= rate < 1.0,
           f"config.diffusion.action_dropout={rate} is a share of clips: set it in [0, 1)")
  if m.get("reward_heads", False):
    _check(d.source in SOURCES_WITH_REWARDS,
           f"config.model.reward_heads=True, but config.data.source={d.source!r} has no rewards; "
           f"set --config.model.reward_heads=False, or use {' or '.join(SOURCES_WITH_REWARDS)}")
    weight = config.train.get("heads_weight", 1.0)
    _check(weight >= 0, f"config.train.heads_weight={weight} must be >= 0")


def _check_hosts(sizes: dict) -> None:
  """Several hosts: each loads its own whole rows (loader: clips [process_index::
  process_count], batch_size / process_count rows), so the batch axes must give every host
  rows of its own (else hosts sharing rows would feed them different data, silently), and a
  row's token and head shards (context, tensor) must stay on one host's devices."""
  hosts = jax.process_count()
  if hosts == 1:
    return
  shards = sizes["data"] * sizes["fsdp"]
  _check(shards % hosts == 0,
         f"config.mesh: data x fsdp = {shards} must be a multiple of the {hosts} hosts, which "
         f"each load their own rows; move devices from tensor/context to data or fsdp")
  within_host = sizes["tensor"] * sizes["context"]
  _check(jax.local_device_count() % within_host == 0,
         f"config.mesh: tensor x context = {within_host} must divide the "
         f"{jax.local_device_count()} devices of one host: each host loads whole rows")


def _validate_context_parallel(config, sizes: dict, heads: int) -> None:
  strategy = config.model.get("context_parallel", "none")
  _check(strategy == "none" or strategy in context_lib.STRATEGIES,
         f"config.model.context_parallel={strategy!r} is unknown; choose 'none' or one of "
         f"{context_lib.STRATEGIES}")
  context, tensor = sizes["context"], sizes["tensor"]
  ulysses = {"ulysses": context, "ulysses_ring": config.model.get("ulysses_degree", 1)}
  if strategy == "ulysses_ring":
    _check(ulysses[strategy] >= 1 and context % ulysses[strategy] == 0,
           f"config.model.ulysses_degree={ulysses[strategy]} must divide the context axis "
           f"({context}): Ulysses within groups of that many devices, ring across them")
  if strategy in ulysses:
    degree = tensor * ulysses[strategy]
    _check(heads % degree == 0,
           f"{heads} heads do not split over tensor x Ulysses = {tensor} x {ulysses[strategy]} "
           f"devices; use a head count divisible by {degree}, a smaller Ulysses degree, or "
           f"--config.model.context_parallel=ring")


def _nearest(value: int, step: int, first: int) -> str:
  """The valid values first + step * k (k >= 0) around `value`, as 'a or b'."""
  lower = first + max(value - first, 0) // step * step
  return " or ".join(str(n) for n in (lower, lower + step) if n != value and n >= first)


def _validate_latents(config) -> None:
  _check("latents" in config, "stage 'latents' needs a `latents` block (chunk_frames, "
         "batch_size); see experiments/physics_tiny.py")
  t = vae_lib.config_from(config.vae).temporal_factor
  n = config.latents.chunk_frames
  _check(n >= t and n % t == 0,
         f"config.latents.chunk_frames={n} must be a positive multiple of the VAE's temporal "
         f"factor {t}; use {max(t, n // t * t)}")
  _check(config.latents.batch_size >= 1,
         f"config.latents.batch_size={config.latents.batch_size} must be >= 1")
  _check(space(config) == "latent",
         "stage 'latents' builds the latent dataset, but config.data.space is 'pixel', so "
         "the DiT would not read it; set --config.data.space=latent")


def _validate_vae(config, num_devices: int, train: bool = True) -> None:
  """The VAE block; the crop, batch and optimiser fields only when the VAE trains here."""
  v, d = config.vae, config.data
  try:
    vae_cfg = vae_lib.config_from(v)
  except ValueError as e:
    raise ConfigError(f"config.vae: {e}") from None
  if not train:
    return
  t, s = vae_cfg.temporal_factor, vae_cfg.spatial_factor
  _check(v.crop_frames >= 1 and (v.crop_frames - 1) % t == 0,
         f"config.vae.crop_frames={v.crop_frames} is not 1 + {t}k (the causal VAE codes frame "
         f"0 alone, then {t} frames per latent frame); set --config.vae.crop_frames to "
         f"{_nearest(v.crop_frames, t, 1)}")
  for name in ("crop_height", "crop_width"):
    size = v[name]
    _check(size >= s and size % s == 0,
           f"config.vae.{name}={size} is not a multiple of the VAE's spatial factor {s}; set "
           f"--config.vae.{name} to {_nearest(size, s, s)}")
  if v.crop_frames < 1 + 2 * t:
    # Every causal conv pads the past with frame 0, so on crops of 1 or 2 latent frames no
    # layer sees a context of video latents only: later latent frames of longer clips decode
    # badly and do not improve with training (BUILD_NOTES, "The tiny VAE").
    logging.warning(
        "config.vae.crop_frames=%d gives %d latent frames: no conv trains on a context of "
        "video latents alone, so longer clips decode badly after frame %d; use %d or more",
        v.crop_frames, 1 + (v.crop_frames - 1) // t, v.crop_frames - 1, 1 + 2 * t)
  if d.source in ("shapes", "physics_world"):   # clip sizes come from config.data
    _check(v.crop_frames <= d.max_frames,
           f"config.vae.crop_frames={v.crop_frames} is longer than every clip "
           f"(config.data.max_frames={d.max_frames}), so every clip would be skipped; "
           f"shorten the crop or raise --config.data.max_frames")
    _check(max(v.crop_height, v.crop_width) <= d.max_side,
           f"config.vae crop ({v.crop_height}, {v.crop_width}) is larger than every frame "
           f"(config.data.max_side={d.max_side}), so every clip would be skipped; make the "
           f"crop smaller or raise --config.data.max_side")
  sizes = _mesh_sizes(config, num_devices)
  shards = sizes["data"] * sizes["fsdp"]
  _check(v.batch_size > 0 and v.batch_size % shards == 0,
         f"config.vae.batch_size={v.batch_size} must be divisible by data x fsdp = {shards} "
         f"(the batch is split over those mesh axes); use a multiple of {shards}")
  _check_hosts(sizes)
  _check(v.optim.learning_rate > 0, "config.vae.optim.learning_rate must be > 0")
  for name in ("steps", "save_every", "log_every", "stats_batches"):
    _check(v[name] > 0, f"config.vae.{name}={v[name]} must be > 0")
  for name in ("kl_weight", "l2_weight", "disc_weight"):
    _check(v[name] >= 0, f"config.vae.{name}={v[name]} must be >= 0")
  _check(v.disc_start < v.steps,
         f"config.vae.disc_start={v.disc_start} is not before config.vae.steps={v.steps}, so "
         f"the discriminator would never train; set -1 to leave it off")
