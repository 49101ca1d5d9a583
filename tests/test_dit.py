import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.random_params import random_params
from worldsim.models import dit, layers, patches, text as text_lib

UNCAPTIONED = dit.DiTConfig(token_dim=12, width=48, depth=2, num_heads=4)
CAPTIONED = dit.DiTConfig(token_dim=12, width=32, depth=2, num_heads=2, text="bytes",
                          text_depth=1)
MAX_LEN = 12                                  # caption slot length of the captioned rows


def _inputs(seq_grid=(2, 4, 4), token_dim=12, batch=2, seed=0):
  pos = jnp.asarray(patches.positions(seq_grid))[None].repeat(batch, 0)
  length = pos.shape[1]
  tokens = jax.random.normal(jax.random.PRNGKey(seed), (batch, length, token_dim))
  return tokens, pos, jnp.ones((batch, length), jnp.int32), jnp.full((batch, length), 0.5)


# Jitted once per (model, shapes) for the module: eager op-by-op dispatch is what makes a tiny
# DiT slow on CPU. `model` is a hashable dataclass.
@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens, positions, segment_ids, noise_level, text=None,
             text_segment_ids=None):
  return model.apply(variables, tokens, positions, segment_ids, noise_level, text=text,
                     text_segment_ids=text_segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _forward_with_cache(model, variables, tokens, positions, segment_ids, noise_level, cache,
                        **captions):
  return model.apply(variables, tokens, positions, segment_ids, noise_level, kv_cache=cache,
                     **captions)


@functools.partial(jax.jit, static_argnums=0)
def _append(model, variables, tokens, positions, segment_ids, cache, **captions):
  return model.apply(variables, tokens, positions, segment_ids, cache,
                     method=dit.DiT.append_to_cache, **captions)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, *args):
  # rbg keys: compiling threefry for every initialiser costs several times more on CPU.
  return model.init(jax.random.key(0, impl="rbg"), *args)


def _pack(clips, budget, captions=None):
  """One packed row of clips (tokens, positions, noise level), padding at the end, and with
  captions (one per clip slot, None = absent) the row's text."""
  tokens, pos = np.zeros((1, budget, 12), np.float32), np.zeros((1, budget, 3), np.int32)
  seg, t = np.zeros((1, budget), np.int32), np.zeros((1, budget), np.float32)
  start = 0
  for i, (x, p, level) in enumerate(clips):
    end = start + len(x)
    tokens[0, start:end], pos[0, start:end], seg[0, start:end], t[0, start:end] = x, p, i + 1, level
    start = end
  row = (tokens, pos, seg, t)
  if captions is None:
    return row
  return row + text_lib.pack_captions([captions], MAX_LEN)


def _clips(grids, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(int(np.prod(g)), 12)).astype(np.float32), patches.positions(g),
           rng.uniform(size=())) for g in grids]


def _alone(clip, caption=None):
  """One clip by itself: segment 1, and its caption in the only slot."""
  x, p, level = clip
  return _pack([clip], len(x), None if caption is None else [caption])


def test_adaln_zero_output_is_zero_at_init():
  model = dit.DiT(UNCAPTIONED)
  args = _inputs()
  np.testing.assert_array_equal(_forward(model, _init(model, *args), *args), 0.0)


def test_attention_does_not_cross_segments():
  model = dit.DiT(UNCAPTIONED)
  tokens, pos, seg, t = _inputs(batch=1)
  seg = seg.at[:, 16:].set(2)                  # two clips in one row
  params = random_params(model, tokens, pos, seg, t)
  out = _forward(model, params, tokens, pos, seg, t)
  changed = tokens.at[:, 16:].multiply(-3.0)    # change only the second clip
  out2 = _forward(model, params, changed, pos, seg, t)
  np.testing.assert_allclose(out[:, :16], out2[:, :16], atol=1e-6)
  assert not np.allclose(out[:, 16:], out2[:, 16:], atol=1e-3)


def test_rope_makes_attention_depend_on_relative_position():
  cfg = dit.DiTConfig(token_dim=12, width=48, depth=1, num_heads=4)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, cfg.head_dim))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, cfg.head_dim))
  def score(pq, pk):
    rq = layers.rope_3d(q, jnp.asarray([[pq]]), cfg.rope_dims, cfg.rope_theta)
    rk = layers.rope_3d(k, jnp.asarray([[pk]]), cfg.rope_dims, cfg.rope_theta)
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(score((1, 2, 3), (0, 1, 1)), score((5, 7, 9), (4, 6, 7)), rtol=1e-5)
  assert abs(score((1, 2, 3), (0, 1, 1)) - score((1, 2, 3), (0, 1, 2))) > 1e-4


