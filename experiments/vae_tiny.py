"""The video compression network of the default recipe: a causal 3D VAE on physics clips.

  python -m worldsim.main --config=experiments/vae_tiny.py --workdir=runs/vae_tiny
  python -m worldsim.main --config=experiments/vae_tiny.py:small --workdir=runs/vae_small

The argument after ':' picks the VAE variant of worldsim/models/vae.py: `tiny` (default; a
laptop CPU in minutes), `small` or `standard`. The data block is physics_tiny's (so both
stages can share one workdir and its built dataset); the VAE trains on fixed-size random
crops of those clips, writes <workdir>/vae/{checkpoints, metrics.jsonl} and, last,
<workdir>/vae/latent_stats.json (the per-channel shift and scale of its latents). Any field
can be overridden, e.g. `--config.vae.steps=200 --config.vae.disc_start=100`.
"""
import ml_collections

from experiments import physics_tiny


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  recipe = physics_tiny.get_config("tiny" if variant == "tiny" else "S")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("vae",)
  c.data = recipe.data            # the same clips (and dataset build) as the DiT recipe
  c.mesh = recipe.mesh            # axis sizes; the VAE's own rules are config.vae.rules
  c.vae = physics_tiny.vae_block(variant)
  return c.lock()
