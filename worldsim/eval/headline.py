"""A trained model's physical accuracy in a few numbers, on scenes it never saw.

  figures = headline(config, workdir)     # {'position_error_px': 3.1, 'physics_iq_score': ...}

For each held-out physics-world scene the engine simulates the clip at a size the model
samples, the model continues the engine's first frame(s) under the clip's caption, and
physics_report scores the continuation against the engine, with a second engine take as the
physical variance. headline averages the reports' summaries; benchmarks/physics_eval.py
prints them beside the engine-vs-engine ceiling and writes every report.
"""
import math

import numpy as np

from data_pipelines.physics_world.simulate import ClipOptions, simulate_clip
from data_pipelines.physics_world.takes import simulate_take
from worldsim import config as config_lib, sampling
from worldsim.eval.report import SUMMARY_KEYS, physics_report
from worldsim.eval.video_metrics import controllability
from worldsim.models import vae as vae_lib

HELD_OUT_SEED = 1000  # as benchmarks/vae.py: a build seed no recipe trains on
JITTER_PX = 0.5  # the second take's, as engine_ceiling's default
MIN_SIDE = 16  # the physics world's smallest frame that holds its layouts


def eval_options(config, num_frames=None, side=None) -> ClipOptions:
  """Clip options whose every clip is num_frames x side x side and valid for the model of
  `config` (its saved config: sim.config).

  Defaults come from the model's sample size (config.sample: a size it trained near). Clips
  are square because the physics world draws every aspect ratio only when its sides may
  vary: side is the default's geometric mean, rounded to a multiple of the VAE's spatial
  factor times the patch and no smaller than the physics world's MIN_SIDE; frames are rounded
  to 1 + t (k pt - 1), whole patches of the VAE's latent frames (as sampling.round_shape).
  """
  s, (t, f), patch = config.sample, _factors(config), tuple(config.model.patch_size)
  step = f * math.lcm(patch[1], patch[2])
  side = math.sqrt(s.height * s.width) if side is None else side
  side = max(round(side / step), math.ceil(MIN_SIDE / step)) * step
  frames = s.num_frames if num_frames is None else num_frames
  frames = 1 + t * (max(1, round(((frames - 1) / t + 1) / patch[0])) * patch[0] - 1)
  if frames <= context_frames(config):
    raise ValueError(f'num_frames={frames}: the model needs more than its '
                     f'{context_frames(config)} context frames to have any to generate')
  return ClipOptions(min_side=side, max_side=side, min_frames=frames, max_frames=frames)


def context_frames(config) -> int:
  """The fewest frames the model can be conditioned on: one patch of frames to the DiT,
  1 + t (pt - 1) video frames (t: the VAE's temporal factor, 1 in pixel space)."""
  return 1 + _factors(config)[0] * (config.model.patch_size[0] - 1)


def _factors(config) -> tuple:
  """(frames, pixels) per latent frame and latent pixel: the VAE's, or (1, 1) in pixel space."""
  if config_lib.space(config) != 'latent':
    return 1, 1
  vae = vae_lib.config_from(config.vae)
  return vae.temporal_factor, vae.spatial_factor


def clip_reports(sim, seed, indices, options, steps=None, jitter=JITTER_PX):
  """(engine record, generated video, full physics report) of each held-out clip;
  deterministic: the scene comes from (seed, index) and the model's noise from the index."""
  start = context_frames(sim.config)
  # byte-caption models read the clip's caption; the physics world has no precomputed
  # embeddings for an 'embeddings' model, which then runs unconditionally
  for index in indices:
    truth = simulate_clip(seed, index, options)
    second = simulate_take(seed, index, options, jitter=jitter)
    video = _continue(sim, truth, steps, int(index), start)
    yield truth, video, physics_report(video, truth, second_take=second, start=start)


def _continue(sim, truth, steps, seed, start, actions=None):
  """The model's continuation of the engine clip `truth` from its first `start` frames, under
  its caption (byte-caption models; the physics world has no precomputed embeddings for an
  'embeddings' model, which then runs unconditionally) and, for an action-conditioned model,
  `actions` (default: the clip's own pushes)."""
  captioned = sim.config.model.get('text', 'none') == 'bytes'
  if is_action_model(sim.config):
    actions = truth['actions'] if actions is None else actions
  frames, height, width = truth['video'].shape[:3]
  return sim.sample(truth['caption'] if captioned else None, num_frames=frames, height=height,
                    width=width, steps=steps, seed=seed, context=truth['video'][:start],
                    actions=actions, progress=False)


def is_action_model(config) -> bool:
  return config.model.get('actions', 'none') != 'none'


def controllability_of(sim, seed, indices, options, steps=None) -> dict:
  """How much the pushes steer an action-conditioned model (video_metrics.controllability):
  PSNR against the engine with each held-out clip's own pushes minus with another clip's, over
  the clips whose agent is pushed, each clip's noise the same in both."""
  start = context_frames(sim.config)
  truths = [t for t in (simulate_clip(seed, i, options) for i in indices) if t['actions'].any()]
  if len(truths) < 2:
    raise ValueError(f'{len(truths)} of {len(indices)} held-out clips push their agent; '
                     'controllability needs two or more: raise num_clips')

  def generate(actions):
    return np.stack([_continue(sim, t, steps, k, start, a)
                     for k, (t, a) in enumerate(zip(truths, actions))])

  result = controllability(generate, np.stack([t['actions'] for t in truths]),
                           np.stack([t['video'] for t in truths]), start=start)
  return {**result, 'clips': len(truths)}


def mean_summary(summaries) -> dict:
  """Each headline figure averaged over the clips that have it (gravity needs free flight,
  spill counts a spill scene); figures no clip has are left out, so every value is a float."""
  mean = {}
  for key in SUMMARY_KEYS:
    values = [s[key] for s in summaries if s.get(key) is not None]
    if values:
      mean[key] = float(np.mean(values))
  mean['clips'] = float(len(summaries))
  return mean


def headline(config, workdir, num_clips=8, seed=HELD_OUT_SEED, steps=None) -> dict:
  """The mean physics-report summary of the model trained in `workdir` over `num_clips`
  held-out scenes: {figure: float} (report.SUMMARY_KEYS, and 'clips').

  config: the run's config (the seed it trained its data with, which `seed` must differ
  from); the model and its sample size come from the workdir's checkpoint. steps: sampler
  steps (default: the model's config.sample.steps).
  """
  if config is not None and seed == config.get('seed', None):
    raise ValueError(f'seed={seed} is the training seed: the scenes would not be held out')
  sim = sampling.load(str(workdir))
  reports = clip_reports(sim, seed, range(num_clips), eval_options(sim.config), steps)
  return mean_summary([report['summary'] for _, _, report in reports])
