"""worldsim.eval: the physics report scores the engine's own render perfectly and corrupted
videos (frozen frames, gravity reversed, an object deleted, objects passing through each
other) clearly worse. Tiny clips (40 px, 16-20 frames) keep it fast."""
import json

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.physics_world import ClipOptions, simulate_clip
from data_pipelines.physics_world.takes import simulate_take
from worldsim.eval import masks, report, tracks, video_metrics


def _options(scenes, frames=20, **kwargs):
  return ClipOptions(min_side=40, max_side=40, min_frames=frames, max_frames=frames,
                     scenes=scenes, active_fraction=kwargs.pop('active_fraction', 0.0),
                     **kwargs)


DROP = _options(('drop',))
DROP_INDEX = 2  # three objects (ball, box, ball) that fall, bounce and settle


@pytest.fixture(scope='module')
def drop():
  return simulate_clip(0, DROP_INDEX, DROP)


@pytest.fixture(scope='module')
def drop_second_take():
  return simulate_take(0, DROP_INDEX, DROP, jitter=0.5)


def _delete(video, object_names, which, from_frame):
  """Paints object `which` with the background from `from_frame` on."""
  video = video.copy()
  background = tracks.background_color(video[0])
  colors = tracks.object_colors(object_names)[which:which + 1]
  drawn = tracks.color_weights(video, colors, background)[0] > 0
  drawn[:from_frame] = False
  video[drawn] = background.astype(np.uint8)
  return video


def _frozen(video, start=1):
  video = video.copy()
  video[start:] = video[start - 1]
  return video


def _blurred_and_noisy(video, rng):
  """A generated-looking video: blurred edges, pixel noise (about 28 dB PSNR)."""
  video = ndimage.gaussian_filter(video.astype(np.float32), (0, 0.7, 0.7, 0))
  return np.clip(np.round(video + rng.normal(0, 8, video.shape)), 0, 255).astype(np.uint8)


def test_tracker_recovers_engine_positions_under_a_pixel():
  options = _options(('drop', 'collide', 'ramp', 'stack', 'pendulum', 'occlude'), frames=12)
  rng = np.random.default_rng(0)
  compared = 0
  for index in range(8):
    clip = simulate_clip(0, index, options)
    colors = tracks.object_colors(clip['object_names'])
    background = tracks.background_color(clip['video'][0])
    found = tracks.track_objects(clip['video'], colors, background)
    # where the whole object shows: an occluded part moves the centroid of what is seen
    whole = found.present & (found.area >= 0.9 * found.area.max(axis=0))
    whole &= tracks.unique_colors(colors)[None]
    for video in (clip['video'], _blurred_and_noisy(clip['video'], rng)):
      position = tracks.track_objects(video, colors, background).position
      error = np.linalg.norm(position - clip['states']['position'], axis=-1)[whole]
      assert error.max() < 1.0, (clip['scene'], error.max())
    compared += error.size
  assert compared >= 100


def test_engine_render_scores_perfectly(drop, drop_second_take):
  result = report.physics_report(drop['video'], drop, second_take=drop_second_take)
  summary = result['summary']
  assert summary['position_error_px'] < 0.2  # the tracker's own error, sub-pixel
  assert summary['gravity_relative_error'] < 0.02
  assert result['gravity']['frames_fitted'] >= 20
  assert summary['event_f1'] == 1.0 and summary['event_offset_frames'] == 0.0
  assert len(result['events']['engine']) >= 2  # the bounces
  assert summary['interpenetration_events'] == 0
  assert summary['permanence_violations'] == 0 and summary['count_accuracy'] == 1.0
  for key in ('spatial_iou', 'spatiotemporal_iou', 'weighted_spatial_iou', 'ssim'):
    assert summary[key] == 1.0, key
  assert summary['mse'] == 0.0 and summary['psnr_db'] > 100
  assert summary['physics_iq_score'] == 100.0
  assert result['particles']['applies'] is False  # drop scenes hold no container
  # the second take drifts, but less than any corruption below
  variance = result['physical_variance']
  assert 0.3 < variance['spatiotemporal_iou'] < 1.0 and variance['mse'] > 0


def test_frozen_frames_score_worse(drop, drop_second_take):
  result = report.physics_report(_frozen(drop['video']), drop, second_take=drop_second_take)
  summary = result['summary']
  assert summary['position_error_px'] > 5
  assert summary['gravity_relative_error'] > 0.5  # nothing falls
  assert summary['event_f1'] == 0.0  # nothing bounces
  assert summary['spatial_iou'] == 0.0  # no pixel moves...
  assert summary['spatiotemporal_iou'] < 0.1  # ...but once all has settled, none should
  assert summary['psnr_db'] < 25 and summary['ssim'] < 0.8
  assert summary['physics_iq_score'] < 20


def test_reversed_gravity_scores_worse(drop):
  upward = simulate_take(0, DROP_INDEX, DROP, gravity_scale=-1)
  result = report.physics_report(upward['video'], drop)
  g = np.array(result['gravity']['estimated'])
  assert g[1] < 0  # fitted from the tracks: pulls up the image
  assert result['summary']['gravity_relative_error'] > 1.0
  assert result['summary']['event_f1'] < 0.5  # no bounces on the ground
  # the objects fly out of the top of the frame and never come back
  assert result['summary']['permanence_violations'] >= 2


