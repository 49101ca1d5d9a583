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
from worldsim.models import vae


def vae_block(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The `vae` block: model, crops, losses, optimiser, schedule and sharding rules."""
  v = ml_collections.ConfigDict()
  v.variant = variant
  # VAEConfig overrides; None = the variant table's value (worldsim/models/vae.py).
  for name in ("base_channels", "num_res_blocks", "latent_channels", "temporal_factor",
               "spatial_factor", "disc_channels", "disc_layers"):
    v[name] = ml_collections.config_dict.placeholder(int)
  v.channel_multipliers = ml_collections.config_dict.placeholder(tuple)
  v.dtype = "float32"                  # compute dtype; parameters stay float32

  # Crops: 1 + 4k frames (frame 0 is coded alone), sides multiples of the spatial factor.
  # Clips shorter or smaller than the crop are skipped (and counted in skipped_clips).
  v.crop_frames = 9
  v.crop_height = 32
  v.crop_width = 32
  v.batch_size = 8                     # clips per global batch, split over data x fsdp

  # loss = L1 + l2_weight * L2 + kl_weight * KL [+ disc_weight * hinge G loss]
  v.kl_weight = 1e-6                   # KL is a mean over latent elements, L1 one over pixels
  v.l2_weight = 1.0
  v.disc_start = -1                    # step the 3D patch discriminator switches on; -1 = never
  v.disc_weight = 0.1

  v.optim = ml_collections.ConfigDict()   # the discriminator uses the same settings
  v.optim.learning_rate = 1e-3
  v.optim.warmup_steps = 50
  v.optim.weight_decay = 0.0
  v.optim.b1 = 0.9
  v.optim.b2 = 0.99
  v.optim.grad_clip = 1.0

  v.steps = 600
  v.log_every = 20
  v.save_every = 200
  v.keep_checkpoints = 2
  v.stats_batches = 8                  # batches whose latents give latent_stats.json

  # Logical axis -> mesh axes for the VAE (the sizes come from config.mesh); why height stays
  # whole: see RULES in worldsim/models/vae.py.
  v.rules = vae.RULES

  if variant != "tiny":
    v.crop_frames, v.crop_height, v.crop_width = 17, 64, 64
    v.optim.learning_rate = 3e-4
    v.steps = 20000
    v.save_every = 1000
    v.disc_start = 10000
  return v


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  recipe = physics_tiny.get_config("tiny" if variant == "tiny" else "S")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("vae",)
  c.data = recipe.data            # the same clips (and dataset build) as the DiT recipe
  c.mesh = recipe.mesh            # axis sizes; the VAE's own rules are config.vae.rules
  c.vae = vae_block(variant)
  return c.lock()
