"""Physics metrics of a generated physics-world video against the engine's rollout of the same
initial state: position error, gravity, bounce and collision timing, interpenetration,
object permanence and particles leaving a container.

Inputs are tracks (tracks.py) of the generated video and of the engine's own render, and the
engine's recorded states (pixels, y down; see data_pipelines/physics_world/builder.py);
report.py puts them together and turns the results into JSON.
"""
import numpy as np
from scipy import ndimage


def reference_mask(truth_tracks, truth_position, tracked, full_fraction=0.9, max_offset=1.0):
  """bool (T, N): where a track can be compared with the recorded position.

  The object is tracked on its own (`tracked`: its colour is unique), it shows at least
  `full_fraction` of its largest area in the engine's render (not half hidden behind an
  occluder or the frame's edge, which moves the centroid of what is seen), and the engine
  render's own track lies within `max_offset` px of the recorded position: the cup of a spill
  is recorded at the corner it turns about, not at its centroid, so it is left out.
  """
  area = truth_tracks.area
  largest = np.max(area, axis=0, keepdims=True)
  full = truth_tracks.present & (area >= full_fraction * largest)
  offset = np.linalg.norm(truth_tracks.position - truth_position, axis=-1)
  with np.errstate(invalid='ignore'):
    return full & (offset <= max_offset) & np.asarray(tracked)[None]


def position_error(position, truth_position, mask, frame_shape):
  """Per-frame mean distance (px) of tracked positions from the recorded ones where `mask`.

  An object the generated video lost (no track where the reference has one) counts as the
  frame's diagonal, the largest error a track inside the frame can have, so that losing an
  object never scores better than placing it badly. NaN in frames with nothing to compare.
  """
  diagonal = float(np.hypot(*frame_shape))
  error = np.linalg.norm(position - truth_position, axis=-1)
  error = np.where(np.isnan(error), diagonal, error)
  counted = mask.sum(axis=1)
  with np.errstate(invalid='ignore'):
    per_frame = np.where(mask, error, 0.0).sum(axis=1) / counted
  return np.where(counted > 0, per_frame, np.nan)


def free_flight(velocity, gravity, fps, movable, rtol=0.01):
  """bool (T - 1, N): between frames t and t + 1 the engine's object moved under gravity alone
  (no contact, joint or push): its velocity changed by exactly gravity / fps, since the engine
  integrates with semi-implicit Euler and no damping."""
  change = np.diff(velocity, axis=0) * fps  # (T - 1, N, 2), px / s^2
  scale = max(float(np.linalg.norm(gravity)), 1.0)
  close = np.linalg.norm(change - np.asarray(gravity), axis=-1) <= rtol * scale
  return close & np.asarray(movable)[None]


def _segments(flags, min_frames):
  """(start, stop) frame ranges where consecutive intervals are all True, >= min_frames."""
  spans, start = [], None
  for t, flag in enumerate(list(flags) + [False]):
    if flag and start is None:
      start = t
    elif not flag and start is not None:
      if t - start + 1 >= min_frames:  # t - start intervals join t - start + 1 frames
        spans.append((start, t + 1))
      start = None
  return spans


def estimate_gravity(position, flight, fps, min_frames=5):
  """Gravity (px/s^2, 2-vector) fitted to the free-flight segments of tracks: every segment
  is a parabola p(t) = p0 + v0 t + g t^2 / 2 with its own p0 and v0, and one g shared by all
  of them (least squares over every frame of every segment).

  position: (T, N, 2) tracks; flight: (T - 1, N) from `free_flight` on the engine's states,
  so the fit covers the frames where the engine says only gravity acts. Frames where the
  track is missing end a segment. Returns (g, number of frames fitted); g is NaN when no
  segment is long enough.
  """
  columns, targets, rows = [], [], 0
  segments = []
  present = ~np.isnan(position).any(axis=-1)
  for n in range(position.shape[1]):
    usable = flight[:, n] & present[:-1, n] & present[1:, n]
    segments += [(n, a, b) for a, b in _segments(usable, min_frames)]
  if not segments:
    return np.full(2, np.nan), 0
  design = []
  for k, (n, a, b) in enumerate(segments):
    t = np.arange(b - a) / fps
    block = np.zeros((b - a, 1 + 2 * len(segments)))
    block[:, 0] = 0.5 * t ** 2
    block[:, 1 + 2 * k] = 1.0
    block[:, 2 + 2 * k] = t
    design.append(block)
    targets.append(position[a:b, n])
    rows += b - a
  solution, *_ = np.linalg.lstsq(np.concatenate(design), np.concatenate(targets), rcond=None)
  return solution[0], rows