def test_deleted_object_breaks_permanence(drop):
  half = len(drop['video']) // 2
  result = report.physics_report(_delete(drop['video'], drop['object_names'], 0, half), drop)
  assert result['permanence']['vanished'] == [0]
  assert result['permanence']['appeared'] == []
  assert result['summary']['count_accuracy'] <= 0.6
  assert result['summary']['position_error_px'] > 5  # a lost object counts as the diagonal
  assert result['summary']['spatiotemporal_iou'] < 0.9


def test_objects_passing_through_each_other_interpenetrate():
  options = _options(('collide',), frames=16)
  engine = simulate_clip(0, 0, options)
  assert report.physics_report(engine['video'], engine)['summary'][
      'interpenetration_events'] == 0
  ghosts = simulate_take(0, 0, options, objects_collide=False)
  contact = report.physics_report(ghosts['video'], engine)['interpenetration']
  assert contact['events'] >= 3 and contact['max_overlap_fraction'] > 0.5


def test_spilled_grains_are_counted_out_of_the_cup():
  options = _options(('spill',), frames=16)
  engine = simulate_clip(0, 0, options)
  particles = report.physics_report(engine['video'], engine)['particles']
  assert particles['applies'] and particles['error_fraction'] == 0.0
  assert particles['onset_frame'] == particles['truth_onset_frame'] is not None
  assert particles['truth_final'] >= 3  # the rest leave the frame, where no video shows them
  frozen = report.physics_report(_frozen(engine['video']), engine)['particles']
  assert frozen['onset_frame'] is None and frozen['final'] == 0
  assert frozen['error_fraction'] > 0.1


def test_ssim_matches_skimage():
  from skimage import metrics as skimage_metrics    # the test extra installs it
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (33, 41, 3), dtype=np.uint8)
  noisy = np.clip(image + rng.integers(-40, 40, image.shape), 0, 255).astype(np.uint8)
  expected = skimage_metrics.structural_similarity(image, noisy, channel_axis=-1,
                                                   data_range=255)
  np.testing.assert_allclose(video_metrics.ssim(image, noisy), expected, rtol=1e-10)


def test_motion_mask_metrics_follow_physics_iq():
  video = np.zeros((3, 4, 4, 3), np.uint8)
  video[1, 0, 0] = video[2, 0, 1] = 255  # moves at (0, 0) into frame 1, at both in frame 2
  other = np.zeros_like(video)
  other[2, 0, 0] = 255  # moves at (0, 0) into frame 2 only
  # no blur: single pixels stay single pixels
  motion, reference = masks.motion_masks(video, blur=0), masks.motion_masks(other, blur=0)
  assert masks.spatial_iou(motion, reference) == 0.5  # {00, 01} against {00}
  # frames: 0 empty in both (1), 1 {00} vs {} (0), 2 {00, 01} vs {00} (1/2)
  assert masks.spatiotemporal_iou(motion, reference) == pytest.approx(0.5)
  # moving fractions: (0,0) 2/3 vs 1/3, (0,1) 1/3 vs 0
  assert masks.weighted_spatial_iou(motion, reference) == pytest.approx((1 / 3) / 1.0)
  same = masks.mask_metrics(video, video, blur=0)
  variance = masks.mask_metrics(other, video, blur=0)
  assert masks.physics_iq_score(same, variance) == 100.0
  assert masks.physics_iq_score(variance, variance) == pytest.approx(100.0)


def test_controllability_separates_a_model_that_follows_actions():
  options = _options(('drop',), frames=12, active_fraction=1.0, push_probability=0.5)
  indices = [0, 1]
  truth = [simulate_clip(0, i, options) for i in indices]
  actions = np.stack([t['actions'] for t in truth])
  videos = np.stack([t['video'] for t in truth])

  def engine(batch_actions):  # the engine itself, driven by the given actions
    return np.stack([simulate_take(0, i, options, actions=a)['video']
                     for i, a in zip(indices, batch_actions)])

  def deaf(batch_actions):  # ignores its actions
    return videos

  follows = video_metrics.controllability(engine, actions, videos)
  assert follows['psnr_true_actions'] > 100 and follows['delta_psnr'] > 20
  assert video_metrics.controllability(deaf, actions, videos)['delta_psnr'] == 0.0
  single = video_metrics.controllability(lambda a: engine(np.concatenate([a, actions[1:]]))[:1],
                                         actions[:1], videos[:1])
  assert single['delta_psnr'] > 0  # one clip: its actions permuted in time


def test_report_writes_json_and_plots(drop, drop_second_take, tmp_path):
  result = report.physics_report(_frozen(drop['video']), drop, second_take=drop_second_take)
  paths = report.write_report(result, tmp_path / 'physics')
  with open(paths[0]) as f:
    written = json.load(f)
  assert written['summary'] == result['summary']
  assert set(report.SUMMARY_KEYS) == set(written['summary'])
  for path in paths[1:]:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_engine_ceiling_and_takes():
  options = _options(('drop', 'collide'), frames=12)
  same = simulate_take(0, 1, options)  # with no change, a take is the clip itself
  np.testing.assert_array_equal(same['video'], simulate_clip(0, 1, options)['video'])
  ceiling = report.engine_ceiling(0, range(2), options, jitter=0.5)
  assert len(ceiling['clips']) == 2
  mean = ceiling['mean']
  assert 0 < mean['position_error_px'] < 5  # two takes drift apart, but not far
  assert 0 < mean['spatiotemporal_iou'] < 1 and mean['mse'] > 0
