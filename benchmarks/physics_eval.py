"""How physical trained models are, beside the engine-vs-engine ceiling, on held-out scenes.

  python -m benchmarks.physics_eval --workdir=runs/physics_tiny [--workdir=B ...] \
      [--num_clips=16 --steps=32 --seed=1000]

For each workdir: worldsim.eval.headline's protocol (clips of the physics world built with
HELD_OUT_SEED, at the model's sample size; the model continues the engine's first frame(s)
under the clip's caption) and engine_ceiling on the same scenes: a second engine take
jittered by 0.5 px, scored the same way. Its Physics-IQ score is 100 by definition (the
score normalises by that take). Prints a table, then one JSON line; writes
<workdir>/physics_eval/report.json (headline, ceiling, per-clip summaries) and, per clip,
clip_<index>/ with the full report.json, tracks.png, horizon.png and frames.png (engine
above, model below).
"""
import argparse
import json
import pathlib
import shutil
import time

import numpy as np
from PIL import Image

from worldsim import eval as eval_lib, sampling
# names, not the module: worldsim.eval.headline is the function once the package loads
from worldsim.eval.headline import HELD_OUT_SEED, JITTER_PX, clip_reports, context_frames, \
    controllability_of, eval_options, is_action_model, mean_summary
from worldsim.eval.report import SUMMARY_KEYS

# lower is better for these (report.py's SUMMARY_KEYS comment); higher for the rest
LOWER_IS_BETTER = ('position_error_px', 'gravity_relative_error', 'event_offset_frames',
                   'interpenetration_events', 'permanence_violations',
                   'spill_error_fraction', 'mse')


def frames_png(generated, engine, path):
  """The engine's frames above the model's, side by side in time, 4x upscaled."""
  strip = np.concatenate([np.concatenate(list(v), axis=1) for v in (engine, generated)], axis=0)
  Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4),
                                Image.NEAREST).save(path)


def evaluate(workdir, num_clips, seed, steps):
  sim = sampling.load(workdir)
  options = eval_options(sim.config)
  out = pathlib.Path(workdir, 'physics_eval')
  shutil.rmtree(out, ignore_errors=True)  # this script's own output: no stale clips of a longer run
  start, summaries = time.perf_counter(), []
  reports = clip_reports(sim, seed, range(num_clips), options, steps)
  for index, (truth, video, report) in enumerate(reports):
    clip_dir = out / f'clip_{index:02d}'
    eval_lib.write_report(report, clip_dir)
    frames_png(video, truth['video'], clip_dir / 'frames.png')
    summaries.append({'index': index, 'scene': report['scene'], **report['summary']})
  seconds = time.perf_counter() - start
  ceiling = eval_lib.engine_ceiling(seed, range(num_clips), options, jitter=JITTER_PX,
                                    start=context_frames(sim.config))
  ceiling_mean = {k: v for k, v in ceiling['mean'].items()
                  if not k.endswith('_clips') and v is not None}
  ceiling_mean['physics_iq_score'] = 100.0  # the take the score normalises by
  result = {'workdir': str(workdir), 'step': int(sim.step),
            'space': sim.config.data.get('space', 'pixel'),
            'clip': [options.min_frames, options.min_side, options.min_side],
            'context_frames': context_frames(sim.config),
            'steps': steps or int(sim.config.sample.steps),
            'headline': mean_summary(summaries), 'ceiling': ceiling_mean,
            'seconds_per_clip': seconds / num_clips}  # sampling, scoring and plots
  if is_action_model(sim.config):     # PSNR with the clips' own pushes minus with others'
    result['controllability'] = controllability_of(sim, seed, range(num_clips), options, steps)
  (out / 'report.json').write_text(json.dumps({**result, 'clips': summaries,
                                               'ceiling_clips': ceiling['clips']}, indent=1))
  return result


def table(results) -> str:
  keys = [k for k in SUMMARY_KEYS if any(k in r['headline'] for r in results)]
  head = ['figure'] + [f"{pathlib.Path(r['workdir']).name} | ceiling" for r in results]
  rows = [head]
  for key in keys:
    arrow = 'v' if key in LOWER_IS_BETTER else '^'
    rows.append([f'{key} {arrow}'] + [
        f"{r['headline'].get(key, float('nan')):.3f} | {r['ceiling'].get(key, float('nan')):.3f}"
        for r in results])
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', action='append', required=True)
  parser.add_argument('--num_clips', type=int, default=16)
  parser.add_argument('--steps', type=int, default=None, help="default: the model's config")
  parser.add_argument('--seed', type=int, default=HELD_OUT_SEED)
  args = parser.parse_args()
  results = [evaluate(w, args.num_clips, args.seed, args.steps) for w in args.workdir]
  print(table(results))
  for r in results:
    if 'controllability' in r:
      c = r['controllability']
      print(f"{pathlib.Path(r['workdir']).name}: controllability {c['delta_psnr']:+.2f} dB "
            f"(true pushes {c['psnr_true_actions']:.2f}, shuffled {c['psnr_shuffled_actions']:.2f}"
            f", {c['clips']} pushed clips)")
  print(json.dumps({'seed': args.seed, 'num_clips': args.num_clips, 'models': results}))


if __name__ == '__main__':
  main()
