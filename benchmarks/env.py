"""worldsim.Env throughput: N envs stepped in one batch against the same N stepped one by one.

  python -m benchmarks.env [--workdir=runs/physics_actions] [--num_envs=1,4,16] [--out=env.json]

Without --workdir the model is the tiny physics recipe (experiments/physics_tiny.py:tiny:
latent space, 32 x 32 frames, the VAE's 4 frames per step) made action-conditioned
(continuous, 2 floats a frame) and block-causal, with random parameters: the figure is the
cost of the machinery, which does not depend on what the weights learned. For each N it
times `env_steps` steps of one Env(num_envs=N) (one jitted call a step) and of N Env(num_envs=1)
stepped in turn (N calls a step), after a step that compiles; the median of `repeats`, which
alternate between the two so that both see the same load.
Prints a table and one JSON line last:
  env_steps_per_s, frames_per_s   per N: batched and one_by_one
  speedup                         per N: batched / one_by_one env steps per second
On a shared CPU compare the ratios, not the absolute rates.
"""
import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _random_like(abstract, seed: int):
  """Random parameters shaped like `abstract` (kernels ~ N(0, 1 / fan_in), scales near 1,
  small biases), filled by numpy so that no initialiser compiles."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return 1.0 + 0.1 * rng.standard_normal(leaf.shape, np.float32)
    if "bias" in name:
      return 0.1 * rng.standard_normal(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    return rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan_in))
  return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_action_sim(seed: int = 0):
  """The tiny physics recipe, action-conditioned and block-causal, with random DiT and VAE
  parameters and unit latent statistics: a latent-space WorldSim without a workdir."""
  import flax.linen as nn
  from experiments import physics_tiny
  from worldsim import sampling
  from worldsim.models import vae as vae_lib
  from worldsim.train import latents
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages = ("dit", "samples")
    config.model.actions, config.model.action_size = "continuous", 2
    config.model.causal = True
  sim = sampling.WorldSim.__new__(sampling.WorldSim)
  setup = sim._setup(config, None)
  sim.step = 0
  sim.params = jax.device_put(_random_like(setup.abstract_state.ema_params, seed))
  vae_cfg = dataclasses.replace(vae_lib.config_from(config.vae), in_channels=config.data.channels)
  vae = vae_lib.VAE(vae_cfg)
  clip = jnp.zeros((1, 1 + vae_cfg.temporal_factor, 32, 32, config.data.channels))
  abstract = nn.unbox(jax.eval_shape(vae.init, jax.random.PRNGKey(0), clip))
  sim.vae = latents.TrainedVAE(vae, {"params": _random_like(abstract["params"], seed + 1)}, 0)
  sim.shift = np.zeros(vae_cfg.latent_channels, np.float32)
  sim.scale = np.ones(vae_cfg.latent_channels, np.float32)
  return sim


def _actions(env, rng):
  shape = (env.num_envs, env.frames_per_step, *env.action_shape)
  if env.action_spec.mode == "continuous":
    return rng.normal(0, 1, shape).astype(np.float32)
  return rng.integers(0, env.action_spec.size, shape)


def time_steps(groups: dict, env_steps: int, repeats: int, seed: int) -> dict:
  """Median seconds for one step of every env of each group (its envs stepped in turn), by
  group name. Repeats alternate between the groups, so on a shared machine both see the
  same load and their ratio holds."""
  rng = np.random.default_rng(seed)
  for envs in groups.values():                       # compiles (the first env of a shape)
    for env in envs:
      env.step(_actions(env, rng))
  times = {name: [] for name in groups}
  for _ in range(repeats):
    for name, envs in groups.items():
      start = time.perf_counter()
      for _ in range(env_steps):
        for env in envs:
          frames = env.step(_actions(env, rng))[0]
      jax.block_until_ready(frames)
      times[name].append((time.perf_counter() - start) / env_steps)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default=None, help="a trained action model (default: the "
                      "tiny random-parameter one)")
  parser.add_argument("--num_envs", default="1,4,16")
  parser.add_argument("--steps", type=int, default=8, help="sampler steps per env step")
  parser.add_argument("--env_steps", type=int, default=3, help="env steps per timing")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args()
  import worldsim
  sim = tiny_action_sim(args.seed) if args.workdir is None else worldsim.load(args.workdir)
  rows = []
  for n in (int(v) for v in args.num_envs.split(",")):
    batched = worldsim.Env(sim, n, steps=args.steps)
    batched.reset(seed=args.seed)
    singles = [worldsim.Env(sim, 1, steps=args.steps) for _ in range(n)]
    for i, env in enumerate(singles):
      env.reset(seed=args.seed, env_ids=[i])
    per_step = batched.frames_per_step
    t = time_steps({"batched": [batched], "one_by_one": singles}, args.env_steps, args.repeats,
                   args.seed)
    t_batched, t_single = t["batched"], t["one_by_one"]
    rows.append({"num_envs": n,
                 "env_steps_per_s": {"batched": n / t_batched, "one_by_one": n / t_single},
                 "frames_per_s": {"batched": n * per_step / t_batched,
                                  "one_by_one": n * per_step / t_single},
                 "speedup": t_single / t_batched})
  print(f"{'envs':>5} {'batched steps/s':>16} {'one-by-one steps/s':>19} {'frames/s batched':>17}"
        f" {'speedup':>8}")
  for r in rows:
    print(f"{r['num_envs']:>5} {r['env_steps_per_s']['batched']:>16.2f} "
          f"{r['env_steps_per_s']['one_by_one']:>19.2f} {r['frames_per_s']['batched']:>17.1f} "
          f"{r['speedup']:>8.2f}")
  cfg = sim.config
  result = {"benchmark": "env", "workdir": args.workdir or "tiny random-parameter action model",
            "device": jax.devices()[0].device_kind, "sampler_steps": args.steps,
            "frames_per_step": worldsim.Env(sim, 1).frames_per_step,
            "frame_size": [cfg.sample.height, cfg.sample.width], "results": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
