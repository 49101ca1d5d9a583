"""An Atari world model against the emulator, beside the baselines that frame its figure.

  python -m benchmarks.atari_eval [--workdir=runs/atari [--rewards]] [--games=pong,breakout \
      --episodes=8 --n_context=5 --horizon=32 --start=0 --height=64 --width=64]

worldsim/eval/atari.py's protocol (DIAMOND's and GameNGen's): held-out episodes of the
builder's sticky random policy (HELD_OUT_SEED; an episode that ends before start + n_context
+ horizon steps is passed over), their frames start .. start + n_context - 1 as context, then
the emulator's recorded actions fed in and every predicted frame scored against the
emulator's (PSNR, SSIM per horizon step). Predictors:
  model                   the --workdir's model through worldsim.Env (rewards scored with
                          --rewards, for a model with a reward head); Env.reset takes the
                          context's frames and their actions
  copy_last_frame         the last context frame, held: what a model that learned nothing
                          of the dynamics scores
  emulator_other_actions  ALE itself from the same state, fed another episode's actions (the
                          next one's in the batch): a perfect simulator that ignores the
                          actions; a model above it is following them
Writes report.json and horizon.png under <workdir>/atari_eval (or --outdir); prints a table
(PSNR: mean of frames'; pooled: of the errors pooled over episodes, which identical frames do
not inflate; @s: mean PSNR s frames after the context; then per game), then one JSON line.
Without --workdir only the baselines run (about 20 s on a CPU).
"""
import argparse
import json
import pathlib
import time

import numpy as np

from worldsim.eval import atari


def model_predictor(sim, num_envs: int, height: int, width: int, rewards: bool):
  """The loaded model (sampling.load) as a predictor of num_envs episodes at once."""
  from worldsim.env import Env
  env = Env(sim, num_envs=num_envs, height=height, width=width)
  return atari.env_predictor(env, rewards=rewards)


def frame_size(args, sim) -> tuple:
  """--height/--width, else the size the model samples, else the builder's default 64 x 64."""
  sample = sim.config.sample if sim is not None else None
  return (args.height or (sample.height if sample else 64),
          args.width or (sample.width if sample else 64))


def figures(report: dict) -> dict:
  """The headline numbers of one predictor: means, the curve at a few steps, rewards."""
  psnr, horizon = report['psnr_db'], report['horizon']
  steps = sorted({1, max(1, horizon // 4), max(1, horizon // 2), horizon})
  out = {'psnr_db_mean': report['psnr_db_mean'], 'ssim_mean': report['ssim_mean'],
         'psnr_db_pooled_mean': report['psnr_db_pooled_mean'],
         'psnr_db_at_step': {s: psnr[s - 1] for s in steps},
         'psnr_db_mean_per_game': {g: r['psnr_db_mean'] for g, r in report['per_game'].items()}}
  if 'reward' in report:
    out['reward'] = report['reward']
  return out


def table(results: dict) -> str:
  first = next(iter(results.values()))
  steps = list(first['psnr_db_at_step'])
  head = (['predictor', 'PSNR dB', 'pooled', 'SSIM'] + [f'@{s}' for s in steps]
          + list(first['psnr_db_mean_per_game']))
  rows = [head] + [[name, f"{r['psnr_db_mean']:.2f}", f"{r['psnr_db_pooled_mean']:.2f}",
                    f"{r['ssim_mean']:.3f}"]
                   + [f'{v:.2f}' for v in r['psnr_db_at_step'].values()]
                   + [f'{v:.2f}' for v in r['psnr_db_mean_per_game'].values()]
                   for name, r in results.items()]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=None, help='a trained Atari model; none: baselines')
  parser.add_argument('--rewards', action='store_true', help="score the model's rewards")
  parser.add_argument('--outdir', default=None, help='default <workdir>/atari_eval')
  parser.add_argument('--games', default='pong,breakout')
  parser.add_argument('--episodes', type=int, default=8, help='per game')
  parser.add_argument('--n_context', type=int, default=5)
  parser.add_argument('--horizon', type=int, default=32)
  parser.add_argument('--start', type=int, default=0, help='the context starts at this step')
  parser.add_argument('--height', type=int, default=None)
  parser.add_argument('--width', type=int, default=None)
  parser.add_argument('--frameskip', type=int, default=4)
  parser.add_argument('--sticky_prob', type=float, default=0.25)
  parser.add_argument('--seed', type=int, default=atari.HELD_OUT_SEED)
  args = parser.parse_args()
  games = tuple(args.games.split(','))
  started = time.perf_counter()
  sim = None
  if args.workdir:        # the model first: its sample size sets the episodes' frame size
    from worldsim import sampling
    sim = sampling.load(args.workdir)
    if args.seed == sim.config.get('seed', None):
      raise ValueError(f'--seed={args.seed} is the training seed: the episodes would not be '
                       'held out')
  height, width = frame_size(args, sim)
  episodes = atari.held_out_episodes(
      games, args.episodes, steps=args.start + args.n_context + args.horizon,
      seed=args.seed, shape=(height, width), frameskip=args.frameskip,
      sticky_prob=args.sticky_prob)
  emulator = atari.emulator_predictor(episodes, start=args.start)
  predictors = {
      'copy_last_frame': atari.copy_last_frame,
      'emulator_other_actions': lambda context, actions: emulator(context,
                                                                  np.roll(actions, 1, axis=0)),
  }
  if args.workdir:
    predictors = {'model': model_predictor(sim, len(episodes), height, width, args.rewards),
                  **predictors}
  reports = {name: atari.evaluate(p, episodes, args.n_context, args.horizon, start=args.start)
             for name, p in predictors.items()}
  setup = {'games': list(games), 'episodes_per_game': args.episodes, 'seed': args.seed,
           'n_context': args.n_context, 'horizon': args.horizon, 'start': args.start,
           'frame_shape': [height, width], 'frameskip': args.frameskip,
           'sticky_prob': args.sticky_prob, 'workdir': args.workdir,
           'step': int(sim.step) if sim is not None else None}
  outdir = args.outdir or (pathlib.Path(args.workdir, 'atari_eval') if args.workdir
                           else 'runs/atari_eval')
  atari.write_report(reports, outdir, extra=setup)
  results = {name: figures(r) for name, r in reports.items()}
  print(table(results))
  print(json.dumps({**setup, 'predictors': results, 'outdir': str(outdir),
                    'seconds': time.perf_counter() - started}))


if __name__ == '__main__':
  main()
