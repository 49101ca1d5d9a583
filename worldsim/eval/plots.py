"""PNG plots of a physics report (report.py) and of Atari prediction against the emulator
(atari.py), drawn with matplotlib's Agg backend so that they work on machines without a
display."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def _array(values):
  return np.array(values, np.float64)  # JSON's None (NaN in the report) becomes NaN again


def plot_tracks(report, path):
  """x and y of every tracked object over frames: generated (solid) against the engine's
  states (dashed), one colour per object."""
  generated = _array(report['tracks']['generated'])
  engine = _array(report['tracks']['engine_states'])
  frames = np.arange(len(engine))
  figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
  for n, (name, tracked) in enumerate(zip(report['objects'], report['tracked'])):
    if not tracked:
      continue
    for axis, coordinate in zip(axes, (0, 1)):
      line, = axis.plot(frames, generated[:, n, coordinate], '-', label=name)
      axis.plot(frames, engine[:, n, coordinate], '--', color=line.get_color())
  for axis, label in zip(axes, ('x (px)', 'y (px, down)')):
    axis.set_xlabel('frame')
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
  axes[1].invert_yaxis()  # as on screen
  axes[1].legend(fontsize=7, title='solid: generated\ndashed: engine', title_fontsize=7,
                 loc='center left', bbox_to_anchor=(1.02, 0.5))  # off the tracks
  figure.suptitle(f"{report['scene']}: object tracks")
  figure.subplots_adjust(wspace=0.35)  # room for the y labels (tight_layout costs a draw)
  figure.savefig(path, dpi=80, bbox_inches='tight')
  plt.close(figure)


def plot_horizon(report, path):
  """Position error, PSNR and SSIM against the frame (the rollout's horizon)."""
  start = report['start']
  error, psnr, ssim = (_array(report[k]) for k in ('position_error_px', 'psnr_db', 'ssim'))
  figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  axes[0].plot(np.arange(len(error)), error, 'o-')
  axes[0].axhline(report['tracker_floor_px'] or 0.0, color='gray', ls=':',
                  label='tracker on the engine render')
  axes[0].set_ylabel('position error (px)')
  axes[0].legend(fontsize=7)
  horizon = np.arange(start, start + len(psnr))
  axes[1].plot(horizon, psnr, 'o-')
  axes[1].set_ylabel('PSNR (dB)')
  axes[2].plot(horizon, ssim, 'o-')
  axes[2].set_ylabel('SSIM')
  for axis in axes:
    axis.set_xlabel('frame')
    axis.grid(alpha=0.3)
  figure.suptitle(f"{report['scene']}: error against the horizon")
  figure.subplots_adjust(wspace=0.35)  # room for the y labels (tight_layout costs a draw)
  figure.savefig(path, dpi=80, bbox_inches='tight')
  plt.close(figure)


def plot_prediction_horizon(reports, path):
  """PSNR (mean of frames', and pooled over episodes) and SSIM against the horizon step, one
  line per predictor ({name: report} of eval/atari.py: a model and its baselines against
  the emulator)."""
  figure, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for name, report in reports.items():
    steps = np.arange(1, report['horizon'] + 1)
    line, = axes[0].plot(steps, _array(report['psnr_db']), 'o-', ms=3,
                         label=f"{name} ({report['psnr_db_mean']:.1f} dB)")
    axes[1].plot(steps, _array(report['psnr_db_pooled']), 'o-', ms=3, color=line.get_color(),
                 label=f"{name} ({report['psnr_db_pooled_mean']:.1f} dB)")
    axes[2].plot(steps, _array(report['ssim']), 'o-', ms=3, color=line.get_color())
  axes[0].set_ylabel('PSNR (dB), mean of frames')
  axes[1].set_ylabel('PSNR (dB), errors pooled')
  axes[2].set_ylabel('SSIM')
  for axis in axes:
    axis.set_xlabel('frames after the context')
    axis.grid(alpha=0.3)
  for axis in axes[:2]:
    axis.legend(fontsize=7)
  report = next(iter(reports.values()))
  figure.suptitle(f"prediction against the emulator: {', '.join(report['per_game'])}, "
                  f"{report['n_context']} context frames from step {report['start']}")
  figure.subplots_adjust(wspace=0.3)  # room for the y labels (tight_layout costs a draw)
  figure.savefig(path, dpi=80, bbox_inches='tight')
  plt.close(figure)
