"""TFDS builder of Atari episodes played by random policies, with actions, rewards and
terminals.

Each game gets `episodes_per_game` episodes, each seeded by (seed, game, episode) so the
dataset is the same on every machine; episodes are cut into clips of at most `clip_frames`
steps. A shorter tail is kept when it has at least `min_clip_frames` steps, or when it ends
the episode at game over, whatever its length: it holds the episode's only terminal step.
Per-frame alignment of frames, actions, rewards and terminals: see `episodes`. A clip starts
at step clip_index * clip_frames of its episode; replaying the episode's actions from
`make_ale(game, episode_seed)` reproduces its frames.

Each option set is its own TFDS config (directory). Records are written as ArrayRecord and
read back without TensorFlow.
"""
import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines.atari import episodes
from data_pipelines.built import clip_features, load_built

POLICIES = ("random", "sticky")


@dataclasses.dataclass(eq=False)
class AtariConfig(tfds.core.BuilderConfig):
  """Recording options; `make_config` checks them and names the config after them."""
  games: tuple[str, ...] = ("pong", "breakout")
  episodes_per_game: int = 10
  policy: str = "sticky"
  sticky_prob: float = 0.25
  frameskip: int = 4
  frame_shape: tuple[int, int] | None = (64, 64)
  max_side: int | None = None
  max_episode_steps: int = 5000
  clip_frames: int = 64
  min_clip_frames: int = 8
  seed: int = 0


def make_config(*, games=("pong", "breakout"), episodes_per_game: int = 10,
                policy: str = "sticky", sticky_prob: float = 0.25, frameskip: int = 4,
                frame_shape: tuple[int, int] | None = (64, 64), max_side: int | None = None,
                max_episode_steps: int = 5000, clip_frames: int = 64,
                min_clip_frames: int = 8, seed: int = 0) -> AtariConfig:
  """Options (see the module docstring); `max_side` keeps the 210x160 aspect and needs
  frame_shape=None; frame_shape=None and max_side=None keep the native 210x160."""
  if policy not in POLICIES:
    raise ValueError(f"policy={policy!r}; use one of {POLICIES}")
  if frame_shape is not None and max_side is not None:
    raise ValueError("set frame_shape (exact size) or max_side (aspect kept), not both")
  if clip_frames < 1 or not 1 <= min_clip_frames <= clip_frames:
    raise ValueError(f"need 1 <= min_clip_frames ({min_clip_frames}) <= clip_frames "
                     f"({clip_frames})")
  height, width = episodes.stored_shape(frame_shape, max_side)
  name = (f"{'-'.join(games)}_{policy}{sticky_prob if policy == 'sticky' else ''}"
          f"_skip{frameskip}_{height}x{width}_ep{episodes_per_game}x{max_episode_steps}"
          f"_clip{clip_frames}_min{min_clip_frames}_seed{seed}")
  return AtariConfig(
      name=name, games=tuple(games), episodes_per_game=episodes_per_game, policy=policy,
      sticky_prob=sticky_prob, frameskip=frameskip,
      frame_shape=None if frame_shape is None else tuple(frame_shape), max_side=max_side,
      max_episode_steps=max_episode_steps, clip_frames=clip_frames,
      min_clip_frames=min_clip_frames, seed=seed)


def caption(game: str, config: AtariConfig) -> str:
  """E.g. 'Pong, random policy' or 'Space Invaders, sticky-action random policy (p=0.25)'."""
  title = game.replace("_", " ").title()
  if config.policy == "random":
    return f"{title}, random policy"
  return f"{title}, sticky-action random policy (p={config.sticky_prob:g})"


class Atari(tfds.core.GeneratorBasedBuilder):
  """Clips of ALE episodes; construct with `config=make_config(...)`."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Frames, actions and rewards.",
      "1.1.0": "Per-frame terminals (game over); a game-over tail shorter than "
               "min_clip_frames is kept.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=clip_features(**{
            "actions": tfds.features.Tensor(shape=(None,), dtype=np.int32, minimum=0,
                                            maximum=episodes.NUM_ACTIONS - 1),
            "rewards": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "terminals": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "game": tfds.features.Text(),
            "episode_index": tfds.features.Scalar(dtype=np.int32),
            "episode_seed": tfds.features.Scalar(dtype=np.int64),
            "clip_index": tfds.features.Scalar(dtype=np.int32),
        }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    shape = episodes.stored_shape(config.frame_shape, config.max_side)
    sticky_prob = config.sticky_prob if config.policy == "sticky" else 0.0
    runs = [(game, index) for game in config.games for index in range(config.episodes_per_game)]
    for game, episode_index in tqdm.tqdm(runs, desc="Playing Atari episodes", unit="episode"):
      seed = episodes.episode_seed(config.seed, game, episode_index)
      steps = episodes.play(game, seed, sticky_prob=sticky_prob, frameskip=config.frameskip,
                            max_steps=config.max_episode_steps, shape=shape)
      for clip_index in itertools.count():
        clip = list(itertools.islice(steps, config.clip_frames))
        ends_game = bool(clip) and clip[-1][3]
        if len(clip) < config.min_clip_frames and not ends_game:
          break
        frames, actions, rewards, terminals = zip(*clip)
        yield f"{game}/{episode_index}/{clip_index}", {
            "video": np.stack(frames),
            "fps": episodes.CONSOLE_FPS / config.frameskip,
            "caption": caption(game, config),
            "actions": np.array(actions, np.int32),
            "rewards": np.array(rewards, np.float32),
            "terminals": np.array(terminals, np.bool_),
            "game": game, "episode_index": episode_index, "episode_seed": seed,
            "clip_index": clip_index}


def build(data_dir, **options) -> Atari:
  """Records the episodes into `data_dir` (skipped when that option set is already built).

  `options` are `make_config`'s, e.g. build(d, games=('pong',), policy='random').
  """
  builder = Atari(data_dir=data_dir, file_format="array_record",
                  config=make_config(**options))
  builder.download_and_prepare()
  return builder


def load(data_dir, split: str = "train", config: str | None = None):
  """A random-access source of the clips built in `data_dir` (see built.load_built)."""
  return load_built(data_dir, Atari, split, config)
