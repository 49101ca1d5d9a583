import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from worldsim.models import patches
from worldsim.parallel import mesh as mesh_lib
from worldsim.scaling import flops
from worldsim.train import trainer


@pytest.mark.parametrize("width,depth,heads,seq_len", [(64, 2, 4, 128), (128, 3, 4, 256)])
def test_analytic_flops_match_xla_cost_analysis(tiny_config, width, depth, heads, seq_len):
  config = tiny_config
  with config.unlocked():
    config.model.width, config.model.depth, config.model.num_heads = width, depth, heads
    config.data.token_budget = seq_len
    config.data.batch_size, config.mesh.data = 2, 1
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = trainer.build(config, mesh)
  batch = trainer.example_batch(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    cost = setup.train_step.lower(setup.abstract_state, batch).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  analytic = flops.dit_train_flops(setup.dit_cfg, setup.seq_len, 2)
  assert abs(analytic / xla - 1) < 0.15, (analytic, xla)


def test_every_parameter_has_logical_axis_names(tiny_config):
  with tiny_config.unlocked():
    tiny_config.model.text = "bytes"                   # the text encoder's parameters too
  setup = trainer.build(tiny_config, mesh_lib.make_mesh(tiny_config.mesh))
  batch = trainer.example_batch(tiny_config)
  boxed = jax.eval_shape(setup.model.init, jax.random.PRNGKey(0), batch["tokens"],
                         batch["positions"], batch["segment_ids"],
                         jax.ShapeDtypeStruct((8, 256), "float32"), text=batch["text"],
                         text_segment_ids=batch["text_segment_ids"])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_packed_flops_count_attention_within_clips_only():
  from worldsim.models import dit
  cfg = dit.DiTConfig(token_dim=48, width=64, depth=2, num_heads=4)
  one_clip = np.ones((2, 128), np.int32)
  np.testing.assert_allclose(flops.packed_train_flops(cfg, one_clip),
                             flops.dit_train_flops(cfg, 128, 2))
  # Two clips of 64 tokens attend to 2 * 64^2 pairs, half of one 128-token clip's.
  two_clips = np.repeat(np.array([[1, 2]], np.int32), 64, axis=1).repeat(2, axis=0)
  dense_attention = 3 * 2 * cfg.depth * 4 * 128 ** 2 * cfg.width
  np.testing.assert_allclose(flops.dit_train_flops(cfg, 128, 2) - flops.packed_train_flops(cfg, two_clips),
                             dense_attention / 2)
  # Padding attends to nothing useful.
  padded = one_clip.copy()
  padded[:, 64:] = 0
  assert flops.packed_train_flops(cfg, padded) < flops.packed_train_flops(cfg, two_clips)


# ----------------------------------------------------------------------------- captions, causal

@pytest.mark.parametrize("kind,embed_dim", [("bytes", 0), ("embeddings", 48)])
def test_captioned_flops_match_xla_cost_analysis(kind, embed_dim):
  """Forward and backward of dit_loss on one clip and one caption per row, dense attention."""
  from worldsim.models import dit
  from worldsim.train import step
  cfg = dit.DiTConfig(token_dim=48, width=64, depth=2, num_heads=4, attention="xla", text=kind,
                      text_depth=2)
  batch_size, seq_len, text_len = 2, 128, 32
  shape = lambda s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)
  batch = {"tokens": shape((batch_size, seq_len, 48)),
           "positions": shape((batch_size, seq_len, 3), jnp.int32),
           "segment_ids": shape((batch_size, seq_len), jnp.int32),
           "text": (shape((batch_size, text_len, embed_dim)) if embed_dim
                    else shape((batch_size, text_len), jnp.int32)),
           "text_segment_ids": shape((batch_size, text_len), jnp.int32)}
  model = dit.DiT(cfg)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["tokens"],
                                   batch["positions"], batch["segment_ids"],
                                   shape((batch_size, seq_len)), None, batch["text"],
                                   batch["text_segment_ids"]))["params"]
  diffusion_cfg = ml_collections.ConfigDict(dict(
      logit_normal_mean=0.0, logit_normal_std=1.0, per_frame_noise=0.5, shift_base_tokens=256,
      max_shift=4.0, caption_dropout=0.1))
  loss = functools.partial(step.dit_loss, model=model, diffusion_cfg=diffusion_cfg)
  cost = jax.jit(jax.value_and_grad(loss)).lower(
      params, batch=batch, rng=jax.random.PRNGKey(0)).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  analytic = flops.dit_train_flops(cfg, seq_len, batch_size, text_len=text_len,
                                   text_embed_dim=embed_dim)
  assert abs(analytic / xla - 1) < 0.15, (analytic, xla)
  # Leaving the captions out of the count would miss by more.
  uncaptioned = flops.dit_train_flops(dataclasses.replace(cfg, text="none"), seq_len, batch_size)
  assert abs(analytic / xla - 1) < abs(uncaptioned / xla - 1) / 2, (analytic, uncaptioned, xla)


