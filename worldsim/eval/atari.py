"""Atari world models against the emulator: action-conditioned prediction from the same state.

  episodes = held_out_episodes(('pong', 'breakout'), 8, steps=5 + 32, shape=(64, 64))
  model = evaluate(env_predictor(worldsim.Env(sim, num_envs=16, height=64, width=64)),
                   episodes, n_context=5, horizon=32)
  baseline = evaluate(copy_last_frame, episodes, n_context=5, horizon=32)
  write_report({'model': model, 'copy_last_frame': baseline}, outdir)  # report.json, horizon.png

The protocol DIAMOND (Alonso et al. 2024) and GameNGen (Valevski et al. 2024) report: an
episode the model never trained on is played in ALE; its frames start .. start + n_context - 1
condition the model, which is then fed the actions the emulator recorded and predicts the
next `horizon` frames, each compared with the emulator's: PSNR and SSIM per horizon step (the
curve) and their mean over steps and episodes. Identical frames score PSNR_CAP_DB
(video_metrics floors the error), not infinity, so where many episodes are predicted exactly
(a still screen) the mean of frames' PSNR jumps; psnr_db_pooled, the PSNR of each step's
squared error pooled over the episodes, does not.

Alignment: as the dataset records an episode (data_pipelines/atari/episodes.py) and the model
trains on it, actions[i] is played on frame i (frame i + 1 is the first to show it) and
rewards[i] is what it earned. With c = start + n_context, the predictor gets frames
start .. c - 1 and the actions of frames start .. c + horizon - 1 (the context's and the
predicted frames' own, laid out as in training), and predicts frames c .. c + horizon - 1;
its reward for predicted frames j .. j' is scored against rewards[c + j .. c + j'].

A predictor is predict(context uint8 (N, C, H, W, 3), actions int (N, C + S)) -> Prediction
(or just its frames): frames uint8 (N, S, H, W, 3), the S frames after the context; optionally
rewards (N, R), R dividing S, each the reward of S // R consecutive predicted frames (a world
model's step). Built here:
  env_predictor(env)             a worldsim.Env: reset on the context, step the actions
  copy_last_frame                the baseline: the last context frame, held
  emulator_predictor(episodes)   ALE itself from the same state: exact on the recorded actions
                                 (the ceiling, and a check of the alignment above)
"""
import json
import os
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from data_pipelines.atari import episodes as episodes_lib
from worldsim.eval import video_metrics

HELD_OUT_SEED = 1000  # as headline.py: no recipe builds its episodes with it
_BLACK = np.zeros((1, 1, 1, 3), np.uint8)
PSNR_CAP_DB = float(video_metrics.psnr_per_frame(_BLACK, _BLACK)[0])   # identical frames
# A predicted reward counts as paid from half the smallest reward of ALE's games (1) on, so a
# regression head's near-zero outputs are read as no reward; only the sign is compared, as
# agents clip Atari rewards to -1, 0, 1.
REWARD_THRESHOLD = 0.5


class Prediction(NamedTuple):
  frames: np.ndarray                    # uint8 (N, S, H, W, 3)
  rewards: Optional[np.ndarray] = None  # (N, R): each that of S // R predicted frames


Predictor = Callable[[np.ndarray, np.ndarray], object]   # -> Prediction or frames


# ----------------------------------------------------------------------------- episodes

def play_episode(game: str, seed: int, *, steps: int, shape=(64, 64), frameskip: int = 4,
                 sticky_prob: float = 0.25) -> dict:
  """The first `steps` steps of the episode the atari builder records for (game, seed) with
  these options (its defaults; fewer steps if the game ends sooner): video, actions, rewards,
  terminals, and what replaying it needs (game, seed, frameskip). A built clip's
  `episode_seed` gives back its episode."""
  played = episodes_lib.play(game, seed, sticky_prob=sticky_prob, frameskip=frameskip,
                             max_steps=steps, shape=tuple(shape))
  frames, actions, rewards, terminals = zip(*played)
  return {'game': game, 'seed': int(seed), 'frameskip': frameskip,
          'video': np.stack(frames), 'actions': np.array(actions, np.int32),
          'rewards': np.array(rewards, np.float32), 'terminals': np.array(terminals, bool)}


