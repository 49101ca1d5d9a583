"""worldsim.Env and worldsim.GymEnv on a tiny random-parameter action-conditioned DiT.

One module-wide model (pixel space, 8 x 8 frames, one token frame per step, 2 sampler steps),
so every test reuses the one compiled step."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import worldsim
from worldsim import env as env_lib
from worldsim import sampling
from worldsim.models import dit
from tests.random_params import random_params

NUM_ENVS = 4
STEPS = dict(steps=2)


def _config(actions="continuous", action_size=2, reward_heads=True):
  """The laptop recipe in pixel space: 8 x 8 frames of 4 x 4 patches (4 tokens a frame), a
  one-block causal DiT, a window of 3 token frames (4-frame clips less one step)."""
  from experiments import physics_tiny
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.stages = ("dit", "samples")
    config.data.source, config.data.space = "physics_world", "pixel"
    config.data.min_frames, config.data.max_frames = 2, 4
    config.data.batch_size, config.data.token_budget = 8, 64
    config.data.max_tokens_per_clip = 64
    config.model.patch_size = (1, 4, 4)
    config.model.depth, config.model.attention, config.model.causal = 1, "xla", True
    config.model.text = "none"
    config.model.actions, config.model.action_size = actions, action_size
    config.model.reward_heads = reward_heads
    config.sample.height = config.sample.width = 8
    config.sample.steps = 2
  return config


def _sim(**kwargs):
  """A WorldSim with random parameters, the action embedder's and the heads' included (their
  zero-initialised output layers would make actions and rewards do nothing)."""
  config = _config(**kwargs)
  probe = sampling.WorldSim.__new__(sampling.WorldSim)
  probe._setup(config, None)                 # the model exactly as WorldSim builds it
  cfg = probe.model.cfg
  row = (jnp.zeros((1, 4, cfg.token_dim)), jnp.zeros((1, 4, 3), jnp.int32),
         jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4)))
  if cfg.action_dim:
    row += (None, None, None, jnp.zeros((1, 4, cfg.action_dim)), jnp.ones((1, 4)))
  method = dit.DiT.velocity_and_heads if cfg.reward_heads else None
  params = random_params(_Init(probe.model, method), *row)["params"]
  return sampling.WorldSim.from_params(config, params)


class _Init:
  """module.init through `method` (the heads' parameters exist only on that path)."""

  def __init__(self, model, method):
    self.model, self.method = model, method

  def init(self, rng, *args):
    return self.model.init(rng, *args, method=self.method)


@pytest.fixture(scope="module")
def sim():
  return _sim()


@pytest.fixture(scope="module")
def batched(sim):
  """4 envs reset at seed 3 and stepped 3 times under per-env actions: (obs, steps)."""
  env = worldsim.Env(sim, NUM_ENVS, **STEPS)
  obs = env.reset(seed=3)
  actions = _actions(3)
  return obs, [env.step(a) for a in actions], env._state


def _actions(num_steps, num_envs=NUM_ENVS):
  rng = np.random.default_rng(0)
  return [rng.normal(0, 2, (num_envs, 1, 2)).astype(np.float32) for _ in range(num_steps)]


def test_steps_are_seeded_and_batched_equals_each_env_alone(sim, batched):
  obs, steps, state = batched
  assert obs.shape == (NUM_ENVS, 1, 8, 8, 3) and obs.dtype == np.uint8
  frames, reward, terminated, info = steps[0]
  env = worldsim.Env(sim, NUM_ENVS, **STEPS)
  assert env.frames_per_step == 1
  assert frames.shape == (NUM_ENVS, 1, 8, 8, 3) and frames.dtype == np.uint8
  assert reward.shape == (NUM_ENVS,) and reward.dtype == np.float32
  assert terminated.shape == (NUM_ENVS,) and terminated.dtype == bool
  assert info["terminal_probability"].shape == (NUM_ENVS,) and np.any(reward != 0)
  compiled = env_lib._advance._cache_size()
  # A seed replays; another seed draws other frames.
  np.testing.assert_array_equal(env.reset(seed=3), obs)
  for a, (f, r, d, _) in zip(_actions(3), steps):
    again = env.step(a)
    np.testing.assert_array_equal(again[0], f)
    np.testing.assert_array_equal(again[1], r)
  assert not np.array_equal(env.reset(seed=4), obs)
  # Env i alone (drawing as env i of the batch) is row i of the batch.
  alone = worldsim.Env(sim, 1, **STEPS)
  for i in (0, 2):
    np.testing.assert_array_equal(alone.reset(seed=3, env_ids=[i])[0], obs[i])
    for a, (f, r, d, _) in zip(_actions(3), steps):
      f1, r1, d1, _ = alone.step(a[i:i + 1])
      assert np.abs(f1[0].astype(int) - f[i]).max() <= 1
      np.testing.assert_allclose(r1[0], r[i], atol=1e-5)
      assert d1[0] == d[i]
    np.testing.assert_allclose(alone._state["tokens"][0], state["tokens"][i], atol=1e-5)
  # Batch sizes 4 and 1: one compile each, whatever the seed and step.
  assert env_lib._advance._cache_size() == compiled + 1


def test_actions_change_the_next_frames(sim, batched):
  obs, steps, _ = batched
  env = worldsim.Env(sim, NUM_ENVS, **STEPS)
  env.reset(seed=3)
  first = _actions(1)[0]
  pushed = env.step(-first)[0]                    # other actions, same noise
  assert not np.array_equal(pushed, steps[0][0])
  env.reset(seed=3)
  held = env.step(first[:, 0])[0]                 # one action per step: held over its frames
  np.testing.assert_array_equal(held, steps[0][0])
  env.reset(seed=3)
  assert not np.array_equal(env.step(None)[0], steps[0][0])   # unknown actions
  # Context frames come back as given and seed the window.
  context = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), np.uint8)
  np.testing.assert_array_equal(env.reset(seed=3, context=context)[1, :, :, :], context)
  after_unknown = env.step(first)[0]
  assert after_unknown.shape == (NUM_ENVS, 1, 8, 8, 3)
  # The context's own actions (an emulator's, say) reach the window: they shape what follows.
  played = np.random.default_rng(2).normal(0, 2, (2, 2)).astype(np.float32)
  env.reset(seed=3, context=context, context_actions=played)
  assert not np.array_equal(env.step(first)[0], after_unknown)
  with pytest.raises(ValueError, match="one per context frame"):
    env.reset(seed=3, context=context, context_actions=played[:1])


