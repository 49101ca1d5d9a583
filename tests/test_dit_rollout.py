"""Block-causal rollouts with a KV cache against the full block-causal forward (float32)."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldsim.diffusion import samplers
from worldsim.models import attention as attention_lib
from worldsim.models import dit, patches

GRID = (4, 2, 3)                        # 4 latent frames of 6 tokens
PER_FRAME = GRID[1] * GRID[2]
LENGTH = int(np.prod(GRID))
TOKEN_DIM, BATCH = 8, 2


def _config(causal=True, attention="xla"):
  return dit.DiTConfig(token_dim=TOKEN_DIM, width=32, depth=2, num_heads=2, causal=causal,
                       attention=attention)


def _clip(seed=0):
  """Tokens, positions and segment ids of one clip per row (rows get different ids)."""
  tokens = jax.random.normal(jax.random.PRNGKey(seed), (BATCH, LENGTH, TOKEN_DIM))
  positions = jnp.asarray(patches.positions(GRID))[None].repeat(BATCH, 0)
  segment_ids = jnp.broadcast_to(jnp.arange(1, BATCH + 1, dtype=jnp.int32)[:, None],
                                 (BATCH, LENGTH))
  return tokens, positions, segment_ids


@functools.cache
def _variables():
  """Random parameters in the model's tree (one tree serves every config here).

  adaLN-Zero's initialisation would make the DiT output zeros; drawing on the host instead of
  compiling the initialisers also keeps the tests fast.
  """
  tokens, positions, segment_ids = _clip()
  shapes = jax.eval_shape(dit.DiT(_config()).init, jax.random.key(0), tokens, positions,
                          segment_ids, jnp.zeros((BATCH, LENGTH)))
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1.0 + 0.1 * noise if name == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


# Jitted once per (model, shapes) for the whole module; `model` is a hashable dataclass.
@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens, positions, segment_ids, noise_level):
  return model.apply(variables, tokens, positions, segment_ids, noise_level)


@functools.partial(jax.jit, static_argnums=0)
@chex.assert_max_traces(n=1)       # per test (the counter is cleared): one shape for every chunk
def _forward_with_cache(model, variables, tokens, positions, segment_ids, noise_level, cache):
  return model.apply(variables, tokens, positions, segment_ids, noise_level, kv_cache=cache)


@functools.partial(jax.jit, static_argnums=0)
def _append(model, variables, tokens, positions, segment_ids, cache):
  return model.apply(variables, tokens, positions, segment_ids, cache,
                     method=dit.DiT.append_to_cache)


def _small_tiles(monkeypatch):
  """Tiles smaller than a frame, so `chunked` runs many tiles and skips the empty cache's."""
  monkeypatch.setattr(attention_lib, "attention",
                      functools.partial(attention_lib.attention, block_q=4, block_kv=4))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_cached_chunks_match_the_full_causal_forward(implementation, chunk_frames, monkeypatch):
  if implementation == "chunked":
    _small_tiles(monkeypatch)
  chex.clear_trace_counter()
  model, variables = dit.DiT(_config(attention=implementation)), _variables()
  reference = dit.DiT(_config(attention="xla"))
  tokens, positions, segment_ids = _clip()
  chunk = chunk_frames * PER_FRAME
  frame = positions[..., 0]
  # Per-frame noise inside the chunk (diffusion forcing); the future is noise at random levels.
  chunk_levels = jnp.repeat(jnp.linspace(0.3, 0.8, chunk_frames), PER_FRAME)
  future_levels = jax.random.uniform(jax.random.PRNGKey(2), (BATCH, LENGTH))

  cache = dit.empty_cache(model.cfg, BATCH, LENGTH + 2 * PER_FRAME)  # room to spare
  for start in range(0, LENGTH, chunk):
    end = start + chunk
    levels = jnp.where(frame < start // PER_FRAME, 0.0, future_levels)
    levels = levels.at[:, start:end].set(chunk_levels)
    # The reference is the dense `xla` forward for every implementation.
    expected = _forward(reference, variables, tokens, positions, segment_ids, levels)[:, start:end]
    got = _forward_with_cache(model, variables, tokens[:, start:end], positions[:, start:end],
                              segment_ids[:, start:end], levels[:, start:end], cache)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(expected).max()) > 1e-2                      # not trivially zero
    # The chunk is done: its clean tokens join the past.
    cache = _append(model, variables, tokens[:, start:end], positions[:, start:end],
                    segment_ids[:, start:end], cache)
  assert int(cache.length) == LENGTH
  np.testing.assert_array_equal(cache.segment_ids[:, LENGTH:], -1)


