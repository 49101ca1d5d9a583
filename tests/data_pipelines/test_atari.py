"""atari: recorded frames, actions, rewards and terminals line up with a replay in a fresh
emulator."""
import os
from pathlib import Path
import subprocess
import sys

import ale_py
import numpy as np
from PIL import Image
import pytest

from data_pipelines import atari

REPO = Path(__file__).resolve().parents[2]
GAMES = ("pong", "breakout")
# Up to 150 steps of 4 frames: long enough for Pong's first points, and for Breakout's random
# player (seed 0) to lose its last ball at step 148. Clips of 48: Pong's 6-step tail is cut
# (too short), Breakout's 4-step tail is kept (it ends the game).
OPTIONS = dict(episodes_per_game=1, max_episode_steps=150, clip_frames=48, min_clip_frames=10)
STEPS = {"pong": 144, "breakout": 148}


def episodes_of(source) -> dict[str, dict]:
  """Clips joined back into whole episodes, one per game (episode 0)."""
  clips = {}
  for i in range(len(source)):
    record = source[i]
    clips.setdefault(record["game"].decode(), []).append(record)
  episodes = {}
  for game, records in clips.items():
    records.sort(key=lambda r: r["clip_index"])
    assert [r["clip_index"] for r in records] == list(range(len(records)))
    episodes[game] = {key: np.concatenate([r[key] for r in records])
                      for key in ("video", "actions", "rewards", "terminals")}
    episodes[game].update(seed=int(records[0]["episode_seed"]), caption=records[0]["caption"],
                          fps=records[0]["fps"], clip_frames=[len(r["actions"]) for r in records])
  return episodes


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict[str, dict]:
  data_dir = tmp_path_factory.mktemp("atari_native")
  atari.build(data_dir, games=GAMES, frame_shape=None, **OPTIONS)
  return episodes_of(atari.load(data_dir))


def test_both_games_build_with_aligned_fields(native):
  assert sorted(native) == sorted(GAMES)
  for game, episode in native.items():
    steps = STEPS[game]
    assert episode["video"].shape == (steps, 210, 160, 3) and episode["video"].dtype == np.uint8
    assert episode["actions"].shape == (steps,) and episode["actions"].dtype == np.int32
    assert episode["rewards"].shape == (steps,) and episode["rewards"].dtype == np.float32
    assert episode["terminals"].shape == (steps,) and episode["terminals"].dtype == bool
    assert episode["fps"] == 15
    legal = {a.value for a in atari.make_ale(game, 0).getMinimalActionSet()}
    assert set(episode["actions"].tolist()) <= legal
  assert native["pong"]["caption"] == b"Pong, sticky-action random policy (p=0.25)"


def test_terminal_marks_game_over_not_the_step_limit(native):
  """Breakout's game ends: its last step is the one terminal, and the short tail holding it
  is kept; Pong is cut at max_episode_steps: no terminal, and its short tail is dropped."""
  assert native["breakout"]["clip_frames"] == [48, 48, 48, 4]
  np.testing.assert_array_equal(native["breakout"]["terminals"], np.arange(148) == 147)
  assert native["pong"]["clip_frames"] == [48, 48, 48]
  assert not native["pong"]["terminals"].any()


def test_replay_reproduces_frames_rewards_and_terminals(native):
  """frames[t] is seen before actions[t]; rewards[t] is what ALE pays over its 4 frames;
  terminals[t] whether the game is over after them."""
  assert np.any(native["pong"]["rewards"] != 0), "the check below needs a scored point"
  for game, episode in native.items():
    ale = atari.make_ale(game, episode["seed"])
    for t, action in enumerate(episode["actions"]):
      np.testing.assert_array_equal(ale.getScreenRGB(), episode["video"][t], err_msg=f"{game} {t}")
      reward = sum(ale.act(ale_py.Action(action)) for _ in range(4))
      assert reward == episode["rewards"][t], f"{game} step {t}"
      assert ale.game_over() == episode["terminals"][t], f"{game} step {t}"


def test_downscaled_build_is_the_same_play_resized(native, tmp_path):
  atari.build(tmp_path, games=("pong",), frame_shape=(64, 64), **OPTIONS)
  (small,) = episodes_of(atari.load(tmp_path)).values()
  np.testing.assert_array_equal(small["actions"], native["pong"]["actions"])
  expected = [np.asarray(Image.fromarray(f).resize((64, 64), Image.Resampling.BOX))
              for f in native["pong"]["video"]]
  np.testing.assert_array_equal(small["video"], np.stack(expected))


def test_options():
  assert atari.builder.caption("pong", atari.make_config(policy="random")) == \
      "Pong, random policy"
  assert atari.episodes.stored_shape(None, 80) == (80, 61)
  with pytest.raises(ValueError, match="not both"):
    atari.make_config(frame_shape=(64, 64), max_side=80)
  assert atari.episode_seed(0, "pong", 1) != atari.episode_seed(0, "pong", 2)


def test_build_and_load_do_not_import_tensorflow(tmp_path):
  code = ("import sys\n"
          "from data_pipelines import atari\n"
          "atari.build(sys.argv[1], games=('pong',), episodes_per_game=1,\n"
          "            max_episode_steps=8, clip_frames=8)\n"
          "assert len(atari.load(sys.argv[1])) == 1\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env)
