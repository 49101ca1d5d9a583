"""The physics report of a generated physics-world video against the engine's rollout of the
same initial state, and the engine-vs-engine ceiling that reads it.

  truth = physics_world.simulate_clip(seed, index, options)      # or a dataset record
  report = physics_report(generated_video, truth, second_take=second)
  write_report(report, 'runs/x/physics')          # report.json, tracks.png, horizon.png
  ceiling = engine_ceiling(seed, range(16), options)   # a second engine take, scored the same

`second_take` is the engine's record of the same clip from slightly perturbed initial
conditions (takes.simulate_take(..., jitter=...)): the Physics-IQ metrics are normalised by
how far two takes of the same set-up drift apart, since no model can be asked to beat that.
"""
import dataclasses
import json
import os

import numpy as np

from data_pipelines.physics_world.simulate import simulate_clip
from data_pipelines.physics_world.takes import simulate_take
from worldsim.eval import masks, physics, tracks, video_metrics

# the headline figures of a report; lower is better for errors, offsets, events, violations
# and MSE, higher for the rest
SUMMARY_KEYS = ('position_error_px', 'gravity_relative_error', 'event_f1',
                'event_offset_frames', 'interpenetration_events', 'permanence_violations',
                'count_accuracy', 'spill_error_fraction', 'spatial_iou', 'spatiotemporal_iou',
                'weighted_spatial_iou', 'mse', 'physics_iq_score', 'psnr_db', 'ssim')


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _Seen:
  """What the tracker finds in the generated video and in the engine's render of the clip."""
  weights: np.ndarray  # (N, T, H, W) each object's share of each pixel, generated video
  truth_weights: np.ndarray  # the same in the engine's render
  generated: tracks.Tracks
  engine: tracks.Tracks
  tracked: np.ndarray  # bool (N,): the object's colour is its own, so its track is too
  compared: np.ndarray  # bool (T, N): where tracks are compared with the recorded positions


def _see(generated, video, names, position):
  colors = tracks.object_colors(names)
  background = tracks.background_color(video[0])  # the engine's: the generated one may drift
  distinct, which, counts = np.unique(colors, axis=0, return_inverse=True, return_counts=True)
  which, single = which.ravel(), counts == 1
  weights = tracks.color_weights(generated, distinct, background, single=single)[which]
  truth_weights = tracks.color_weights(video, distinct, background, single=single)[which]
  engine = tracks.tracks_from_weights(truth_weights)
  tracked = tracks.unique_colors(colors)
  return _Seen(weights, truth_weights, tracks.tracks_from_weights(weights), engine, tracked,
               physics.reference_mask(engine, position, tracked))


def physics_report(generated, truth, second_take=None, start=1, mask_threshold=24,
                   event_threshold=1.0) -> dict:
  """Every metric of `generated` (uint8 (T, H, W, 3)) against the engine record `truth`.

  truth: a physics-world record (simulate_clip or the dataset): its video, states, params,
  fps, object names and scene. start: the frames before it conditioned the model (copied
  from the truth); frame metrics (PSNR, SSIM, masks) cover frames from `start` on, physics
  metrics the whole clip. second_take: another engine record of the clip (see module doc).
  Returns a JSON-ready dict; its 'summary' holds the headline figures (SUMMARY_KEYS).
  """
  generated = np.asarray(generated)
  video = np.asarray(truth['video'])
  if generated.shape != video.shape:
    raise ValueError(f'generated video has shape {generated.shape}, the engine take '
                     f'{video.shape}: generate as many frames of the same size')
  num_frames, height, width, _ = video.shape
  position = np.asarray(truth['states']['position'], np.float64)
  names = [_text(n) for n in truth['object_names']]
  scene = _text(truth['scene'])
  seen = _see(generated, video, names, position)

  error, floor = (physics.position_error(t.position, position, seen.compared, (height, width))
                  for t in (seen.generated, seen.engine))
  frame_metrics = masks.mask_metrics(generated, video, start, mask_threshold)
  report = {
      'scene': scene, 'caption': _text(truth.get('caption', '')),
      'frames': num_frames, 'height': height, 'width': width, 'fps': float(truth['fps']),
      'start': start, 'objects': names, 'tracked': seen.tracked,
      'tracks': {'generated': seen.generated.position, 'engine_render': seen.engine.position,
                 'engine_states': position, 'compared': seen.compared},
      'position_error_px': error, 'tracker_floor_px': _mean(floor),
      'gravity': _gravity(seen, truth),
      'events': _events(seen, truth, event_threshold),
      'interpenetration': _interpenetration(seen),
      'permanence': physics.permanence(seen.generated.present, seen.engine.present,
                                       seen.tracked),
      'particles': _spill(seen, scene, position, (height, width)),
      'masks': frame_metrics,
      'psnr_db': video_metrics.psnr_per_frame(generated, video)[start:],
      'ssim': video_metrics.ssim_per_frame(generated[start:], video[start:]),
  }
  if second_take is not None:
    variance = masks.mask_metrics(np.asarray(second_take['video']), video, start,
                                  mask_threshold)
    report['physical_variance'] = variance
    report['normalised'] = masks.normalised(frame_metrics, variance)
    report['physics_iq_score'] = masks.physics_iq_score(frame_metrics, variance)
  report['summary'] = _summary(report)
  return _jsonable(report)


