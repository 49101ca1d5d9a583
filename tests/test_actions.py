"""Action conditioning and reward heads in training: per-token inputs and dropout, head
targets, both recipes' dit stage on their own data, learning through the actions, the
sharded step, and the config checks.

Compiling is what costs (a few seconds per train step on CPU), so there are three: the
physics recipe's and the Atari recipe's one-block steps on one device, and the Atari one on
eight devices. Their states are random numpy arrays (no initialiser to compile).
"""
import functools
import json
import math
import pathlib

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from worldsim import config as config_lib
from worldsim.models import dit
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import step as step_lib
from worldsim.train import trainer

FAST_COMPILE = {"xla_backend_optimization_level": 0}   # as in test_scale_out
# The config the first bundled model was saved with, before actions existed.
CONFIG_BEFORE_ACTIONS = pathlib.Path(__file__).parent / "saved_configs/physics_tiny_before_actions.json"


def _diffusion(**overrides):
  return ml_collections.ConfigDict({
      "logit_normal_mean": 0.0, "logit_normal_std": 1.0, "shift_base_tokens": 64,
      "max_shift": 1.0, "per_frame_noise": 0.5, **overrides})


def _packed_rows(rng, rows, clips, frames, tokens_per_frame, num_actions):
  """Rows of `clips` clips of frames x tokens_per_frame tokens each, frame-major, then 8
  padding tokens, with noise for tokens and a random action id per clip and frame
  (B, M, F, 1), as the loader ships Atari's."""
  clip_len = frames * tokens_per_frame
  length = clips * clip_len + 8
  segment_ids = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length, 3), np.int32)
  for m in range(clips):
    clip = slice(m * clip_len, (m + 1) * clip_len)
    segment_ids[:, clip] = m + 1
    positions[:, clip, 0] = np.repeat(np.arange(frames), tokens_per_frame)
    positions[:, clip, 2] = np.tile(np.arange(tokens_per_frame), frames)
  return {"tokens": rng.standard_normal((rows, length, 4)).astype(np.float32),
          "positions": positions, "segment_ids": segment_ids,
          "actions": rng.integers(0, num_actions, (rows, clips, frames, 1)).astype(np.float32)}


# ----------------------------------------------------------------------------- the step's inputs

def test_action_dropout_is_per_clip_and_leaves_the_noise_as_it_was():
  """Known flags are one value per clip, dropped on about the configured share; the noise
  levels and noise are those of a run without actions (the dropout's rng is folded in); the
  per-token actions are the one-hot features of each token's frames."""
  batch = _packed_rows(np.random.default_rng(0), rows=64, clips=4, frames=2,
                       tokens_per_frame=2, num_actions=5)
  spec = step_lib.ActionSpec("discrete", 5, frames_per_patch=2)
  # One jitted function for the three draws: op by op they cost seconds on CPU.
  def draws(b, k):
    return (step_lib.draw_noise(b, k, _diffusion(action_dropout=0.3), spec),
            step_lib.draw_noise(b, k, _diffusion()),
            step_lib.draw_noise(b, k, _diffusion(), spec))
  key = jax.random.PRNGKey(3)
  noised, plain, none = jax.jit(draws).lower(batch, key).compile(FAST_COMPILE)(batch, key)
  np.testing.assert_array_equal(noised["t"], plain["t"])
  np.testing.assert_array_equal(noised["eps"], plain["eps"])
  known, seg = np.asarray(noised["actions_known"]), batch["segment_ids"]
  for m in range(1, 5):
    per_clip = known[:, seg[0] == m]
    assert (per_clip == per_clip[:, :1]).all()          # one flag per clip
  share = 1.0 - known[:, seg[0] > 0].mean()
  assert 0.2 < share < 0.4, share
  # A token of 2 frames per patch reads both frames' one-hot ids side by side.
  ids = batch["actions"][0, 0, :2, 0].astype(int)
  np.testing.assert_array_equal(noised["token_actions"][0, 0], np.eye(5)[ids].ravel())
  # No dropout: every clip known.
  assert (np.asarray(none["actions_known"])[seg > 0] == 1).all()


