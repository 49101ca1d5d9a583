"""Simulates and renders one clip: `simulate_clip(seed, index, options) -> dict`.

Clip `index` of a build with `seed` depends only on (seed, index): every random choice comes
from np.random.default_rng((seed, index)), and pymunk is deterministic for a fixed sequence of
calls. The returned dict is the TFDS record (see builder.py for the conventions).

Timing: frame t is observed at time t / fps. The physics steps `substeps` times per frame with
pymunk's semi-implicit Euler integrator and no damping, so between contacts a body's sampled
positions lie exactly on a parabola whose acceleration is the stored gravity. actions[t] is an
impulse applied to the agent's centre of mass right after frame t is observed, so it first
shows in frame t + 1 (it changes the agent's velocity by actions[t] / mass).
"""
import dataclasses
import math

import numpy as np

from data_pipelines.physics_world.render import render
from data_pipelines.physics_world.scenes import SCENES

FPS_CHOICES = (8.0, 10.0, 12.0, 15.0, 20.0, 24.0, 30.0)
BACKGROUNDS = ((18, 18, 24), (30, 26, 26), (22, 32, 44), (36, 36, 36))
STEPS_PER_CLIP = 512  # keeps each step's motion around a pixel, whatever the clip length


@dataclasses.dataclass(frozen=True)
class ClipOptions:
  """Ranges that the clips are drawn from (inclusive)."""
  min_side: int = 32
  max_side: int = 128
  min_frames: int = 8
  max_frames: int = 64
  scenes: tuple[str, ...] = tuple(SCENES)
  active_fraction: float = 0.5  # the fraction of clips whose agent gets pushed
  push_probability: float = 0.1  # per frame, in an active clip

  def __post_init__(self):
    if not 16 <= self.min_side <= self.max_side:  # smaller frames cannot hold the layouts
      raise ValueError(f'need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}')
    if not 2 <= self.min_frames <= self.max_frames:
      raise ValueError(f'need 2 <= min_frames <= max_frames, got {self.min_frames}, '
                       f'{self.max_frames}')
    unknown = set(self.scenes) - set(SCENES)
    if unknown or not self.scenes:
      raise ValueError(f'scenes must be a non-empty subset of {sorted(SCENES)}, got {self.scenes}')


def _frame_size(rng, options):
  """Height and width in [min_side, max_side] with an aspect ratio in [1/2, 2]."""
  height = int(rng.integers(options.min_side, options.max_side + 1))
  aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
  # clipping the width into range moves the aspect ratio towards 1, never past the bounds
  width = int(np.clip(round(height * aspect), options.min_side, options.max_side))
  return height, width


def _actions(rng, scene, num_frames, duration, options):
  """Sparse random pushes of the agent: impulses in mass * pixels / second."""
  actions = np.zeros((num_frames, 2), np.float32)
  if scene.agent < 0 or rng.random() >= options.active_fraction:
    return actions
  pushed = rng.random(num_frames - 1) < options.push_probability
  pushed[rng.integers(num_frames - 1)] = True  # an active clip has at least one push
  speed = rng.uniform(0.3, 1.0, num_frames - 1) * scene.unit / duration
  direction = rng.uniform(0, 2 * np.pi, num_frames - 1)
  impulse = scene.objects[scene.agent].mass * speed[:, None] * np.stack(
      [np.cos(direction), np.sin(direction)], axis=1)
  actions[:-1] = np.where(pushed[:, None], impulse, 0.0)  # the last one would never show
  return actions


def _caption(scene, actions, position, angle, visible):
  caption = scene.caption(position, angle, visible)
  pushes = int(actions.any(axis=1).sum())
  if pushes:
    times = 'once' if pushes == 1 else f'{pushes} times'
    caption += f'; the {scene.objects[scene.agent].name} is pushed {times}'
  return caption


def simulate_clip(seed: int, index: int, options: ClipOptions = ClipOptions(),
                  adjust=None) -> dict:
  """Simulates clip `index` of the build with `seed`; returns its record as numpy arrays.

  adjust(scene, actions, duration) -> actions, when given, may change the laid-out scene and
  the actions before the first step (takes.py: another take of the same clip for evaluation).
  """
  rng = np.random.default_rng((seed, index))
  family = options.scenes[rng.integers(len(options.scenes))]
  height, width = _frame_size(rng, options)
  num_frames = int(rng.integers(options.min_frames, options.max_frames + 1))
  fps = float(rng.choice(FPS_CHOICES))
  duration = num_frames / fps
  background = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]) + rng.integers(0, 8, 3)
  scene = SCENES[family](rng, width, height, duration)
  actions = _actions(rng, scene, num_frames, duration, options)
  if adjust is not None:  # after every draw from rng, so the clip's other choices stay
    actions = np.asarray(adjust(scene, actions, duration), np.float32)

  substeps = math.ceil(STEPS_PER_CLIP / num_frames)
  dt = 1.0 / (fps * substeps)
  bodies = [o.body for o in scene.objects]
  num_objects = len(bodies)
  video = np.empty((num_frames, height, width, 3), np.uint8)
  position = np.empty((num_frames, num_objects, 2), np.float32)
  velocity = np.empty_like(position)
  angle = np.empty((num_frames, num_objects), np.float32)
  visible = np.empty((num_frames, num_objects), bool)
  for t in range(num_frames):
    position[t] = [tuple(b.position) for b in bodies]
    velocity[t] = [tuple(b.velocity) for b in bodies]
    angle[t] = [b.angle for b in bodies]
    video[t], visible[t] = render(scene.drawables, width, height, background, num_objects)
    if actions[t].any():
      agent = bodies[scene.agent]  # a world-frame impulse (the local-frame one spins with the body)
      agent.apply_impulse_at_world_point(tuple(map(float, actions[t])), agent.position)
    for step in range(substeps):
      scene.drive((t * substeps + step) * dt)
      scene.space.step(dt)

  objects = scene.objects
  return {
      'video': video,
      'fps': np.float32(fps),
      'caption': _caption(scene, actions, position, angle, visible),
      'actions': actions,
      'action_object': np.int32(scene.agent),
      'states': {'position': position, 'velocity': velocity, 'angle': angle,
                 'visible': visible},
      'object_names': [o.name for o in objects],
      'params': {
          'gravity': np.asarray(scene.space.gravity, np.float32),
          'mass': np.array([o.mass for o in objects], np.float32),
          'elasticity': np.array([o.elasticity for o in objects], np.float32),
          'friction': np.array([o.friction for o in objects], np.float32),
      },
      'scene': family,
      'seed': np.int64(seed),
      'index': np.int64(index),
  }
