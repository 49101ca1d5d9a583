"""Stage 'latents': the configured clip source encoded once by the trained VAE.

  encode(config, workdir)   <workdir>/vae (the `vae` stage's final checkpoint)
                            + config.data.source's pixel clips
                            -> <data_dir>/latents/<latents_name>/ (data_pipelines.latents)

The DiT then reads that dataset in latent space (config.data.space='latent') and never pays
for encoding again; `sample()` decodes its latents with the same VAE (`trained_vae`). The
stage is complete, and skipped, when the dataset's latent_stats.json exists; a dataset of
another VAE config under the same name is an error, not overwritten.
"""
import math
import os
import pathlib
from typing import Any, NamedTuple

import jax
from absl import logging

from data_pipelines import latents as latents_lib
from data_pipelines import loader
from worldsim import config as config_lib
from worldsim.models import vae as vae_lib
from worldsim.train import checkpoint, trainer


class TrainedVAE(NamedTuple):
  model: vae_lib.VAE
  variables: Any        # {'params': ...} on the host, as model.apply takes them
  step: int


def vae_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "vae"


def trained_vae(config, workdir) -> TrainedVAE:
  """The `vae` stage's final parameters, restored replicated onto this host's devices."""
  directory = vae_dir(workdir)
  # Every local device on `data`, so the parameters restore whole onto each of them.
  setup = trainer.build_vae(config, latents_lib.encode.local_mesh())
  try:
    step, state = checkpoint.restore_state_only(directory, setup.abstract_state)
  except FileNotFoundError:
    raise FileNotFoundError(f"no trained VAE under {directory}: run the `vae` stage first "
                            "(add 'vae' to config.stages)") from None
  if step < config.vae.steps:
    logging.warning("the VAE in %s stopped at step %d of %d", directory, step, config.vae.steps)
  return TrainedVAE(setup.model, {"params": jax.device_get(state.params)}, step)


def dataset_dir(config, workdir) -> pathlib.Path:
  return pathlib.Path(trainer.data_config(config, workdir).data_dir) / loader.LATENTS_DIR


def patch_pixels(config) -> int:
  """Pixels per DiT patch side: frames are cut to multiples of it at encode time, which the
  DiT's loader would crop to anyway, and which bounds the clip shapes to compile for."""
  _, ph, pw = config.model.patch_size
  return vae_lib.config_from(config.vae).spatial_factor * math.lcm(int(ph), int(pw))


def encode(config, workdir) -> None:
  """Stage 'latents'. Every host runs it; each encodes its own shard of the source."""
  config_lib.validate(config)
  d = trainer.data_config(config, workdir)
  root = dataset_dir(config, workdir)
  if (root / d.latents_name / latents_lib.STATS_NAME).exists() and jax.process_count() == 1:
    logging.info("latent dataset %s already built; skipping", root / d.latents_name)
    return
  source = loader.pixel_source(d, config.seed)
  vae = trained_vae(config, workdir)
  latents_lib.build(root, source, vae.model, vae.variables, name=d.latents_name,
                    chunk_frames=config.latents.chunk_frames,
                    batch_size=config.latents.batch_size, rules=config.vae.rules,
                    size_multiple=patch_pixels(config))
  stats = latents_lib.load_stats(root, d.latents_name)
  logging.info("latents: %d of %d clips encoded into %s (VAE step %d)", stats["num_clips"],
               stats["source_clips"], os.fspath(root / d.latents_name), vae.step)