def velocity_events(position, gravity, fps, threshold=1.0):
  """Sudden velocity changes (bounces, collisions, pushes): list of (frame, object, kind).

  The second difference of positions is gravity / fps^2 in free flight; an event is a frame
  where it departs from that by more than `threshold` px/frame^2 and by more than at the
  frames either side (one contact shows in two second differences). kind is 'bounce' when a
  velocity component of more than half a pixel per frame reverses sign, else 'collision'.
  """
  expected = np.asarray(gravity) / fps ** 2
  residual = np.linalg.norm(position[2:] - 2 * position[1:-1] + position[:-2] - expected,
                            axis=-1)  # (T - 2, N): frame t + 1
  residual = np.where(np.isnan(residual), 0.0, residual)
  padded = np.pad(residual, ((1, 1), (0, 0)))
  peak = (residual > threshold) & (residual >= padded[:-2]) & (residual > padded[2:])
  events = []
  for i, n in zip(*np.nonzero(peak)):
    t = int(i) + 1
    before, after = position[t] - position[t - 1], position[t + 1] - position[t]
    flips = (before[n] * after[n] < 0) & (np.abs(before[n]) > 0.5) & (np.abs(after[n]) > 0.5)
    events.append((t, int(n), 'bounce' if flips.any() else 'collision'))
  return events


def match_events(truth, generated, tolerance=2):
  """Pairs events of the same object at most `tolerance` frames apart (nearest first).

  Returns precision, recall, F1 and the mean |frame offset| of the matched pairs; with no
  events on either side the timing agrees perfectly (F1 1, offset 0).
  """
  pairs = sorted((abs(a[0] - b[0]), i, j) for i, a in enumerate(truth)
                 for j, b in enumerate(generated) if a[1] == b[1] and abs(a[0] - b[0]) <= tolerance)
  used_truth, used_generated, offsets = set(), set(), []
  for offset, i, j in pairs:
    if i not in used_truth and j not in used_generated:
      used_truth.add(i)
      used_generated.add(j)
      offsets.append(offset)
  matched = len(offsets)
  if not truth and not generated:
    return {'precision': 1.0, 'recall': 1.0, 'f1': 1.0, 'offset_frames': 0.0, 'matched': 0}
  precision = matched / len(generated) if generated else 0.0
  recall = matched / len(truth) if truth else 0.0
  f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
  return {'precision': precision, 'recall': recall, 'f1': f1,
          'offset_frames': float(np.mean(offsets)) if offsets else None, 'matched': matched}


def touching(weights):
  """bool (T, N, N): objects i and j touch (their masks, grown by one pixel, meet).
  weights: (N, T, H, W) from tracks.color_weights."""
  masks = weights > 0
  grown = ndimage.binary_dilation(masks, structure=_grow_in_plane())
  touch = np.einsum('ithw,jthw->tij', grown.astype(np.float32), masks.astype(np.float32)) > 0
  return touch | touch.transpose(0, 2, 1) & ~np.eye(len(weights), dtype=bool)


def pair_overlap(area, expected_area, touch):
  """Area (px) that each pair of touching objects is missing, per frame: (T, N, N).

  A rendered frame gives every pixel to one object, so two shapes that interpenetrate show as
  one of them losing the overlap to the other. When objects i and j touch, the area they
  miss together against `expected_area` (N, T) is their overlap. area: (N, T) shown.
  """
  missing = np.maximum(expected_area - area, 0.0).T  # (T, N)
  overlap = missing[:, :, None] + missing[:, None, :]
  return np.where(touch & ~np.eye(len(area), dtype=bool), overlap, 0.0)


def expected_area(area, truth_area, alone, min_frames=3):
  """The area (N, T) each object should show in the generated video: what the engine's render
  shows at that frame (less where an occluder hides it), times how much smaller the generated
  video draws the object where it touches nothing (blur and colour drift cost a little area
  in every frame; interpenetration only where objects touch). alone: bool (N, T). Objects
  never alone for `min_frames` take the median over the other objects, or no scaling."""
  shown = (truth_area > 1.0) & alone
  ratios = [np.median(area[n, shown[n]] / truth_area[n, shown[n]])
            if shown[n].sum() >= min_frames else np.nan for n in range(len(area))]
  pooled = np.nanmedian(ratios) if np.isfinite(ratios).any() else 1.0
  scale = np.minimum(np.where(np.isfinite(ratios), ratios, pooled), 1.0)  # never inflate it
  return scale[:, None] * truth_area