def held_out_episodes(games: Sequence[str], per_game: int, *, steps: int,
                      seed: int = HELD_OUT_SEED, **options) -> list:
  """`per_game` episodes of each game that last at least `steps` steps (one that ends sooner
  is passed over), seeded as the builder seeds episode i of a build with `seed`: use a seed
  the training data was not built with. options: play_episode's."""
  chosen = []
  for game in games:
    found = 0
    for index in range(4 * per_game + 16):       # a random policy rarely dies this fast
      episode = play_episode(game, episodes_lib.episode_seed(seed, game, index), steps=steps,
                             **options)
      if len(episode['actions']) == steps:
        chosen.append(episode)
        found += 1
        if found == per_game:
          break
    if found < per_game:
      raise ValueError(f'{game}: only {found} of {4 * per_game + 16} episodes last {steps} '
                       'steps; ask for a shorter horizon')
  return chosen


# ----------------------------------------------------------------------------- predictors

def copy_last_frame(context: np.ndarray, actions: np.ndarray) -> Prediction:
  """The baseline every model must beat: nothing moves after the context."""
  context = np.asarray(context)
  return Prediction(np.repeat(context[:, -1:], np.shape(actions)[1] - context.shape[1], axis=1))


def env_predictor(env, seed: int = 0, rewards: bool = True) -> Predictor:
  """A worldsim.Env as a predictor: reset on the context, then step the predicted frames'
  own actions, frames_per_step at a time (Env.step conditions the frames it makes on their
  actions, as the model trained). env.num_envs must be the number of episodes and S a
  multiple of frames_per_step. The context's own actions go in with it (Env.reset's
  context_actions): the last one made the first predicted frame.
  rewards=False for a model without a reward head (its zeros would be read as predictions)."""
  def predict(context, actions):
    context, actions = np.asarray(context, np.uint8), np.asarray(actions, np.int32)
    k, predicted = int(env.frames_per_step), actions[:, context.shape[1]:]
    if predicted.shape[1] % k:
      raise ValueError(f'a horizon of {predicted.shape[1]} frames is not whole steps of the '
                       f'model ({k} frames each); choose a multiple of {k}')
    env.reset(seed=seed, context=context, context_actions=actions[:, :context.shape[1]])
    frames, paid = [], []
    for i in range(0, predicted.shape[1], k):
      step_frames, reward, _, _ = env.step(predicted[:, i:i + k])
      frames.append(np.asarray(step_frames, np.uint8))
      paid.append(np.asarray(reward, np.float32))
    return Prediction(np.concatenate(frames, axis=1), np.stack(paid, 1) if rewards else None)
  return predict


def emulator_predictor(episodes: Sequence[dict], start: int = 0) -> Predictor:
  """ALE as a predictor for `episodes` (in the batch's order): each episode's emulator is
  replayed through its recorded actions up to its context's last frame, then plays the given
  actions from that frame's on: predicted frame j is the screen after the action before it,
  and its reward what its own action earned. Exact for the recorded ones (an episode is a pure function of game, seed and
  actions); with other actions, the best a model ignoring the actions could hope for."""
  saved = {}   # (episode, context length) -> its emulator and state there: a ROM loads slowly

  def emulator_at(i: int, context_frames: int):
    if (i, context_frames) not in saved:
      episode = episodes[i]
      ale = episodes_lib.make_ale(episode['game'], episode['seed'])
      for action in episode['actions'][:start + context_frames - 1]:   # to the last frame
        episodes_lib.act(ale, int(action), episode['frameskip'])
      saved[i, context_frames] = ale, ale.cloneState(include_rng=True)
    ale, state = saved[i, context_frames]
    ale.restoreState(state)
    return ale

  def predict(context, actions):
    n_context, shape = np.shape(context)[1], np.shape(context)[2:4]
    frames, paid = [], []
    for i, episode_actions in enumerate(np.asarray(actions)):
      ale, frameskip = emulator_at(i, n_context), episodes[i]['frameskip']
      steps = [(episodes_lib.act(ale, int(a), frameskip)[0], episodes_lib.screen(ale, shape))
               for a in episode_actions[n_context - 1:]]
      paid.append([reward for reward, _ in steps[1:]])      # earned on predicted frames
      frames.append(np.stack([frame for _, frame in steps[:-1]]))
    return Prediction(np.stack(frames), np.array(paid, np.float32))
  return predict


# ----------------------------------------------------------------------------- scoring

def _prediction(output) -> Prediction:
  return output if isinstance(output, Prediction) else Prediction(np.asarray(output))


