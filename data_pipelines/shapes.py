"""Procedural clips of coloured shapes moving and bouncing off the walls.

A random-access source (what grain's MapDataset.source takes): clip i depends only on
(seed, i), so it needs no files and any worker can produce any clip. Each clip draws its own
length in [min_frames, max_frames] and its own height and width in [min_side, max_side], so
the stream mixes durations, resolutions and aspect ratios the way real footage does. It is
the loader's test source and the trainer's data when no dataset is built.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShapesSource:
  num_clips: int
  min_frames: int
  max_frames: int
  min_side: int
  max_side: int
  max_shapes: int = 2
  seed: int = 0

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((self.seed, int(index)))
    t = int(rng.integers(self.min_frames, self.max_frames + 1))
    h, w = (int(s) for s in rng.integers(self.min_side, self.max_side + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    background = rng.uniform(0, 60, size=3).astype(np.float32)
    frames = np.broadcast_to(background, (t, h, w, 3)).copy()
    num_shapes = int(rng.integers(1, self.max_shapes + 1))
    for _ in range(num_shapes):
      radius = rng.uniform(0.12, 0.25) * min(h, w)
      pos = rng.uniform([radius, radius], [w - radius, h - radius])
      vel = rng.uniform(-0.12, 0.12, size=2) * np.array([w, h])
      color = rng.uniform(120, 255, size=3).astype(np.float32)
      square = rng.random() < 0.5
      for f in range(t):
        dx, dy = xx - pos[0], yy - pos[1]
        inside = (np.maximum(abs(dx), abs(dy)) < radius) if square else (dx * dx + dy * dy < radius ** 2)
        frames[f][inside] = color
        pos = pos + vel
        for axis, limit in ((0, w), (1, h)):   # elastic bounce off the walls
          if pos[axis] < radius or pos[axis] > limit - radius:
            vel[axis] = -vel[axis]
            pos[axis] = np.clip(pos[axis], radius, limit - radius)
    return {"video": frames.astype(np.uint8), "fps": np.float32(8.0),
            "caption": f"{num_shapes} coloured shape{'s' * (num_shapes > 1)} bouncing",
            "index": np.int64(index)}
