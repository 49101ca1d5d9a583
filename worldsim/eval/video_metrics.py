"""Frame metrics over a rollout's horizon (PSNR, SSIM) and controllability.

SSIM is computed here with scipy (a jax dependency) rather than scikit-image, which is only in
the `bench` extra; it is skimage's `structural_similarity` with its defaults (7 x 7 uniform
window, sample covariance, K1 0.01, K2 0.03, borders cropped, channels averaged), which
benchmarks/vae.py reports, and the tests check that the two agree.
"""
import numpy as np
from scipy import ndimage

_MSE_FLOOR = 1e-10  # identical frames: a finite PSNR (148 dB), as benchmarks/vae.py


def psnr_per_frame(video, reference):
  """PSNR (dB) of each frame of uint8 videos (T, H, W, C)."""
  diff = np.asarray(video, np.float64) - np.asarray(reference, np.float64)
  mse = np.mean(diff ** 2, axis=(1, 2, 3))
  return 10 * np.log10(255.0 ** 2 / np.maximum(mse, _MSE_FLOOR))


def ssim(image, reference, win_size=7, data_range=255.0):
  """SSIM of two (H, W, C) images, as skimage.metrics.structural_similarity(channel_axis=-1)."""
  x = np.asarray(image, np.float64)
  y = np.asarray(reference, np.float64)
  size = (win_size, win_size, 1)  # within each channel
  count = win_size ** 2
  covariance_norm = count / (count - 1)  # sample covariance

  def mean(a):
    return ndimage.uniform_filter(a, size=size, mode='reflect')

  ux, uy = mean(x), mean(y)
  vx = covariance_norm * (mean(x * x) - ux * ux)
  vy = covariance_norm * (mean(y * y) - uy * uy)
  vxy = covariance_norm * (mean(x * y) - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  similarity = ((2 * ux * uy + c1) * (2 * vxy + c2)
                / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2)))
  pad = (win_size - 1) // 2  # the window reaches past the border there
  return float(similarity[pad:-pad, pad:-pad].mean())


def ssim_per_frame(video, reference, win_size=7):
  return np.array([ssim(a, b, win_size) for a, b in zip(video, reference)])


def controllability(generate, actions, reference, rng=None, start=1):
  """How much the actions steer the model: PSNR with the true actions minus PSNR with
  shuffled ones, against the reference videos the true actions produced.

  generate(actions (B, T, A)) -> videos (B, T, H, W, C) uint8. The shuffle pairs each clip
  with another clip's actions (a derangement over the batch), or, for one clip, permutes its
  actions in time. PSNR is averaged over frames from `start` on (the conditioning frames
  before it show no effect of the actions). A model that ignores its actions scores 0; one
  that follows them scores above 0.
  """
  rng = np.random.default_rng(0) if rng is None else rng
  actions = np.asarray(actions)
  reference = np.asarray(reference)
  if len(actions) > 1:
    order = (np.arange(len(actions)) + rng.integers(1, len(actions))) % len(actions)
    shuffled = actions[order]
  else:
    shuffled = actions[:, rng.permutation(actions.shape[1])]

  def mean_psnr(videos):
    return np.mean([psnr_per_frame(v[start:], r[start:]) for v, r in zip(videos, reference)],
                   axis=0)

  true_curve = mean_psnr(generate(actions))
  shuffled_curve = mean_psnr(generate(shuffled))
  return {'psnr_true_actions': float(true_curve.mean()),
          'psnr_shuffled_actions': float(shuffled_curve.mean()),
          'delta_psnr': float(true_curve.mean() - shuffled_curve.mean()),
          'delta_psnr_per_frame': (true_curve - shuffled_curve).tolist()}