def _gravity(seen, truth):
  """Gravity fitted to the generated tracks where the engine's objects fly freely."""
  params, states = truth['params'], truth['states']
  gravity = np.asarray(params['gravity'], np.float64)
  fps = float(truth['fps'])
  movable = (np.asarray(params['mass']) > 0) & seen.compared.any(axis=0)
  flight = physics.free_flight(np.asarray(states['velocity'], np.float64), gravity, fps,
                               movable)
  flight &= seen.compared[:-1] & seen.compared[1:]
  estimated, fitted = physics.estimate_gravity(seen.generated.position, flight, fps)
  engine_fit, _ = physics.estimate_gravity(np.asarray(states['position'], np.float64), flight,
                                           fps)
  scale = float(np.linalg.norm(gravity))
  error = float(np.linalg.norm(estimated - gravity) / scale) if scale > 0 and fitted else None
  return {'true': gravity, 'estimated': estimated, 'engine_fit': engine_fit,
          'frames_fitted': fitted, 'relative_error': error}


def _events(seen, truth, threshold):
  """Bounce and collision timing. Events are detected on the tracks of both videos, so that
  the tracker's own noise (an object half behind the occluder, anti-aliasing against a
  neighbour) shows in both alike."""
  gravity = np.asarray(truth['params']['gravity'], np.float64)
  fps = float(truth['fps'])

  def detect(position):
    return [e for e in physics.velocity_events(position, gravity, fps, threshold)
            if seen.tracked[e[1]]]

  engine, generated = detect(seen.engine.position), detect(seen.generated.position)
  return {'engine': engine, 'generated': generated,
          **physics.match_events(engine, generated)}


def _interpenetration(seen):
  largest = seen.engine.area.max(axis=0)
  truth_area, area = seen.engine.area.T, seen.generated.area.T  # (N, T)
  # pairs that overlap in the engine's own render, against each object's largest area, are
  # an occluder and what it hides
  engine_overlap = physics.pair_overlap(truth_area, np.broadcast_to(largest[:, None],
                                                                    truth_area.shape),
                                        physics.touching(seen.truth_weights))
  touch = physics.touching(seen.weights)
  expected = physics.expected_area(area, truth_area, ~touch.any(axis=2).T)
  overlap = physics.pair_overlap(area, expected, touch)
  return physics.interpenetration(overlap, engine_overlap, largest, seen.tracked)


def _spill(seen, scene, position, shape):
  """Cause and effect: grains counted out of the tipped cup, for spill scenes (object 0 is
  the cup, the rest are its grains, all of one colour)."""
  if scene != 'spill':
    return {'applies': False,
            'note': 'particles leaving a container: only spill scenes have one'}
  total = len(position[0]) - 1
  height, width = shape
  inside = physics.spill_region(height, width, position[0, 0, 1], min(height, width))
  particle_area = seen.truth_weights[1, 0].sum() / total  # all grains lie in the cup at first
  count = physics.particles_outside(seen.weights[1], inside, particle_area)
  engine_count = physics.particles_outside(seen.truth_weights[1], inside, particle_area)
  return {'applies': True, 'count': count, 'engine_count': engine_count,
          **physics.compare_counts(count, engine_count, total)}


def _mean(values):
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _summary(report):
  masks_ = report['masks']
  particles = report['particles']
  return {
      'position_error_px': _mean(report['position_error_px']),
      'gravity_relative_error': report['gravity']['relative_error'],
      'event_f1': report['events']['f1'],
      'event_offset_frames': report['events']['offset_frames'],
      'interpenetration_events': report['interpenetration']['events'],
      'permanence_violations': report['permanence']['violations'],
      'count_accuracy': report['permanence']['count_accuracy'],
      'spill_error_fraction': particles['error_fraction'] if particles['applies'] else None,
      **{k: masks_[k] for k in ('spatial_iou', 'spatiotemporal_iou', 'weighted_spatial_iou',
                                'mse')},
      'physics_iq_score': report.get('physics_iq_score'),
      'psnr_db': _mean(report['psnr_db']), 'ssim': _mean(report['ssim']),
  }


def _jsonable(value):
  """numpy to lists and floats, NaN to None (JSON has no NaN), tuples to lists."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if np.isfinite(value) else None
  return value


def write_report(report: dict, outdir) -> list[str]:
  """Writes report.json and the plots (tracks.png, horizon.png) under outdir; returns paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = [os.path.join(outdir, name) for name in ('report.json', 'tracks.png', 'horizon.png')]
  with open(paths[0], 'w') as f:
    json.dump(report, f, indent=1)
  from worldsim.eval import plots  # matplotlib only when plots are written
  plots.plot_tracks(report, paths[1])
  plots.plot_horizon(report, paths[2])
  return paths


def engine_ceiling(seed, indices, options, jitter=0.5, start=1) -> dict:
  """The engine against itself: for each clip, a second take with initial conditions jittered
  by `jitter` px (takes.simulate_take) scored against the first. Returns the per-clip
  summaries and their mean: the best a model can be expected to reach on each metric."""
  per_clip = []
  for index in indices:
    truth = simulate_clip(seed, index, options)
    second = simulate_take(seed, index, options, jitter=jitter)
    report = physics_report(second['video'], truth, start=start)
    per_clip.append({'index': int(index), 'scene': report['scene'], **report['summary']})
  mean = {}
  for key in SUMMARY_KEYS:
    values = [c[key] for c in per_clip if c.get(key) is not None]
    mean[key] = float(np.mean(values)) if values else None
    mean[f'{key}_clips'] = len(values)
  return {'seed': seed, 'jitter_px': jitter, 'clips': per_clip, 'mean': mean}
