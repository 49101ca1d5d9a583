"""The pipeline behind worldsim.sample(): load a trained workdir, integrate noise to video.

`load(checkpoint)` restores the EMA parameters once and keeps them; `sample(...)` draws clips
of any (frames, height, width) that divide into patches, since the model reads token
positions rather than a fixed grid. In latent space (config.data.space='latent') the DiT
draws normalised latents, which are denormalised with the latent dataset's statistics (the
copy in <workdir>/latent_stats.json) and decoded by the workdir's VAE (<workdir>/vae),
streamed in time so memory does not grow with the clip's length.

The denoising steps run as a Python loop over one jitted step (one compile per clip shape,
sampler and guidance mode), so a progress bar can tick; the sampler's arithmetic is the same
as samplers.sample's lax.fori_loop. Drafts (Sora): `sample(..., draft=dict(height=...,
width=...))` draws a cheap small clip, upsamples it in the model's space and refines it at the
final size from an intermediate noise level (SDEdit); `refine(video, t)` does the second half
for any clip.
"""
import functools
import inspect
import json
import math
import numbers
import os
import pathlib
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import loader
from worldsim import actions as actions_lib
from worldsim import config as config_lib
from worldsim import export as export_lib
from worldsim import rollout
from worldsim import video as video_lib
from worldsim.diffusion import flow, samplers
from worldsim.models import patches, text as text_lib, vae as vae_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint as checkpoint_lib
from worldsim.train import step as step_lib


DECODE_CHUNK = 4                     # latent frames the VAE decodes at a time
# The bundled default model: a release (worldsim/export.py) of the tiny physics-world recipe
# shipped inside the package, what `sample(checkpoint=None)` uses.
BUNDLED = pathlib.Path(__file__).parent / "assets" / "physics_tiny"
DEFAULT_CHECKPOINT: Optional[str] = str(BUNDLED) if export_lib.is_export(BUNDLED) else None
PROGRESS_DELAY_S = 1.0               # the progress bar appears only for calls longer than this
DRAFT_KEYS = ("height", "width", "size", "steps", "sampler")


def resolve_checkpoint(checkpoint) -> tuple:
  """A workdir (holding checkpoints/), one step's directory (<workdir>/checkpoints/<step>) or
  a release (worldsim/export.py; None: the bundled one) -> (path, step or None)."""
  if checkpoint is None:
    checkpoint = DEFAULT_CHECKPOINT
  if checkpoint is None:
    raise ValueError("checkpoint is required: the workdir of a trained model (e.g. "
                     "checkpoint='runs/physics_tiny', what `python -m worldsim.main` trained) "
                     "or one of its step directories (runs/physics_tiny/checkpoints/600)")
  path = pathlib.Path(checkpoint).expanduser()
  if export_lib.is_export(path) or (path / "checkpoints").is_dir():
    return str(path), None
  if path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
    return str(path.parent.parent), int(path.name)
  raise FileNotFoundError(f"checkpoint={str(checkpoint)!r} is neither a trained workdir (with a "
                          f"checkpoints/ folder), a <workdir>/checkpoints/<step> directory, nor "
                          f"a release written by `python -m worldsim.export`")


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


def _positive(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"{name}={value!r} must be a positive number")
  return float(value)


def parse_aspect_ratio(aspect_ratio) -> float:
  """'16:9' (width:height) or a float (width / height) -> width / height."""
  if isinstance(aspect_ratio, str):
    try:
      w, h = (float(part) for part in aspect_ratio.split(":"))
    except ValueError:
      raise ValueError(f"aspect_ratio={aspect_ratio!r}: write it as 'width:height', e.g. "
                       f"'16:9', or as a number (width / height)") from None
    if not (w > 0 and h > 0):
      raise ValueError(f"aspect_ratio={aspect_ratio!r}: both sides must be positive")
    return w / h
  return _positive("aspect_ratio", aspect_ratio)