def test_one_prefill_caches_what_chunk_by_chunk_appends_do():
  model, variables = dit.DiT(_config()), _variables()
  tokens, positions, segment_ids = _clip()
  context = 3 * PER_FRAME
  empty = dit.empty_cache(model.cfg, BATCH, LENGTH + 2 * PER_FRAME)
  at_once = _append(model, variables, tokens[:, :context], positions[:, :context],
                    segment_ids[:, :context], empty)
  by_frame = empty
  for start in range(0, context, PER_FRAME):
    end = start + PER_FRAME
    by_frame = _append(model, variables, tokens[:, start:end], positions[:, start:end],
                       segment_ids[:, start:end], by_frame)
  chex.assert_trees_all_close(at_once, by_frame, atol=1e-5, rtol=1e-5)
  assert int(at_once.length) == context
  np.testing.assert_array_equal(at_once.frames[:, :context], positions[:, :context, 0])
  np.testing.assert_array_equal(at_once.segment_ids[:, :context], segment_ids[:, :context])


@pytest.mark.parametrize("causal", [True, False])
def test_later_frames_change_earlier_outputs_only_without_causality(causal):
  model, variables = dit.DiT(_config(causal=causal)), _variables()
  tokens, positions, segment_ids = _clip()
  levels = jax.random.uniform(jax.random.PRNGKey(2), (BATCH, LENGTH))
  out = _forward(model, variables, tokens, positions, segment_ids, levels)
  last = (GRID[0] - 1) * PER_FRAME
  changed = _forward(model, variables, tokens.at[:, last:].multiply(-3.0), positions,
                     segment_ids, levels)
  assert not np.allclose(out[:, last:], changed[:, last:], atol=1e-3)
  if causal:
    np.testing.assert_allclose(out[:, :last], changed[:, :last], atol=1e-6)
  else:
    assert not np.allclose(out[:, :last], changed[:, :last], atol=1e-3)


def test_rollout_keeps_the_context_and_matches_full_recomputation():
  model, variables = dit.DiT(_config()), _variables()
  tokens, positions, segment_ids = _clip()
  context, num_chunks, steps, shift = tokens[:, :PER_FRAME], GRID[0] - 1, 2, 2.0
  noise = jax.random.normal(jax.random.PRNGKey(3), (BATCH, num_chunks, PER_FRAME, TOKEN_DIM))
  run = jax.jit(functools.partial(dit.rollout, model, steps=steps, shift=shift))
  clip = run(variables, context, positions, segment_ids, noise)

  chex.assert_shape(clip, (BATCH, LENGTH, TOKEN_DIM))
  chex.assert_tree_all_finite(clip)
  np.testing.assert_array_equal(clip[:, :PER_FRAME], context)

  # The same rollout without a cache: every Euler step runs the whole clip, at noise level 0
  # before the chunk. Frames after the chunk hold zeros, which causal attention never shows it.
  reference = jnp.zeros_like(tokens).at[:, :PER_FRAME].set(context)
  times = samplers.time_grid(steps, shift)
  for i in range(num_chunks):
    start, end = (i + 1) * PER_FRAME, (i + 2) * PER_FRAME
    x = noise[:, i]
    for t, t_next in zip(times[:-1], times[1:]):
      levels = jnp.zeros((BATCH, LENGTH)).at[:, start:end].set(t)
      velocity = _forward(model, variables, reference.at[:, start:end].set(x), positions,
                          segment_ids, levels)[:, start:end]
      x = x + (t_next - t) * velocity
    reference = reference.at[:, start:end].set(x)
  chex.assert_trees_all_close(clip, reference, atol=1e-5, rtol=1e-5)
  assert not np.allclose(clip[:, PER_FRAME:], noise.reshape(BATCH, -1, TOKEN_DIM), atol=1e-2)


def test_cache_misuse_fails_with_the_fix_in_the_message():
  tokens, positions, segment_ids = _clip()
  chunk = (tokens[:, :PER_FRAME], positions[:, :PER_FRAME], segment_ids[:, :PER_FRAME],
           jnp.zeros((BATCH, PER_FRAME)))
  bidirectional = dit.DiT(_config(causal=False))
  cache = dit.empty_cache(bidirectional.cfg, BATCH, LENGTH)
  with pytest.raises(ValueError, match="causal=True"):
    jax.eval_shape(functools.partial(bidirectional.apply, kv_cache=cache), _variables(), *chunk)
  model = dit.DiT(_config())
  too_small = dit.empty_cache(model.cfg, BATCH, PER_FRAME - 1)
  with pytest.raises(ValueError, match="capacity"):
    model.apply(_variables(), *chunk, kv_cache=too_small)