def test_variant_table_builds_every_size():
  for name, (width, depth, heads) in dit.VARIANTS.items():
    assert width % heads == 0 and (width // heads) % 2 == 0, name


def test_packed_row_gives_each_clip_the_output_it_gets_alone():
  model = dit.DiT(UNCAPTIONED)
  clips = _clips([(2, 3, 4), (1, 5, 2), (3, 2, 2)])
  row = _pack(clips, sum(len(c[0]) for c in clips) + 5)        # trailing padding too
  params = random_params(model, *row)
  packed = _forward(model, params, *row)
  start = 0
  for clip in clips:
    alone = _forward(model, params, *_alone(clip))
    np.testing.assert_allclose(packed[0, start:start + len(clip[0])], alone[0], atol=1e-5)
    start += len(clip[0])


# ----------------------------------------------------------------------------- captions

# Clip 1 has a caption longer than its slot, clip 2 an empty one (BOS alone, the null
# caption), the third slot no clip; three padding tokens end the row.
CAPTION_GRIDS = [(2, 3, 4), (1, 4, 2)]
CAPTIONS = ["a small red ball rolls down the ramp", "", None]
PADDING = 3


def _captioned_row(captions=CAPTIONS):
  clips = _clips(CAPTION_GRIDS, seed=1)
  return clips, _pack(clips, sum(len(c[0]) for c in clips) + PADDING, captions)


@functools.cache
def _captioned_params():
  _, row = _captioned_row()
  return random_params(dit.DiT(CAPTIONED), *row[:4], None, *row[4:])


def test_captioned_packed_row_gives_each_clip_the_output_it_gets_alone():
  model = dit.DiT(CAPTIONED)
  clips, row = _captioned_row()
  packed = _forward(model, _captioned_params(), *row)
  chex.assert_tree_all_finite(packed)                   # padding and a BOS-only caption
  start = 0
  for clip, caption in zip(clips, CAPTIONS):
    alone = _forward(model, _captioned_params(), *_alone(clip, caption))
    np.testing.assert_allclose(packed[0, start:start + len(clip[0])], alone[0], atol=1e-5)
    start += len(clip[0])


def test_a_caption_changes_only_its_own_clip():
  model = dit.DiT(CAPTIONED)
  _, row = _captioned_row()
  _, recaptioned = _captioned_row(["a blue box slides off the shelf"] + CAPTIONS[1:])
  first = int(np.prod(CAPTION_GRIDS[0]))
  out = _forward(model, _captioned_params(), *row)
  out2 = _forward(model, _captioned_params(), *recaptioned)
  assert not np.allclose(out[0, :first], out2[0, :first], atol=1e-3)
  np.testing.assert_allclose(out[0, first:], out2[0, first:], atol=1e-6)   # clip 2, padding


def _cross_attention_outputs_zeroed(params):
  def zero(path, leaf):
    keys = jax.tree_util.keystr(path)
    return jnp.zeros_like(leaf) if "cross_attention" in keys and "'out'" in keys else leaf
  return jax.tree_util.tree_map_with_path(zero, params)


def _without_captions(variables):
  """A captioned model's variables less the text encoder and the cross-attention layers."""
  def strip(tree):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items()
            if k not in ("text_encoder", "cross_attention")}
  return strip(variables)


def test_fresh_cross_attention_ignores_the_caption():
  model = dit.DiT(CAPTIONED)
  _, row = _captioned_row()
  # The initialiser zeroes every cross-attention output projection...
  fresh = nn.unbox(_init(model, *row[:4], None, *row[4:]))
  chex.assert_trees_all_equal(fresh, _cross_attention_outputs_zeroed(fresh))
  # ...so with otherwise trained-looking weights, the caption changes nothing, and the model
  # computes what the uncaptioned one does with the same weights.
  params = _cross_attention_outputs_zeroed(_captioned_params())
  _, recaptioned = _captioned_row(["something else entirely", "x", None])
  out = _forward(model, params, *row)
  np.testing.assert_array_equal(out, _forward(model, params, *recaptioned))
  uncaptioned = dit.DiT(dataclasses.replace(CAPTIONED, text="none"))
  np.testing.assert_allclose(out, _forward(uncaptioned, _without_captions(params), *row[:4]),
                             atol=1e-6)
  assert float(jnp.abs(out).max()) > 1e-2


