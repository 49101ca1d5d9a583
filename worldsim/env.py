"""worldsim.Env: a learned sandbox that agents act in, many environments in one batch.

Each environment is a long rollout (worldsim/rollout.py) driven by actions. `reset` starts
every env from given context frames, or from a first frame the model draws (from the
caption); `step(actions)` makes the next token frame of every env, frames_per_step pixel
frames (the VAE's temporal factor x the patch's frames), conditioned on the actions of those
frames, with the last `window` frames as noise-augmented context (a KV cache for a
block-causal model). One jitted call per step runs the DiT over all envs at once, reads the
reward heads (when the model has them) and streams each env's new latents through the VAE's
causal decoder with that env's cache. Steps cost the same all episode long: the window slides.

Deterministic: env i's step k draws from fold_in(fold_in(key(seed), i), k) and reads nothing
of the other rows, so an env batched with others is the env alone, and a seed replays.

  env = worldsim.Env(worldsim.load("runs/physics_actions"), num_envs=16)
  obs = env.reset(seed=0)                              # (16, 1, H, W, 3) uint8
  frames, reward, terminated, info = env.step(np.zeros((16, 2)))

worldsim/gym_env.py wraps one env as a gymnasium.Env.
"""
import functools
import numbers
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from worldsim import actions as actions_lib
from worldsim import rollout
from worldsim.diffusion import flow, samplers
from worldsim.models import conditioning, patches
from worldsim.models import vae as vae_lib

# reset's first frame (no context) draws from fold_in(env key, RESET_DRAW): a stream no step
# index reaches, so it never repeats a step's noise.
RESET_DRAW = 2 ** 31 - 1


def _to_uint8(x):
  """[-1, 1] -> uint8, as loader.latent_to_pixels (on the device, inside the step)."""
  return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("model", "vae", "action_spec", "patch_size",
                                             "channels", "frame_grid", "window", "steps",
                                             "sampler", "guided"))
def _advance(model, vae, params, vae_variables, latent_stats, state, raw_actions, known, draw,
             text, guidance, shift, context_noise, *, action_spec, patch_size, channels,
             frame_grid, window, steps, sampler, guided):
  """One token frame for every env: denoised after its window, read by the heads, appended
  to the window and decoded to pixels.

    state        tokens (B, window F, P), valid (B, window), actions (B, window, A) and known
                 (B, window) of the window; keys (B, 2) the envs' keys; cache: the VAE
                 decoder's (None before the first frame, and always in pixel space)
    raw_actions  (B, frames_per_step x k) the step's per-pixel-frame actions (k floats, or 1
                 id) with known (B,) (0: unknown)
    draw         int32 index folded into every env's key: the step, or RESET_DRAW
  Returns (state, frames uint8 (B, n, H, W, 3), heads (B, F, 2) or None).
  """
  per_frame = frame_grid[0] * frame_grid[1]
  features = conditioning.action_features(raw_actions, action_spec.mode,
                                          action_spec.size) * known[:, None]
  token_actions = jnp.concatenate([state["actions"], features[:, None]], axis=1)
  token_known = jnp.concatenate([state["known"], known[:, None]], axis=1)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state["keys"], draw)
  out = rollout.denoise_chunk(
      model, params, state["tokens"], state["valid"], keys, text, guidance, shift,
      context_noise, jnp.repeat(token_actions, per_frame, axis=1),
      jnp.repeat(token_known, per_frame, axis=1), frame_grid=frame_grid, window=window,
      chunk=1, steps=steps, sampler=sampler, guided=guided, heads=model.cfg.reward_heads)
  tokens, heads = out if model.cfg.reward_heads else (out, None)
  state = dict(state,
               tokens=jnp.concatenate([state["tokens"], tokens], axis=1)[:, per_frame:],
               valid=jnp.concatenate([state["valid"], jnp.ones_like(state["valid"][:, :1])],
                                     axis=1)[:, 1:],
               actions=token_actions[:, 1:], known=token_known[:, 1:])
  z = patches.unpatchify(tokens, (1, *frame_grid), patch_size, channels)
  if vae is None:
    return state, _to_uint8(z), heads
  latent = z * latent_stats[1] + latent_stats[0]
  frames, state["cache"] = vae_lib.decode_chunk(vae, vae_variables, latent, state["cache"])
  return state, _to_uint8(frames), heads


