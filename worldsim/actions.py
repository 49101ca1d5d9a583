"""Actions as users give them (per pixel frame) -> what the DiT reads (per token frame).

A user's actions come one per pixel frame: config.model.action_size floats each
('continuous', e.g. the physics world's impulse) or one integer id each ('discrete', e.g. an
Atari button). The DiT reads them per token (models/conditioning.py): a token spans the
patch's pt model frames, each holding its t pixel frames' actions side by side (t: the VAE's
temporal factor, 1 in pixel space), with a known flag that says whether they were given.
sample(), the long rollouts and worldsim.Env all go through here, so they lay actions out as
the latent dataset did in training. `spec` is the config's train.step.ActionSpec
(step.action_spec(config.model)).
"""
import jax.numpy as jnp
import numpy as np

from worldsim.models import conditioning


def frame_shape(spec) -> tuple:
  """One pixel frame's action as users give it: (size,) floats (continuous), () an id."""
  return (spec.size,) if spec.mode == "continuous" else ()


def held(actions, spec, axis: int, length: int) -> np.ndarray:
  """`actions`, (B, n, *frame_shape), as an array; given one axis short, without `axis`
  (one set for every clip or env: axis 0; one action held over a step's frames: axis 1),
  repeated `length` times along it."""
  a = np.asarray(actions)
  if a.ndim == 1 + len(frame_shape(spec)):
    a = np.broadcast_to(np.expand_dims(a, axis), (*a.shape[:axis], length, *a.shape[axis:]))
  return a


def check_actions(actions, spec, name: str = "actions") -> np.ndarray:
  """Raw per-pixel-frame actions -> float32 (..., spec.raw_width): size floats each
  (continuous), or one id each (discrete: the input has no trailing axis, ids are integers in
  [0, size)). Raises ValueError naming what is wrong."""
  a, mode, size = np.asarray(actions), spec.mode, spec.size
  if mode == "continuous":
    if a.ndim < 1 or a.shape[-1] != size:
      raise ValueError(f"{name}: continuous actions end in config.model.action_size={size} "
                       f"floats per frame; got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
      raise ValueError(f"{name} must be finite numbers; got {a.dtype} {a.shape}")
    return a.astype(np.float32)
  if mode == "discrete":
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
      raise ValueError(f"{name}: discrete actions are integer ids; got {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
      raise ValueError(f"{name}: discrete actions are integer ids; got non-integer values")
    if a.size and (a.min() < 0 or a.max() >= size):
      raise ValueError(f"{name}: discrete action ids must be in [0, {size}) "
                       f"(config.model.action_size); got {a.min()} .. {a.max()}")
    return a.astype(np.float32)[..., None]
  raise ValueError(f"{name} were given to a model without action conditioning "
                   f"(config.model.actions={mode!r}): leave them out")


def token_frame_actions(actions, spec, temporal_factor: int, num_token_frames: int) -> tuple:
  """A video's per-pixel-frame actions from its frame 0 -> each token frame's action features
  (the DiT's action_dim wide) and whether they are known.

  actions: (n, size) floats (continuous) or (n,) ids (discrete), n at most the video's
    frames; frames past n (and every frame when actions is None) are unknown.
  Model frame 0 holds pixel frame 0 behind t - 1 zero rows and model frame j > 0 pixel frames
  t (j - 1) + 1 .. t j, as the latent dataset lays them out (latents.actions_per_latent_frame);
  token frame u holds model frames u pt .. (u + 1) pt - 1. A token frame is known when all of
  its frames' actions are given. Returns float32 (num_token_frames, action_dim) features
  (zero where unknown) and float32 (num_token_frames,) known flags.
  """
  t, pt, width = temporal_factor, spec.frames_per_patch, spec.raw_width
  rows = num_token_frames * pt * t                 # pixel rows, the t - 1 padding included
  raw = np.zeros((rows, width), np.float32)
  given = np.zeros(rows, bool)
  given[:t - 1] = True
  if actions is not None:
    a = check_actions(actions, spec).reshape(-1, width)
    if len(a) > rows - (t - 1):
      raise ValueError(f"actions for {len(a)} frames; the video has {rows - (t - 1)}")
    raw[t - 1:t - 1 + len(a)], given[t - 1:t - 1 + len(a)] = a, True
  features = np.asarray(conditioning.action_features(
      jnp.asarray(raw.reshape(num_token_frames, -1)), spec.mode, spec.size))
  known = given.reshape(num_token_frames, -1).all(axis=1)
  return features * known[:, None], known.astype(np.float32)
