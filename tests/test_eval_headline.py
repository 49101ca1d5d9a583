"""worldsim.eval.headline on an untrained pixel-space workdir: finite figures, the same for a
seed, and worse than the engine against itself."""
import math

import jax
import numpy as np
import pytest

from worldsim import eval as eval_lib
from worldsim.eval.headline import context_frames, eval_options
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import checkpoint, trainer

NUM_CLIPS, STEPS, SEED = 2, 2, 1000  # two scenes and two sampler steps: plumbing, not quality


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """tests/conftest.py's tiny_config (shapes clips: no dataset build) with one block, an
  untrained state saved as the trainer saves a step. Not trained, and random rather than
  Flax-initialised: compiling two train steps, or even the initialiser, costs a minute on 2
  busy CPU cores (test_trainer.py trains and samples), and orbax saves numpy arrays in a
  second where it slices every replica of sharded ones. Samples are 4 frames of 16 x 16,
  the physics world's smallest frames."""
  from experiments import physics_tiny
  config = physics_tiny.get_config('tiny')
  with config.unlocked():
    config.stages = ('dit',)
    config.data.space, config.data.source = 'pixel', 'shapes'
    config.model.patch_size = (1, 4, 4)
    config.model.depth, config.model.attention, config.model.text = 1, 'xla', 'none'
    config.sample.num_frames, config.sample.height, config.sample.width = 4, 16, 16
    config.data.min_side, config.data.max_side = 16, 32
    config.data.min_frames, config.data.max_frames = 2, 8
    config.data.max_tokens_per_clip, config.data.token_budget = 128, 256
    config.data.batch_size, config.data.caption_len = 8, 16
  path = tmp_path_factory.mktemp('headline')
  abstract = trainer.build(config, mesh_lib.make_mesh(config.mesh)).abstract_state
  saver = checkpoint.Checkpointer(path, save_every=1, keep=1)
  saver.save(0, _random_state(abstract), trainer.open_data(config, path),
             config.to_json_best_effort(), force=True)
  saver.close()  # waits for the save to commit
  return config, path


def _random_state(abstract, seed=0):
  """numpy values for a train state's leaves, as tests/random_params.py draws parameters
  (kernels ~ N(0, 1 / fan_in), scales near 1, small biases); integer leaves (step) 0."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(shape, leaf.dtype)
    if 'scale' in name:
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(leaf.dtype)
    if 'bias' in name:
      return (0.1 * rng.standard_normal(shape)).astype(leaf.dtype)
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_headline_is_finite_deterministic_and_below_the_engine_ceiling(workdir):
  config, path = workdir
  figures = eval_lib.headline(config, path, num_clips=NUM_CLIPS, seed=SEED, steps=STEPS)
  assert {'position_error_px', 'physics_iq_score', 'psnr_db', 'ssim'} <= set(figures)
  assert all(isinstance(v, float) and math.isfinite(v) for v in figures.values()), figures
  assert figures == eval_lib.headline(config, path, num_clips=NUM_CLIPS, seed=SEED,
                                      steps=STEPS)

  ceiling = eval_lib.engine_ceiling(SEED, range(NUM_CLIPS), eval_options(config),
                                    start=context_frames(config))['mean']
  # an untrained model draws noise after the context frame: the tracker loses the objects
  assert ceiling['position_error_px'] < figures['position_error_px'], (ceiling, figures)
  assert figures['physics_iq_score'] < 100.0  # the ceiling's, by definition (masks.py)


def test_clips_match_what_the_default_latent_model_samples():
  from experiments import physics_tiny
  config = physics_tiny.get_config('tiny')  # 4x4x4 VAE, (1, 2, 2) patches, 13 x 32 x 32
  options = eval_options(config)
  assert (options.min_frames, options.max_frames, options.min_side, options.max_side) == (
      13, 13, 32, 32)
  assert context_frames(config) == 1  # one latent frame
  assert eval_options(config, num_frames=10, side=20).min_frames == 9  # 1 + 4k, k >= 1
  assert eval_options(config, side=26).min_side == 24  # multiples of 8 (VAE 4 x patch 2)
  assert eval_options(config, side=8).min_side == 16  # the physics world's smallest
  with pytest.raises(ValueError, match='training seed'):
    eval_lib.headline(config, 'no_workdir', seed=config.seed)
