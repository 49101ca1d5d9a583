"""worldsim.eval.atari: the emulator replayed from the same state scores perfectly (frames and
rewards), a frozen frame clearly worse; a worldsim.Env plugs in by whole steps. Held-out Pong
and Breakout episodes at 32 x 32, from step 56 so that Pong's first point (step 63) falls in
the horizon."""
import json

import numpy as np
import pytest

from worldsim.eval import atari

N_CONTEXT, HORIZON, START = 3, 8, 56


@pytest.fixture(scope='module')
def episodes():
  return atari.held_out_episodes(('pong', 'breakout'), 1, steps=START + N_CONTEXT + HORIZON,
                                 shape=(32, 32))


def _evaluate(predict, episodes):
  return atari.evaluate(predict, episodes, N_CONTEXT, HORIZON, start=START)


def test_the_emulator_is_exact_and_a_frozen_frame_scores_clearly_worse(episodes, tmp_path):
  oracle = _evaluate(atari.emulator_predictor(episodes, start=START), episodes)
  frozen = _evaluate(atari.copy_last_frame, episodes)
  assert oracle['psnr_db'] == [atari.PSNR_CAP_DB] * HORIZON and oracle['ssim_mean'] == 1.0
  assert oracle['reward'] == {'accuracy': 1.0, 'steps': 2 * HORIZON, 'paid_accuracy': 1.0,
                              'paid_steps': 1}                          # Pong's point, -1
  assert max(frozen['psnr_db']) < 45 and frozen['ssim_mean'] < 0.99
  assert 'reward' not in frozen
  assert sorted(frozen['per_game']) == ['breakout', 'pong']
  assert frozen['per_game']['pong']['num_episodes'] == 1
  paths = atari.write_report({'emulator': oracle, 'copy_last_frame': frozen}, tmp_path,
                             extra={'games': ['pong', 'breakout']})
  written = json.loads(open(paths[0]).read())
  assert written['predictors']['copy_last_frame']['psnr_db'] == frozen['psnr_db']
  assert open(paths[1], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


class _EmulatorEnv:
  """A stand-in for worldsim.Env with 4 frames per step: the emulator, which replays exactly
  when env_predictor hands it the context's own actions."""
  frames_per_step = 4

  def __init__(self, episodes):
    self.emulator = atari.emulator_predictor(episodes, start=START)
    self.recorded = np.stack([e['actions'][START:START + N_CONTEXT] for e in episodes])

  def reset(self, seed, context, context_actions):
    np.testing.assert_array_equal(context_actions, self.recorded)
    self.context, self.played = context, context_actions
    return context

  def step(self, actions):
    assert actions.shape == (len(self.context), self.frames_per_step)
    self.played = np.concatenate([self.played, actions], axis=1)
    frames, rewards = self.emulator(self.context, self.played)     # every frame so far
    k = self.frames_per_step
    return frames[:, -k:], rewards[:, -k:].sum(1), np.zeros(len(frames), bool), {}


def test_an_env_is_stepped_whole_steps_and_its_rewards_scored_per_step(episodes):
  env = _EmulatorEnv(episodes)
  report = _evaluate(atari.env_predictor(env), episodes)
  assert report['psnr_db'] == [atari.PSNR_CAP_DB] * HORIZON
  assert report['reward'] == {'accuracy': 1.0, 'steps': 2 * HORIZON // 4, 'paid_accuracy': 1.0,
                              'paid_steps': 1}
  with pytest.raises(ValueError, match='multiple of 4'):
    atari.evaluate(atari.env_predictor(env), episodes, N_CONTEXT, 6, start=START)
  assert 'reward' not in _evaluate(atari.env_predictor(env, rewards=False), episodes)


def test_reward_scores_compare_signs_and_count_paid_steps_apart():
  true = np.array([[0, 0, 1, 0], [0, -1, 0, 4]], np.float32)
  scores = atari.reward_scores(np.array([[0.1, 0, 0.7, -0.6], [0, -2, 0, 0.2]]), true)
  assert scores == {'accuracy': 0.75, 'steps': 8, 'paid_accuracy': 2 / 3, 'paid_steps': 3}
  assert atari.reward_scores(np.zeros((1, 2)), np.zeros((1, 2)))['paid_accuracy'] is None


def test_episodes_too_short_for_the_protocol_are_refused(episodes):
  with pytest.raises(ValueError, match='needs'):
    atari.evaluate(atari.copy_last_frame, episodes, N_CONTEXT, HORIZON + 1, start=START)
