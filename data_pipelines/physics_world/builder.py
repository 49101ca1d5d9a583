"""The physics_world TFDS builder: pymunk clips written as ArrayRecord, built and read without
TensorFlow.

Record (one clip, T frames of H x W pixels, N objects; read back as numpy arrays, text as bytes):
  video          uint8 (T, H, W, 3)   RGB frames.
  fps            float32 ()           frame t shows the world at time t / fps seconds.
  caption        text                 written from the scene parameters and the outcome.
  actions        float32 (T, 2)       impulse on object `action_object` right after frame t is
                                      observed (first seen in frame t + 1), in mass * pixels / s,
                                      image orientation; zeros when nothing is pushed.
  action_object  int32 ()             index of the pushed (controllable) object; -1 if none.
  states         position float32 (T, N, 2)  pixels: x to the right, y down, origin at the
                                             frame's top-left corner (as the image is indexed).
                 velocity float32 (T, N, 2)  pixels / second, same orientation.
                 angle    float32 (T, N)     radians; positive turns clockwise on screen.
                 visible  bool (T, N)        the object owns at least one pixel of the frame:
                                             False when occluded or out of the frame.
  object_names   text (N,)            'small red ball', 'blue ramp', ...
  params         gravity    float32 (2,)  pixels / second^2, image orientation ((0, g): down).
                 mass       float32 (N,)  0 for static and kinematic objects (infinite mass).
                 elasticity float32 (N,)  pymunk multiplies the coefficients of the two shapes
                 friction   float32 (N,)  in contact; scenery has 1, so these apply against it.
  scene          text                 the family: drop, collide, ramp, stack, pendulum, spill,
                                      occlude (see scenes.py).
  seed, index    int64 ()             simulate_clip(seed, index, options) makes this record again.

Positions, velocities and gravity share the frame's pixel units and orientation, so a body in
free fall traces y(t) = y0 + vy0 t + gravity[1] t^2 / 2 in the stored positions, t = frame / fps.

Without TensorFlow: TFDS (4.9.x) encodes tfds.features.Tensor, Scalar and Text with numpy alone
and reads ArrayRecord through `as_data_source()`; Image and Video features would need TF to
encode PNGs, so the video is a zlib-compressed uint8 Tensor (flat-coloured frames compress
well). Tensors with more than one unknown dimension must name an encoding; they use zlib.
"""
import functools
import hashlib
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from data_pipelines.built import clip_features
from data_pipelines.physics_world.scenes import SCENES
from data_pipelines.physics_world.simulate import ClipOptions, simulate_clip


class PhysicsWorldConfig(tfds.core.BuilderConfig):
  """How many clips, from which seed, drawn from which ranges."""

  def __init__(self, *, num_clips: int, seed: int, clip_options: ClipOptions, **kwargs):
    super().__init__(**kwargs)
    self.num_clips, self.seed, self.clip_options = num_clips, seed, clip_options


def make_config(num_clips: int = 1000, seed: int = 0,
                clip_options: ClipOptions = ClipOptions()) -> PhysicsWorldConfig:
  """A config named after its contents, so that builds with different options never share a
  directory: 'clips1000_seed0_side32-128_frames8-64_<hash of the rest>'."""
  o = clip_options
  digest = hashlib.sha1(repr((num_clips, seed, o)).encode()).hexdigest()[:8]
  name = (f'clips{num_clips}_seed{seed}_side{o.min_side}-{o.max_side}_'
          f'frames{o.min_frames}-{o.max_frames}_{digest}')
  return PhysicsWorldConfig(name=name, num_clips=num_clips, seed=seed, clip_options=clip_options,
                            description=f'{num_clips} clips, seed {seed}, {clip_options}')


