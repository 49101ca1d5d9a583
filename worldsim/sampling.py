"""The pipeline behind worldsim.sample(): load a trained workdir, integrate noise to video.

`load(workdir)` restores the EMA parameters once and keeps them; `sample(...)` draws one clip
of any (frames, height, width) that divides into patches, since the model reads token
positions rather than a fixed grid. In latent space (config.data.space='latent') the DiT
draws normalised latents, which are denormalised with the latent dataset's statistics (the
copy in <workdir>/latent_stats.json) and decoded by the workdir's VAE (<workdir>/vae),
streamed in time so memory does not grow with the clip's length.
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
from worldsim import config as config_lib
from worldsim import video as video_lib
from worldsim.diffusion import flow, samplers
from worldsim.models import patches, text as text_lib, vae as vae_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint


DECODE_CHUNK = 4                     # latent frames the VAE decodes at a time


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
    self.channels = self.config.data.channels            # of the videos
    self.model_channels = config_lib.model_channels(self.config)
    self.vae = None
    if config_lib.space(self.config) == "latent":
      from worldsim.train import latents              # imports the trainer, like build() above
      self.vae = latents.trained_vae(self.config, self.workdir)
      stats = json.loads((self.workdir / trainer.LATENT_STATS).read_text())
      self.shift = np.asarray(stats["shift"], np.float32)
      self.scale = np.asarray(stats["scale"], np.float32)

  @property
  def factors(self) -> tuple:
    """(frames, pixels) per latent frame and latent pixel; (1, 1) in pixel space."""
    if self.vae is None:
      return 1, 1
    return self.vae.model.cfg.temporal_factor, self.vae.model.cfg.spatial_factor

  def _model_shape(self, shape: tuple) -> tuple:
    """Video (frames, height, width) -> what the DiT draws (latent frames, height, width)."""
    (t, s), (frames, height, width) = self.factors, shape
    if (frames - 1) % t or height % s or width % s:
      raise ValueError(f"(num_frames, height, width)={shape}: this model's VAE needs 1 + {t}k "
                       f"frames and sides that are multiples of {s}")
    return 1 + (frames - 1) // t, height // s, width // s

  def _encode(self, video: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> what the DiT models, (T', H', W', C)."""
    x = loader.pixels_to_latent(video)
    if self.vae is None:
      return x
    mean, _ = vae_lib.stream_encode(self.vae.model, self.vae.variables, x[None],
                                    DECODE_CHUNK * self.factors[0])
    return (np.asarray(mean[0]) - self.shift) / self.scale

  def _decode(self, z) -> np.ndarray:
    """What the DiT drew (T', H', W', C) -> uint8 video (T, H, W, 3)."""
    if self.vae is None:
      return loader.latent_to_pixels(z)
    latent = np.asarray(z) * self.scale + self.shift
    frames = [np.asarray(chunk[0]) for chunk in vae_lib.iter_decode(
        self.vae.model, self.vae.variables, latent[None], DECODE_CHUNK)]
    return loader.latent_to_pixels(np.concatenate(frames))

  def sample(self, caption: Optional[str] = None, *, num_frames: Optional[int] = None,
             height: Optional[int] = None, width: Optional[int] = None,
             steps: Optional[int] = None, seed: int = 0,
             context: Optional[np.ndarray] = None,
             guidance: Optional[float] = None) -> np.ndarray:
    """One clip as uint8 (T, H, W, 3). Sizes default to the config's `sample` block; in
    latent space T is 1 + 4k (the VAE's temporal factor) and H, W multiples of its spatial
    factor times the patch.

    `context`: uint8 (Tc, H, W, 3) clean frames the clip continues from (image-to-video with
    one frame, extension with more); what they become for the DiT (their latents, encoded by
    the VAE) is held at noise level 0, and they come back unchanged as the clip's first Tc
    frames. Tc follows the rule for T (and must give whole patches); H, W default to the
    context's.

    `caption`: a str for a 'bytes' model, float (L, E) rows for an 'embeddings' one; None or
    '' asks for the unconditional model (the null caption). `guidance` (default
    config.sample.guidance): the classifier-free guidance scale w, v = v_null + w (v_caption
    - v_null); 1 is the plain conditional model, one forward pass per step instead of two.
    """
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
    model_shape = self._model_shape(shape)
    try:
      grid = patches.grid_shape(model_shape, self.patch_size)
    except ValueError:
      raise ValueError(f"(num_frames, height, width)={shape} gives {model_shape} to model, "
                       f"which must be multiples of the patch size {self.patch_size}") from None
    num_context = 0
    context_tokens = np.zeros((0, patches.token_dim(self.patch_size, self.model_channels)),
                              np.float32)
    if context is not None:
      t = self.factors[0]
      if (len(context) - 1) % t or len(context) >= shape[0] or (
          self._model_shape(context.shape[:3])[0] % self.patch_size[0]):
        raise ValueError(f"{len(context)} context frames: need fewer than num_frames="
                         f"{shape[0]}, 1 + {t}k of them, giving a multiple of "
                         f"{self.patch_size[0]} frames to model")
      context_tokens = patches.patchify(self._encode(context), self.patch_size)
      num_context = len(context_tokens)
    text = self._captions(caption)
    guidance = s.get("guidance", 1.0) if guidance is None else guidance
    z = self._generate(grid, steps or s.steps, seed, num_context, context_tokens, text,
                       float(guidance), text is not None and guidance != 1.0)
    video = self._decode(patches.unpatchify(z, grid, self.patch_size, self.model_channels))
    if context is not None:        # the given frames, exactly (the VAE would blur them a bit)
      video[:len(context)] = context
    return video

  def _captions(self, caption):
    """(caption, null caption), each (text, text_segment_ids) of one clip, or None for a
    model without text conditioning."""
    mode, length = self.model.cfg.text, self.config.data.get("caption_len", 0)
    if mode == "none":
      if caption is not None and len(caption):
        logging.warning("this model was trained without captions; the caption is ignored")
      return None
    if mode == "bytes":
      if caption is not None and not isinstance(caption, str):
        raise ValueError(f"this model reads captions as text; got {type(caption).__name__}")
      return text_lib.pack_captions([[caption or ""]], length), text_lib.null_text(1, 1, length)
    width = self.config.model.text_embed_dim
    null = text_lib.null_text(1, 1, length, width)
    if caption is None:
      return null, null
    rows = np.asarray(caption, np.float32)
    if rows.ndim != 2 or rows.shape[1] != width:
      raise ValueError(f"this model reads precomputed caption embeddings (L, {width}); got "
                       f"an array of shape {rows.shape}")
    text, segment_ids = np.zeros_like(null[0]), np.zeros_like(null[1])
    n = min(len(rows), length)
    text[0, :n], segment_ids[0, :n] = rows[:n], 1
    return (text, segment_ids), null

  # seed, context, captions and guidance scale are traced; guided (two passes or one) is not
  @functools.partial(jax.jit, static_argnums=(0, 1, 2, 4, 8))
  def _generate(self, grid, steps, seed, num_context, context_tokens, text, guidance, guided):
    seq_len = int(np.prod(grid))
    positions = jnp.asarray(patches.positions(grid))[None]
    segment_ids = jnp.ones((1, seq_len), jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(seed),
                              (1, seq_len, patches.token_dim(self.patch_size, self.model_channels)))
    # Context tokens come first (frame-major order); they stay clean: t = 0 and v = 0.
    is_context = (jnp.arange(seq_len) < num_context)[None, :, None]
    start = noise.at[:, :num_context].set(context_tokens)
    d = self.config.diffusion
    shift = flow.shift_for_tokens(seq_len, d.shift_base_tokens, d.max_shift)

    def forward(x, t, caption):
      rows = x.shape[0]                     # 2 when guided: caption and null caption
      level = jnp.broadcast_to(jnp.where(is_context[..., 0], 0.0, t), (rows, seq_len))
      text_args = {} if caption is None else dict(text=caption[0], text_segment_ids=caption[1])
      return self.model.apply({"params": self.params}, x,
                              jnp.broadcast_to(positions, (rows, seq_len, 3)),
                              jnp.broadcast_to(segment_ids, (rows, seq_len)), level,
                              **text_args)

    def velocity(x, t):
      if not guided:
        v = forward(x, t, None if text is None else text[0])
      else:           # both passes in one batch: the caption's and the null caption's
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text[0], text[1])
        v_caption, v_null = jnp.split(forward(jnp.concatenate([x, x]), t, both), 2)
        v = v_null + guidance * (v_caption - v_null)
      return jnp.where(is_context, 0.0, v)

    return samplers.euler(velocity, start, steps, shift)[0]


