"""physics_world: a real TFDS/ArrayRecord build without TensorFlow, and ground truth that agrees
with the frames and the physics."""
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from data_pipelines import physics_world
from data_pipelines.physics_world import ClipOptions, simulate_clip

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = dict(num_clips=12, seed=3, min_side=32, max_side=80, min_frames=8, max_frames=32)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('physics_world')
  physics_world.build(data_dir, num_workers=2, **BUILD)
  return physics_world.load(data_dir)


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _free_fall_end(velocity_y):
  """The last frame before the first contact: gravity alone only ever increases vy."""
  slowed = np.nonzero(np.diff(velocity_y) < 0)[0]
  return slowed[0] if slowed.size else len(velocity_y) - 1


def test_build_reads_back_varied_clips_with_consistent_ground_truth(source):
  assert len(source) == BUILD['num_clips']
  shapes = set()
  for i in range(len(source)):
    record = source[i]
    assert record['index'] == i and record['seed'] == BUILD['seed']  # record i is clip i
    video = record['video']
    t, h, w, _ = video.shape
    shapes.add((t, h, w))
    assert video.dtype == np.uint8
    assert BUILD['min_side'] <= min(h, w) and max(h, w) <= BUILD['max_side']
    assert 0.5 <= w / h <= 2.0
    assert BUILD['min_frames'] <= t <= BUILD['max_frames']
    n = len(record['object_names'])
    states = record['states']
    assert states['position'].shape == states['velocity'].shape == (t, n, 2)
    assert states['angle'].shape == states['visible'].shape == (t, n)
    assert states['visible'].dtype == bool
    assert record['actions'].shape == (t, 2)
    assert record['params']['gravity'].shape == (2,)
    for name in ('mass', 'elasticity', 'friction'):
      assert record['params'][name].shape == (n,)
    assert record['caption'] and record['scene'].decode() in physics_world.SCENES
  assert len(shapes) >= 4
  # what was written is what simulate_clip makes, whatever the worker count
  clip = simulate_clip(BUILD['seed'], 5, ClipOptions(**{k: BUILD[k] for k in BUILD
                                                        if k.startswith(('min', 'max'))}))
  np.testing.assert_array_equal(source[5]['video'], clip['video'])
  _assert_same(source[5]['states'], clip['states'])
  assert source[5]['caption'].decode() == clip['caption']


def test_clip_is_deterministic_by_seed_and_index():
  options = ClipOptions(max_side=48, max_frames=16)
  _assert_same(simulate_clip(7, 2, options), simulate_clip(7, 2, options))
  assert not np.array_equal(simulate_clip(7, 3, options)['video'],
                            simulate_clip(7, 2, options)['video'])


def test_positions_are_pixel_coordinates_of_the_frame():
  options = ClipOptions(scenes=('drop',), active_fraction=0.0)
  checked = 0
  for index in range(8):
    clip = simulate_clip(0, index, options)
    if len(clip['object_names']) != 1:
      continue
    frame = clip['video'][0].astype(int)
    background = frame[0, 0]
    drawn = np.any(frame != background, axis=-1)
    drawn[drawn.all(axis=1)] = False  # the ground's rows
    rows, cols = np.nonzero(drawn)
    centroid = np.array([cols.mean(), rows.mean()]) + 0.5  # pixel centres
    np.testing.assert_allclose(centroid, clip['states']['position'][0, 0], atol=1.0)
    checked += 1
  assert checked >= 2


def test_dropped_ball_falls_on_a_parabola_with_the_scene_gravity(source):
  clips = [simulate_clip(0, i, ClipOptions(scenes=('drop',), min_frames=24, active_fraction=0.0))
           for i in range(6)]
  clips += [source[i] for i in range(len(source)) if source[i]['scene'] == b'drop']
  fitted = 0
  for clip in clips:
    y = clip['states']['position'][:, 0, 1]
    end = _free_fall_end(clip['states']['velocity'][:, 0, 1])
    pushed = np.nonzero(clip['actions'].any(axis=1))[0]
    if pushed.size:
      end = min(end, pushed[0])  # a push shows from the next frame on
    if end < 4:
      continue
    time = np.arange(end + 1) / clip['fps']
    acceleration = 2 * np.polyfit(time, y[:end + 1], 2)[0]
    np.testing.assert_allclose(acceleration, clip['params']['gravity'][1], rtol=0.02)
    assert clip['params']['gravity'][0] == 0
    fitted += 1
  assert fitted >= 4


