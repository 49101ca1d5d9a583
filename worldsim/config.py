"""Checks an experiment config before anything compiles; errors name the field and the fix."""
import jax

from data_pipelines import loader
from worldsim.models import attention, dit, vae as vae_lib
from worldsim.parallel import mesh as mesh_lib

STAGES = ("vae", "dit", "samples")
DIT_STAGES = ("dit", "samples")         # stages that read config.model, diffusion, optim, train


class ConfigError(ValueError):
  pass


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
  if any(s in DIT_STAGES for s in config.stages):
    _validate_dit(config, num_devices)
  if "vae" in config.stages:
    _validate_vae(config, num_devices)


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
  _check(d.min_side >= max(ph, pw),
         f"config.data.min_side={d.min_side} is smaller than the patch's height/width "
         f"{max(ph, pw)}; raise --config.data.min_side to at least {max(ph, pw)}")
  _check(d.min_frames >= pt,
         f"config.data.min_frames={d.min_frames} is shorter than the patch's {pt} frames; "
         f"set --config.data.min_frames >= {pt}")
  try:
    loader.clip_spec(d, m.patch_size)
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
  _check(d.token_budget % sizes["context"] == 0,
         f"config.data.token_budget={d.token_budget} must be divisible by the context axis "
         f"({sizes['context']}), which splits each row's tokens")
  _check(0.0 <= config.diffusion.per_frame_noise <= 1.0,
         f"config.diffusion.per_frame_noise={config.diffusion.per_frame_noise} is a share: "
         f"set it between 0 and 1")
  _check(config.optim.learning_rate > 0, "config.optim.learning_rate must be > 0")
  _check(config.train.steps > 0, "config.train.steps must be > 0")
  _check(config.train.save_every > 0, "config.train.save_every must be > 0")
  _check(config.sample.height % m.patch_size[1] == 0 and config.sample.width % m.patch_size[2] == 0
         and config.sample.num_frames % m.patch_size[0] == 0,
         f"config.sample size ({config.sample.num_frames}, {config.sample.height}, "
         f"{config.sample.width}) must divide into patches of {tuple(m.patch_size)}")


def _nearest(value: int, step: int, first: int) -> str:
  """The valid values first + step * k (k >= 0) around `value`, as 'a or b'."""
  lower = first + max(value - first, 0) // step * step
  return " or ".join(str(n) for n in (lower, lower + step) if n != value and n >= first)


def _validate_vae(config, num_devices: int) -> None:
  v, d = config.vae, config.data
  try:
    vae_cfg = vae_lib.config_from(v)
  except ValueError as e:
    raise ConfigError(f"config.vae: {e}") from None
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
  _check(v.optim.learning_rate > 0, "config.vae.optim.learning_rate must be > 0")
  for name in ("steps", "save_every", "log_every", "stats_batches"):
    _check(v[name] > 0, f"config.vae.{name}={v[name]} must be > 0")
  for name in ("kl_weight", "l2_weight", "disc_weight"):
    _check(v[name] >= 0, f"config.vae.{name}={v[name]} must be >= 0")
  _check(v.disc_start < v.steps,
         f"config.vae.disc_start={v.disc_start} is not before config.vae.steps={v.steps}, so "
         f"the discriminator would never train; set -1 to leave it off")
