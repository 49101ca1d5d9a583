"""Writing and showing uint8 videos (T, H, W, 3)."""
import os
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


def _check_video(video) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"expected a uint8 video (T, H, W, 3), got {video.dtype} {video.shape}")
  return video


def save_video(path, video, fps: float = 8.0, *, scale: int = 1) -> pathlib.Path:
  """Writes uint8 `video` (T, H, W, 3) to `path`: .mp4 (H.264) through the ffmpeg that
  imageio-ffmpeg ships (via mediapy), .gif through Pillow. Returns the path written.

  Either order works: save_video(path, video, fps) or save_video(video, path, fps); a path
  is a str or os.PathLike, a video never is. `scale`: an integer upscale (pixel repeat), for
  tiny clips players would show as a dot. H.264 needs even sides, so an .mp4 of odd sides
  gets its last row/column repeated once. An .mp4 path falls back to .gif beside it when the
  video extra (imageio-ffmpeg, mediapy) is not installed.
  """
  if isinstance(video, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
    path, video = video, path                        # the older save_video(video, path) order
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"save_video(path, video, fps): no path among the first two arguments "
                    f"({type(path).__name__}, {type(video).__name__})")
  video = _check_video(video)
  if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale={scale!r} must be a positive integer")
  if not fps > 0:
    raise ValueError(f"fps={fps!r} must be positive")
  if scale > 1:
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix.lower() == ".mp4" and _ffmpeg_ready():
    import mediapy
    odd = (0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)
    mediapy.write_video(path, np.pad(video, odd, mode="edge"), fps=fps)
    return path
  from PIL import Image
  path = path.with_suffix(".gif")
  frames = [Image.fromarray(f) for f in video]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                 loop=0)
  return path


def show(video, fps: float = 8.0, **kwargs):
  """Shows a video inline in a notebook (Colab, Jupyter) with mediapy; (B, T, H, W, 3) shows
  the B clips side by side. Outside a notebook IPython prints a placeholder; pass
  return_html=True to get the HTML instead. kwargs go to mediapy.show_video(s) (e.g. title,
  height: the displayed height in pixels, which tiny clips default to at least 128)."""
  _ffmpeg_ready()
  import mediapy
  video = np.asarray(video)
  if video.ndim == 5:
    for clip in video:
      _check_video(clip)
    kwargs.setdefault("height", max(128, video.shape[2]))
    return mediapy.show_videos(list(video), fps=fps, **kwargs)
  video = _check_video(video)
  kwargs.setdefault("height", max(128, video.shape[1]))
  return mediapy.show_video(video, fps=fps, **kwargs)
