"""A latent dataset read as the loader's clip source: what the DiT trains on in latent space.

Each record comes back as the pixel sources' records do, so the loader's crop, pack and
batch steps serve both spaces:
  video     float32 (T', H', W', C)  the normalised latent, (latent - shift) / scale with the
                                     dataset's own per-channel statistics (latent_stats.json)
  actions   float32 (T', t * A)      when the source has actions: latent frame j gets the
                                     actions of its t pixel frames side by side (pixel frames
                                     4j-3 .. 4j; frame 0, coded alone, gets t-1 zero rows
                                     before its own), so no action is lost or averaged
  rewards   float32 (T', t)          when the source has them (Atari), grouped the same way;
  terminals float32 (T', t)          1.0 on a game-over frame (builder.py: a terminal the
                                     1 + 4k cut drops sits on the last kept frame)
  every other field unchanged (caption, fps, states, source_index, ...).
"""
import numpy as np

from data_pipelines import loader
from data_pipelines.latents import builder
from data_pipelines.latents.features import LATENT


GROUPED_FIELDS = ("actions", "rewards", "terminals")   # per pixel frame -> per latent frame


def per_latent_frame(values: np.ndarray, temporal_factor: int) -> np.ndarray:
  """(1 + t k, A) or (1 + t k,) per pixel frame -> float32 (1 + k, t A): each latent frame's
  pixel frames side by side, frame 0 padded in front with t - 1 zero rows."""
  values = np.asarray(values, np.float32)
  values = values.reshape(len(values), -1)
  t = temporal_factor
  if (len(values) - 1) % t:
    raise ValueError(f"{len(values)} per-frame rows is not 1 + {t}k; latent records keep "
                     "the first 1 + tk frames' rows")
  padded = np.concatenate([np.zeros((t - 1, values.shape[1]), np.float32), values])
  return padded.reshape(len(padded) // t, t * values.shape[1])


actions_per_latent_frame = per_latent_frame   # its first name, for actions only


class LatentClips:
  """Random access to data_dir/<name> (built by latents.build) as normalised latent clips."""

  def __init__(self, data_dir, name: str):
    self.source = builder.load(data_dir, name)
    stats = builder.load_stats(data_dir, name)
    self.shift, self.scale = stats["shift"], stats["scale"]
    vae = stats["vae"]
    self.geometry = loader.LatentGeometry(vae["latent_channels"], vae["temporal_factor"])
    self.stats = stats

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    record = dict(self.source[index])
    record["video"] = self.normalise(record.pop(LATENT))
    for name in GROUPED_FIELDS:
      if name in record:
        record[name] = per_latent_frame(record[name], self.geometry.temporal_factor)
    return record

  def normalise(self, latent) -> np.ndarray:
    return ((np.asarray(latent, np.float32) - self.shift) / self.scale).astype(np.float32)

  def denormalise(self, z) -> np.ndarray:
    return np.asarray(z, np.float32) * self.scale + self.shift

  def __repr__(self) -> str:
    return f"LatentClips({self.source!r}, {len(self)} clips)"
