"""Scaling sweep on the physics world: DiT sizes at fixed compute levels (IsoFLOP design).

  python -m worldsim.sweep --sweep=experiments/sweeps/physics_sizes.py --workdir=runs/sweep
  python -m worldsim.sweep --sweep=experiments/sweeps/physics_sizes.py:patch --workdir=...

Every point is experiments/physics_tiny.py:tiny shrunk to a CPU: the DiT alone on pixels
(no VAE, so nothing but the DiT's size and data change between points), uncaptioned, on the
physics_world clips. A point is a model size at a compute level, its steps chosen so that
steps x (analytic FLOPs per step) hits the level: at one level, small models see many tokens
and large ones few, which is what an IsoFLOP profile needs (Chinchilla, approach 2). Each
level trains the window of 4 sizes around where its optimum is expected (the window slides
to larger models as compute doubles), so 7 sizes cover 4 levels in 16 points. The steps
estimate assumes rows full of clips at the token cap; result.json records measured FLOPs.
On 2 CPU cores shared with other jobs a point took 3-7 min, mostly start-up, compilation and
the physics evaluation (benchmarks/scaling/README.md).

Variants (the argument after ':'):
  ''      7 sizes, 4 compute levels, 4 sizes each (16 points)
  patch   compression ratio: 3 patch sizes x 2 sizes at one level
  smoke   2 points of a few steps (checks the machinery)
"""
from worldsim.models import dit
from worldsim.scaling import flops
from worldsim.sweep import Sweep

CONFIG = "experiments/physics_tiny.py:tiny"
BASE = {
    "stages": ("dit",),
    "data.space": "pixel",
    "data.source": "physics_world",
    "data.num_clips": 512,
    "data.min_frames": 4,
    "data.max_frames": 8,
    "data.max_tokens_per_clip": 256,
    "data.token_budget": 1024,
    "data.batch_size": 2,
    "model.text": "none",
    "model.patch_size": (1, 4, 4),
    "train.log_every": 20,
    "train.save_every": 100,      # resumable mid-point
    "train.keep_checkpoints": 1,
}
# (width, depth, heads) -> peak learning rate: narrower models take larger steps.
SIZES = {(8, 1, 1): 4e-3, (16, 1, 2): 3e-3, (24, 1, 2): 2.5e-3, (32, 1, 2): 2e-3,
         (32, 2, 4): 2e-3, (48, 2, 4): 1.5e-3, (64, 2, 4): 1e-3}
COMPUTE_LEVELS = (2e10, 4e10, 8e10, 1.6e11)       # training FLOPs
WINDOW = 4                                        # sizes trained per level


def flops_per_step(width: int, depth: int, heads: int, base: dict = BASE) -> float:
  """Analytic train FLOPs of one step, rows full of clips of max_tokens_per_clip tokens."""
  pt, ph, pw = base["model.patch_size"]
  budget, clip = base["data.token_budget"], base["data.max_tokens_per_clip"]
  cfg = dit.DiTConfig(token_dim=pt * ph * pw * 3, width=width, depth=depth, num_heads=heads)
  row = flops.dit_forward_flops(cfg, budget, attended_pairs=(budget // clip) * clip * clip)
  return 3.0 * base["data.batch_size"] * row


def size_point(width: int, depth: int, heads: int, compute: float, base: dict = BASE) -> dict:
  steps = max(int(round(compute / flops_per_step(width, depth, heads, base))), 10)
  return {"model.width": width, "model.depth": depth, "model.num_heads": heads,
          "optim.learning_rate": SIZES.get((width, depth, heads), 1e-3),   # 1e-3: the recipe's
          "optim.warmup_steps": min(50, steps // 10), "train.steps": steps}


def get_sweep(arg: str = "") -> Sweep:
  if arg == "smoke":
    return Sweep(CONFIG, BASE, [size_point(16, 1, 2, 1e9), size_point(32, 1, 2, 2e9)])
  if arg == "patch":
    # 8 sampled frames: a whole number of 2-frame patches (the physics report samples).
    sweep_base = dict(BASE, **{"sample.num_frames": 8})
    points = []
    for patch in ((1, 2, 2), (1, 4, 4), (2, 4, 4)):
      base = dict(BASE, **{"model.patch_size": patch})
      for size in ((32, 2, 4), (64, 2, 4)):
        point = size_point(*size, COMPUTE_LEVELS[2], base)
        points.append(dict(point, **{"model.patch_size": patch}))
    return Sweep(CONFIG, sweep_base, points)
  if arg:
    raise ValueError(f"unknown sweep variant {arg!r}; use '', 'patch' or 'smoke'")
  sizes = list(SIZES)
  return Sweep(CONFIG, BASE, [size_point(*size, c) for level, c in enumerate(COMPUTE_LEVELS)
                              for size in sizes[level:level + WINDOW]])
