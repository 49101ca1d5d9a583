import jax
import jax.numpy as jnp
import numpy as np

from worldsim.models import dit, patches


def _inputs(seq_grid=(2, 4, 4), token_dim=12, batch=2, seed=0):
  pos = jnp.asarray(patches.positions(seq_grid))[None].repeat(batch, 0)
  length = pos.shape[1]
  tokens = jax.random.normal(jax.random.PRNGKey(seed), (batch, length, token_dim))
  return tokens, pos, jnp.ones((batch, length), jnp.int32), jnp.full((batch, length), 0.5)


def _perturbed(params, scale=0.02, seed=1):
  """adaLN-Zero starts every block as the identity; perturb so the blocks do something."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_adaln_zero_output_is_zero_at_init():
  model = dit.DiT(dit.DiTConfig(token_dim=12, width=48, depth=2, num_heads=4))
  args = _inputs()
  params = model.init(jax.random.PRNGKey(0), *args)
  np.testing.assert_array_equal(model.apply(params, *args), 0.0)


def test_attention_does_not_cross_segments():
  model = dit.DiT(dit.DiTConfig(token_dim=12, width=48, depth=2, num_heads=4))
  tokens, pos, seg, t = _inputs(batch=1)
  seg = seg.at[:, 16:].set(2)                  # two clips in one row
  params = _perturbed(nn_unbox(model.init(jax.random.PRNGKey(0), tokens, pos, seg, t)))
  out = model.apply(params, tokens, pos, seg, t)
  changed = tokens.at[:, 16:].multiply(-3.0)    # change only the second clip
  out2 = model.apply(params, changed, pos, seg, t)
  np.testing.assert_allclose(out[:, :16], out2[:, :16], atol=1e-6)
  assert not np.allclose(out[:, 16:], out2[:, 16:], atol=1e-3)


def test_rope_makes_attention_depend_on_relative_position():
  cfg = dit.DiTConfig(token_dim=12, width=48, depth=1, num_heads=4)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, cfg.head_dim))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, cfg.head_dim))
  def score(pq, pk):
    rq = dit.rope_3d(q, jnp.asarray([[pq]]), cfg.rope_dims, cfg.rope_theta)
    rk = dit.rope_3d(k, jnp.asarray([[pk]]), cfg.rope_dims, cfg.rope_theta)
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(score((1, 2, 3), (0, 1, 1)), score((5, 7, 9), (4, 6, 7)), rtol=1e-5)
  assert abs(score((1, 2, 3), (0, 1, 1)) - score((1, 2, 3), (0, 1, 2))) > 1e-4


def test_variant_table_builds_every_size():
  for name, (width, depth, heads) in dit.VARIANTS.items():
    assert width % heads == 0 and (width // heads) % 2 == 0, name


def nn_unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)


def test_packed_row_gives_each_clip_the_output_it_gets_alone():
  model = dit.DiT(dit.DiTConfig(token_dim=12, width=48, depth=2, num_heads=4))
  rng = np.random.default_rng(0)
  grids = [(2, 3, 4), (1, 5, 2), (3, 2, 2)]
  clips = [(rng.normal(size=(int(np.prod(g)), 12)).astype(np.float32), patches.positions(g),
            rng.uniform(size=())) for g in grids]
  budget = sum(len(c[0]) for c in clips) + 5                   # trailing padding too
  tokens, pos = np.zeros((1, budget, 12), np.float32), np.zeros((1, budget, 3), np.int32)
  seg, t = np.zeros((1, budget), np.int32), np.zeros((1, budget), np.float32)
  start = 0
  for i, (x, p, level) in enumerate(clips):
    end = start + len(x)
    tokens[0, start:end], pos[0, start:end], seg[0, start:end], t[0, start:end] = x, p, i + 1, level
    start = end
  params = _perturbed(nn_unbox(model.init(jax.random.PRNGKey(0), tokens, pos, seg, t)))
  packed = model.apply(params, tokens, pos, seg, t)
  start = 0
  for x, p, level in clips:
    alone = model.apply(params, x[None], p[None], np.ones((1, len(x)), np.int32),
                        np.full((1, len(x)), level, np.float32))
    np.testing.assert_allclose(packed[0, start:start + len(x)], alone[0], atol=1e-5)
    start += len(x)
