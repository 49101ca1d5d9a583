"""Playing Atari episodes in the Arcade Learning Environment (ALE), replayably.

Alignment of one step t (what the builder stores per frame):
  frames[t]   the screen the policy sees (after reset for t = 0, else after step t - 1);
  actions[t]  the ALE action id the policy picks having seen frames[t], held for `frameskip`
              emulator frames;
  rewards[t]  the sum of the rewards ALE returns over those frames;
  terminals[t] True when the game was over after those frames (ALE's game_over(): the
              episode's last step), False on every other step and on the last step of an
              episode cut at max_steps, which the game did not end.
So frames[t + 1] is the first frame that shows the effect of actions[t] (and of rewards[t],
e.g. a changed score). The screen after the last action of an episode is not stored: it
has no action.

ALE's own sticky actions are switched off (repeat_action_probability = 0): the policy makes
its own, so the recorded action is the one played, and an episode is a pure function of
(game, seed, actions): replaying them in a fresh emulator gives the same frames.
"""
from collections.abc import Iterator, Sequence

import ale_py
from ale_py import roms
import numpy as np
from PIL import Image

CONSOLE_FPS = 60   # emulator frames per second; a stored clip runs at CONSOLE_FPS / frameskip
NUM_ACTIONS = 18   # ALE's full action set: action ids mean the same in every game
NATIVE_SHAPE = (210, 160)


def make_ale(game: str, seed: int) -> ale_py.ALEInterface:
  """A fresh emulator for `game` (a ROM id such as 'pong' or 'space_invaders')."""
  if game not in roms.get_all_rom_ids():
    raise ValueError(f"unknown Atari game {game!r}; ALE ships {sorted(roms.get_all_rom_ids())}")
  ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
  ale = ale_py.ALEInterface()
  ale.setInt("random_seed", seed)
  ale.setFloat("repeat_action_probability", 0.0)
  ale.loadROM(roms.get_rom_path(game))
  return ale


def stored_shape(frame_shape: Sequence[int] | None, max_side: int | None) -> tuple[int, int]:
  """The stored (height, width): `frame_shape` when given, else the native 210x160 shrunk
  so its longer side is at most `max_side` (aspect kept)."""
  if frame_shape is not None:
    return tuple(frame_shape)
  height, width = NATIVE_SHAPE
  if max_side is None or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def screen(ale: ale_py.ALEInterface, shape: tuple[int, int]) -> np.ndarray:
  """The current screen as (height, width, 3) uint8 RGB at `shape`."""
  rgb = ale.getScreenRGB()
  if rgb.shape[:2] == shape:
    return rgb
  # Area averaging keeps thin sprites (the Pong ball is 2 pixels wide) visible when shrunk.
  return np.asarray(Image.fromarray(rgb).resize(shape[::-1], Image.Resampling.BOX))


def act(ale: ale_py.ALEInterface, action: int, frameskip: int) -> tuple[float, bool]:
  """Plays `action` for `frameskip` emulator frames (fewer if the game ends); the reward sum
  and whether the game is over."""
  reward = 0.0
  for _ in range(frameskip):
    reward += ale.act(ale_py.Action(action))
    if ale.game_over():
      return reward, True
  return reward, False


def play(game: str, seed: int, *, sticky_prob: float, frameskip: int, max_steps: int,
         shape: tuple[int, int]) -> Iterator[tuple[np.ndarray, int, float, bool]]:
  """Yields (frame, action, reward, terminal) steps of one episode of a random policy.

  The policy draws uniformly from the game's minimal action set, except that with
  probability `sticky_prob` it repeats its previous action (sticky actions, Machado et al.
  2018; 0 gives the plain random policy). The episode ends at game over (its last step is
  terminal) or after `max_steps` steps (none is).
  """
  ale = make_ale(game, seed)
  actions = [int(a.value) for a in ale.getMinimalActionSet()]
  rng = np.random.default_rng(seed)
  action = None
  for _ in range(max_steps):
    frame = screen(ale, shape)
    if action is None or rng.random() >= sticky_prob:
      action = actions[rng.integers(len(actions))]
    reward, terminal = act(ale, action, frameskip)
    yield frame, action, reward, terminal
    if terminal:
      return


def episode_seed(seed: int, game: str, episode_index: int) -> int:
  """The emulator and policy seed of one episode: episodes are independent and replayable."""
  entropy = [seed, episode_index, *game.encode()]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)
