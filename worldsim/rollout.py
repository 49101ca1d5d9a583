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
as they come. An action-conditioned model reads each frame's actions (`actions=`, per pixel
frame; worldsim/actions.py lays them out per token); worldsim/env.py steps a batch of such
rollouts one token frame at a time under an agent's actions (denoise_chunk is batched).

  sim = worldsim.load("runs/physics_tiny")
  for frames in rollout_frames(sim, seconds=60, caption="a ball rolls down a ramp"): ...
  save_rollout("minute.mp4", sim, seconds=60)
"""
import functools
import math
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from data_pipelines import loader
from worldsim import actions as actions_lib
from worldsim.diffusion import flow, samplers
from worldsim.models import dit, patches
from worldsim.models import vae as vae_lib
from worldsim.train import step as step_lib

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


def _rows(a, rows: int):
  """An array of 1 row, or of a divisor of `rows` rows, as `rows` rows: broadcast, or stacked
  whole ([a; a] when guidance doubles a batch, matching x's [x; x]). None stays None."""
  if a is None or a.shape[0] == rows:
    return a
  if a.shape[0] == 1:
    return jnp.broadcast_to(a, (rows, *a.shape[1:]))
  return jnp.concatenate([a] * (rows // a.shape[0]))


def velocity_fn(model, params, positions, segment_ids, text, guidance, guided, *, held=None,
                held_level=0.0, kv_cache=None, actions=None, actions_known=None):
  """v(x, t) of the DiT over B rows (2B when guided: caption and null caption in one batch,
  v = v_null + w (v_caption - v_null)), for sample() and the rollouts alike.
  text: (caption, null caption) or None. held: (L,) bool, tokens (a context) kept at noise
  level held_level with velocity 0; the others are at t. positions, segment_ids, actions and
  actions_known have 1 or B rows."""
  def forward(x, t, caption):
    rows, length = x.shape[0], x.shape[1]
    level = t if held is None else jnp.where(held, held_level, t)
    text_args = {} if caption is None else dict(text=caption[0], text_segment_ids=caption[1])
    action_args = {} if actions is None else dict(actions=_rows(actions, rows),
                                                  actions_known=_rows(actions_known, rows))
    return model.apply({"params": params}, x, _rows(positions, rows),
                       _rows(segment_ids, rows), jnp.broadcast_to(level, (rows, length)),
                       kv_cache=kv_cache, **text_args, **action_args)

  def velocity(x, t):
    if not guided:
      v = forward(x, t, None if text is None else text[0])
    else:
      both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text[0], text[1])
      v_caption, v_null = jnp.split(forward(jnp.concatenate([x, x]), t, both), 2)
      v = v_null + guidance * (v_caption - v_null)
    return v if held is None else jnp.where(held[:, None], 0.0, v)

  return velocity


@functools.partial(jax.jit, static_argnames=("model", "frame_grid", "window", "chunk", "steps",
                                             "sampler", "guided", "use_cache", "heads"))
def denoise_chunk(model, params, window_tokens, window_valid, rng, text, guidance, shift,
                  context_noise, actions=None, actions_known=None, *, frame_grid, window, chunk,
                  steps, sampler, guided, use_cache=None, heads=False):
  """One chunk of `chunk` token frames after a window of `window` token frames, for B rows
  at once; row i reads only its own inputs and key, so it is the row drawn alone.

    window_tokens (B, window * F, P) the clean context (F = tokens per frame); window_valid
                  (window,) or (B, window) bool: False for frames not made yet (padding)
    rng           (B, 2) keys, one per row (or one key when B = 1)
    text          (caption, null caption) of a captioned model (1 or B rows each), else None
    actions       (B, (window + chunk) * F, action_dim) an action-conditioned model's per-token
                  actions of window and chunk, with actions_known (B, (window + chunk) * F)
                  (1: given, 0: unknown); None for a model without actions
    use_cache     None: a KV cache exactly when the model is block-causal (for which both
                  paths give the same chunk; tests compare them)
    heads         also read DiT.heads on the finished chunk (clean, after its window)
  Returns the chunk's clean tokens (B, chunk * F, P), and with heads the per-token
  (reward, terminal logit) (B, chunk * F, 2).
  """
  b = window_tokens.shape[0]
  per_frame = frame_grid[0] * frame_grid[1]
  context_length = window * per_frame
  keys = rng.reshape(-1, rng.shape[-1])
  if keys.shape[0] != b:
    raise ValueError(f"{keys.shape[0]} keys for {b} rows: give one key per row")
  positions = jnp.asarray(patches.positions((window + chunk, *frame_grid)))[None]
  valid = jnp.broadcast_to(window_valid, (b, window))
  segment_ids = jnp.concatenate([jnp.repeat(valid, per_frame, axis=1).astype(jnp.int32),
                                 jnp.ones((b, chunk * per_frame), jnp.int32)], axis=1)
  text = None if text is None else jax.tree.map(lambda a: _rows(a, b), text)

  # Per row, so a row's draw ignores the batch around it; one draw for context and chunk
  # (each threefry call site costs seconds of XLA compile time on a CPU).
  eps = jax.vmap(lambda key: jax.random.normal(
      key, ((window + chunk) * per_frame, window_tokens.shape[-1])))(keys)
  context_eps, x1 = eps[:, :context_length], eps[:, context_length:]
  context = flow.noise(window_tokens, context_eps, context_noise)
  split = lambda a: (None, None) if a is None else (a[:, :context_length], a[:, context_length:])
  window_actions, chunk_actions = split(actions)
  window_known, chunk_known = split(actions_known)
  if model.cfg.causal if use_cache is None else use_cache:   # window once into a KV cache
    # Guided: one cache row per caption (later blocks' keys depend on the caption).
    rows = 2 * b if guided else b
    captions = None if text is None else (
        jax.tree.map(lambda c, n: jnp.concatenate([c, n]), text[0], text[1]) if guided
        else text[0])
    caption_args = {} if captions is None else dict(text=captions[0],
                                                    text_segment_ids=captions[1])
    action_args = lambda a, k: {} if a is None else dict(actions=_rows(a, rows),
                                                         actions_known=_rows(k, rows))
    cache = dit.empty_cache(model.cfg, rows, (window + chunk) * per_frame)
    cache = model.apply({"params": params}, _rows(context, rows),
                        _rows(positions[:, :context_length], rows),
                        _rows(segment_ids[:, :context_length], rows), cache,
                        noise_level=jnp.full((rows, context_length), context_noise),
                        method=dit.DiT.append_to_cache, **caption_args,
                        **action_args(window_actions, window_known))
    velocity = velocity_fn(model, params, positions[:, context_length:],
                           segment_ids[:, context_length:], text, guidance, guided,
                           kv_cache=cache, actions=chunk_actions, actions_known=chunk_known)
    x0 = samplers.sample(velocity, x1, steps, shift, sampler)[0]
    if not heads:
      return x0
    # The conditional rows of the cache's layout (caption first when guided).
    out = model.apply({"params": params}, _rows(x0, rows),
                      _rows(positions[:, context_length:], rows),
                      _rows(segment_ids[:, context_length:], rows),
                      jnp.zeros((rows, chunk * per_frame)), kv_cache=cache,
                      method=dit.DiT.heads, **caption_args,
                      **action_args(chunk_actions, chunk_known))
    return x0, out[:b]
  is_context = jnp.arange(positions.shape[1]) < context_length
  velocity = velocity_fn(model, params, positions, segment_ids, text, guidance, guided,
                         held=is_context, held_level=context_noise, actions=actions,
                         actions_known=actions_known)
  x0 = samplers.sample(velocity, jnp.concatenate([context, x1], axis=1), steps, shift,
                       sampler)[0]
  if not heads:
    return x0[:, context_length:]
  out = model.apply({"params": params}, x0, _rows(positions, b), segment_ids,
                    jnp.broadcast_to(jnp.where(is_context, context_noise, 0.0)[None],
                                     segment_ids.shape),
                    method=dit.DiT.heads,
                    **({} if text is None else dict(text=text[0][0],
                                                    text_segment_ids=text[0][1])),
                    **({} if actions is None else dict(actions=actions,
                                                       actions_known=actions_known)))
  return x0[:, context_length:], out[:, context_length:]


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
                   context_noise: float = CONTEXT_NOISE, actions: Optional[np.ndarray] = None,
                   progress: bool = True) -> Iterator[np.ndarray]:
  """Yields uint8 frames (n, H, W, 3) chunk by chunk, num_frames (or seconds * fps) in all.

  `sim` is a loaded worldsim.sampling.WorldSim. `chunk` and `window` count the frames the DiT
  models (latent frames in latent space; multiples of the patch's frames); by default they
  split the longest clip the model trained on in halves. `context`: uint8 frames to continue
  (they come first, exactly). Deterministic for a seed; chunk k draws from fold_in(seed, k).
  `actions`: an action-conditioned model's per-pixel-frame actions from the video's frame 0
  (the context's frames included): (n, action_size) floats (continuous) or (n,) ids
  (discrete), n <= num_frames; frames past n, or all without them, are unknown to the model.
  """
  s, cfg = sim.config.sample, sim.model.cfg
  if actions is not None and not cfg.action_dim:
    raise ValueError("actions were given to a model without action conditioning "
                     "(config.model.actions='none'): leave them out")
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
    made = len(z)

  num_chunks = math.ceil(max(total_model_frames - made, 0) / chunk)
  if cfg.action_dim:      # every token frame's actions, from frame 0 (the context's included)
    if actions is not None and len(actions) > num_frames:
      raise ValueError(f"actions for {len(actions)} frames; the video has num_frames={num_frames}")
    frame_actions, frame_known = actions_lib.token_frame_actions(
        actions, step_lib.action_spec(sim.config.model), t_factor,
        made // pt + num_chunks * chunk_t)

  def token_actions(first: int, count: int) -> tuple:
    """Token frames first .. first + count - 1 (before 0: padding, unknown) per token."""
    index = np.arange(first, first + count)
    inside = index >= 0
    features = frame_actions[np.maximum(index, 0)] * inside[:, None]
    known = frame_known[np.maximum(index, 0)] * inside
    return (np.repeat(features, per_frame, axis=0)[None],
            np.repeat(known, per_frame, axis=0)[None])

  if context is not None:
    decode(z)                                               # warms the decoder's cache
    emitted = len(context)
    yield np.asarray(context)

  text = sim._captions(caption)
  guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
  guided = text is not None and guidance != 1.0
  d = sim.config.diffusion
  shift = flow.shift_for_tokens((window_t + chunk_t) * per_frame, d.shift_base_tokens, d.max_shift)
  base = jax.random.PRNGKey(seed)
  for k in tqdm(range(num_chunks), desc="rollout", unit="chunk", disable=not progress):
    made_t = made // pt
    model_actions = (None, None) if not cfg.action_dim else tuple(
        jnp.asarray(a) for a in token_actions(made_t - window_t, window_t + chunk_t))
    tokens = np.asarray(denoise_chunk(
        sim.model, sim.params, jnp.asarray(window_tokens), jnp.asarray(window_valid),
        jax.random.fold_in(base, k), text, guidance, shift, context_noise, *model_actions,
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
  """Writes rollout_frames to an mp4 as they come (video.save_video over the chunks, ffmpeg
  from imageio-ffmpeg), so a video of any length is written at constant memory. Frames under
  128 pixels are upscaled by a whole factor towards 128. Returns the path."""
  from worldsim import video as video_lib
  if not video_lib._ffmpeg_ready():
    raise ImportError("save_rollout writes mp4 with mediapy and imageio-ffmpeg: "
                      "pip install 'worldsim[video]'")
  fps = fps or sim.config.sample.fps
  return video_lib.save_video(path, rollout_frames(sim, fps=fps, **kwargs), fps, scale="auto")
