"""physics_world: clips of 2D rigid-body scenes simulated with pymunk, as a TFDS dataset.

  builder = physics_world.build('/data', num_clips=1000, seed=0)  # ArrayRecord, no TensorFlow
  source = physics_world.load('/data')        # len(source), source[i] -> dict of numpy arrays
  clip = physics_world.simulate_clip(0, 7, physics_world.ClipOptions())  # one clip, in memory

The record's fields and units are described in builder.py.
"""
from data_pipelines.physics_world.builder import PhysicsWorld, build, load, make_config
from data_pipelines.physics_world.scenes import SCENES
from data_pipelines.physics_world.simulate import ClipOptions, simulate_clip

__all__ = ['ClipOptions', 'PhysicsWorld', 'SCENES', 'build', 'load', 'make_config',
           'simulate_clip']