class Env:
  """num_envs learned environments of one trained, action-conditioned world model.

  sim: a worldsim.WorldSim (worldsim.load(...)), or a checkpoint to load.
  height, width: the frames' size (default config.sample's). caption: the scene's caption for
    a captioned model (a str, or one per env); reset can change it. steps, sampler, guidance:
    the sampler per step (defaults: config.sample.steps, 'euler', config.sample.guidance).
  window: the context the model sees, in the frames it models (latent frames in latent space,
    a multiple of the patch's frames); default the longest clip it trained on less one step.
  context_noise: the noise level the context is re-noised to (rollout.CONTEXT_NOISE).
  """

  def __init__(self, sim, num_envs: int = 1, *, height: Optional[int] = None,
               width: Optional[int] = None, caption=None, steps: Optional[int] = None,
               sampler: str = "euler", window: Optional[int] = None,
               context_noise: float = rollout.CONTEXT_NOISE, guidance: Optional[float] = None):
    if sim is None or isinstance(sim, (str, os.PathLike)):
      from worldsim import sampling
      sim = sampling.load(sim)
    self.sim = sim
    self.action_spec = sim.action_spec           # train.step.ActionSpec: mode, size, pt
    if not sim.model.cfg.action_dim:
      raise ValueError("worldsim.Env needs an action-conditioned model (config.model.actions="
                       "'continuous' or 'discrete'); this one has config.model.actions='none'")
    if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral) or num_envs < 1:
      raise ValueError(f"num_envs={num_envs!r} must be a positive integer")
    self.num_envs = int(num_envs)
    s = sim.config.sample
    t_factor, s_factor = sim.factors
    pt, ph, pw = sim.patch_size
    self.height, self.width = int(height or s.height), int(width or s.width)
    if self.height % (s_factor * ph) or self.width % (s_factor * pw):
      raise ValueError(f"height={self.height}, width={self.width}: sides must be multiples of "
                       f"{s_factor * ph}, {s_factor * pw} (the VAE's factor times the patch)")
    self.frames_per_step = t_factor * pt          # one token frame
    self._frame_grid = (self.height // (s_factor * ph), self.width // (s_factor * pw))
    span = rollout.latent_frames_per_clip(sim.config) // pt
    window = window or max(1, span - 1) * pt
    if window % pt or window < pt:
      raise ValueError(f"window={window} must be a positive multiple of the patch's {pt} frames")
    self._window = window // pt                    # in token frames
    self.steps = int(steps or s.steps)
    self.sampler = samplers.get(sampler).name
    self.guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    self.context_noise = float(context_noise)
    self.caption = caption
    d = sim.config.diffusion
    per_frame = self._frame_grid[0] * self._frame_grid[1]
    self._shift = flow.shift_for_tokens((self._window + 1) * per_frame, d.shift_base_tokens,
                                        d.max_shift)
    self._latent_stats = None if sim.vae is None else (jnp.asarray(sim.shift),
                                                       jnp.asarray(sim.scale))
    self._state, self._text, self._step_index = None, None, 0

  @property
  def action_shape(self) -> tuple:
    """One env's action for one pixel frame: (action_size,) floats, or () for an id."""
    return actions_lib.frame_shape(self.action_spec)

  # ------------------------------------------------------------------------------- API

  def reset(self, seed: int = 0, context: Optional[np.ndarray] = None, caption=None, *,
            context_actions=None, env_ids=None) -> np.ndarray:
    """Starts every env; returns the observation, uint8 (num_envs, n, H, W, 3).

    context: uint8 (n, H, W, 3) frames every env continues from, or (num_envs, n, H, W, 3)
      one set per env; they come back as given. n is 1 + t k pixel frames giving whole
      patches (t: the VAE's temporal factor). Without context each env's first frame(s),
      1 + t (pt - 1) of them, are drawn by the model from the caption.
    caption: replaces the Env's caption (a str, or one per env).
    context_actions: the actions played on the context frames, one per frame ((n, action_size)
      floats or (n,) ids, or one set per env with a leading num_envs axis); default unknown.
      The last context frame's action shapes the first frame of the next step, so give them
      when they are known (an emulator's, a recorded episode's).
    env_ids: the random streams the envs draw from (default 0 .. num_envs - 1): env j draws
      as env env_ids[j] of a batch would, e.g. to replay one env of a batch alone.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
      raise ValueError(f"seed={seed!r} must be an integer")
    b, sim = self.num_envs, self.sim
    env_ids = np.arange(b) if env_ids is None else np.asarray(env_ids)
    if env_ids.shape != (b,):
      raise ValueError(f"env_ids: one id per env ({b}); got shape {env_ids.shape}")
    context = None if context is None else self._check_context(context)
    if caption is not None:
      self.caption = caption
    captions = list(self.caption) if isinstance(self.caption, (list, tuple)) else [self.caption] * b
    if len(captions) != b:
      raise ValueError(f"caption: {len(captions)} captions for {b} envs")
    self._text = sim._caption_batch(captions)
    base = jax.random.PRNGKey(int(seed))
    keys = jnp.stack([jax.random.fold_in(base, int(i)) for i in env_ids])
    per_frame = self._frame_grid[0] * self._frame_grid[1]
    width = sim.model.cfg.action_dim
    state = dict(tokens=jnp.zeros((b, self._window * per_frame, sim.token_dim), jnp.float32),
                 valid=jnp.zeros((b, self._window), bool),
                 actions=jnp.zeros((b, self._window, width), jnp.float32),
                 known=jnp.zeros((b, self._window), jnp.float32), keys=keys, cache=None)
    self._step_index = 0
    if context is None:                            # the model draws the first token frame
      self._state, frames, _ = self._advance(state, None, RESET_DRAW)
      return np.asarray(frames)
    z = np.stack([sim._encode(c) for c in context])          # (B, T', H', W', C)
    pt = sim.patch_size[0]
    if z.shape[1] % pt:
      raise ValueError(f"{context.shape[1]} context frames give {z.shape[1]} model frames; "
                       f"need a multiple of the patch's {pt}")
    tokens = patches.patchify(z, sim.patch_size)
    keep = min(z.shape[1] // pt, self._window)
    state["tokens"] = state["tokens"].at[:, (self._window - keep) * per_frame:].set(
        tokens[:, tokens.shape[1] - keep * per_frame:])
    state["valid"] = state["valid"].at[:, self._window - keep:].set(True)
    if context_actions is not None:
      per_env = actions_lib.held(context_actions, self.action_spec, axis=0, length=b)
      if len(per_env) != b or per_env.shape[1] != context.shape[1]:
        raise ValueError(f"context_actions: one per context frame ({context.shape[1]}), "
                         f"optionally per env ({b}); got shape {per_env.shape}")
      laid_out = [actions_lib.token_frame_actions(a, self.action_spec, sim.factors[0],
                                                  z.shape[1] // pt) for a in per_env]
      features, known = (np.stack(x)[:, -keep:] for x in zip(*laid_out))
      state["actions"] = state["actions"].at[:, self._window - keep:].set(features)
      state["known"] = state["known"].at[:, self._window - keep:].set(known)
    if sim.vae is not None:                        # warms each env's decoder cache
      latent = jnp.asarray(z) * self._latent_stats[1] + self._latent_stats[0]
      _, state["cache"] = vae_lib.decode_chunk(sim.vae.model, sim.vae.variables, latent)
    self._state = state
    return context.copy()

  def step(self, actions):
    """Advances every env by frames_per_step pixel frames under `actions`:
      continuous: (num_envs, frames_per_step, action_size) floats, one per frame, or
                  (num_envs, action_size), held over the step's frames
      discrete:   (num_envs, frames_per_step) integer ids in [0, action_size), or (num_envs,)
      None:       the actions are unknown to the model (it draws what any action might do)
    Returns (frames uint8 (num_envs, frames_per_step, H, W, 3), reward float32 (num_envs,),
    terminated bool (num_envs,), info). reward and terminated come from the model's reward
    heads, averaged over the step's tokens (terminated: sigmoid of the mean logit > 1/2);
    zeros and False for a model without heads. info: step (the index k drawn from) and, with
    heads, terminal_probability (num_envs,). A terminated env keeps stepping until reset.
    """
    if self._state is None:
      raise RuntimeError("call reset() before step()")
    raw, known = self._check_actions(actions)
    self._state, frames, heads = self._advance(self._state, (raw, known), self._step_index)
    info = {"step": self._step_index}
    self._step_index += 1
    if heads is None:
      return (np.asarray(frames), np.zeros(self.num_envs, np.float32),
              np.zeros(self.num_envs, bool), info)
    reward, logit = np.asarray(jnp.mean(heads, axis=1)).T
    info["terminal_probability"] = np.asarray(jax.nn.sigmoid(logit))
    return np.asarray(frames), reward.astype(np.float32), logit > 0, info

  # --------------------------------------------------------------------------- internals

  def _advance(self, state, actions, draw: int):
    sim, vae = self.sim, self.sim.vae
    raw, known = self._check_actions(None) if actions is None else actions
    guided = self._text is not None and self.guidance != 1.0
    return _advance(
        sim.model, None if vae is None else vae.model, sim.params,
        None if vae is None else vae.variables, self._latent_stats, state, jnp.asarray(raw),
        jnp.asarray(known), jnp.int32(draw), self._text, self.guidance, self._shift,
        self.context_noise, action_spec=self.action_spec,
        patch_size=tuple(sim.patch_size), channels=sim.model_channels,
        frame_grid=self._frame_grid, window=self._window, steps=self.steps,
        sampler=self.sampler, guided=guided)

  def _check_actions(self, actions) -> tuple:
    """The step's actions -> raw (B, frames_per_step x k) float32 and known (B,) float32."""
    b, n, spec = self.num_envs, self.frames_per_step, self.action_spec
    if actions is None:
      return np.zeros((b, n * spec.raw_width), np.float32), np.zeros(b, np.float32)
    per_frame, per_step = (b, n, *self.action_shape), (b, *self.action_shape)
    a = actions_lib.held(actions, spec, axis=1, length=n)     # one per step: held over it
    if a.shape != per_frame:
      if spec.mode == "continuous":
        names = "floats (num_envs, frames_per_step, action_size)", "(num_envs, action_size)"
      else:
        names = "integer ids (num_envs, frames_per_step)", "(num_envs,)"
      raise ValueError(f"actions: {names[0]} = {per_frame}, or {names[1]} = {per_step} held "
                       f"over the step's frames; got shape {np.shape(actions)}")
    return actions_lib.check_actions(a, spec).reshape(b, -1), np.ones(b, np.float32)

  def _check_context(self, context) -> np.ndarray:
    context = np.asarray(context)
    if context.ndim == 4:
      context = np.broadcast_to(context[None], (self.num_envs, *context.shape))
    want = (self.height, self.width, self.sim.channels)
    if (context.ndim != 5 or context.dtype != np.uint8 or len(context) != self.num_envs
        or context.shape[2:] != want):
      raise ValueError(f"context must be uint8 (n, {', '.join(map(str, want))}) or "
                       f"({self.num_envs}, n, {', '.join(map(str, want))}); got "
                       f"{context.dtype} {context.shape}")
    t = self.sim.factors[0]
    if (context.shape[1] - 1) % t:
      raise ValueError(f"{context.shape[1]} context frames: the VAE needs 1 + {t}k")
    return context
