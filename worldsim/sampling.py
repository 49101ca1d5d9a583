"""The pipeline behind worldsim.sample(): load a trained workdir, integrate noise to video.

`load(workdir)` restores the EMA parameters once and keeps them; `sample(...)` draws one clip
of any (frames, height, width) that divides into patches, since the model reads token
positions rather than a fixed grid.
"""
import functools
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import loader
from worldsim import video as video_lib
from worldsim.diffusion import flow, samplers
from worldsim.models import patches
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint


class WorldSim:
  """A trained world simulator: its config and EMA parameters, ready to sample."""

  def __init__(self, workdir, step: Optional[int] = None):
    from worldsim.train import trainer   # the trainer's build() gives the exact state layout
    self.workdir = pathlib.Path(workdir)
    self.config = ml_collections.ConfigDict(checkpoint.load_config(workdir, step))
    self.config.mesh.data, self.config.mesh.fsdp = -1, 1     # sampling: any local devices
    self.config.mesh.tensor, self.config.mesh.context = 1, 1
    self.config.data.batch_size = jax.device_count()
    setup = trainer.build(self.config, mesh_lib.make_mesh(self.config.mesh))
    self.step, state = checkpoint.restore_state_only(workdir, setup.abstract_state, step)
    self.model = setup.model
    self.params = jax.device_get(state.ema_params)
    self.patch_size = tuple(self.config.model.patch_size)
    self.channels = self.config.data.channels

  def sample(self, caption: Optional[str] = None, *, num_frames: Optional[int] = None,
             height: Optional[int] = None, width: Optional[int] = None,
             steps: Optional[int] = None, seed: int = 0,
             context: Optional[np.ndarray] = None) -> np.ndarray:
    """One clip as uint8 (T, H, W, 3). Sizes default to the config's `sample` block.

    `context`: uint8 (Tc, H, W, 3) clean frames the clip continues from (image-to-video with
    Tc = 1 patch of frames, extension with more); they are held at noise level 0 and come
    back unchanged as the clip's first Tc frames. Tc must be a multiple of the patch's frames
    and H, W default to the context's.
    """
    if caption is not None:
      logging.warning("captions are not used yet: this model is unconditional")
    s = self.config.sample
    if context is not None:
      context = np.asarray(context)
      if context.ndim != 4 or context.dtype != np.uint8 or context.shape[-1] != self.channels:
        raise ValueError(f"context must be uint8 (Tc, H, W, {self.channels}), got "
                         f"{context.dtype} {context.shape}")
      height, width = height or context.shape[1], width or context.shape[2]
      if context.shape[1:3] != (height, width):
        raise ValueError(f"context frames are {context.shape[1:3]}, the clip is {(height, width)}")
    shape = (num_frames or s.num_frames, height or s.height, width or s.width)
    try:
      grid = patches.grid_shape(shape, self.patch_size)
    except ValueError:
      raise ValueError(f"(num_frames, height, width)={shape} must be multiples of the patch "
                       f"size {self.patch_size}") from None
    num_context = 0
    context_tokens = np.zeros((0, patches.token_dim(self.patch_size, self.channels)), np.float32)
    if context is not None:
      if len(context) % self.patch_size[0] or len(context) >= shape[0]:
        raise ValueError(f"{len(context)} context frames: need a multiple of "
                         f"{self.patch_size[0]} and fewer than num_frames={shape[0]}")
      context_tokens = patches.patchify(loader.pixels_to_latent(context), self.patch_size)
      num_context = len(context_tokens)
    latent = self._generate(grid, steps or s.steps, seed, num_context, context_tokens)
    return loader.latent_to_pixels(patches.unpatchify(latent, grid, self.patch_size, self.channels))

  @functools.partial(jax.jit, static_argnums=(0, 1, 2, 4))   # seed and context are traced
  def _generate(self, grid, steps, seed, num_context, context_tokens):
    seq_len = int(np.prod(grid))
    positions = jnp.asarray(patches.positions(grid))[None]
    segment_ids = jnp.ones((1, seq_len), jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(seed),
                              (1, seq_len, patches.token_dim(self.patch_size, self.channels)))
    # Context tokens come first (frame-major order); they stay clean: t = 0 and v = 0.
    is_context = (jnp.arange(seq_len) < num_context)[None, :, None]
    start = noise.at[:, :num_context].set(context_tokens)
    d = self.config.diffusion
    shift = flow.shift_for_tokens(seq_len, d.shift_base_tokens, d.max_shift)

    def velocity(x, t):
      level = jnp.where(is_context[..., 0], 0.0, t)
      v = self.model.apply({"params": self.params}, x, positions, segment_ids, level)
      return jnp.where(is_context, 0.0, v)

    return samplers.euler(velocity, start, steps, shift)[0]


@functools.lru_cache(maxsize=4)
def load(workdir, step: Optional[int] = None) -> WorldSim:
  """A trained workdir as a WorldSim (cached: repeated calls reuse the loaded parameters)."""
  return WorldSim(str(workdir), step)


def sample(caption: Optional[str] = None, *, checkpoint: str, num_frames: Optional[int] = None,
           height: Optional[int] = None, width: Optional[int] = None,
           steps: Optional[int] = None, seed: int = 0,
           context: Optional[np.ndarray] = None) -> np.ndarray:
  """Generates one clip with the model trained in `checkpoint` (a workdir): uint8 (T, H, W, 3).

  See WorldSim.sample for `context` (clean frames to continue from).
  """
  return load(str(checkpoint)).sample(caption, num_frames=num_frames, height=height, width=width,
                                      steps=steps, seed=seed, context=context)


def write_samples(config, workdir) -> None:
  """The `samples` stage: config.sample.num_videos videos in workdir/samples/."""
  out = pathlib.Path(workdir) / "samples"
  sim = load(str(workdir))
  marker = out / "done.json"
  if marker.exists() and json.loads(marker.read_text()).get("step") == sim.step:
    logging.info("samples for step %d already written; skipping", sim.step)
    return
  written = []
  for seed in range(config.sample.num_videos):
    clip = sim.sample(seed=seed)
    written.append(str(video_lib.save_video(clip, out / f"sample_{seed}.mp4", config.sample.fps)))
  marker.write_text(json.dumps({"step": sim.step, "files": written}))
  logging.info("wrote %d samples to %s", len(written), out)