def _grow_in_plane():
  structure = np.zeros((3, 3, 3, 3), bool)
  structure[1, 1] = ndimage.generate_binary_structure(2, 1)  # 4-neighbours, same frame
  return structure


def interpenetration(overlap, engine_overlap, reference_area, tracked, tolerance=0.3,
                     min_pixels=3.0, occluded=0.5):
  """Frames where touching objects overlap: (frame, pair) events whose overlap exceeds
  max(tolerance * the smaller object's area, min_pixels). Pairs that the engine's own render
  shows overlapping by more than `occluded` of the smaller object in some frame (a ball behind
  the occluding wall) are occlusion by design, and not counted; the engine's render is not
  held to `tolerance`, since there anti-aliasing moves a small box's area by a tenth.
  """
  tracked = np.asarray(tracked)
  smaller = np.minimum(reference_area[:, None], reference_area[None, :])
  allowed = np.maximum(tolerance * smaller, min_pixels)
  occluding = (engine_overlap > occluded * smaller[None]).any(axis=0)
  pairs = tracked[:, None] & tracked[None, :] & ~np.eye(len(tracked), dtype=bool) & ~occluding
  events = np.triu(pairs[None] & (overlap > allowed[None]), k=1)
  depth = np.where(events, overlap / np.maximum(smaller[None], 1.0), 0.0)
  return {'events': int(events.sum()), 'frames': int(events.any(axis=(1, 2)).sum()),
          'max_overlap_fraction': float(depth.max()) if depth.size else 0.0,
          'occluding_pairs': np.argwhere(np.triu(occluding, k=1)).tolist()}


def permanence(present, truth_present, tracked, tolerance=1):
  """Object permanence: objects that vanish for good or appear from nothing.

  vanished: the generated video last shows the object more than `tolerance` frames before the
  engine last shows it (so it did not come back out from behind an occluder). appeared: it
  first shows more than `tolerance` frames after the engine first shows it. count_accuracy:
  the fraction of frames showing as many objects as the engine's render.
  """
  tracked = np.asarray(tracked)
  num_frames = present.shape[0]
  frames = np.arange(num_frames)[:, None]
  last = np.where(present, frames, -1).max(axis=0)
  truth_last = np.where(truth_present, frames, -1).max(axis=0)
  first = np.where(present, frames, num_frames).min(axis=0)
  truth_first = np.where(truth_present, frames, num_frames).min(axis=0)
  seen = truth_present.any(axis=0) & tracked
  vanished = seen & (last < truth_last - tolerance)
  appeared = seen & (first > truth_first + tolerance)
  count = present[:, tracked].sum(axis=1)
  truth_count = truth_present[:, tracked].sum(axis=1)
  return {'vanished': np.nonzero(vanished)[0].tolist(),
          'appeared': np.nonzero(appeared)[0].tolist(),
          'violations': int(vanished.sum() + appeared.sum()),
          'count_accuracy': float(np.mean(count == truth_count)),
          'count': count.tolist(), 'truth_count': truth_count.tolist()}


def particles_outside(weights, inside, particle_area):
  """Particles of one colour outside a region, per frame: their area outside the region
  (weights (T, H, W) of the particles' colour; inside: bool (H, W)) over one particle's area.
  Area, not connected components, because grains that pile up touch each other."""
  return np.where(inside[None], 0.0, weights).sum(axis=(1, 2)) / particle_area


def spill_region(height, width, pivot_y, unit):
  """The region a spill's grains are counted out of: every row above a line a quarter of the
  short side below the cup's pivot (a tipped cup reaches about 0.2 of it below the pivot, so
  grains below that line have left the cup and the shelf: the test of the physics world uses
  the same line)."""
  rows = np.arange(height)[:, None] + 0.5
  return np.broadcast_to(rows < pivot_y + 0.25 * unit, (height, width))


def compare_counts(count, truth_count, total):
  """Agreement of particle counts over time: mean |difference| as a fraction of all particles,
  the final counts, and the first frame with at least one particle out (None if never)."""
  def onset(c):
    out = np.nonzero(np.asarray(c) >= 1.0)[0]
    return int(out[0]) if out.size else None
  return {'error_fraction': float(np.mean(np.abs(np.asarray(count) - truth_count)) / total),
          'final': float(count[-1]), 'truth_final': float(truth_count[-1]), 'total': int(total),
          'onset_frame': onset(count), 'truth_onset_frame': onset(truth_count)}
