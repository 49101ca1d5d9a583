"""Action conditioning: per-token gathering, dropout flags and the DiT's action input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldsim.models import conditioning, dit
from tests.random_params import random_params


def test_token_actions_follow_segments_and_frames():
  # One row: clip 1 has 2 frames of 2 tokens, clip 2 one frame of 1 token, then padding.
  actions = np.zeros((1, 2, 3, 2), np.float32)                      # (B, M, F, A)
  actions[0, 0, :2] = [[1, 2], [3, 4]]
  actions[0, 1, 0] = [5, 6]
  segment_ids = jnp.asarray([[1, 1, 1, 1, 2, 0]])
  frames = jnp.asarray([[0, 0, 1, 1, 0, 0]])
  positions = jnp.stack([frames, jnp.zeros_like(frames), jnp.zeros_like(frames)], -1)
  per_token = conditioning.token_actions(jnp.asarray(actions), segment_ids, positions)
  np.testing.assert_array_equal(per_token[0], [[1, 2], [1, 2], [3, 4], [3, 4], [5, 6], [0, 0]])
  # Two frames per patch: token t covers frames 2t and 2t + 1, side by side.
  two = conditioning.token_actions(jnp.asarray(actions), segment_ids[:, :2], positions[:, :2], 2)
  np.testing.assert_array_equal(two[0], [[1, 2, 3, 4], [1, 2, 3, 4]])


def test_action_dropout_is_per_clip():
  segment_ids = jnp.asarray([[1] * 50 + [2] * 50 + [0] * 4] * 64)
  known = conditioning.drop_actions(jax.random.PRNGKey(0), segment_ids, 2, 0.5)
  assert (known[:, :50] == known[:, :1]).all() and (known[:, 50:100] == known[:, 50:51]).all()
  assert 0.3 < float(known[:, 0].mean()) < 0.7


def test_the_dit_reads_actions_only_when_it_has_them():
  cfg = dit.DiTConfig(token_dim=8, width=32, depth=1, num_heads=2, action_dim=4)
  model = dit.DiT(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 8))
  positions = jnp.zeros((1, 6, 3), jnp.int32).at[..., 0].set(jnp.arange(6) // 2)
  segment_ids, t = jnp.ones((1, 6), jnp.int32), jnp.full((1, 6), 0.5)
  actions, known = jnp.ones((1, 6, 4)), jnp.ones((1, 6))
  params = random_params(model, x, positions, segment_ids, t, None, None, None, actions, known)
  out = lambda a, k: model.apply(params, x, positions, segment_ids, t, actions=a, actions_known=k)
  moved = out(actions, known)
  assert not np.allclose(moved, out(-actions, known))              # actions change velocities
  assert not np.allclose(moved, out(actions, jnp.zeros_like(known)))   # unknown differs
  # Unknown actions are ignored whatever their values (dropout's "any action").
  np.testing.assert_allclose(out(actions, 0 * known), out(-actions, 0 * known), atol=1e-6)
  with pytest.raises(ValueError, match="action-conditioned"):
    model.apply(params, x, positions, segment_ids, t)
  with pytest.raises(ValueError, match="without action conditioning"):
    jax.eval_shape(dit.DiT(dit.DiTConfig(token_dim=8, width=32, depth=1, num_heads=2)).init,
                   jax.random.PRNGKey(0), x, positions, segment_ids, t, actions=actions,
                   actions_known=known)