def test_head_targets_sum_rewards_and_max_terminals_over_a_tokens_frames():
  rewards = np.zeros((1, 1, 4, 2), np.float32)          # 4 model frames of 2 pixel frames
  rewards[0, 0, 1] = [1.0, 2.0]
  terminals = np.zeros_like(rewards)
  terminals[0, 0, 3, 1] = 1.0
  segment_ids = np.array([[1, 1, 1, 1, 0]])
  positions = np.zeros((1, 5, 3), np.int32)
  positions[0, :4, 0] = [0, 0, 1, 1]                    # patches of 2 model frames
  targets = step_lib.head_targets({"rewards": rewards, "terminals": terminals,
                                   "segment_ids": segment_ids, "positions": positions}, 2)
  np.testing.assert_array_equal(targets["token_rewards"], [[3, 3, 0, 0, 0]])
  np.testing.assert_array_equal(targets["token_terminals"], [[0, 0, 1, 1, 0]])


# ----------------------------------------------------------------------------- the recipes

def _tiny_recipe(config, workdir, mesh_shape=(1, 1, 1, 1)):
  """A recipe at test size, validated for a mesh of mesh_shape (data, fsdp, tensor,
  context): pixel space, one dense block without captions (what compiling costs), rows of
  128 tokens."""
  with config.unlocked():
    config.stages = ("dit",)
    config.data.space = "pixel"
    config.data.data_dir = str(workdir / "data")
    config.data.min_side, config.data.max_side = 16, 24
    config.data.min_frames, config.data.max_frames = 4, 8
    config.data.max_tokens_per_clip, config.data.token_budget = 64, 128
    config.data.batch_size, config.data.packing_bins = 4, 4
    config.model.text = "none"
    config.model.patch_size = (1, 4, 4)
    config.model.depth, config.model.attention = 1, "xla"
    config.sample.num_frames, config.sample.height, config.sample.width = 4, 16, 16
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.context = mesh_shape
  config_lib.validate(config, num_devices=math.prod(mesh_shape))
  return config


def _numpy_state(abstract_state, seed=0):
  """A train state of the abstract state's shapes without compiling an initialiser: random
  parameters (every layer, the zero-initialised ones too, so every path carries gradient),
  the EMA equal to them, zero optimizer moments and step."""
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
  params = jax.tree.map(
      lambda a: (rng.standard_normal(a.shape) / np.sqrt(max(np.prod(a.shape[:-1]), 1)))
      .astype(a.dtype), abstract_state.params)
  return state.replace(params=params, ema_params=params)


