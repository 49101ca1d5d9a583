"""One video file -> clips of upright RGB frames, optionally downscaled and resampled in time.

Decoding streams: a clip is yielded as soon as it is full, so a long video never sits in memory.
Times are exact fractions (pts * time_base), so resampling a 24 fps file to 12 fps keeps
exactly every second frame, with no float drift over a long video.
"""
from collections.abc import Iterator
from fractions import Fraction
import math

import av
import numpy as np


class TruncatedVideoError(ValueError):
  """The file decodes to less than its header states (e.g. an interrupted download)."""


def output_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
  """(height, width) shrunk so the longer side is at most `max_side`, aspect kept; never grown."""
  if max_side is None or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def _to_rgb(frame: av.VideoFrame, max_side: int | None) -> np.ndarray:
  height, width = output_size(frame.height, frame.width, max_side)
  rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
  # Phones store portrait video sideways with a display matrix; `rotation` is the
  # counterclockwise angle that matrix applies, as np.rot90 counts it.
  return np.ascontiguousarray(np.rot90(rgb, k=round(frame.rotation / 90)))


def _slots(frames: Iterator[av.VideoFrame], stream: av.video.stream.VideoStream,
           fps: Fraction) -> Iterator[tuple[int, av.VideoFrame]]:
  """Yields (output slot, frame): frame i goes to slot round((t_i - t_0) * fps).

  The slot after the last frame (its end time) closes the stream, so the frame count is
  round(duration * fps). A frame without a timestamp is placed one frame period after the last.
  """
  start = last_time = last_frame = None
  for frame in frames:
    if frame.pts is None:
      time = last_time + 1 / fps if last_time is not None else Fraction(0)
    else:
      time = frame.pts * stream.time_base
    if start is None:
      start = time
    last_time, last_frame = time, frame
    yield math.floor((time - start) * fps + Fraction(1, 2)), frame
  if last_frame is not None:
    duration = (last_frame.duration * stream.time_base if last_frame.duration
                else 1 / fps)
    yield math.floor((last_time + duration - start) * fps + Fraction(1, 2)), None


def _native_fps(stream) -> Fraction:
  rate = stream.average_rate or stream.guessed_rate
  if not rate:
    raise ValueError("the file states no frame rate; set the fps option to resample it")
  return Fraction(rate)


def decode_clips(path, *, max_side: int | None = None, fps: float | None = None,
                 clip_frames: int = 64, min_clip_frames: int = 8
                 ) -> Iterator[tuple[np.ndarray, float]]:
  """Yields (video (T, H, W, 3) uint8, fps) clips of one video file.

  Resampling to `fps` (None: the file's average rate) shows at output time k / fps the last
  frame whose timestamp rounds to it, or, when none does, the frame before it: frames are
  dropped when `fps` is lower than the file's and repeated when it is higher. Clips hold
  `clip_frames` frames; the tail is kept when it has at least `min_clip_frames`.
  Raises av.FFmpegError or ValueError for a file that is not a readable video, and
  TruncatedVideoError, after the clips it could decode, for one that ends early.
  """
  with av.open(str(path)) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = Fraction(fps).limit_denominator(1001) if fps else _native_fps(stream)
    clip, next_slot = [], 0
    on_screen = on_screen_rgb = None
    cut_by = None   # the decoding error that ended a file early: its frames so far are kept
    try:
      for slot, frame in _slots(container.decode(stream), stream, rate):
        while next_slot < slot:
          if on_screen_rgb is None:   # convert only frames that are shown, and each once
            on_screen_rgb = _to_rgb(on_screen, max_side)
          clip.append(on_screen_rgb)
          next_slot += 1
          if len(clip) == clip_frames:
            yield np.stack(clip), float(rate)
            clip = []
        on_screen, on_screen_rgb = frame, None
    except av.FFmpegError as e:
      cut_by = e
    if next_slot == 0:
      raise cut_by or ValueError("no decodable video frames")
    if len(clip) >= max(min_clip_frames, 1):
      yield np.stack(clip), float(rate)
    decoded = f"decoded {float(next_slot / rate):.2f} s"
    if cut_by:
      raise TruncatedVideoError(f"{decoded}, then {type(cut_by).__name__}: {cut_by}")
    # Only the video stream's own duration is checked: the container's includes audio.
    stated = stream.duration * stream.time_base if stream.duration else None
    if stated and next_slot / rate < 0.9 * stated:
      raise TruncatedVideoError(f"{decoded} of the {float(stated):.2f} s it states")
