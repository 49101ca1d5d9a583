"""Long videos: a minute and more, chunk by chunk, at constant memory and time per chunk.

Diffusion forcing with a sliding window. A clip is generated `chunk` latent frames at a
time; each chunk is denoised from noise while attending to the last `window` latent frames
already made (its context), which are
  - noise-augmented: re-noised to a small level `context_noise` and given that noise level,
    so the model's own small errors look like noise it was trained to remove rather than
    signal to copy (the drift that ruins naive autoregressive rollouts);
  - re-based: the window always sits at frame positions 0 .. window - 1 and the chunk after
    it, so positions never leave the range the model trained on;
  - padded: before `window` frames exist (the first chunks), the missing frames are padding
    (segment id 0, never seen by the clip's tokens), so one compiled function serves every
    chunk and the time per chunk does not change along the video.
A block-causal model (config.model.causal) puts the window in a KV cache once per chunk and
runs each denoising step over the chunk's tokens alone; a bidirectional one runs each step
over window + chunk with the window held at its noise level. Finished chunks stream through
the VAE's causal decoder with its cache (vae.decode_chunk), so the host holds one window, one
chunk and the decoder's cache, whatever the length; `save_rollout` writes frames to the mp4
as they come.

  sim = worldsim.load("runs/physics_tiny")
  for frames in rollout_frames(sim, seconds=60, caption="a ball rolls down a ramp"): ...
  save_rollout("minute.mp4", sim, seconds=60)
"""
import functools
import itertools
import math
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from data_pipelines import loader
from worldsim.diffusion import flow, samplers
from worldsim.models import dit, patches
from worldsim.models import vae as vae_lib

# Context noise level: enough to hide the model's own small errors, small enough that the
# context still pins the scene (diffusion forcing's noise-augmented context).
CONTEXT_NOISE = 0.05


def latent_frames_per_clip(config) -> int:
  """The longest clip the model trained on, in the frames it models (latent frames in latent
  space): window + chunk should not exceed it, so attention spans stay in range."""
  frames = int(config.data.max_frames)
  if config.data.get("space", "pixel") == "latent":
    frames = 1 + (frames - 1) // vae_lib.config_from(config.vae).temporal_factor
  return frames


def _velocity_fn(model, params, positions, segment_ids, level_of, text, guidance, guided,
                 kv_cache=None):
  """v(x, t) of the DiT over one row (two when guided: caption and null caption in one batch,
  v = v_null + w (v_caption - v_null)); level_of(t) gives the per-token noise levels."""
  def forward(x, t, caption):
    rows, length = x.shape[0], x.shape[1]
    text_args = {} if caption is None else dict(text=caption[0], text_segment_ids=caption[1])
    return model.apply({"params": params}, x, jnp.broadcast_to(positions, (rows, length, 3)),
                       jnp.broadcast_to(segment_ids, (rows, length)),
                       jnp.broadcast_to(level_of(t), (rows, length)), kv_cache=kv_cache,
                       **text_args)

  def velocity(x, t):
    if not guided:
      return forward(x, t, None if text is None else text[0])
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text[0], text[1])
    v_caption, v_null = jnp.split(forward(jnp.concatenate([x, x]), t, both), 2)
    return v_null + guidance * (v_caption - v_null)

  return velocity


@functools.partial(jax.jit, static_argnames=("model", "frame_grid", "window", "chunk", "steps",
                                             "sampler", "guided", "use_cache"))
