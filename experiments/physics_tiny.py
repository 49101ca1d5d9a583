"""The embedded default recipe: a small world simulator of moving bodies, trained on a CPU.

  python -m worldsim.main --config=experiments/physics_tiny.py --workdir=runs/physics_tiny
  python -m worldsim.main --config=experiments/physics_tiny.py:S --workdir=runs/physics_s

The argument after ':' picks a variant: `tiny` (default; a laptop CPU in minutes) or one of
the model table's names (S, B, L, XL) with a data size that suits it. Any field can be
overridden from the command line, e.g. `--config.model.depth=4 --config.train.steps=200`.
"""
import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("dit", "samples")

  # Until the VAE exists the "latent" is the pixel clip scaled to [-1, 1] (3 channels).
  # Clips keep their own size and length; the loader packs them into rows of token_budget
  # tokens (see data_pipelines/loader.py), so one compiled step serves every clip size.
  c.data = ml_collections.ConfigDict()
  c.data.source = "physics_world"     # or shapes (procedural, no build), video_folder, atari
  c.data.data_dir = ""                # "" = <workdir>/data; built there on first use
  c.data.num_clips = 512              # clips to build (physics_world) or draw (shapes)
  c.data.min_side, c.data.max_side = 32, 64       # frame sides when building / drawing
  c.data.min_frames, c.data.max_frames = 4, 16    # built lengths and the random crop's range
  c.data.resize = "cap"               # "native": every pixel; "cap": downscale to the cap
  c.data.max_tokens_per_clip = 128   # tiny frames for a CPU; about 8 clips per row
  c.data.token_budget = 1024          # tokens per packed row
  c.data.max_clips_per_row = 16
  c.data.packing_bins = 64            # rows the packer fills at once (more: less padding)
  c.data.batch_size = 4               # rows per global batch, split over data x fsdp
  c.data.channels = 3
  c.data.max_shapes = 2               # shapes source only
  c.data.worker_count = 0             # grain worker processes; 0 = in the main process

  c.model = ml_collections.ConfigDict()
  c.model.variant = variant
  c.model.patch_size = (1, 4, 4)      # (frames, height, width) of one spacetime patch
  # None = take the value from the variant table in worldsim/models/dit.py.
  c.model.width = ml_collections.config_dict.placeholder(int)
  c.model.depth = ml_collections.config_dict.placeholder(int)
  c.model.num_heads = ml_collections.config_dict.placeholder(int)
  c.model.mlp_ratio = 4.0
  c.model.attention = "chunked"       # xla (dense), chunked (flash, linear memory), cudnn, splash
  c.model.causal = False
  c.model.dtype = "float32"           # compute dtype; parameters stay float32

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.logit_normal_mean = 0.0
  c.diffusion.logit_normal_std = 1.0
  # The time shift grows as sqrt(tokens per clip / shift_base_tokens) (SD3 / Open-Sora 2.0):
  # larger clips need more noise to destroy the same amount of structure.
  c.diffusion.shift_base_tokens = 256
  c.diffusion.max_shift = 4.0
  # Share of clips trained with one t per latent frame (diffusion forcing) instead of one t
  # per clip: what lets the model continue clips and roll out chunk by chunk.
  c.diffusion.per_frame_noise = 0.5

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.99

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.log_every = 20
  c.train.save_every = 200
  c.train.keep_checkpoints = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1: whatever devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.context = 1
  # Logical axis -> mesh axes. A name may appear more than once: flax takes the first entry
  # whose mesh axes are not already used by an earlier dimension of the same array.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("length", "context"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("patch", None),
  )

  c.sample = ml_collections.ConfigDict()
  c.sample.num_videos = 4
  c.sample.steps = 32
  c.sample.num_frames = 8
  c.sample.height = 16
  c.sample.width = 16
  c.sample.fps = 8

  if variant != "tiny":
    # Larger variants: native-size clips up to 128 px, long rows; still a single host.
    c.data.num_clips = 20000
    c.data.min_side, c.data.max_side = 32, 128
    c.data.min_frames, c.data.max_frames = 8, 64
    c.data.max_tokens_per_clip = 4096
    c.data.token_budget = 4096
    c.data.batch_size = 8
    c.model.patch_size = (2, 4, 4)
    c.optim.learning_rate = 3e-4
    c.train.steps = 20000
    c.train.save_every = 1000
    c.sample.num_frames, c.sample.height, c.sample.width = 16, 64, 64
  return c.lock()
