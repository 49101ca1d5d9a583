"""Atari (ALE) episodes of random policies as a TFDS (ArrayRecord) dataset of clips."""
from data_pipelines.atari.builder import Atari, build, load, make_config
from data_pipelines.atari.episodes import episode_seed, make_ale, NUM_ACTIONS
