"""What a finished sweep point measured: its size, its compute, and a validation loss that
every point computes the same way, so losses of different points are comparable.

The training loss in metrics.jsonl is not: it is one noisy batch, at random noise levels,
of the training stream. The validation loss here is the rectified-flow loss of the final
checkpoint on held-out clips (the same source drawn with another seed), at fixed noise
levels t (no shift, no logit-normal draw), with fixed noise:

  val_loss = mean over t in T_GRID of  sum_tokens |v(x_t, t) - (eps - x0)|^2 / real tokens

so it depends on the parameters alone. Training FLOPs are analytic (flops.packed_train_flops,
attention counted within clips only, as MFU counts them) per step of the training stream,
averaged over its first batches and multiplied by the steps: not 6ND, which ignores
attention and the timestep / modulation layers that dominate a small DiT.
"""
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data_pipelines import loader
from worldsim import config as config_lib
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint, step as step_lib, trainer

T_GRID = tuple(round(0.1 * k, 1) for k in range(1, 10))   # 0.1 ... 0.9
VAL_SEED = 1_000_003          # the held-out clips' seed: a dataset disjoint from training
VAL_CLIPS = 64
VAL_BATCHES = 4
FLOPS_BATCHES = 8             # training batches averaged for the per-step FLOPs and tokens


def heldout_data(config, workdir):
  """config.data for the held-out clips: VAL_CLIPS clips of the same source drawn (or built)
  with VAL_SEED, in the same data_dir."""
  d = trainer.data_config(config, workdir)
  with d.unlocked():
    d.num_clips = VAL_CLIPS
  return d


def build_datasets(config, workdir) -> None:
  """Builds the training and held-out pixel datasets (a no-op for sources already built)."""
  if config_lib.space(config) != "pixel":
    return      # a latent dataset is built by the latents stage of a VAE run
  loader.pixel_source(trainer.data_config(config, workdir), config.seed)
  loader.pixel_source(heldout_data(config, workdir), VAL_SEED)


def param_count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def fixed_t_loss(params, batch: dict, eps, t, *, model):
  """The rectified-flow loss (step.summed_loss) with every token at noise level t."""
  noised = dict(batch, eps=eps, t=jnp.full(batch["segment_ids"].shape, t, jnp.float32))
  return step_lib.summed_loss(params, model, noised) / step_lib.real_tokens(batch)


def validation_loss(setup, params_by_name: dict, batches, t_grid=T_GRID) -> dict:
  """Per-parameter-set mean loss over `batches` (host batches) and t_grid, and per t."""
  loss = jax.jit(functools.partial(fixed_t_loss, model=setup.model))
  sums = {name: np.zeros(len(t_grid)) for name in params_by_name}
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for index, host_batch in enumerate(batches):
      device_batch = mesh_lib.global_batch(host_batch, setup.batch_shardings)
      eps = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(VAL_SEED), index),
                              device_batch["tokens"].shape, jnp.float32)
      for name, params in params_by_name.items():
        sums[name] += [float(loss(params, device_batch, eps, t)) for t in t_grid]
  out = {}
  for name, total in sums.items():
    per_t = total / len(batches)
    out[name] = {"mean": float(per_t.mean()), "per_t": dict(zip(map(str, t_grid), per_t.tolist()))}
  return out


def physics_metrics(config, workdir):
  """Headline physical-accuracy figures from worldsim.eval when it exists, else None.

  The hook: worldsim.eval.headline(config, workdir) -> {name: float}. A missing module or
  function records None; an error in it is logged and recorded as None too, so a point's
  result never depends on an optional component.
  """
  try:
    eval_lib = importlib.import_module("worldsim.eval")
  except ImportError:
    return None
  headline = getattr(eval_lib, "headline", None)
  if headline is None:
    return None
  try:
    return {k: float(v) for k, v in headline(config, workdir).items()}
  except Exception as e:  # pylint: disable=broad-except  (optional: never fail the point)
    logging.exception("worldsim.eval.headline failed: %s", e)
    return None


def measure_point(config, workdir, flops_batches: int = FLOPS_BATCHES,
                  val_batches: int = VAL_BATCHES) -> dict:
  """A trained point's result: size, compute, tokens, validation loss, physics figures."""
  setup = trainer.build(config, mesh_lib.make_mesh(config.mesh))
  step, state = checkpoint.restore_state_only(workdir, setup.abstract_state)
  stage = trainer.dit_stage(config, workdir, setup)

  # The training stream from its start is what the point trained on (same seed, same order).
  train_iter = trainer.open_data(config, workdir)
  measured = [stage.throughput(next(train_iter)) for _ in range(flops_batches)]
  flops_per_step = float(np.mean([m["model_flops"] for m in measured]))
  tokens_per_step = float(np.mean([m["tokens"] for m in measured]))

  d = heldout_data(config, workdir)
  heldout = iter(loader.make_dataset(d, config.model.patch_size, VAL_SEED,
                                     text=config.model.get("text", "none")))
  batches = [next(heldout) for _ in range(val_batches)]
  losses = validation_loss(setup, {"params": state.params, "ema": state.ema_params}, batches)

  params = param_count(setup.abstract_state.params)
  tokens = tokens_per_step * step
  cfg = setup.dit_cfg
  return {
      "step": int(step),
      "params": params,
      "width": cfg.width, "depth": cfg.depth, "num_heads": cfg.num_heads,
      "patch_size": list(config.model.patch_size),
      "batch_size": config.data.batch_size, "token_budget": config.data.token_budget,
      "learning_rate": config.optim.learning_rate,
      "flops_per_step": flops_per_step,
      "train_flops": flops_per_step * step,          # analytic, attention included
      "train_flops_6nd": 6.0 * params * tokens,      # the usual approximation, for comparison
      "tokens_per_step": tokens_per_step,            # real (non-padding) tokens
      "tokens": tokens,
      "val_loss": losses["params"]["mean"],
      "val_loss_ema": losses["ema"]["mean"],
      "val_loss_per_t": losses["params"]["per_t"],
      "val": {"t_grid": list(T_GRID), "seed": VAL_SEED, "clips": VAL_CLIPS,
              "batches": val_batches},
      "physics": physics_metrics(config, workdir),
  }
