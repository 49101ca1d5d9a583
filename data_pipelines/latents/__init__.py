"""latents: any clip dataset encoded once by the frozen VAE, as a TFDS dataset for the DiT.

  builder = latents.build('/data/latents', physics_world.load('/data'), model, params,
                          name='physics_vae_step20000')      # ArrayRecord, no TensorFlow
  source = latents.load('/data/latents', name='physics_vae_step20000')  # record['latent']
  stats = latents.load_stats('/data/latents', name='physics_vae_step20000')
  z = (record['latent'] - stats['shift']) / stats['scale']   # what the DiT trains on
  clips = latents.LatentClips('/data/latents', 'physics_vae_step20000')  # the loader's source

The record format, the frame rule (first 1 + 4k frames; per-frame fields cut alike, kept at
the pixel frame rate) and the multi-host layout are described in builder.py and encode.py.
"""
from data_pipelines.latents.builder import (FRAME_FIELDS, STATS_NAME, ConcatSource, Latents,
                                            build, load, load_stats)
from data_pipelines.latents.clips import LatentClips, actions_per_latent_frame, per_latent_frame
from data_pipelines.latents.encode import ClipEncoder, kept_frames, pixel_frames_of

__all__ = ["ClipEncoder", "ConcatSource", "FRAME_FIELDS", "LatentClips", "Latents", "STATS_NAME",
           "actions_per_latent_frame", "build", "kept_frames", "load", "load_stats",
           "per_latent_frame", "pixel_frames_of"]
