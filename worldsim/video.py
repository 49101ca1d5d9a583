"""Writing and showing uint8 videos (T, H, W, 3)."""
import pathlib

import numpy as np


def _ffmpeg_ready() -> bool:
  """Points mediapy at the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed)."""
  try:
    import imageio_ffmpeg
    import mediapy
  except ImportError:
    return False
  mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
  return True


def save_video(video: np.ndarray, path, fps: float = 8.0) -> pathlib.Path:
  """Writes `video` to `path`: .mp4 through ffmpeg (mediapy), .gif through Pillow.

  An .mp4 path falls back to .gif beside it when the video extra is not installed.
  Returns the path written.
  """
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"expected a uint8 video (T, H, W, 3), got {video.dtype} {video.shape}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".mp4" and _ffmpeg_ready():
    import mediapy
    # H.264 wants even sides; tiny frames are upscaled so players show them at a visible size.
    scale = max(1, 128 // max(video.shape[1:3]))
    big = video.repeat(scale, axis=1).repeat(scale, axis=2)
    big = big[:, : big.shape[1] // 2 * 2, : big.shape[2] // 2 * 2]
    mediapy.write_video(path, big, fps=fps)
    return path
  from PIL import Image
  path = path.with_suffix(".gif")
  frames = [Image.fromarray(f) for f in video]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
  return path


def show(video: np.ndarray, fps: float = 8.0, **kwargs):
  """Shows a video inline in a notebook (Colab, Jupyter) with mediapy."""
  _ffmpeg_ready()
  import mediapy
  return mediapy.show_video(np.asarray(video), fps=fps, **kwargs)