def test_actions_push_the_controllable_body(source):
  records = [source[i] for i in range(len(source))]
  assert any(r['actions'].any() and r['action_object'] >= 0 for r in records)
  assert all(not r['actions'].any() for r in records if r['action_object'] < 0)
  # a push changes the agent's velocity by impulse / mass from the next frame on
  checked = 0
  for index in range(12):
    passive = simulate_clip(1, index, ClipOptions(scenes=('drop',), min_frames=24,
                                                  active_fraction=0.0))
    pushed = simulate_clip(1, index, ClipOptions(scenes=('drop',), min_frames=24,
                                                 active_fraction=1.0, push_probability=0.3))
    t = np.nonzero(pushed['actions'].any(axis=1))[0][0]
    if t + 1 > _free_fall_end(passive['states']['velocity'][:, 0, 1]):
      continue
    np.testing.assert_array_equal(passive['video'][:t + 1], pushed['video'][:t + 1])
    kick = pushed['actions'][t] / pushed['params']['mass'][pushed['action_object']]
    change = (pushed['states']['velocity'][t + 1, 0] - passive['states']['velocity'][t + 1, 0])
    np.testing.assert_allclose(change, kick, rtol=1e-3, atol=1e-3)
    checked += 1
  assert checked >= 2


def test_ball_is_not_visible_while_behind_the_occluder():
  options = ClipOptions(scenes=('occlude',), min_frames=24, active_fraction=0.0)
  hidden_clips = 0
  for index in range(6):
    clip = simulate_clip(0, index, options)
    _, h, w, _ = clip['video'].shape
    ball, wall = clip['states']['position'][:, 0], clip['states']['position'][0, 1]
    visible = clip['states']['visible'][:, 0]
    assert visible[0] and clip['states']['visible'][:, 1].all()
    hidden = ~visible
    in_frame = (ball[:, 0] > 0) & (ball[:, 0] < w) & (ball[:, 1] > 0) & (ball[:, 1] < h)
    # hidden only behind the wall, and always when right behind its middle
    assert np.all(np.abs(ball[hidden & in_frame, 0] - wall[0]) < 0.25 * w)
    assert np.all(hidden[np.abs(ball[:, 0] - wall[0]) < 1.0])
    hidden_clips += bool((hidden & in_frame).any())
  assert hidden_clips >= 4


def test_spill_ends_with_grains_out_of_the_cup():
  for index in range(4):
    clip = simulate_clip(0, index, ClipOptions(scenes=('spill',)))
    _, h, w, _ = clip['video'].shape
    position = clip['states']['position']
    pivot_y = position[0, 0, 1]  # the cup's outer bottom corner, which it turns about
    assert np.all(position[0, 1:, 1] < pivot_y)  # the grains start in the cup
    # the cup reaches at most ~0.2 * min(h, w) below its pivot at any angle it is tipped to
    out = position[-1, 1:, 1] > pivot_y + 0.25 * min(h, w)
    assert out.mean() >= 0.5, clip['caption']
    assert 'spills' in clip['caption']


def test_build_and_read_do_not_import_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      from data_pipelines import physics_world
      physics_world.build({str(tmp_path)!r}, num_clips=3, max_side=40, max_frames=12,
                          num_workers=1)
      source = physics_world.load({str(tmp_path)!r})
      assert source[2]['video'].ndim == 4
      assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
      """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]


def test_config_sets_how_often_the_agent_is_pushed(tmp_path):
  """config.data.active_fraction / push_probability reach the build (each its own build)."""
  from data_pipelines import loader
  from experiments import physics_tiny
  d = physics_tiny.get_config().data.copy_and_resolve_references()
  pushed = {}
  for name, fraction, probability in (('calm', 0.0, 0.1), ('busy', 1.0, 1.0)):
    with d.unlocked():
      d.data_dir, d.num_clips, d.max_side, d.max_frames = str(tmp_path / name), 8, 32, 6
      d.active_fraction, d.push_probability = fraction, probability
    clips = loader.pixel_source(d, seed=0)
    pushed[name] = [np.abs(clips[i]['actions']).sum(-1) > 0 for i in range(len(clips))]
  assert not any(p.any() for p in pushed['calm'])
  busy = [p for p in pushed['busy'] if p.any()]                 # `spill` has no agent
  assert len(busy) >= 4 and all(p[:-1].all() for p in busy)     # every frame but the last