def reward_scores(predicted: np.ndarray, true: np.ndarray) -> dict:
  """Sign accuracy of (N, R) predicted rewards against (N, R) true ones: over every step, and
  over the steps the game paid a reward (most pay none, so the first alone flatters)."""
  def sign(r, threshold):
    return np.sign(r) * (np.abs(r) >= threshold)
  hit = sign(predicted, REWARD_THRESHOLD) == sign(true, 1e-6)
  paid = true != 0
  return {'accuracy': float(hit.mean()), 'steps': int(hit.size),
          'paid_accuracy': float(hit[paid].mean()) if paid.any() else None,
          'paid_steps': int(paid.sum())}


def evaluate(predict: Predictor, episodes: Sequence[dict], n_context: int, horizon: int,
             start: int = 0) -> dict:
  """predict's frames against the emulator's over `horizon` steps after each episode's
  context (module docstring). Episodes (play_episode's dicts) share one frame size and last
  at least start + n_context + horizon steps. Returns a JSON-ready report: per-step curves
  psnr_db and ssim (means over episodes) and psnr_db_pooled, with their means over the steps
  (psnr_db_mean, ssim_mean, psnr_db_pooled_mean); psnr_db, ssim and their means per game
  (per_game) and per episode (episodes); and `reward` (reward_scores) when the predictor
  returns rewards."""
  first = start + n_context
  for episode in episodes:
    if len(episode['actions']) < first + horizon:
      raise ValueError(f"episode {episode['game']}/{episode['seed']} has "
                       f"{len(episode['actions'])} steps; the protocol needs {first + horizon}")
  context = np.stack([e['video'][start:first] for e in episodes])
  actions = np.stack([e['actions'][start:first + horizon] for e in episodes])
  truth = np.stack([e['video'][first:first + horizon] for e in episodes])
  prediction = _prediction(predict(context, actions))
  if prediction.frames.shape != truth.shape:
    raise ValueError(f'the predictor returned frames of shape {prediction.frames.shape}, '
                     f'expected {truth.shape}')
  psnr = np.stack([video_metrics.psnr_per_frame(p, t)
                   for p, t in zip(prediction.frames, truth)])
  # one PSNR per step, of the squared error of every episode's frame: episodes side by side
  pooled = video_metrics.psnr_per_frame(np.concatenate(list(prediction.frames), axis=1),
                                        np.concatenate(list(truth), axis=1))
  ssim = np.stack([video_metrics.ssim_per_frame(p, t) for p, t in zip(prediction.frames, truth)])
  games = np.array([e['game'] for e in episodes])
  report = {
      'n_context': n_context, 'horizon': horizon, 'start': start,
      'frame_shape': list(truth.shape[2:4]), 'psnr_cap_db': PSNR_CAP_DB,
      **_curves(psnr, ssim),
      'psnr_db_pooled': pooled.tolist(), 'psnr_db_pooled_mean': float(pooled.mean()),
      'per_game': {str(g): _curves(psnr[games == g], ssim[games == g])
                   for g in dict.fromkeys(games)},
      'episodes': [{'game': e['game'], 'seed': e['seed'], 'psnr_db_mean': float(p.mean()),
                    'ssim_mean': float(s.mean())} for e, p, s in zip(episodes, psnr, ssim)],
  }
  if prediction.rewards is not None:
    predicted = np.asarray(prediction.rewards, np.float64)
    true = np.stack([e['rewards'][first:first + horizon] for e in episodes])
    if predicted.ndim != 2 or horizon % predicted.shape[1]:
      raise ValueError(f'rewards of shape {predicted.shape}: expected (N, R) with R dividing '
                       f'the horizon {horizon}')
    true = true.reshape(len(episodes), predicted.shape[1], -1).sum(-1)
    report['reward'] = reward_scores(predicted, true)
  return report


def _curves(psnr: np.ndarray, ssim: np.ndarray) -> dict:
  return {'psnr_db': psnr.mean(0).tolist(), 'ssim': ssim.mean(0).tolist(),
          'psnr_db_mean': float(psnr.mean()), 'ssim_mean': float(ssim.mean()),
          'num_episodes': len(psnr)}


def write_report(reports: dict, outdir, extra: Optional[dict] = None) -> list:
  """{name: evaluate() report} (the model, baselines) -> outdir/report.json (with `extra`) and
  outdir/horizon.png (each one's PSNR and SSIM curve); returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = [os.path.join(outdir, 'report.json'), os.path.join(outdir, 'horizon.png')]
  with open(paths[0], 'w') as f:
    json.dump({**(extra or {}), 'predictors': reports}, f, indent=1)
  from worldsim.eval import plots  # matplotlib only when plots are written
  plots.plot_prediction_horizon(reports, paths[1])
  return paths