class WorldSim:
  """A trained world simulator: its config and EMA parameters, ready to sample."""

  def __init__(self, workdir, step: Optional[int] = None):
    from worldsim.train import trainer
    setup = self._setup(checkpoint_lib.load_config(workdir, step), workdir)
    self.step, state = checkpoint_lib.restore_state_only(workdir, setup.abstract_state, step)
    # On the default device once, not sent from the host at every step.
    self.params = jax.device_put(jax.device_get(state.ema_params))
    if config_lib.space(self.config) == "latent":
      from worldsim.train import latents              # imports the trainer, like build() above
      self.vae = latents.trained_vae(self.config, self.workdir)
      stats = json.loads((self.workdir / trainer.LATENT_STATS).read_text())
      self.shift = np.asarray(stats["shift"], np.float32)
      self.scale = np.asarray(stats["scale"], np.float32)

  @classmethod
  def from_export(cls, path) -> "WorldSim":
    """A release written by worldsim/export.py (the bundled model is one): config, EMA
    parameters, and in latent space the VAE and the latent statistics; no checkpoint."""
    path = pathlib.Path(path)
    sim = cls.__new__(cls)
    sim._setup(json.loads((path / "config.json").read_text()), path)
    info = json.loads((path / "export.json").read_text())
    sim.step = info["dit_step"]
    sim.params = jax.device_put(export_lib.load_arrays(path / "dit.npz"))
    if config_lib.space(sim.config) == "latent":
      import dataclasses
      from worldsim.train import latents
      vae_cfg = dataclasses.replace(vae_lib.config_from(sim.config.vae),
                                    in_channels=sim.config.data.channels)
      sim.vae = latents.TrainedVAE(vae_lib.VAE(vae_cfg),
                                   {"params": export_lib.load_arrays(path / "vae.npz")},
                                   info["vae_step"])
      stats = json.loads((path / "latent_stats.json").read_text())
      sim.shift = np.asarray(stats["shift"], np.float32)
      sim.scale = np.asarray(stats["scale"], np.float32)
    return sim

  @classmethod
  def from_params(cls, config, params, step: int = 0) -> "WorldSim":
    """A pixel-space model from its config and DiT parameters held in memory (e.g. just
    trained in a notebook, or random ones in tests): no workdir, no checkpoint."""
    if config_lib.space(config) == "latent":
      raise ValueError("WorldSim.from_params: config.data.space='latent' needs the workdir's "
                       "VAE and latent statistics; use worldsim.load(workdir)")
    sim = cls.__new__(cls)
    sim._setup(config, None)
    sim.step, sim.params = step, jax.device_put(jax.device_get(params))
    return sim

  def _setup(self, config, workdir):
    """The config (re-meshed for sampling on the local devices), the model and the fields
    derived from them; returns the trainer's Setup (its build() gives the exact layout)."""
    from worldsim.train import trainer
    self.workdir = None if workdir is None else pathlib.Path(workdir)
    self.config = ml_collections.ConfigDict(
        config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    self.config.mesh.data, self.config.mesh.fsdp = -1, 1     # sampling: any local devices
    self.config.mesh.tensor, self.config.mesh.context = 1, 1
    self.config.data.batch_size = jax.device_count()
    setup = trainer.build(self.config, mesh_lib.make_mesh(self.config.mesh))
    self.model = setup.model             # its action_dim is config_lib.action_dim(config)
    self.action_spec = step_lib.action_spec(self.config.model)
    self.patch_size = tuple(self.config.model.patch_size)
    self.channels = self.config.data.channels            # of the videos
    self.model_channels = config_lib.model_channels(self.config)
    self.token_dim = patches.token_dim(self.patch_size, self.model_channels)
    self._step_fns = {}                                  # (sampler, guided) -> jitted step
    self.vae = None
    return setup

  # ------------------------------------------------------------------------------ sizes

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
                       f"frames and sides that are multiples of {s}; valid sizes near it: "
                       f"{self.round_shape(shape)} (or pass round_sizes=True)")
    return 1 + (frames - 1) // t, height // s, width // s

  def _grid(self, shape: tuple) -> tuple:
    """Video (frames, height, width) -> the patch grid, or ValueError naming the rule."""
    model_shape = self._model_shape(shape)
    try:
      return patches.grid_shape(model_shape, self.patch_size)
    except ValueError:
      raise ValueError(f"(num_frames, height, width)={shape} gives {model_shape} to model, "
                       f"which must be multiples of the patch size {self.patch_size}; valid "
                       f"sizes near it: {self.round_shape(shape)} (or pass round_sizes=True)"
                       ) from None

  def round_shape(self, shape) -> tuple:
    """The valid (frames, height, width) nearest to `shape` (floats allowed): frames
    1 + t (k pt - 1) and sides multiples of s * ph (s * pw), k >= 1, where t, s are the VAE's
    temporal and spatial factors (1 in pixel space) and (pt, ph, pw) the patch."""
    (t, s), (pt, ph, pw) = self.factors, self.patch_size
    frames, height, width = shape
    k = max(1, round(((frames - 1) / t + 1) / pt))
    return (1 + t * (k * pt - 1), max(1, round(height / (s * ph))) * s * ph,
            max(1, round(width / (s * pw))) * s * pw)

  def video_shape(self, *, num_frames=None, seconds=None, fps=None, height=None, width=None,
                  aspect_ratio=None, size=None, round_sizes: bool = False,
                  context_shape: Optional[tuple] = None) -> tuple:
    """The (frames, height, width) a request asks for; see `sample` for the arguments.

    Sizes computed from seconds * fps, aspect_ratio or size are rounded to the nearest valid
    ones (logged at INFO); explicit num_frames, height and width must be valid already unless
    round_sizes=True. Raises ValueError naming the argument for impossible requests."""
    s = self.config.sample
    derived = set()
    if num_frames is not None and seconds is not None:
      raise ValueError(f"num_frames={num_frames} and seconds={seconds}: give one of them")
    if seconds is not None:
      if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or seconds < 0:
        raise ValueError(f"seconds={seconds!r} must be a number >= 0")
      fps = _positive("fps", s.get("fps", 8) if fps is None else fps)
      frames, derived = max(1.0, seconds * fps), derived | {"num_frames"}
    else:
      frames = _positive_int("num_frames", s.num_frames if num_frames is None else num_frames)
    for name, value in (("height", height), ("width", width)):
      if value is not None:
        _positive_int(name, value)
    if size is not None:
      size = _positive("size", size)
      if height is not None or width is not None:
        raise ValueError(f"size={size} sets the short side: give it or height/width, not both")
    if aspect_ratio is not None:
      ratio = parse_aspect_ratio(aspect_ratio)
      if height is not None and width is not None:
        raise ValueError(f"aspect_ratio={aspect_ratio!r} with both height and width: give "
                         "height and width, or aspect_ratio with one side or a size")
    elif size is not None:                      # a short side at the default's aspect ratio
      ratio = s.width / s.height
    if aspect_ratio is not None or size is not None:
      if size is not None:
        height, width = (size, size * ratio) if ratio >= 1 else (size / ratio, size)
        derived |= {"height", "width"}
      elif height is not None:
        width, derived = height * ratio, derived | {"width"}
      elif width is not None:
        height, derived = width / ratio, derived | {"height"}
      else:                                     # the default clip's area at this ratio
        area = s.height * s.width
        height, width = math.sqrt(area / ratio), math.sqrt(area * ratio)
        derived |= {"height", "width"}
    if context_shape is not None:
      height, width = height or context_shape[0], width or context_shape[1]
    requested = (frames, height or s.height, width or s.width)
    rounded = self.round_shape(requested)
    shape = tuple(int(r) if (round_sizes or name in derived) else int(v) for name, r, v in
                  zip(("num_frames", "height", "width"), rounded, requested))
    changed = [f"{name} {v:g} -> {n}" for name, v, n in
               zip(("num_frames", "height", "width"), requested, shape) if v != n]
    if changed:
      (tf, sf), (pt, ph, pw) = self.factors, self.patch_size
      logging.info("worldsim.sample: rounded %s, the nearest size this model can patch "
                   "(frames 1 + %d (%d k - 1), height a multiple of %d, width of %d)",
                   ", ".join(changed), tf, pt, sf * ph, sf * pw)
    return shape

  # ------------------------------------------------------------------- model space <-> pixels

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

  def _resize_tokens(self, tokens, grid_from: tuple, grid_to: tuple):
    """(B, L, P) tokens of one patch grid -> another's, resized in the model's space
    (bilinear; in latent space the VAE's latents, so no decode/encode round trip)."""
    b = tokens.shape[0]
    z = patches.unpatchify(jnp.asarray(tokens), grid_from, self.patch_size, self.model_channels)
    size = tuple(g * p for g, p in zip(grid_to, self.patch_size))
    z = jax.image.resize(z, (b, *size, self.model_channels), "linear")
    return patches.patchify(z, self.patch_size)

  # ---------------------------------------------------------------------------- sampling

  def sample(self, caption: Union[None, str, np.ndarray, Sequence] = None, *,
             num_frames: Optional[int] = None, seconds: Optional[float] = None,
             fps: Optional[float] = None, height: Optional[int] = None,
             width: Optional[int] = None, aspect_ratio: Union[None, str, float] = None,
             size: Optional[float] = None, sampler: Optional[str] = None,
             steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0,
             context: Optional[np.ndarray] = None, actions: Optional[np.ndarray] = None,
             draft: Optional[dict] = None, refine_t: float = 0.6, progress: bool = True,
             round_sizes: bool = False) -> np.ndarray:
    """Clips as uint8 video: (T, H, W, 3) for one caption, (B, T, H, W, 3) for a list of B.

    caption: a str for a 'bytes' model, float (L, E) rows for an 'embeddings' one; None or
      '' asks for the unconditional model (the null caption). A list (or tuple) of them draws
      one clip per caption in one batch; clip i's noise comes from (seed, i), so clip 0 of a
      batch is the clip of the same caption and seed drawn alone.
    Length: num_frames, or seconds at fps frames a second (fps defaults to the config's
      sample.fps; seconds=0 is one frame). In latent space frames are 1 + 4k (the VAE's
      temporal factor).
    Size: height and width in pixels, or aspect_ratio ('16:9' is width:height, or a float
      width / height) with `size`, the short side in pixels, or with one of height/width;
      aspect_ratio alone keeps the config's default area, size alone its aspect ratio. Sides
      are multiples of the VAE's spatial factor times the patch. Sizes computed from seconds,
      aspect_ratio or size are rounded to the nearest valid ones, with an INFO log saying so;
      explicit num_frames/height/width must be valid (ValueError naming the rule and the
      nearest valid sizes) unless round_sizes=True rounds them too.
    sampler: 'euler', 'heun' or 'dpmpp_2m' (default config.sample.sampler, else 'euler');
      steps: sampler steps (default config.sample.steps); see diffusion/samplers.py for the
      model evaluations each takes.
    guidance: the classifier-free guidance scale w (default config.sample.guidance),
      v = v_null + w (v_caption - v_null); 1 is the plain conditional model, one forward
      pass per step instead of two (both run in one batch).
    seed: the noise; the same seed and arguments give the same clip.
    context: uint8 (Tc, H, W, 3) clean frames the clips continue from (image-to-video with
      one frame, extension with more), or (B, Tc, H, W, 3), one set per clip; what they become
      for the DiT is held at noise level 0, and they come back unchanged as the first Tc
      frames. Tc follows the rule for T (and must give whole patches); H, W default to the
      context's.
    actions: an action-conditioned model's (config.model.actions) per-pixel-frame actions
      from frame 0 (the context's frames included): (n, action_size) floats (continuous) or
      (n,) integer ids (discrete), n <= num_frames, or (B, n, ...) one set per clip; frames
      past n, and every frame without actions, are unknown to the model. A model without
      action conditioning raises ValueError.
    draft: dict(height=, width= or size=, steps=, sampler=) for draft-then-refine (Sora):
      a clip is first drawn at the draft's size (default: half the final sides) and
      steps/sampler (default: the final's), upsampled in the model's space, noised again to
      t = refine_t with noise of the seed and integrated from there to 0 at the final size
      (SDEdit). refine_t in (0, 1]: near 0 keeps the upsampled draft, 1 ignores it. The
      refinement takes the last refine_t share of a `steps`-step schedule (see `refine`).
    progress: a progress bar over the denoising steps (tqdm.auto, so a widget in notebooks),
      shown once a call has run PROGRESS_DELAY_S seconds; False for none.
    """
    s = self.config.sample
    if actions is not None and not self.model.cfg.action_dim:
      raise ValueError("actions: this model has no action conditioning "
                       "(config.model.actions='none'); sample without `actions`")
    sampler = samplers.get(sampler or s.get("sampler", "euler")).name
    steps = _positive_int("steps", s.steps if steps is None else steps)
    guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    if draft is not None:                       # checked before anything is drawn
      _check_draft(draft)
      _check_refine_t(refine_t)
    captions, batched = _caption_list(caption)
    context = self._check_context(context, len(captions))
    shape = self.video_shape(num_frames=num_frames, seconds=seconds, fps=fps, height=height,
                             width=width, aspect_ratio=aspect_ratio, size=size,
                             round_sizes=round_sizes,
                             context_shape=None if context is None else context.shape[2:4])
    if context is not None and context.shape[2:4] != shape[1:]:
      raise ValueError(f"context frames are {context.shape[2:4]}, the clip is {shape[1:]}")
    grid = self._grid(shape)
    frame_actions = self._frame_actions(actions, len(captions), shape, grid)
    context_tokens = self._context_tokens(context, shape)
    text = self._caption_batch(captions)
    keys = _clip_keys(seed, len(captions))
    if draft is None:
      noise = _noise(keys, grid, self.token_dim)
      z = self._denoise(noise, grid, context_tokens, text, guidance, sampler, steps, 1.0,
                        progress, actions=frame_actions)
    else:
      z = self._draft_then_refine(draft, refine_t, shape, grid, context, context_tokens, text,
                                  guidance, sampler, steps, keys, progress, frame_actions)
    videos = self._to_videos(z, grid, context)
    return videos if batched else videos[0]

  def refine(self, video: np.ndarray, t: float, caption=None, *, height: Optional[int] = None,
             width: Optional[int] = None, aspect_ratio=None, size=None,
             sampler: Optional[str] = None, steps: Optional[int] = None,
             guidance: Optional[float] = None, seed: int = 0, progress: bool = True,
             round_sizes: bool = False) -> np.ndarray:
    """SDEdit: the clip(s) `video`, uint8 (T, H, W, 3) or (B, T, H, W, 3), moved to the
    model's space, resized there to the requested size (default: the video's), noised to
    level t with noise of `seed` and integrated from t to 0 by the model.

    t in (0, 1]: t -> 0 returns (nearly) the resized video, t = 1 draws a new clip. The
    integration takes the last t share of a `steps`-step schedule: max(1, round(steps * u))
    steps, u being t before the time shift. Other arguments as in `sample`; the caption list
    must match the batch (or be one caption for every clip).
    """
    s = self.config.sample
    sampler = samplers.get(sampler or s.get("sampler", "euler")).name
    steps = _positive_int("steps", s.steps if steps is None else steps)
    guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    video = np.asarray(video)
    batched = video.ndim == 5
    video = video if batched else video[None]
    if video.ndim != 5 or video.dtype != np.uint8 or video.shape[-1] != self.channels:
      raise ValueError(f"video must be uint8 (T, H, W, {self.channels}) or (B, T, H, W, "
                       f"{self.channels}), got {video.dtype} {video.shape}")
    captions, _ = _caption_list(caption)
    if len(captions) == 1:
      captions = captions * len(video)
    if len(captions) != len(video):
      raise ValueError(f"caption: {len(captions)} captions for {len(video)} clips")
    source_grid = self._grid(video.shape[1:4])
    shape = self.video_shape(num_frames=video.shape[1], height=height, width=width,
                             aspect_ratio=aspect_ratio, size=size, round_sizes=round_sizes,
                             context_shape=video.shape[2:4])
    grid = self._grid(shape)
    tokens = np.stack([patches.patchify(self._encode(v), self.patch_size) for v in video])
    resized = self._resize_tokens(tokens, source_grid, grid)
    keys = _clip_keys(seed, len(video))
    z = self._refine_tokens(resized, t, grid, self._context_tokens(None, shape),
                            self._caption_batch(captions), guidance, sampler, steps, keys,
                            progress)
    videos = self._to_videos(z, grid, None)
    return videos if batched else videos[0]

  def _draft_then_refine(self, draft, refine_t, shape, grid, context, context_tokens, text,
                         guidance, sampler, steps, keys, progress, actions=None):
    _check_draft(draft)
    draft_steps = _positive_int("draft['steps']", draft.get("steps", steps))
    draft_sampler = samplers.get(draft.get("sampler") or sampler).name
    # Missing sides keep the final clip's aspect ratio; no sides at all: half its sides.
    ratio = shape[2] / shape[1]
    height, width, size = (draft.get(k) for k in ("height", "width", "size"))
    if size is not None:
      size = _positive("draft['size']", size)
      height, width = (size, size * ratio) if ratio >= 1 else (size / ratio, size)
    elif height is None and width is None:
      height, width = shape[1] / 2, shape[2] / 2
    height = _positive("draft['height']", width / ratio if height is None else height)
    width = _positive("draft['width']", height * ratio if width is None else width)
    draft_shape = self.round_shape((shape[0], height, width))
    draft_grid = self._grid(draft_shape)
    draft_context = self._context_tokens(context, draft_shape)
    noise = _noise(keys, draft_grid, self.token_dim)
    z = self._denoise(noise, draft_grid, draft_context, text, guidance, draft_sampler,
                      draft_steps, 1.0, progress, desc="draft", actions=actions)
    resized = self._resize_tokens(z, draft_grid, grid)
    return self._refine_tokens(resized, refine_t, grid, context_tokens, text, guidance, sampler,
                               steps, keys, progress, actions)

  def _refine_tokens(self, tokens, t, grid, context_tokens, text, guidance, sampler, steps,
                     keys, progress, actions=None):
    """Noises (B, L, P) clean tokens to level t and integrates them back to 0."""
    _check_refine_t(t)
    shift = float(self._shift(grid))
    u = float(samplers.unshift_time(t, shift))
    refine_steps = max(1, round(steps * u))
    eps = _noise([jax.random.fold_in(k, 1) for k in keys], grid, self.token_dim)
    start = (1.0 - t) * jnp.asarray(tokens) + t * eps
    return self._denoise(start, grid, context_tokens, text, guidance, sampler, refine_steps,
                         float(t), progress, desc="refine", actions=actions)

  def _shift(self, grid):
    d = self.config.diffusion
    return flow.shift_for_tokens(int(np.prod(grid)), d.shift_base_tokens, d.max_shift)

  def _denoise(self, start, grid, context_tokens, text, guidance, sampler, steps, t_start,
               progress, desc="sample", actions=None):
    """Integrates (B, L, P) `start` (pure noise when t_start = 1) to clean tokens at t = 0,
    one jitted sampler step at a time. Context tokens (the first num_context of each row,
    frame-major) are set clean and held: noise level 0, velocity 0. actions: per token frame
    (features (B, gt, action_dim), known (B, gt)); None: unknown to an action model."""
    from tqdm.auto import tqdm
    num_context = context_tokens.shape[1]
    start = jnp.asarray(start).at[:, :num_context].set(context_tokens)
    if actions is None and self.model.cfg.action_dim:
      actions = self._frame_actions(None, len(start), None, grid)
    inputs = _step_inputs(len(start), grid, num_context, text, guidance, actions)
    ts = np.asarray(samplers.time_grid(steps, self._shift(grid), t_start), np.float32)
    step_fn = self._step_fn(sampler, guided=text is not None and guidance != 1.0)
    carry = samplers.get(sampler).init(start)
    for i in tqdm(range(steps), desc=f"worldsim {desc} ({sampler})", unit="step", leave=False,
                  disable=not progress, delay=PROGRESS_DELAY_S):
      times = tuple(np.float32(t) for t in samplers.step_times(ts, i))
      carry = step_fn(self.params, carry, times, inputs)
    return carry.x

  def _step_fn(self, sampler: str, guided: bool):
    """One jitted sampler step, (params, carry, (t_prev, t, t_next), inputs) -> carry;
    compiled once per clip shape (jit's cache) for each (sampler, guided), whatever the number
    of steps."""
    if (sampler, guided) not in self._step_fns:
      self._step_fns[sampler, guided] = jax.jit(functools.partial(
          _sampler_step, self.model, samplers.get(sampler), guided))
    return self._step_fns[sampler, guided]

  def _to_videos(self, z, grid, context) -> np.ndarray:
    z = np.asarray(jax.device_get(z))
    videos = np.stack([self._decode(patches.unpatchify(row, grid, self.patch_size,
                                                       self.model_channels)) for row in z])
    if context is not None:        # the given frames, exactly (the VAE would blur them a bit)
      videos[:, :context.shape[1]] = context
    return videos

  # ----------------------------------------------------------------- conditioning inputs

  def _frame_actions(self, actions, batch: int, shape, grid):
    """Per-pixel-frame actions of B clips ((n, ...) shared, or (B, n, ...)) -> per token
    frame (features (B, gt, action_dim), known (B, gt)); None for a model without actions."""
    if not self.model.cfg.action_dim:
      return None
    spec = self.action_spec
    if actions is not None:
      actions = actions_lib.held(actions, spec, axis=0, length=batch)     # shared by the clips
      per_clip = 1 + len(actions_lib.frame_shape(spec))     # a clip's (n, size) or (n,)
      if actions.ndim != per_clip + 1 or len(actions) != batch:
        raise ValueError(f"actions: {'(n, action_size)' if per_clip == 2 else '(n,)'} per clip"
                         f" or one set per clip ({batch}, ...); got shape {actions.shape}")
      if shape is not None and actions.shape[1] > shape[0]:
        raise ValueError(f"actions for {actions.shape[1]} frames; the clip has {shape[0]}")
    rows = [actions_lib.token_frame_actions(None if actions is None else actions[i], spec,
                                            self.factors[0], grid[0])
            for i in range(batch)]
    return tuple(jnp.asarray(np.stack(part)) for part in zip(*rows))

  def _check_context(self, context, batch: int):
    """None, or uint8 context as (B, Tc, H, W, 3)."""
    if context is None:
      return None
    context = np.asarray(context)
    if context.ndim == 4:
      context = np.broadcast_to(context[None], (batch, *context.shape))
    if (context.ndim != 5 or context.dtype != np.uint8 or context.shape[-1] != self.channels
        or len(context) != batch):
      raise ValueError(f"context must be uint8 (Tc, H, W, {self.channels}) or ({batch}, Tc, H, "
                       f"W, {self.channels}), got {context.dtype} {context.shape}")
    return context

  def _context_tokens(self, context, shape: tuple):
    """(B, Tc, H, W, 3) context frames -> (B, Lc, P) clean tokens at `shape`'s size (resized
    in the model's space when the clip is smaller, as a draft is); (1, 0, P) for none."""
    if context is None:
      return jnp.zeros((1, 0, self.token_dim), jnp.float32)
    t = self.factors[0]
    if (context.shape[1] - 1) % t or context.shape[1] >= shape[0]:
      raise ValueError(f"{context.shape[1]} context frames: need fewer than num_frames="
                       f"{shape[0]}, 1 + {t}k of them, giving a multiple of "
                       f"{self.patch_size[0]} frames to model")
    try:
      source_grid = self._grid(context.shape[1:4])
    except ValueError:
      raise ValueError(f"{context.shape[1]} context frames: need fewer than num_frames="
                       f"{shape[0]}, 1 + {t}k of them, giving a multiple of "
                       f"{self.patch_size[0]} frames to model") from None
    tokens = jnp.stack([patches.patchify(self._encode(c), self.patch_size) for c in context])
    target_grid = (source_grid[0], *self._grid(shape)[1:])
    if target_grid != source_grid:
      tokens = self._resize_tokens(tokens, source_grid, target_grid)
    return tokens

  def _captions(self, caption):
    """One clip's caption -> (caption text, null text), each (text, text_segment_ids) of one
    row, or None for a model without text conditioning (worldsim.rollout reads it)."""
    return self._caption_batch([caption])

  def _caption_batch(self, captions: list):
    """B captions -> (caption text, null text), each (text, text_segment_ids) with B rows, or
    None for a model without text conditioning."""
    mode, length, batch = self.model.cfg.text, self.config.data.get("caption_len", 0), len(captions)
    if mode == "none":
      if any(c is not None and len(c) for c in captions):
        logging.warning("this model was trained without captions; the caption is ignored")
      return None
    if mode == "bytes":
      for c in captions:
        if c is not None and not isinstance(c, str):
          raise ValueError(f"this model reads captions as text; got {type(c).__name__}")
      return (text_lib.pack_captions([[c or ""] for c in captions], length),
              text_lib.null_text(batch, 1, length))
    width = self.config.model.text_embed_dim
    null = text_lib.null_text(batch, 1, length, width)
    text, segment_ids = np.zeros_like(null[0]), np.zeros_like(null[1])
    for i, c in enumerate(captions):
      if c is None:
        text[i], segment_ids[i] = null[0][i], null[1][i]
        continue
      rows = np.asarray(c, np.float32)
      if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"this model reads precomputed caption embeddings (L, {width}); got "
                         f"an array of shape {rows.shape}")
      n = min(len(rows), length)
      text[i, :n], segment_ids[i, :n] = rows[:n], 1
    return (text, segment_ids), null