def denoise_chunk(model, params, window_tokens, window_valid, rng, text, guidance, shift,
                  context_noise, *, frame_grid, window, chunk, steps, sampler, guided,
                  use_cache=None):
  """One chunk of `chunk` token frames after a window of `window` token frames.

    window_tokens (1, window * F, P) the clean context (F = tokens per frame); window_valid
                  (window,) bool: False for frames not made yet (padding)
    text          (caption, null caption) of a captioned model, else None
    use_cache     None: a KV cache exactly when the model is block-causal (for which both
                  paths give the same chunk; tests compare them)
  Returns the chunk's clean tokens (1, chunk * F, P).
  """
  per_frame = frame_grid[0] * frame_grid[1]
  context_length = window * per_frame
  positions = jnp.asarray(patches.positions((window + chunk, *frame_grid)))[None]
  segment_ids = jnp.concatenate([jnp.repeat(window_valid, per_frame).astype(jnp.int32),
                                 jnp.ones(chunk * per_frame, jnp.int32)])[None]
  context_rng, chunk_rng = jax.random.split(rng)
  context = flow.noise(window_tokens, jax.random.normal(context_rng, window_tokens.shape),
                       context_noise)
  x1 = jax.random.normal(chunk_rng, (1, chunk * per_frame, window_tokens.shape[-1]))
  if model.cfg.causal if use_cache is None else use_cache:   # window once into a KV cache
    # Guided: one cache row per caption (later blocks' keys depend on the caption).
    rows = 2 if guided else 1
    captions = None if text is None else (
        jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text[0], text[1]) if guided
        else text[0])
    cache = dit.empty_cache(model.cfg, rows, (window + chunk) * per_frame)
    cache = model.apply({"params": params}, jnp.repeat(context, rows, axis=0),
                        jnp.repeat(positions[:, :context_length], rows, axis=0),
                        jnp.repeat(segment_ids[:, :context_length], rows, axis=0), cache,
                        noise_level=jnp.full((rows, context_length), context_noise),
                        method=dit.DiT.append_to_cache,
                        **({} if captions is None else
                           dict(text=captions[0], text_segment_ids=captions[1])))
    velocity = _velocity_fn(model, params, positions[:, context_length:],
                            segment_ids[:, context_length:], lambda t: t, text, guidance,
                            guided, cache)
    return samplers.sample(velocity, x1, steps, shift, sampler)[0]
  is_context = jnp.arange(positions.shape[1]) < context_length
  velocity = _velocity_fn(model, params, positions, segment_ids,
                          lambda t: jnp.where(is_context, context_noise, t)[None], text,
                          guidance, guided)
  held = lambda x, t: jnp.where(is_context[None, :, None], 0.0, velocity(x, t))
  x0 = samplers.sample(held, jnp.concatenate([context, x1], axis=1), steps, shift, sampler)[0]
  return x0[:, context_length:]


class _Decoder:
  """Model frames -> uint8 pixels, chunk by chunk: the VAE's causal decoder with its cache
  (denormalising first), or the identity map of pixel space."""

  def __init__(self, sim):
    self.sim, self.cache = sim, None

  def __call__(self, z: np.ndarray) -> np.ndarray:            # (T', H', W', C) -> (T, H, W, 3)
    if self.sim.vae is None:
      return loader.latent_to_pixels(z)
    latent = np.asarray(z) * self.sim.scale + self.sim.shift
    frames, self.cache = vae_lib.decode_chunk(self.sim.vae.model, self.sim.vae.variables,
                                              latent[None], self.cache)
    return loader.latent_to_pixels(frames[0])


