"""grain pipelines from a clip source to the trainer's token batches.

source -> seeded shuffle (reshuffled every epoch) -> per-host shard -> clip to tokens -> batch.
A batch row is one clip here: tokens (B, L, P), positions (B, L, 3), segment_ids (B, L) all 1.
The iterator is a grain DatasetIterator, whose state the checkpoint saves with the model.
"""
from typing import Sequence

import grain
import numpy as np

from data_pipelines.shapes import ShapesSource
from worldsim.models import patches


def pixels_to_latent(video: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]: the identity "latent" used before the VAE stage."""
  return video.astype(np.float32) / 127.5 - 1.0


def latent_to_pixels(latent) -> np.ndarray:
  return np.clip((np.asarray(latent) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class ClipToTokens(grain.transforms.Map):
  """A clip record -> its spacetime-patch tokens, positions and segment ids."""

  def __init__(self, patch_size: Sequence[int]):
    self.patch_size = tuple(patch_size)

  def map(self, record: dict) -> dict:
    latent = pixels_to_latent(record["video"])
    grid = patches.grid_shape(latent.shape, self.patch_size)
    tokens = patches.patchify(latent, self.patch_size)
    return {"tokens": tokens, "positions": patches.positions(grid),
            "segment_ids": np.ones(tokens.shape[0], np.int32)}


def make_source(data_cfg, seed: int):
  if data_cfg.source == "shapes":
    return ShapesSource(num_clips=data_cfg.num_clips, num_frames=data_cfg.num_frames,
                        height=data_cfg.height, width=data_cfg.width,
                        max_shapes=data_cfg.max_shapes, seed=seed)
  raise ValueError(f"config.data.source={data_cfg.source!r} is not a known source; use 'shapes'")


def make_dataset(data_cfg, patch_size, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The training stream of this host: an endless IterDataset of local batches."""
  if data_cfg.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={data_cfg.batch_size} must divide over "
                     f"{process_count} hosts")
  ds = (grain.MapDataset.source(make_source(data_cfg, seed))
        .shuffle(seed=seed)
        .repeat(None)
        [process_index::process_count]
        .map(ClipToTokens(patch_size))
        .batch(data_cfg.batch_size // process_count, drop_remainder=True))
  ds = ds.to_iter_dataset()
  if data_cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return ds