def _available_cores() -> int:
  if hasattr(os, 'sched_getaffinity'):  # the cores this process may run on (Linux)
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _features():
  def zlib_tensor(shape, dtype):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding='zlib')

  return clip_features(**{
      'actions': tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
      'action_object': tfds.features.Scalar(np.int32),
      'states': {
          'position': zlib_tensor((None, None, 2), np.float32),
          'velocity': zlib_tensor((None, None, 2), np.float32),
          'angle': zlib_tensor((None, None), np.float32),
          'visible': zlib_tensor((None, None), np.bool_),
      },
      'object_names': tfds.features.Sequence(tfds.features.Text()),
      'params': {
          'gravity': tfds.features.Tensor(shape=(2,), dtype=np.float32),
          'mass': tfds.features.Tensor(shape=(None,), dtype=np.float32),
          'elasticity': tfds.features.Tensor(shape=(None,), dtype=np.float32),
          'friction': tfds.features.Tensor(shape=(None,), dtype=np.float32),
      },
      'scene': tfds.features.Text(),
      'seed': tfds.features.Scalar(np.int64),
      'index': tfds.features.Scalar(np.int64),
  })


class PhysicsWorld(tfds.core.GeneratorBasedBuilder):
  """Clips of 2D rigid-body scenes simulated with pymunk, with ground-truth states."""

  VERSION = tfds.core.Version('1.0.0')  # bump when the simulation changes: builds are reused
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [PhysicsWorldConfig(name='default', num_clips=1000, seed=0,
                                        clip_options=ClipOptions())]

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """num_workers: processes that simulate clips (default: every core); the data do not
    depend on it."""
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self._num_workers = num_workers or _available_cores()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=_features(),
        disable_shuffling=True)  # record i is clip i

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    simulate = functools.partial(simulate_clip, config.seed, options=config.clip_options)
    indices = range(config.num_clips)
    progress = functools.partial(tqdm.tqdm, total=config.num_clips, unit='clip',
                                 desc=f'Simulating {self.name}/{config.name}')
    if self._num_workers <= 1:
      yield from enumerate(progress(map(simulate, indices)))
      return
    # spawn, not fork: the parent may hold JAX's threads, which a forked child would inherit
    context = multiprocessing.get_context('spawn')
    with context.Pool(min(self._num_workers, config.num_clips)) as pool:
      yield from enumerate(progress(pool.imap(simulate, indices)))


def build(data_dir, num_clips: int = 1000, seed: int = 0, min_side: int = 32,
          max_side: int = 128, min_frames: int = 8, max_frames: int = 64,
          num_workers: int | None = None, scenes=tuple(SCENES),
          active_fraction: float = ClipOptions.active_fraction,
          push_probability: float = ClipOptions.push_probability) -> PhysicsWorld:
  """Simulates and writes the dataset under data_dir (skipped if already complete).

  active_fraction: the share of clips whose agent is pushed; push_probability: the chance of a
  push per frame of such a clip (ClipOptions). Each setting is its own build.

  Clips are simulated in `num_workers` processes (default: every core) started with 'spawn',
  so a script that calls build() needs the usual `if __name__ == '__main__':` guard.
  """
  options = ClipOptions(min_side=min_side, max_side=max_side, min_frames=min_frames,
                        max_frames=max_frames, scenes=tuple(scenes),
                        active_fraction=active_fraction, push_probability=push_probability)
  builder = PhysicsWorld(data_dir=data_dir, config=make_config(num_clips, seed, options),
                         num_workers=num_workers)
  builder.download_and_prepare()
  return builder


def load(data_dir, split: str = 'train', config: str | None = None):
  """A random-access source of records (len() and [i] -> dict of numpy arrays), for grain.

  data_dir is the one given to build() (then `config` picks the build when there are several)
  or a build's own directory (`builder.data_dir`). Splits can be sliced: 'train[:90%]'.
  """
  path = epath.Path(data_dir)
  if not (path / 'dataset_info.json').exists():
    pattern = f"{PhysicsWorld.name}/{config or '*'}/*/dataset_info.json"
    builds = sorted(info.parent for info in path.glob(pattern))
    if len(builds) != 1:
      found = [f'{b.parent.name}/{b.name}' for b in builds] or 'none'
      raise ValueError(f'Expected one physics_world build under {data_dir} (pass config=): '
                       f'found {found}')
    path = builds[0]
  return tfds.builder_from_directory(path).as_data_source(split=split)
