"""Writing and showing uint8 videos (T, H, W, 3)."""
import collections.abc
import itertools
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


def _same_size(chunks, first: np.ndarray):
  """The chunks of a streamed video, each checked, all of the first chunk's frame size."""
  for chunk in chunks:
    chunk = _check_video(chunk)
    if chunk.shape[1:] != first.shape[1:]:
      raise ValueError(f"every chunk of a video needs frames of one size: {first.shape[1:]}, "
                       f"then {chunk.shape[1:]}")
    yield chunk


AUTO_SCALE_SIDE = 128      # scale="auto" upscales frames towards this many pixels


def auto_scale(height: int, width: int) -> int:
  """The whole upscale factor that brings frames under AUTO_SCALE_SIDE pixels towards it."""
  return max(1, AUTO_SCALE_SIDE // max(height, width))


def save_video(path, video, fps: float = 8.0, *, scale=1) -> pathlib.Path:
  """Writes uint8 `video` (T, H, W, 3) to `path`: .mp4 (H.264) through the ffmpeg that
  imageio-ffmpeg ships (via mediapy), .gif through Pillow. Returns the path written.

  Either order works: save_video(path, video, fps) or save_video(video, path, fps); a path
  is a str or os.PathLike, a video never is. `video` may also be an iterator of uint8
  (t, H, W, 3) chunks of one frame size (a generator, such as rollout.rollout_frames): an .mp4
  is then written as they come, one chunk in memory at a time (a .gif still holds them all).
  `scale`: an integer upscale (pixel repeat), for tiny clips players would show as a dot;
  "auto" picks auto_scale of the first frames (a whole factor towards 128 pixels).
  H.264 needs even sides, so an .mp4 of odd sides gets its last row/column repeated once. An
  .mp4 path falls back to .gif beside it when the video extra (imageio-ffmpeg, mediapy) is not
  installed.
  """
  if isinstance(video, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
    path, video = video, path                        # the older save_video(video, path) order
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"save_video(path, video, fps): no path among the first two arguments "
                    f"({type(path).__name__}, {type(video).__name__})")
  if isinstance(video, collections.abc.Iterator):
    first = next(video, None)
    if first is None:
      raise ValueError("expected a uint8 video (T, H, W, 3), got an empty iterator of chunks")
    first = _check_video(first)
    chunks = itertools.chain([first], _same_size(video, first))
  else:
    first = _check_video(video)
    chunks = iter([first])
  if scale == "auto":
    scale = auto_scale(*first.shape[1:3])
  if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale={scale!r} must be a positive integer or 'auto'")
  if not fps > 0:
    raise ValueError(f"fps={fps!r} must be positive")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mp4 = path.suffix.lower() == ".mp4" and _ffmpeg_ready()
  height, width = first.shape[1] * scale, first.shape[2] * scale
  odd = (0, 0), (0, height % 2), (0, width % 2), (0, 0)

  def frames():
    for chunk in chunks:
      if scale > 1:
        chunk = chunk.repeat(scale, axis=1).repeat(scale, axis=2)
      yield from np.pad(chunk, odd, mode="edge") if mp4 else chunk

  if mp4:
    import mediapy
    mediapy.write_video(path, frames(), fps=fps)
    return path
  from PIL import Image
  path = path.with_suffix(".gif")
  frames = [Image.fromarray(f) for f in frames()]
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
