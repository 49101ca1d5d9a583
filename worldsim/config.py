"""Checks an experiment config before anything compiles; errors name the field and the fix."""
import jax

from data_pipelines import loader
from worldsim.models import attention, dit
from worldsim.parallel import mesh as mesh_lib

STAGES = ("dit", "samples")


class ConfigError(ValueError):
  pass


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config, num_devices: int = None) -> None:
  num_devices = jax.device_count() if num_devices is None else num_devices
  d, m = config.data, config.model
  _check(all(s in STAGES for s in config.stages),
         f"config.stages={tuple(config.stages)} holds an unknown stage; choose from {STAGES}")
  _check(d.source in loader.SOURCES,
         f"config.data.source={d.source!r} is unknown; choose from {loader.SOURCES}")
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
  try:
    sizes = dict(zip(mesh_lib.AXES, mesh_lib.axis_sizes(config.mesh, num_devices)))
  except ValueError as e:
    raise ConfigError(str(e)) from None
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