@functools.lru_cache(maxsize=4)
def load(workdir, step: Optional[int] = None) -> WorldSim:
  """A trained workdir as a WorldSim (cached: repeated calls reuse the loaded parameters)."""
  return WorldSim(str(workdir), step)


def sample(caption: Optional[str] = None, *, checkpoint: str, num_frames: Optional[int] = None,
           height: Optional[int] = None, width: Optional[int] = None,
           steps: Optional[int] = None, seed: int = 0,
           context: Optional[np.ndarray] = None,
           guidance: Optional[float] = None) -> np.ndarray:
  """Generates one clip with the model trained in `checkpoint` (a workdir): uint8 (T, H, W, 3).

  See WorldSim.sample for `caption`, `guidance` and `context` (clean frames to continue from).
  """
  return load(str(checkpoint)).sample(caption, num_frames=num_frames, height=height, width=width,
                                      steps=steps, seed=seed, context=context,
                                      guidance=guidance)


def write_samples(config, workdir) -> None:
  """The `samples` stage: config.sample.num_videos videos of config.sample.caption (seeds 0,
  1, ...) in workdir/samples/."""
  out = pathlib.Path(workdir) / "samples"
  sim = load(str(workdir))
  marker = out / "done.json"
  if marker.exists() and json.loads(marker.read_text()).get("step") == sim.step:
    logging.info("samples for step %d already written; skipping", sim.step)
    return
  written = []
  for seed in range(config.sample.num_videos):
    clip = sim.sample(config.sample.get("caption") or None, seed=seed)
    written.append(str(video_lib.save_video(clip, out / f"sample_{seed}.mp4", config.sample.fps)))
  marker.write_text(json.dumps({"step": sim.step, "files": written}))
  logging.info("wrote %d samples to %s", len(written), out)
