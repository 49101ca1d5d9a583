"""Physics-IQ-style motion-mask metrics (Motamed et al. 2025, github.com/google-deepmind/
physics-IQ-benchmark): where, when and how much a video moves, against a reference take.

  spatial IoU              IoU of the masks collapsed over time (any motion at a pixel): where
  spatiotemporal IoU       per-frame IoU, averaged (a frame where neither moves scores 1): when
  weighted spatial IoU     sum(min) / sum(max) of the per-pixel fraction of frames that move:
                           how much
  MSE                      per-frame mean squared error of [0, 1] pixels, averaged

Physics-IQ compares two real takes of each scene (the physical variance) and scores a model
as mean(IoU_model / IoU_variance over the three IoUs) - (MSE_model - MSE_variance), x 100,
clipped to [0, 100]; `physics_iq_score` does the same with two engine takes.

Differences from Physics-IQ's mask maker, for flat-coloured frames tens of pixels wide: a
pixel moves when its largest channel change from the previous frame, after a 1 px Gaussian
blur, exceeds `threshold` (theirs: grey-level change against a running average after a 5 x 5
blur, then a 5 x 5 opening and closing, which would erase a ball a few pixels wide).
"""
import numpy as np
from scipy import ndimage


def motion_masks(video, threshold=24, blur=1.0):
  """bool (T, H, W): pixels whose colour changed from the previous frame by more than
  `threshold` (uint8 units, largest channel) after a Gaussian blur of `blur` px (as Physics-IQ
  blurs before differencing: a generated video's pixel noise would otherwise move
  everywhere). Frame 0 has no previous frame: no motion."""
  frames = np.asarray(video, np.float32)
  if blur:
    frames = ndimage.gaussian_filter(frames, sigma=(0, blur, blur, 0))
  change = np.abs(np.diff(frames, axis=0)).max(axis=-1) > threshold
  return np.concatenate([np.zeros_like(change[:1]), change])


def _iou(a, b):
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def spatial_iou(masks, reference):
  return _iou(masks.any(axis=0), reference.any(axis=0))


def spatiotemporal_iou(masks, reference):
  return float(np.mean([_iou(a, b) for a, b in zip(masks, reference)]))


def weighted_spatial_iou(masks, reference):
  a, b = masks.mean(axis=0), reference.mean(axis=0)
  union = np.maximum(a, b).sum()
  return 1.0 if union == 0 else float(np.minimum(a, b).sum() / union)


def mse(video, reference):
  """Mean squared error of [0, 1] pixels, averaged over frames (Physics-IQ's scale)."""
  diff = (np.asarray(video, np.float32) - np.asarray(reference, np.float32)) / 255.0
  return float(np.mean(diff ** 2))


def mask_metrics(video, reference, start=0, threshold=24, blur=1.0):
  """The four Physics-IQ metrics of `video` against `reference` (same shape, uint8), over
  frames from `start` on (frame `start` moves against frame start - 1)."""
  masks = motion_masks(video, threshold, blur)[start:]
  reference_masks = motion_masks(reference, threshold, blur)[start:]
  return {'spatial_iou': spatial_iou(masks, reference_masks),
          'spatiotemporal_iou': spatiotemporal_iou(masks, reference_masks),
          'weighted_spatial_iou': weighted_spatial_iou(masks, reference_masks),
          'mse': mse(video[start:], reference[start:])}


def physics_iq_score(metrics, variance):
  """Physics-IQ's score from the metrics of a model and of the second take (dicts from
  mask_metrics, or their means over scenes): 100 means as close as two engine takes."""
  ratios = [metrics[k] / variance[k] if variance[k] > 0 else float(metrics[k] > 0)
            for k in ('spatial_iou', 'spatiotemporal_iou', 'weighted_spatial_iou')]
  score = 100 * (np.mean(ratios) - (metrics['mse'] - variance['mse']))
  return float(np.clip(score, 0.0, 100.0))


def normalised(metrics, variance):
  """Each metric against the physical variance: IoU / IoU_variance (1 = as good as a second
  take, above 1 = closer than it) and MSE_variance / MSE (same reading; capped at 100)."""
  out = {k: metrics[k] / variance[k] if variance[k] > 0 else None
         for k in ('spatial_iou', 'spatiotemporal_iou', 'weighted_spatial_iou')}
  out['mse'] = min(variance['mse'] / metrics['mse'], 100.0) if metrics['mse'] > 0 else 100.0
  return out