def _check_draft(draft) -> None:
  if not isinstance(draft, dict) or set(draft) - set(DRAFT_KEYS):
    raise ValueError(f"draft={draft!r}: a dict with keys among {DRAFT_KEYS}")


def _check_refine_t(t) -> None:
  if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t <= 1:
    raise ValueError(f"refine_t={t!r} must be in (0, 1]")


def _caption_list(caption) -> tuple:
  """caption -> (list of per-clip captions, whether a batch was asked for)."""
  if isinstance(caption, (list, tuple)):
    if not caption:
      raise ValueError("caption=[]: give at least one caption (or None)")
    return list(caption), True
  return [caption], False


def _clip_keys(seed, batch: int) -> list:
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed={seed!r} must be an integer")
  key = jax.random.PRNGKey(int(seed))
  return [jax.random.fold_in(key, i) for i in range(batch)]


def _noise(keys, grid, token_dim: int):
  """(B, L, P) standard normal tokens, row i from keys[i]."""
  shape = (int(np.prod(grid)), token_dim)
  return jnp.stack([jax.random.normal(k, shape) for k in keys])


def _step_inputs(batch: int, grid, num_context: int, text, guidance: float,
                 actions=None) -> dict:
  """What every step of one clip batch reads besides the carry (see _sampler_step);
  actions per token frame (features (B, gt, A), known (B, gt)) become per token."""
  seq_len, per_frame = int(np.prod(grid)), int(grid[1] * grid[2])
  inputs = dict(positions=jnp.broadcast_to(jnp.asarray(patches.positions(grid)),
                                           (batch, seq_len, 3)),
                segment_ids=jnp.ones((batch, seq_len), jnp.int32),
                is_context=jnp.arange(seq_len) < num_context,
                text=text, guidance=jnp.float32(guidance))
  if actions is not None:          # token frames are contiguous (frame-major tokens)
    inputs.update(actions=jnp.repeat(actions[0], per_frame, axis=1),
                  actions_known=jnp.repeat(actions[1], per_frame, axis=1))
  return inputs


