"""worldsim.GymEnv: one worldsim.Env as a gymnasium.Env, for agents written against gymnasium.

  env = worldsim.GymEnv(worldsim.load("runs/atari_world"), max_episode_steps=500)
  obs, info = env.reset(seed=0)                        # obs: the last frame (H, W, 3) uint8
  obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

A step is one Env step (frames_per_step pixel frames under one action, held over them); the
observation is its last frame and info["frames"] all of them. gymnasium is imported here only
(pip install 'worldsim[gym]'), so `import worldsim` does not need it.
"""
from typing import Optional

import numpy as np

try:
  import gymnasium
  from gymnasium import spaces
except ImportError as error:                 # pragma: no cover (the test extra installs it)
  raise ImportError("worldsim.GymEnv needs gymnasium: pip install 'worldsim[gym]'") from error

from worldsim import env as env_lib


class GymEnv(gymnasium.Env):
  """A gymnasium.Env of one learned environment.

  observation_space: Box uint8 (H, W, 3), the step's last frame. action_space: Box of
  action_size floats in action_bounds (continuous: the agent's range; the model itself reads
  any floats, so set them to the source's, e.g. the physics world's impulses), or
  Discrete(action_size). max_episode_steps: steps after which `truncated` is True (None:
  never). reset's options: {'context': uint8 frames, 'caption': ...} as Env.reset takes them.
  Other keyword arguments go to worldsim.Env (height, width, caption, steps, sampler, ...).
  """
  metadata = {"render_modes": ["rgb_array"]}

  def __init__(self, sim, *, max_episode_steps: Optional[int] = None,
               action_bounds: tuple = (-1.0, 1.0), render_mode: Optional[str] = None,
               **env_kwargs):
    self.env = env_lib.Env(sim, 1, **env_kwargs)
    if render_mode not in (None, "rgb_array"):
      raise ValueError(f"render_mode={render_mode!r}: GymEnv renders 'rgb_array' (or None)")
    self.render_mode = render_mode
    self.metadata = dict(self.metadata, render_fps=self.env.sim.config.sample.get("fps", 8))
    self.max_episode_steps = max_episode_steps
    self.observation_space = spaces.Box(0, 255, (self.env.height, self.env.width, 3), np.uint8)
    if self.env.action_spec.mode == "continuous":
      low, high = action_bounds
      self.action_space = spaces.Box(np.float32(low), np.float32(high), self.env.action_shape,
                                     np.float32)
    else:
      self.action_space = spaces.Discrete(self.env.action_spec.size)
    self._frame, self._steps = None, 0

  def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
    super().reset(seed=seed)
    if seed is None:                          # gymnasium's stream, seeded at the first reset
      seed = int(self.np_random.integers(2 ** 31))
    options = dict(options or {})
    unknown = set(options) - {"context", "caption"}
    if unknown:
      raise ValueError(f"options: unknown keys {sorted(unknown)}; GymEnv reads 'context' and "
                       f"'caption'")
    frames = self.env.reset(seed=seed, **options)[0]
    self._frame, self._steps = frames[-1], 0
    return frames[-1].copy(), {"frames": frames}

  def step(self, action):
    frames, reward, terminated, info = self.env.step(np.asarray(action)[None])
    self._steps += 1
    self._frame = frames[0, -1]
    truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
    info = dict(info, frames=frames[0])
    if "terminal_probability" in info:
      info["terminal_probability"] = float(info["terminal_probability"][0])
    return (self._frame.copy(), float(reward[0]), bool(terminated[0]), bool(truncated), info)

  def render(self):
    return None if self._frame is None else self._frame.copy()
