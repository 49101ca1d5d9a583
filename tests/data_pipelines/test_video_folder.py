"""video_folder: good files become clips at native size with captions; bad ones are reported."""
import json
import os
from pathlib import Path
import struct
import subprocess
import sys

import av
import numpy as np
import pytest

from data_pipelines import video_folder

REPO = Path(__file__).resolve().parents[2]
BAD_FILES = ("truncated.mp4", "empty.mp4", "notes.mov")


def moving_square(num_frames: int, height: int, width: int) -> np.ndarray:
  """A 10x10 white square on black moving right 2 pixels a frame, from (10, 0)."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    frames[t, 10:20, 2 * t:2 * t + 10] = 255
  return frames


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str, pix_fmt: str,
                options: dict | None = None) -> None:
  with av.open(str(path), "w", options=options) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def turned_on_display(mp4: bytes) -> bytes:
  """The same mp4 with the display matrix phones write for portrait video (turn 90 cw)."""
  data = bytearray(mp4)
  tkhd = data.index(b"tkhd")
  assert data[tkhd + 4] == 0, "expects a version-0 tkhd box"
  matrix = tkhd + 44   # after type, version/flags, 5 32-bit fields, 8 reserved, 4 16-bit
  data[matrix:matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
  return bytes(data)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
  folder = tmp_path_factory.mktemp("videos")
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  write_video(folder / "square.mp4", moving_square(24, 48, 80), 24, codec, "yuv420p")
  (folder / "square.txt").write_text("a white square slides right\n")
  write_video(folder / "anim.gif", moving_square(12, 30, 40), 10, "gif", "rgb8")
  mp4 = (folder / "square.mp4").read_bytes()
  (folder / "phone" / "portrait.mp4").parent.mkdir()
  (folder / "phone" / "portrait.mp4").write_bytes(turned_on_display(mp4))
  (folder / "truncated.mp4").write_bytes(mp4[:len(mp4) // 2])
  (folder / "empty.mp4").write_bytes(b"")
  # An interrupted download: the header (written first) states 48 frames, the data stops.
  # Noise makes every frame take bytes, so the cut falls mid-video, not in the first frame.
  noisy = np.maximum(moving_square(48, 48, 80),
                     np.random.default_rng(0).integers(0, 60, (48, 48, 80, 3), np.uint8))
  write_video(folder / "interrupted.mp4", noisy, 24, codec, "yuv420p",
              options={"movflags": "faststart"})
  full = (folder / "interrupted.mp4").read_bytes()
  (folder / "interrupted.mp4").write_bytes(full[:len(full) * 6 // 10])
  (folder / "notes.mov").write_text("these are notes, not a video\n" * 20)
  return folder


def clips_by_source(source) -> dict[str, list[dict]]:
  clips = {}
  for i in range(len(source)):
    record = source[i]
    clips.setdefault(record["source"].decode(), []).append(record)
  return {name: sorted(c, key=lambda r: r["clip_index"]) for name, c in clips.items()}


@pytest.fixture(scope="module")
def built(video_dir, tmp_path_factory):
  """One data_dir with two option sets: native, and shrunk + resampled + short clips."""
  data_dir = tmp_path_factory.mktemp("data")
  native = video_folder.build(data_dir, video_dir)
  small = video_folder.build(data_dir, video_dir, max_side=40, fps=12, clip_frames=8,
                             min_clip_frames=4)
  return data_dir, native, small


def test_native_build_keeps_size_frames_and_captions(built):
  data_dir, native, _ = built
  clips = clips_by_source(video_folder.load(data_dir, config=native.builder_config.name))
  assert sorted(clips) == ["anim.gif", "interrupted.mp4", "phone/portrait.mp4", "square.mp4"]

  (square,) = clips["square.mp4"]
  assert square["video"].shape == (24, 48, 80, 3) and square["video"].dtype == np.uint8
  assert square["fps"] == 24 and square["caption"] == b"a white square slides right"
  assert square["actions"].shape == (24, 0) and square["actions"].dtype == np.float32
  left_edges = [np.flatnonzero(frame[15, :, 0] > 128)[0] for frame in square["video"]]
  assert left_edges == [2 * t for t in range(24)]

  (gif,) = clips["anim.gif"]
  assert gif["video"].shape == (12, 30, 40, 3) and gif["fps"] == 10 and gif["caption"] == b""

  # Shown upright: the square's first frame, turned 90 degrees clockwise.
  (portrait,) = clips["phone/portrait.mp4"]
  assert portrait["video"].shape == (24, 80, 48, 3)
  np.testing.assert_array_equal(portrait["video"][0, :, :, 0] > 128,
                                np.rot90(square["video"][0, :, :, 0] > 128, k=-1))


def test_bad_files_are_skipped_and_reported(built):
  for builder in built[1:]:
    report = json.loads((Path(builder.data_dir) / video_folder.builder.REPORT_NAME).read_text())
    assert sorted(report["skipped"]) == sorted(BAD_FILES)
    assert all(report["skipped"].values()), "every skipped file has a reason"
    assert sorted(report["ingested"]) == ["anim.gif", "phone/portrait.mp4", "square.mp4"]
    assert list(report["partial"]) == ["interrupted.mp4"]
    assert "TruncatedVideoError" in report["partial"]["interrupted.mp4"]


def test_truncated_file_keeps_the_frames_before_the_cut(built):
  data_dir, native, _ = built
  clips = clips_by_source(video_folder.load(data_dir, config=native.builder_config.name))
  (interrupted,) = clips["interrupted.mp4"]
  assert 8 <= len(interrupted["video"]) < 48


def test_max_side_fps_and_clip_length(built):
  data_dir, _, small = built
  clips = clips_by_source(video_folder.load(data_dir, config=small.builder_config.name))
  shapes = {name: [c["video"].shape for c in cs] for name, cs in clips.items()}
  # 24 frames at 24 fps -> 12 at 12 fps -> a clip of 8 and a kept tail of 4.
  assert shapes["square.mp4"] == [(8, 24, 40, 3), (4, 24, 40, 3)]
  assert shapes["phone/portrait.mp4"] == [(8, 40, 24, 3), (4, 40, 24, 3)]
  # 1.2 s at 12 fps = 14 frames (repeats); 30x40 is within max_side, so not resized.
  assert shapes["anim.gif"] == [(8, 30, 40, 3), (6, 30, 40, 3)]
  assert [c["clip_index"] for c in clips["square.mp4"]] == [0, 1]
  assert all(c["fps"] == 12 for cs in clips.values() for c in cs)
  # Every second source frame: the square moves 4 pixels per kept frame (scaled by 1/2).
  left_edges = [np.flatnonzero(f[7, :, 0] > 128)[0] for f in clips["square.mp4"][0]["video"]]
  assert left_edges == [2 * t for t in range(8)]


def test_load_needs_config_when_several_were_built(built):
  with pytest.raises(FileNotFoundError, match="pass config="):
    video_folder.load(built[0])


def test_build_and_load_do_not_import_tensorflow(video_dir, tmp_path):
  code = ("import sys\n"
          "from data_pipelines import video_folder\n"
          "video_folder.build(sys.argv[1], sys.argv[2], clip_frames=8)\n"
          "assert len(video_folder.load(sys.argv[1])) > 0\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  subprocess.run([sys.executable, "-c", code, str(tmp_path), str(video_dir)], check=True,
                 env=env)
