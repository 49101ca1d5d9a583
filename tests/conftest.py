"""Eight host CPU devices, set before JAX initialises, so sharding is tested for real."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def tiny_config():
  """The laptop recipe shrunk further, in pixel space: a few steps of a 2-block model on
  packed rows of procedural clips (no dataset build, no VAE)."""
  from experiments import physics_tiny
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages = ("dit", "samples")
    config.data.space = "pixel"        # no VAE: the DiT models the clips themselves
    config.model.patch_size = (1, 4, 4)
    config.sample.num_frames, config.sample.height, config.sample.width = 4, 16, 16
    config.data.source = "shapes"
    config.data.min_side, config.data.max_side = 16, 32
    config.data.min_frames, config.data.max_frames = 2, 8
    config.data.max_tokens_per_clip = 128
    config.data.token_budget = 256
    config.data.batch_size = 8
    config.model.text = "none"         # tests of captions switch them on (and caption_len)
    config.data.caption_len = 16
    config.train.steps = 6
    config.train.save_every = 3
    config.train.log_every = 1
    config.train.keep_checkpoints = 5
    config.optim.warmup_steps = 2
  return config
