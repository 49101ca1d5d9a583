"""worldsim.video.save_video fed chunk by chunk (as save_rollout feeds it)."""
import av
import numpy as np
import pytest
from PIL import Image

from worldsim import video as video_lib


def _chunks(video, size):
  return (video[i:i + size] for i in range(0, len(video), size))


@pytest.mark.parametrize("name,scale", [("clip.mp4", 1), ("odd.mp4", 2), ("clip.gif", 3)])
def test_streamed_chunks_write_the_same_file_as_the_array(tmp_path, name, scale):
  video = np.random.default_rng(0).integers(0, 256, (7, 15, 7, 3), dtype=np.uint8)
  whole = video_lib.save_video(tmp_path / "whole" / name, video, 8, scale=scale)
  streamed = video_lib.save_video(tmp_path / "streamed" / name, _chunks(video, 3), 8,
                                  scale=scale)
  assert streamed.name == whole.name
  assert streamed.read_bytes() == whole.read_bytes()
  if streamed.suffix == ".mp4":
    with av.open(str(streamed)) as container:
      frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    sides = (15 * scale + 15 * scale % 2, 7 * scale + 7 * scale % 2)   # odd sides padded
    assert len(frames) == 7 and frames[0].shape == (*sides, 3)
  else:
    with Image.open(streamed) as image:
      assert image.n_frames == 7 and image.size == (7 * scale, 15 * scale)


def test_streamed_chunks_are_checked(tmp_path):
  video = np.zeros((4, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="one size"):
    video_lib.save_video(tmp_path / "a.mp4", iter([video, video[:, :6]]), 8)
  with pytest.raises(ValueError, match="uint8 video"):
    video_lib.save_video(tmp_path / "b.mp4", iter([video, video.astype(np.float32)]), 8)
  with pytest.raises(ValueError, match="empty iterator"):
    video_lib.save_video(tmp_path / "c.mp4", iter([]), 8)


def test_auto_scale_brings_tiny_frames_towards_128_pixels(tmp_path):
  assert [video_lib.auto_scale(h, w) for h, w in ((32, 48), (64, 20), (200, 90))] == [2, 2, 1]
  video = np.zeros((3, 24, 40, 3), np.uint8)
  path = video_lib.save_video(tmp_path / "tiny.gif", _chunks(video, 2), 8, scale="auto")
  with Image.open(path) as image:
    assert image.size == (40 * 3, 24 * 3)              # 128 // 40 = 3
  with pytest.raises(ValueError, match="positive integer or 'auto'"):
    video_lib.save_video(tmp_path / "bad.gif", video, 8, scale="big")
