"""The embedded default recipe: a small world simulator of moving bodies, trained on a CPU.

  python -m worldsim.main --config=experiments/physics_tiny.py --workdir=runs/physics_tiny
  python -m worldsim.main --config=experiments/physics_tiny.py:S --workdir=runs/physics_s

Four stages, each resuming or skipping when its output is complete:
  vae      the causal 3D VAE on random crops of the clips      -> <workdir>/vae/
  latents  every clip encoded once by it                       -> <data_dir>/latents/<name>/
  dit      the DiT on those latents, packed at native size     -> <workdir>/checkpoints/
  samples  videos drawn by the DiT, decoded by the VAE         -> <workdir>/samples/

The argument after ':' picks a variant: `tiny` (default; a laptop CPU in minutes) or one of
the model table's names (S, B, L, XL) with a data size and VAE (`small`, 4x8x8) that suit
it. Any field can be overridden from the command line, e.g. `--config.model.depth=4
--config.train.steps=200`; `--config.data.space=pixel` trains the DiT on pixels without a
VAE (then leave out the vae and latents stages: `--config.stages=dit,samples`).
"""
import ml_collections

from worldsim.models import vae


def vae_block(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The `vae` block: model, crops, losses, optimiser, schedule and sharding rules."""
  v = ml_collections.ConfigDict()
  v.variant = variant
  # VAEConfig overrides; None = the variant table's value (worldsim/models/vae.py).
  for name in ("base_channels", "num_res_blocks", "latent_channels", "temporal_factor",
               "spatial_factor", "disc_channels", "disc_layers", "res_kernel_t"):
    v[name] = ml_collections.config_dict.placeholder(int)
  v.channel_multipliers = ml_collections.config_dict.placeholder(tuple)
  v.dtype = "float32"                  # compute dtype; parameters stay float32
  v.norm = "rms"                       # per-voxel feature norm: "rms" or "none"
  v.sample_posterior = True            # train on posterior samples (else the mean)
  v.shortcuts = False                  # pooling / repetition paths around resampling
  v.upsample = "nearest"               # decoder upsampling: "nearest" or "subpixel"
  v.upsample_kernel_t = 3              # temporal kernel of the sub-pixel upsampling conv: 2 or 3
  v.upsample_width = "level"           # its output width: "level" (it leaves) or "next" (it enters)
  v.zero_init = False                  # res blocks' last convs start at zero (identity blocks)
  if variant == "tiny":                # the recipe's: twice the table's width and latents
    v.base_channels, v.latent_channels = 16, 8
    # What a CPU's few hundred steps can learn (BUILD_NOTES, "The tiny VAE"): without the
    # norm, flat colours and brightness pass through from the start (+1 dB at equal steps);
    # decoding the mean and weighting L2 (what PSNR measures) each add about 0.3 dB; pooling
    # shortcuts +1.8 dB, sub-pixel upsampling (frames of one latent get their own weights)
    # +0.5 dB more.
    v.norm, v.sample_posterior = "none", False
    v.shortcuts, v.upsample = True, "subpixel"
    # Per-frame res blocks: a third of their FLOPs (1.9x the steps per second), and a temporal
    # receptive field of about 5 latent frames instead of 14, so latent frames past a 9-frame
    # crop's 3 decode nearly as well as earlier ones (at equal time +1.9 dB held-out).
    v.res_kernel_t = 1
    # The sub-pixel upsampling convs were the step's largest cost: 2-frame kernels that give
    # the next level's width make the step 16% cheaper at equal quality per step (1500 steps:
    # 28.72 dB held-out either way), spent on more steps. Zero-initialised blocks start the net
    # as its shortcut codec (+0.4 dB at 850 steps).
    v.upsample_kernel_t, v.upsample_width, v.zero_init = 2, "next", True

  # Crops: 1 + 4k frames (frame 0 is coded alone), sides multiples of the spatial factor.
  # Clips shorter or smaller than the crop are skipped (and counted in skipped_clips).
  # At least 9 frames (3 latent frames): the causal convs pad the past with frame 0, so on
  # 5-frame crops no layer ever sees a context of video latents only, and every latent
  # frame past the second decoded badly and never improved (BUILD_NOTES, "The tiny VAE").
  v.crop_frames = 9
  v.crop_height = 32
  v.crop_width = 32
  # Clips per global batch, split over data x fsdp. The tiny recipe's 4: at equal compute,
  # twice the steps on half the batch gained 0.7 dB (batch 2 gained nothing more). On more
  # devices than that, raise it to a multiple of data x fsdp (the config check says so).
  v.batch_size = 4 if variant == "tiny" else 8

  # loss = L1 + l2_weight * L2 + kl_weight * KL [+ disc_weight * hinge G loss]
  v.kl_weight = 1e-6                   # KL is a mean over latent elements, L1 one over pixels
  v.l2_weight = 10.0 if variant == "tiny" else 1.0
  v.disc_start = -1                    # step the 3D patch discriminator switches on; -1 = never
  v.disc_weight = 0.1

  v.optim = ml_collections.ConfigDict()   # the discriminator uses the same settings
  v.optim.learning_rate = 1e-3
  v.optim.warmup_steps = 50
  v.optim.weight_decay = 0.0
  v.optim.b1 = 0.9
  v.optim.b2 = 0.99
  v.optim.grad_clip = 1.0

  v.steps = 1750                       # about 11 minutes on 2 cores
  v.log_every = 20
  v.save_every = 200
  v.keep_checkpoints = 2
  v.stats_batches = 8                  # batches whose latents give vae/latent_stats.json

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
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("vae", "latents", "dit", "samples")

  # Clips keep their own size and length; the loader packs them into rows of token_budget
  # tokens (see data_pipelines/loader.py), so one compiled step serves every clip size.
  c.data = ml_collections.ConfigDict()
  c.data.source = "physics_world"     # or shapes (procedural, no build), video_folder, atari
  c.data.data_dir = ""                # "" = <workdir>/data; built there on first use
  c.data.num_clips = 512              # clips to build (physics_world) or draw (shapes)
  c.data.min_side, c.data.max_side = 32, 64       # frame sides when building / drawing
  c.data.min_frames, c.data.max_frames = 4, 16    # built lengths and the random crop's range
  # What the DiT models: "latent" (the VAE's latents of the clips, encoded once by the latents
  # stage into <data_dir>/latents/<latents_name>) or "pixel" (the clips in [-1, 1]).
  c.data.space = "latent"
  c.data.latents_name = ""            # "" = <source>_vae_<variant>_step<steps>
  c.data.resize = "cap"               # "native": every pixel; "cap": shrink to the cap
  c.data.max_tokens_per_clip = 256   # a CPU-sized cap; about 4 to 16 clips per row
  c.data.token_budget = 1024          # tokens per packed row
  c.data.max_clips_per_row = 16
  c.data.caption_len = 32             # byte tokens (or embedding rows) kept per caption
  c.data.packing_bins = 64            # rows the packer fills at once (more: less padding)
  c.data.batch_size = 4               # rows per global batch, split over data x fsdp
  c.data.channels = 3
  c.data.max_shapes = 2               # shapes source only
  # physics_world only: the share of clips whose agent is pushed, and the chance of a push per
  # frame in those (the actions the action-conditioned recipes learn from).
  c.data.active_fraction = 0.5
  c.data.push_probability = 0.1
  c.data.worker_count = 0             # grain worker processes; 0 = in the main process

  c.model = ml_collections.ConfigDict()
  c.model.variant = variant
  c.model.patch_size = (1, 2, 2)      # (latent frames, height, width) of one spacetime patch
  # None = take the value from the variant table in worldsim/models/dit.py.
  c.model.width = ml_collections.config_dict.placeholder(int)
  c.model.depth = ml_collections.config_dict.placeholder(int)
  c.model.num_heads = ml_collections.config_dict.placeholder(int)
  c.model.mlp_ratio = 4.0
  c.model.attention = "chunked"       # xla (dense), chunked (flash, linear memory), cudnn, splash
  c.model.causal = False
  # Attention over a sequence split on the context axis (config.mesh.context > 1): "none"
  # (XLA moves what it needs), "ulysses" (all-to-all to whole sequences, heads split),
  # "ring" (key/value blocks passed around), or "ulysses_ring" (Ulysses within groups of
  # ulysses_degree devices, ring across them).
  c.model.context_parallel = "none"
  c.model.ulysses_degree = 1
  # Captions: "bytes" (a byte tokenizer and a small text encoder trained with the model),
  # "embeddings" (a source's precomputed `caption_embedding` rows, text_embed_dim wide, from
  # any external encoder) or "none" (unconditional). Cross-attention reads them per clip.
  c.model.text = "bytes"
  c.model.text_depth = 2
  c.model.text_embed_dim = 0          # "embeddings" only
  c.model.dtype = "float32"           # compute dtype; parameters stay float32
  c.model.remat = "none"              # none, full, dots, offload (worldsim/models/dit.py)
  # Actions the DiT is conditioned on, per token through adaLN (models/conditioning.py):
  # "none", "continuous" (action_size floats per frame; physics_world's pushes: 2) or
  # "discrete" (one id per frame out of action_size; atari: 18). experiments/physics_actions.py
  # and atari_world.py switch them on.
  c.model.actions = "none"
  c.model.action_size = 0
  # Per-token [reward, terminal] heads trained beside the velocity (sources with rewards:
  # atari); DiT.heads reads them.
  c.model.reward_heads = False

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
  # Share of clips trained with the null caption, so guidance has an unconditional model.
  c.diffusion.caption_dropout = 0.1
  # Share of clips trained with their actions unknown (model.actions on): guidance's
  # action-free model, and rollouts that leave actions open.
  c.diffusion.action_dropout = 0.1

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
  # Gradient accumulation: each step runs its batch in this many parts (rows j, j + k, ...)
  # one after another, for a batch larger than activations allow at once.
  c.train.accum_steps = 1
  c.train.log_every = 20
  c.train.save_every = 200
  c.train.keep_checkpoints = 2
  # A non-finite loss or gradient skips its update; this many in a row stop the run.
  c.train.max_nonfinite_skips = 10
  # Weight of the reward heads' losses (model.reward_heads) beside the velocity loss.
  c.train.heads_weight = 1.0

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
      ("vocab", None),
  )

  c.vae = vae_block("tiny" if variant == "tiny" else "small")

  c.latents = ml_collections.ConfigDict()
  # Pixel frames encoded at a time (memory, not results); clips are padded in time to the
  # next chunk, so all clips of one frame size share a compiled shape. 12: every clip of up
  # to 16 frames keeps 13 (1 + 4k), coded in one call with no padding (16 padded them to 17,
  # 20 s more of the main job for the same latents).
  c.latents.chunk_frames = 12
  c.latents.batch_size = 8            # equal-size clips encoded together

  c.sample = ml_collections.ConfigDict()
  c.sample.num_videos = 4
  c.sample.sampler = "euler"          # euler, heun or dpmpp_2m (worldsim/diffusion/samplers.py)
  c.sample.steps = 32
  c.sample.guidance = 1.0             # classifier-free guidance scale; 1 = none (one pass)
  # What the samples stage asks for ("" = the unconditional model).
  c.sample.caption = "a stack of 3 boxes topples to the left"
  c.sample.num_frames = 13            # 1 + 4k: 4 latent frames
  c.sample.height = 32
  c.sample.width = 32
  c.sample.fps = 8

  if variant != "tiny":
    # Larger variants: native-size clips up to 128 px, long rows; still a single host.
    c.data.num_clips = 20000
    c.data.min_side, c.data.max_side = 32, 128
    c.data.min_frames, c.data.max_frames = 8, 64
    c.data.max_tokens_per_clip = 4096
    c.data.token_budget = 4096
    c.data.batch_size = 8
    c.optim.learning_rate = 3e-4
    c.train.steps = 20000
    c.train.save_every = 1000
    c.sample.num_frames, c.sample.height, c.sample.width = 17, 128, 128
    c.latents.chunk_frames = 16
  return c.lock()