def test_bad_actions_and_arguments_are_named(sim):
  env = worldsim.Env(sim, 2, **STEPS)
  with pytest.raises(RuntimeError, match="reset"):
    env.step(np.zeros((2, 2)))
  env._state = {}                                 # as if reset: the checks come first
  with pytest.raises(ValueError, match=r"\(2, 1, 2\).*\(2, 2\).*got shape \(3, 2\)"):
    env.step(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="finite"):
    env.step(np.full((2, 2), np.nan))
  with pytest.raises(ValueError, match="num_envs=0"):
    worldsim.Env(sim, 0)
  with pytest.raises(ValueError, match="multiples of 4"):
    worldsim.Env(sim, height=10)
  with pytest.raises(ValueError, match="context must be uint8"):
    env.reset(context=np.zeros((1, 16, 16, 3), np.uint8))
  discrete = worldsim.Env(_sim(actions="discrete", action_size=3, reward_heads=False), 2)
  discrete._state = {}
  with pytest.raises(ValueError, match=r"in \[0, 3\)"):
    discrete.step(np.asarray([0, 3]))
  with pytest.raises(ValueError, match="integer ids"):
    discrete.step(np.asarray([0.5, 1.0]))
  with pytest.raises(ValueError, match=r"\(2, 1\).*\(2,\)"):
    discrete.step(np.zeros((2, 2), int))
  with pytest.raises(ValueError, match="needs an action-conditioned model"):
    worldsim.Env(_sim(actions="none", action_size=0, reward_heads=False))


def test_gym_wrapper_passes_gymnasiums_checker(sim):
  from gymnasium.utils.env_checker import check_env
  gym_env = worldsim.GymEnv(sim, max_episode_steps=2, **STEPS)
  assert gym_env.observation_space.shape == (8, 8, 3)
  assert gym_env.action_space.shape == (2,)
  with warnings.catch_warnings():
    warnings.simplefilter("error")               # the checker's advice is a warning: none
    check_env(gym_env, skip_render_check=True)
  obs, info = gym_env.reset(seed=0)
  assert obs.shape == (8, 8, 3) and info["frames"].shape == (1, 8, 8, 3)
  *_, truncated, _ = gym_env.step(gym_env.action_space.sample())
  assert not truncated
  obs, reward, terminated, truncated, info = gym_env.step(gym_env.action_space.sample())
  assert truncated and isinstance(reward, float) and isinstance(terminated, bool)


def test_sample_and_rollout_read_actions_frame_by_frame(sim):
  """sample(actions=) and rollout(actions=) on the action model: a frame's actions change
  that frame and later ones, never earlier ones (causal model, chunks of 2 frames)."""
  from worldsim import rollout
  actions = np.random.default_rng(2).normal(0, 2, (5, 2)).astype(np.float32)
  later = actions.copy()
  later[4] += 3.0
  run = lambda a: rollout.rollout(sim, num_frames=5, steps=1, actions=a, progress=False)
  video, changed = run(actions), run(later)
  np.testing.assert_array_equal(changed[:4], video[:4])
  assert not np.array_equal(changed[4], video[4])
  assert not np.array_equal(run(None), video)              # unknown actions
  with pytest.raises(ValueError, match="actions for 6 frames"):
    run(np.zeros((6, 2)))
  size = dict(num_frames=2, height=8, width=8, steps=1, progress=False)
  clips = sim.sample([None, None], actions=np.stack([actions[:2], later[:2] - 3]), **size)
  np.testing.assert_array_equal(sim.sample(None, actions=actions[:2], **size), clips[0])
  assert not np.array_equal(clips[0], clips[1])
  with pytest.raises(ValueError, match="action_size=2"):
    sim.sample(None, actions=np.zeros((2, 3)), **size)


def test_controllability_compares_the_clips_own_pushes_with_others(sim):
  from worldsim.eval.headline import controllability_of, eval_options
  options = eval_options(sim.config, num_frames=4, side=16)
  result = controllability_of(sim, 1000, range(2), options, steps=2)   # both pushed
  assert result["clips"] == 2 and len(result["delta_psnr_per_frame"]) == 3
  # A random action embedder steers the frames, so other pushes give other frames.
  assert np.isfinite(result["delta_psnr"]) and result["delta_psnr"] != 0.0