def _sampler_step(model, sampler: samplers.Sampler, guided: bool, params, carry, times, inputs):
  """One step of `sampler` with the model's velocity (rollout.velocity_fn: guided, the
  caption's and the null caption's passes in one batch of twice the rows; context tokens
  held clean)."""
  velocity = rollout.velocity_fn(
      model, params, inputs["positions"], inputs["segment_ids"], inputs["text"],
      inputs["guidance"], guided, held=inputs["is_context"], actions=inputs.get("actions"),
      actions_known=inputs.get("actions_known"))
  return sampler.step(velocity, carry, *times)


@functools.lru_cache(maxsize=4)
def _load(workdir: str, step: Optional[int]) -> WorldSim:
  if export_lib.is_export(workdir):
    return WorldSim.from_export(workdir)
  return WorldSim(workdir, step)


def load(checkpoint=None, step: Optional[int] = None) -> WorldSim:
  """A trained model as a WorldSim, from its workdir or one of its step directories
  (<workdir>/checkpoints/<step>). Cached: repeated calls reuse the loaded parameters."""
  workdir, path_step = resolve_checkpoint(checkpoint)
  return _load(os.path.abspath(workdir), step if step is not None else path_step)


def _with_checkpoint(method):
  """A module function calling `method` on load(checkpoint), with method's signature (plus
  checkpoint) and docstring, so the two cannot drift apart."""
  def decorate(fn):
    params = list(inspect.signature(method).parameters.values())[1:]
    at = next((i for i, p in enumerate(params) if p.kind == p.KEYWORD_ONLY), len(params))
    params.insert(at, inspect.Parameter("checkpoint", inspect.Parameter.KEYWORD_ONLY,
                                        default=None))
    fn.__signature__ = inspect.Signature(params, return_annotation=np.ndarray)
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + inspect.getdoc(method)
    return fn
  return decorate


@_with_checkpoint(WorldSim.sample)
def sample(*args, checkpoint=None, **kwargs) -> np.ndarray:
  """Generates clips with the model trained in `checkpoint` (a workdir or one of its
  checkpoints/<step> directories; required until a bundled default ships), loaded once and
  cached. Everything else as WorldSim.sample:
  """
  return load(checkpoint).sample(*args, **kwargs)


@_with_checkpoint(WorldSim.refine)
def refine(*args, checkpoint=None, **kwargs) -> np.ndarray:
  """Refines clips with the model trained in `checkpoint` (SDEdit). As WorldSim.refine:"""
  return load(checkpoint).refine(*args, **kwargs)


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
    clip = sim.sample(config.sample.get("caption") or None, seed=seed, progress=False)
    # Tiny clips are upscaled so players show them at a visible size.
    written.append(str(video_lib.save_video(out / f"sample_{seed}.mp4", clip,
                                            config.sample.fps, scale="auto")))
  marker.write_text(json.dumps({"step": sim.step, "files": written}))
  logging.info("wrote %d samples to %s", len(written), out)