def test_precomputed_embeddings_of_any_width():
  cfg = dataclasses.replace(CAPTIONED, text="embeddings")
  model = dit.DiT(cfg)
  _, row = _captioned_row()
  text_segment_ids = row[5]
  embeddings = jax.random.normal(jax.random.PRNGKey(0), (*text_segment_ids.shape, 20))
  params = random_params(model, *row[:4], None, embeddings, text_segment_ids)
  chex.assert_shape(params["params"]["text_projection"]["kernel"], (20, cfg.width))
  out = _forward(model, params, *row[:4], embeddings, text_segment_ids)
  chex.assert_tree_all_finite(out)
  first = int(np.prod(CAPTION_GRIDS[0]))
  changed = embeddings.at[:, :MAX_LEN].multiply(-2.0)          # clip 1's slot only
  out2 = _forward(model, params, *row[:4], changed, text_segment_ids)
  assert not np.allclose(out[0, :first], out2[0, :first], atol=1e-3)
  np.testing.assert_allclose(out[0, first:], out2[0, first:], atol=1e-6)


def test_captions_must_match_the_config():
  _, row = _captioned_row()
  uncaptioned = dit.DiT(UNCAPTIONED)
  with pytest.raises(ValueError, match="config.model.text"):
    jax.eval_shape(functools.partial(uncaptioned.init, text=row[4], text_segment_ids=row[5]),
                   jax.random.PRNGKey(0), *row[:4])
  with pytest.raises(ValueError, match="needs text and text_segment_ids"):
    jax.eval_shape(dit.DiT(CAPTIONED).init, jax.random.PRNGKey(0), *row[:4])
  with pytest.raises(ValueError, match="is not one of"):
    jax.eval_shape(dit.DiT(dataclasses.replace(CAPTIONED, text="t5")).init,
                   jax.random.PRNGKey(0), *row[:4])


def test_captioned_cache_chunks_match_the_full_causal_forward():
  """The KV cache holds video keys only; the captions are passed with every chunk."""
  cfg = dataclasses.replace(CAPTIONED, causal=True, depth=1)
  model = dit.DiT(cfg)
  grid = (3, 2, 2)
  per_frame, length = grid[1] * grid[2], int(np.prod(grid))
  (clip,) = _clips([grid], seed=2)
  tokens, positions, segment_ids, _, text, text_segment_ids = _alone(clip, "a ball bounces")
  levels = jnp.asarray(np.random.default_rng(3).uniform(size=(1, length)), jnp.float32)
  captions = dict(text=text, text_segment_ids=text_segment_ids)
  params = random_params(model, tokens, positions, segment_ids, levels, None, text,
                         text_segment_ids)
  cache = dit.empty_cache(cfg, 1, length)
  for start in range(0, length, per_frame):
    chunk = slice(start, start + per_frame)
    # The full forward's past is what was appended: clean, noise level 0.
    expected = _forward(model, params, tokens, positions, segment_ids,
                        levels.at[:, :start].set(0.0), **captions)[:, chunk]
    got = _forward_with_cache(model, params, tokens[:, chunk], positions[:, chunk],
                              segment_ids[:, chunk], levels[:, chunk], cache, **captions)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(expected).max()) > 1e-2
    cache = _append(model, params, tokens[:, chunk], positions[:, chunk], segment_ids[:, chunk],
                    cache, **captions)


@pytest.mark.parametrize("policy", ["full", "dots", "offload"])
def test_remat_policies_give_the_same_gradients(policy):
  """Rematerialisation changes what the backward keeps, never what it computes."""
  clips = _clips([(2, 3, 4), (1, 5, 2)])
  row = _pack(clips, sum(len(c[0]) for c in clips) + 3)
  plain = dit.DiT(dataclasses.replace(UNCAPTIONED, causal=True))
  remat = dit.DiT(dataclasses.replace(UNCAPTIONED, causal=True, remat=policy))
  params = random_params(plain, *row)

  def grads(model):
    loss = lambda p: jnp.sum(jnp.square(model.apply(p, *row)))
    return jax.jit(jax.grad(loss))(params)

  chex.assert_trees_all_close(grads(remat), grads(plain), rtol=1e-5, atol=1e-6)
