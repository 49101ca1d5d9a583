"""Other takes of a clip: the same scene and initial state, run again by the engine with one
thing changed. worldsim.eval uses them as references and as known-wrong physics:

  simulate_take(seed, index, options, jitter=0.5)        # a second take: the physical variance
  simulate_take(seed, index, options, gravity_scale=-1)  # gravity reversed
  simulate_take(seed, index, options, actions=a)         # the engine as a model driven by a
  simulate_take(seed, index, options, objects_collide=False)  # objects pass through each other

With the defaults it returns simulate_clip(seed, index, options) exactly.
"""
import numpy as np
import pymunk

from data_pipelines.physics_world.simulate import ClipOptions, simulate_clip


def simulate_take(seed: int, index: int, options: ClipOptions = ClipOptions(), *,
                  jitter: float = 0.0, jitter_seed: int = 1, gravity_scale: float = 1.0,
                  actions: np.ndarray | None = None, objects_collide: bool = True) -> dict:
  """Clip `index` of the build with `seed`, simulated again with one change.

  jitter: pixels. Every dynamic body starts displaced by N(0, jitter) px and with its velocity
    changed by N(0, jitter / duration) px/s, drawn from (seed, index, jitter_seed): two takes
    of one physical set-up never start exactly alike, and chaotic scenes (collisions, stacks,
    double pendulums) amplify the difference, as two real recordings would.
  gravity_scale: multiplies the scene's gravity (-1 reverses it; the record stores the result).
  actions: (T, 2) impulses replacing the clip's own (see builder.py for their units).
  objects_collide: False puts the objects in one collision group, so they pass through each
    other (scenery still stops them): interpenetration that the engine never makes itself.
  """

  def adjust(scene, clip_actions, duration):
    scene.space.gravity = tuple(gravity_scale * g for g in scene.space.gravity)
    if jitter:
      rng = np.random.default_rng((seed, index, jitter_seed))
      for item in scene.objects:
        body = item.body
        if body.body_type != pymunk.Body.DYNAMIC:
          continue  # scenery, the occluding wall and the driven cup are placed exactly
        dx, dy = rng.normal(0.0, jitter, 2)
        dvx, dvy = rng.normal(0.0, jitter / duration, 2)
        body.position = (body.position[0] + dx, body.position[1] + dy)
        body.velocity = (body.velocity[0] + dvx, body.velocity[1] + dvy)
    if not objects_collide:
      group = pymunk.ShapeFilter(group=1)  # shapes in one non-zero group never collide
      for drawable in scene.drawables:
        if drawable.owner >= 0 and isinstance(drawable.item, pymunk.Shape):
          drawable.item.filter = group
    if actions is None:
      return clip_actions
    if np.shape(actions) != np.shape(clip_actions):
      raise ValueError(f'actions must have shape {np.shape(clip_actions)}, got '
                       f'{np.shape(actions)}')
    return actions

  return simulate_clip(seed, index, options, adjust=adjust)