def rollout_frames(sim, *, num_frames: Optional[int] = None, seconds: Optional[float] = None,
                   fps: Optional[float] = None, height: Optional[int] = None,
                   width: Optional[int] = None, caption=None,
                   context: Optional[np.ndarray] = None, chunk: Optional[int] = None,
                   window: Optional[int] = None, steps: Optional[int] = None,
                   sampler: str = "euler", seed: int = 0, guidance: Optional[float] = None,
                   context_noise: float = CONTEXT_NOISE,
                   progress: bool = True) -> Iterator[np.ndarray]:
  """Yields uint8 frames (n, H, W, 3) chunk by chunk, num_frames (or seconds * fps) in all.

  `sim` is a loaded worldsim.sampling.WorldSim. `chunk` and `window` count the frames the DiT
  models (latent frames in latent space; multiples of the patch's frames); by default they
  split the longest clip the model trained on in halves. `context`: uint8 frames to continue
  (they come first, exactly). Deterministic for a seed; chunk k draws from fold_in(seed, k).
  """
  s, cfg = sim.config.sample, sim.model.cfg
  fps = fps or s.fps
  if num_frames is None:
    if seconds is None or seconds <= 0:
      raise ValueError(f"give num_frames or seconds > 0 (got seconds={seconds})")
    num_frames = int(round(seconds * fps))
  t_factor, s_factor = sim.factors
  pt, ph, pw = sim.patch_size
  height, width = height or s.height, width or s.width
  if height % (s_factor * ph) or width % (s_factor * pw):
    raise ValueError(f"height={height}, width={width}: sides must be multiples of "
                     f"{s_factor * ph}, {s_factor * pw} (the VAE's factor times the patch)")
  frame_grid = (height // (s_factor * ph), width // (s_factor * pw))
  per_frame = frame_grid[0] * frame_grid[1]
  span = latent_frames_per_clip(sim.config) // pt           # token frames of a trained clip
  chunk = chunk or max(1, span // 2) * pt
  window = window or max(1, span - chunk // pt) * pt
  if chunk % pt or window % pt or chunk < pt or window < pt:
    raise ValueError(f"chunk={chunk} and window={window} must be positive multiples of the "
                     f"patch's {pt} frames")
  chunk_t, window_t = chunk // pt, window // pt             # in token frames
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames} must be >= 1")
  # Enough model frames to cover num_frames (1 + 4k pixel frames per 1 + k latents); the
  # last chunk is cut to num_frames.
  total_model_frames = 1 + -(-(num_frames - 1) // t_factor)

  window_tokens = np.zeros((1, window_t * per_frame, patches.token_dim(sim.patch_size,
                                                                       sim.model_channels)),
                           np.float32)
  window_valid = np.zeros(window_t, bool)
  decode = _Decoder(sim)
  made = 0                                                 # model frames produced so far
  emitted = 0                                              # pixel frames yielded so far
  if context is not None:
    z = sim._encode(np.asarray(context))                   # (Tc', H', W', C)
    if len(z) % pt:
      raise ValueError(f"{len(context)} context frames give {len(z)} model frames; need a "
                       f"multiple of the patch's {pt}")
    tokens = patches.patchify(z, sim.patch_size)
    keep = min(len(z) // pt, window_t)
    window_tokens[0, (window_t - keep) * per_frame:] = tokens[len(tokens) - keep * per_frame:]
    window_valid[window_t - keep:] = True
    decode(z)                                               # warms the decoder's cache
    made, emitted = len(z), len(context)
    yield np.asarray(context)

  text = sim._captions(caption)
  guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
  guided = text is not None and guidance != 1.0
  d = sim.config.diffusion
  shift = flow.shift_for_tokens((window_t + chunk_t) * per_frame, d.shift_base_tokens, d.max_shift)
  num_chunks = math.ceil(max(total_model_frames - made, 0) / chunk)
  base = jax.random.PRNGKey(seed)
  for k in tqdm(range(num_chunks), desc="rollout", unit="chunk", disable=not progress):
    tokens = np.asarray(denoise_chunk(
        sim.model, sim.params, jnp.asarray(window_tokens), jnp.asarray(window_valid),
        jax.random.fold_in(base, k), text, guidance, shift, context_noise,
        frame_grid=frame_grid, window=window_t, chunk=chunk_t, steps=steps or s.steps,
        sampler=sampler, guided=guided))[0]
    window_tokens = np.concatenate([window_tokens[0], tokens])[-window_t * per_frame:][None]
    window_valid = np.concatenate([window_valid, np.ones(chunk_t, bool)])[-window_t:]
    z = patches.unpatchify(tokens, (chunk_t, *frame_grid), sim.patch_size, sim.model_channels)
    frames = decode(np.asarray(z))
    made += chunk
    frames = frames[:max(num_frames - emitted, 0)]         # the last chunk may overshoot
    emitted += len(frames)
    if len(frames):
      yield frames


def rollout(sim, **kwargs) -> np.ndarray:
  """rollout_frames joined into one uint8 (T, H, W, 3) array (holds the whole video)."""
  return np.concatenate(list(rollout_frames(sim, **kwargs)))


def save_rollout(path, sim, fps: Optional[float] = None, **kwargs):
  """Writes rollout_frames to an mp4 as they come (ffmpeg from imageio-ffmpeg), so a video of
  any length is written at constant memory. Returns the path."""
  import mediapy
  from worldsim import video as video_lib
  if not video_lib._ffmpeg_ready():
    raise ImportError("save_rollout writes mp4 with mediapy and imageio-ffmpeg: "
                      "pip install 'worldsim[video]'")
  fps = fps or sim.config.sample.fps
  frames_iter = rollout_frames(sim, fps=fps, **kwargs)
  first = next(frames_iter)
  # H.264 wants even sides; tiny frames are upscaled as save_video does.
  scale = max(1, 128 // max(first.shape[1:3]))
  size = (first.shape[1] * scale // 2 * 2, first.shape[2] * scale // 2 * 2)
  with mediapy.VideoWriter(path, shape=size, fps=fps) as writer:
    for frames in itertools.chain([first], frames_iter):
      for frame in frames.repeat(scale, axis=1).repeat(scale, axis=2):
        writer.add_image(frame[:size[0], :size[1]])
  return path