class _Stage:
  """The dit stage's own pieces on the config's mesh: its Setup, throughput counters and
  train step, compiled once. (The loop around them, checkpoints and logs, is test_trainer's
  and test_faults'; on a recipe it costs a minute of compiling and saving here.)"""

  def __init__(self, config, workdir):
    devices = jax.devices()[:math.prod(config.mesh[a] for a in mesh_lib.AXES)]
    self.setup = trainer.build(config, mesh_lib.make_mesh(config.mesh, devices))
    self.stage = trainer.dit_stage(config, workdir, self.setup)
    self.compiled = None

  def step(self, state, host_batch):
    """(state on the mesh, metrics on the host) after one step from `state` (on the host,
    or on the mesh: then donated) and a host batch."""
    setup = self.setup
    assert self.stage.throughput(host_batch)["model_flops"] > 0
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      state = jax.device_put(state, setup.state_shardings)
      batch = mesh_lib.global_batch(host_batch, setup.batch_shardings)
      if self.compiled is None:
        self.compiled = setup.train_step.lower(state, batch).compile(FAST_COMPILE)
      state, metrics = self.compiled(state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert np.isfinite(list(metrics.values())).all() and not metrics["update_skipped"]
    return state, metrics


def _train(stage, state, batches):
  """Steps over host batches -> (final state, each step's metrics)."""
  rows = []
  for batch in batches:
    state, metrics = stage.step(state, batch)
    rows.append(metrics)
  return state, rows


def test_physics_actions_dit_stage_trains_on_pushes(tmp_path, monkeypatch):
  """The recipe's data (built here) ships each frame's push; its stage steps on them."""
  from data_pipelines import physics_world
  from experiments import physics_actions
  # In this process: the build's worker processes would each import TFDS again.
  monkeypatch.setattr(physics_world, "build", functools.partial(physics_world.build,
                                                                num_workers=1))
  config = physics_actions.get_config()
  with config.unlocked():
    config.data.num_clips = 8
  config = _tiny_recipe(config, tmp_path)
  data = trainer.open_data(config, tmp_path)
  batches = [next(data) for _ in range(3)]
  assert all(b["actions"].shape[-1] == 2 for b in batches)
  assert sum(np.abs(b["actions"]).sum() for b in batches) > 0          # pushes
  stage = _Stage(config, tmp_path)
  _train(stage, _numpy_state(stage.setup.abstract_state), batches)


def _params_moved(before, after) -> bool:
  return any(np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_atari_world_stage_trains_actions_and_heads_and_on_eight_devices_matches_one(tmp_path):
  """On the recipe's data (Pong, built here) the stage steps and logs the heads' losses,
  weighted into the loss. Actions reach the loss: the action embedder moves, and swapping
  actions between rows changes the loss at the same noise. With rewards and terminals that
  follow the actions, 25 steps bring both head losses down, through the actions: swapped,
  they are lost again. And one step with discrete actions, action dropout and reward heads
  on a (data 2, tensor 2, context 2) mesh, its gradient accumulated over 2 parts, equals the
  one-device step: losses 1e-5, gradient norm 1e-4, parameters 1e-4 relative or 2e-5 (of an
  update of 5e-3)."""
  from data_pipelines import atari
  from experiments import atari_world
  atari.build(tmp_path / "data", games=("pong",), episodes_per_game=1, max_episode_steps=40,
              frame_shape=(24, 24), clip_frames=8, min_clip_frames=4)
  config = _tiny_recipe(atari_world.get_config(), tmp_path)
  with config.unlocked():      # a flat learning rate for the 25 steps below
    config.optim.warmup_steps, config.optim.learning_rate, config.train.steps = 0, 5e-3, 1000
    # The heads' share of the clipped gradient beside a random model's large velocity error.
    config.train.heads_weight = 10.0
  data = trainer.open_data(config, tmp_path)
  batches = [next(data) for _ in range(2)]
  assert all({"rewards", "terminals"} <= set(b) and b["actions"].shape[-1] == 1
             for b in batches)
  one = _Stage(config, tmp_path)
  # Every parameter, the action embedder's and the heads' too, has logical axis names.
  boxed = jax.eval_shape(lambda k: step_lib.init_state(
      one.setup.model, optax.identity(), trainer.example_batch(config), k).params,
                         jax.random.PRNGKey(0))
  for name in ("actions", "reward_heads"):
    leaves = jax.tree.leaves(boxed[name], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                          for x in leaves)
  initial = _numpy_state(one.setup.abstract_state)
  state, rows = _train(one, initial, batches)
  r = rows[0]
  np.testing.assert_allclose(
      r["loss"], r["flow_loss"] + 10 * (r["reward_loss"] + r["terminal_loss"]), rtol=1e-5)
  assert _params_moved(initial.params["actions"], jax.device_get(state.params["actions"]))

  # A reward for odd action ids, the end for even ones: learnable from the actions alone.
  batch = dict(batches[0])
  ids = batch["actions"]
  batch["rewards"] = (ids % 2).astype(np.float32)
  batch["terminals"] = 1.0 - batch["rewards"]
  _, before = one.step(initial, batch)
  _, swapped = one.step(initial, dict(batch, actions=ids[::-1]))
  assert swapped["flow_loss"] != before["flow_loss"]
  state = initial
  for _ in range(25):
    state, _ = one.step(state, batch)
  state = jax.device_get(state).replace(step=np.zeros((), np.int32))   # `before`'s noise
  _, after = one.step(state, batch)
  _, after_swapped = one.step(state, dict(batch, actions=ids[::-1]))
  for name in ("reward_loss", "terminal_loss"):
    assert after[name] < 0.5 * before[name], (name, before, after)
    assert after_swapped[name] > 3 * after[name], (name, after, after_swapped)

  config = _tiny_recipe(config, tmp_path, (2, 1, 2, 2))
  with config.unlocked():
    config.train.accum_steps = 2
  sharded, metrics = jax.device_get(_Stage(config, tmp_path).step(initial, batch))
  reference, ref_metrics = jax.device_get(one.step(initial, batch))
  for name in ("loss", "flow_loss", "reward_loss", "terminal_loss"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  # atol: Adam's first step is lr x sign(gradient) for most entries, so an entry with a
  # gradient near rounding moves by a part of the step's 5e-3; 2e-5 is under 1% of it.
  chex.assert_trees_all_close(sharded.params, reference.params, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("overrides,message", [
    ({"model.actions": "joystick"}, "config.model.actions='joystick' is unknown"),
    ({"model.actions": "continuous", "model.action_size": 2},
     "config.data.source='shapes' has no actions; set --config.model.actions=none"),
    ({"data.source": "video_folder", "model.actions": "continuous"},
     "config.data.source='video_folder' has no actions"),
    ({"data.source": "physics_world", "model.actions": "continuous"},
     "needs config.model.action_size >= 1 .*action_size=2"),
    ({"data.source": "physics_world", "model.actions": "discrete", "model.action_size": 2},
     "physics_world's actions are continuous"),
    ({"data.source": "physics_world", "model.actions": "continuous", "model.action_size": 3},
     "physics_world gives 2 floats per frame"),
    ({"data.source": "atari", "model.actions": "discrete", "model.action_size": 6},
     "fewer than atari's 18 action ids"),
    ({"data.source": "physics_world", "model.actions": "continuous", "model.action_size": 2,
      "diffusion.action_dropout": 1.0}, "config.diffusion.action_dropout=1.0 is a share"),
    ({"data.source": "physics_world", "model.reward_heads": True},
     "source='physics_world' has no rewards; set --config.model.reward_heads=False"),
])
def test_action_configs_name_the_field_and_fix(tiny_config, overrides, message):
  for field, value in overrides.items():
    section, name = field.split(".")
    with tiny_config.unlocked():
      tiny_config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config)


def test_configs_from_before_actions_still_validate_and_read_as_action_free():
  """A config saved before actions existed (the first bundled model's) validates, and reads
  as no actions, no heads, no per-frame arrays in the batch."""
  config = ml_collections.ConfigDict(json.loads(CONFIG_BEFORE_ACTIONS.read_text()))
  assert "actions" not in config.model
  config_lib.validate(config, num_devices=1)
  assert config_lib.action_dim(config) == 0 and not trainer.frame_widths(config)
  cfg = dit.config_from(config.model, 48)
  assert cfg.action_dim == 0 and not cfg.reward_heads
  assert step_lib.action_spec(config.model) == step_lib.ActionSpec("none", 0, 1)


def test_the_action_recipes_validate():
  from data_pipelines import atari
  from experiments import atari_world, physics_actions
  for module in (physics_actions, atari_world):
    for variant in ("tiny", "S"):
      config_lib.validate(module.get_config(variant), num_devices=1)
  config = atari_world.get_config()
  assert config_lib.SOURCE_ACTIONS["atari"] == ("discrete", atari.NUM_ACTIONS)
  assert config.model.action_size == atari.NUM_ACTIONS and config.model.reward_heads
  assert config_lib.action_dim(config) == 4 * atari.NUM_ACTIONS     # 4 frames per latent frame