def _packed_rows(seed=0, rows=3, length=72, max_clips=3):
  """Random packed rows: segment ids, each token's frame in its clip, and caption segment ids
  (slots of 6 tokens, each caption 1 to 6 tokens; an absent clip's slot all padding)."""
  rng = np.random.default_rng(seed)
  segment_ids, frames = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
  text_segment_ids = np.zeros((rows, max_clips * 6), np.int32)
  for r in range(rows):
    start = 0
    for clip in range(max_clips - r % 2):            # odd rows leave the last slot empty
      grid = tuple(int(g) for g in rng.integers(1, 4, size=3))
      n = min(int(np.prod(grid)), length - start)
      segment_ids[r, start:start + n] = clip + 1
      frames[r, start:start + n] = patches.positions(grid)[:n, 0]
      text_segment_ids[r, 6 * clip:6 * clip + rng.integers(1, 7)] = clip + 1
      start += n
  return segment_ids, frames, text_segment_ids


def _true_entries(mask, query_segment_ids):
  return int(np.sum(np.asarray(mask)[:, 0] & (np.asarray(query_segment_ids) > 0)[:, :, None]))


def test_pair_counts_equal_the_attention_masks_true_entries():
  from worldsim.models import attention, text
  segment_ids, frames, text_segment_ids = _packed_rows()
  causal = attention.attention_mask(segment_ids, segment_ids, frames, frames)
  assert flops.attended_pairs(segment_ids, frames) == _true_entries(causal, segment_ids)
  dense = attention.attention_mask(segment_ids, segment_ids)
  assert flops.attended_pairs(segment_ids) == _true_entries(dense, segment_ids)
  assert flops.attended_pairs(segment_ids, frames) < flops.attended_pairs(segment_ids)
  cross = attention.attention_mask(segment_ids, text.key_segment_ids(text_segment_ids))
  assert flops.cross_attended_pairs(segment_ids, text_segment_ids) == _true_entries(
      cross, segment_ids)
  captions = attention.attention_mask(text_segment_ids, text.key_segment_ids(text_segment_ids))
  assert flops.attended_pairs(text_segment_ids) == _true_entries(captions, text_segment_ids)


def test_packed_flops_count_block_causal_and_caption_pairs():
  from worldsim.models import dit
  segment_ids, frames, text_segment_ids = _packed_rows()
  rows, length = segment_ids.shape
  per_pair = 3 * 2 * 2 * 64
  causal = dit.DiTConfig(token_dim=48, width=64, depth=2, num_heads=4, causal=True)
  bidirectional = dataclasses.replace(causal, causal=False)
  saved = flops.attended_pairs(segment_ids) - flops.attended_pairs(segment_ids, frames)
  np.testing.assert_allclose(
      flops.packed_train_flops(bidirectional, segment_ids, frames=frames)
      - flops.packed_train_flops(causal, segment_ids, frames=frames), causal.depth * per_pair * saved)
  # One clip and one caption filling the row and its text: the dense count.
  captioned = dataclasses.replace(bidirectional, text="bytes", text_depth=1)
  np.testing.assert_allclose(
      flops.packed_train_flops(captioned, np.ones((2, length), np.int32),
                               text_segment_ids=np.ones((2, 18), np.int32)),
      flops.dit_train_flops(captioned, length, 2, text_len=18))
  # Captions add their encoder, projections and (video, caption) and caption pairs.
  text_len = text_segment_ids.shape[1]
  linear = 3 * rows * (flops.dit_forward_flops(captioned, length, 0, text_len=text_len,
                                               text_pairs=0, cross_pairs=0)
                       - flops.dit_forward_flops(bidirectional, length, 0))
  pairs = (captioned.depth * flops.cross_attended_pairs(segment_ids, text_segment_ids)
           + captioned.text_depth * flops.attended_pairs(text_segment_ids))
  np.testing.assert_allclose(
      flops.packed_train_flops(captioned, segment_ids, text_segment_ids)
      - flops.packed_train_flops(bidirectional, segment_ids), linear + per_pair * pairs)
  with pytest.raises(ValueError, match="text_segment_ids"):
    flops.packed_train_flops(captioned, segment_ids)


def test_action_and_head_flops_match_xla_cost_analysis():
  """Forward FLOPs of velocity_and_heads with wide per-token actions: the analytic count with
  the action embedder and reward heads matches XLA, and without them it misses by more."""
  from worldsim.models import dit
  cfg = dit.DiTConfig(token_dim=16, width=64, depth=1, num_heads=4, attention="xla",
                      action_dim=512, reward_heads=True)
  batch_size, seq_len = 2, 64
  zeros = lambda s, dtype=jnp.float32: jnp.zeros(s, dtype)
  args = (zeros((batch_size, seq_len, 16)), zeros((batch_size, seq_len, 3), jnp.int32),
          jnp.ones((batch_size, seq_len), jnp.int32), zeros((batch_size, seq_len)))
  actions = dict(actions=zeros((batch_size, seq_len, 512)),
                 actions_known=zeros((batch_size, seq_len)))
  model = dit.DiT(cfg)
  params = jax.eval_shape(functools.partial(model.init, method=dit.DiT.velocity_and_heads),
                          jax.random.PRNGKey(0), *args, **actions)
  forward = jax.jit(functools.partial(model.apply, method=dit.DiT.velocity_and_heads))
  cost = forward.lower(params, *args, **actions).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  analytic = batch_size * flops.dit_forward_flops(cfg, seq_len)
  assert abs(analytic / xla - 1) < 0.1, (analytic, xla)
  bare = batch_size * flops.dit_forward_flops(
      dataclasses.replace(cfg, action_dim=0, reward_heads=False), seq_len)
  assert abs(analytic / xla - 1) < abs(bare / xla - 1) / 2, (analytic, bare, xla)
