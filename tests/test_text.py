"""Captions: the byte tokenizer, packing by clip, the text encoder, caption dropout."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.random_params import random_params
from worldsim.models import dit, patches, text
from worldsim.train import step


def test_tokens_are_bos_then_bytes_and_decode_back():
  captions = ["a red ball", "", "über 3 blocks"]
  tokens = text.tokenize(captions, 32)
  assert tokens.dtype == np.int32 and tokens.shape == (3, 32)
  np.testing.assert_array_equal(tokens[:, 0], text.BOS)
  np.testing.assert_array_equal(tokens[1, 1:], text.PAD)           # empty: BOS alone
  np.testing.assert_array_equal(tokens[0, 1:11], np.frombuffer(b"a red ball", np.uint8) + 2)
  assert tokens.max() < text.VOCAB_SIZE == 258
  assert text.detokenize(tokens) == captions


def test_long_captions_are_cut_to_max_len():
  tokens = text.tokenize(["abcdefgh", "é"], 4)
  assert text.detokenize(tokens) == ["abc", "é"]
  assert (tokens != text.PAD).sum(axis=1).tolist() == [4, 3]
  # A character cut in half is dropped, not turned into garbage.
  assert text.detokenize(text.tokenize(["aé"], 3)) == ["a"]
  with pytest.raises(ValueError, match="max_len"):
    text.tokenize(["a"], 0)


def test_packed_captions_carry_their_clips_segment_ids():
  captions = np.array([["ab", "", None], ["xyz", "q", "longer than four"]], dtype=object)
  tokens, segment_ids = text.pack_captions(captions, 4)
  assert tokens.shape == segment_ids.shape == (2, 12)
  assert tokens.dtype == segment_ids.dtype == np.int32
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0],
                                              [1, 1, 1, 1, 2, 2, 0, 0, 3, 3, 3, 3]])
  np.testing.assert_array_equal(tokens[:, ::4], [[text.BOS, text.BOS, text.PAD],
                                                 [text.BOS, text.BOS, text.BOS]])
  assert text.detokenize(tokens.reshape(6, 4)) == ["ab", "", "", "xyz", "q", "lon"]
  # `present` marks absent clips whatever their caption (the loader pads with '').
  _, only_first = text.pack_captions(captions, 4, present=[[True, False, False]] * 2)
  np.testing.assert_array_equal(only_first[:, 4:], 0)
  np.testing.assert_array_equal(only_first[:, :4], segment_ids[:, :4])


def test_null_text_is_bos_or_one_zero_row_per_clip():
  tokens, segment_ids = text.null_text(2, 3, 5)
  np.testing.assert_array_equal((tokens, segment_ids), text.pack_captions([[""] * 3] * 2, 5))
  np.testing.assert_array_equal(segment_ids[0], [1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0])
  embeddings, embedding_segment_ids = text.null_text(2, 3, 5, embed_dim=7)
  chex.assert_shape(embeddings, (2, 15, 7))
  np.testing.assert_array_equal(embeddings, 0.0)
  np.testing.assert_array_equal(embedding_segment_ids, segment_ids)


def test_positions_restart_in_every_caption():
  segment_ids = jnp.asarray([[1, 1, 1, 0, 2, 2, 0, 0, 3]])
  np.testing.assert_array_equal(text.positions_in_segment(segment_ids), [[0, 1, 2, 0, 0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(text.first_of_segment(segment_ids),
                                [[1, 0, 0, 0, 1, 0, 0, 0, 1]])
  np.testing.assert_array_equal(text.key_segment_ids(segment_ids), [[1, 1, 1, -1, 2, 2, -1, -1, 3]])


def _captions(rows, clips, max_len, seed=0):
  rng = np.random.default_rng(seed)
  words = ["ball", "ramp", "falls", "red", "box", "slides", "a", "the"]
  return np.array([[" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(clips)]
                   for _ in range(rows)], dtype=object)


def test_caption_dropout_drops_clips_at_the_rate_down_to_the_null_caption():
  rows, clips, max_len, rate = 64, 8, 16, 0.3
  tokens, segment_ids = text.pack_captions(_captions(rows, clips, max_len), max_len)
  dropped_tokens, dropped_ids = jax.jit(step.drop_captions, static_argnums=3)(
      jax.random.PRNGKey(0), jnp.asarray(tokens), jnp.asarray(segment_ids), rate)
  null_tokens, null_ids = text.null_text(rows, clips, max_len)
  per_clip = lambda x: np.asarray(x).reshape(rows, clips, max_len)
  is_null = np.all((per_clip(dropped_tokens) == per_clip(null_tokens))
                   & (per_clip(dropped_ids) == per_clip(null_ids)), axis=-1)
  kept = np.all((per_clip(dropped_tokens) == per_clip(tokens))
                & (per_clip(dropped_ids) == per_clip(segment_ids)), axis=-1)
  assert np.all(is_null | kept)                 # every clip is either untouched or null
  assert abs(is_null.mean() - rate) < 0.07, is_null.mean()   # 512 clips: sd 0.02

  embeddings = jax.random.normal(jax.random.PRNGKey(1), (rows, clips * max_len, 5))
  dropped_embeddings, ids = step.drop_captions(jax.random.PRNGKey(0), embeddings,
                                               jnp.asarray(segment_ids), rate)
  np.testing.assert_array_equal(ids, dropped_ids)          # the same clips, the same way
  rows_of = lambda x: np.asarray(x).reshape(rows, clips, max_len, 5)
  # The one row a dropped clip keeps is zero; the others are masked by their segment id 0.
  np.testing.assert_array_equal(rows_of(dropped_embeddings)[is_null][:, 0], 0.0)
  np.testing.assert_array_equal(rows_of(dropped_embeddings)[kept], rows_of(embeddings)[kept])


def test_text_encoder_reads_each_caption_alone():
  encoder = text.TextEncoder(width=32, depth=2, num_heads=2, mlp_dim=64)
  captions = [["a red ball falls", "", "the box slides"]]
  tokens, segment_ids = text.pack_captions(captions, 10)
  params = random_params(encoder, tokens, segment_ids)
  encode = jax.jit(encoder.apply)
  packed = encode(params, tokens, segment_ids)
  chex.assert_shape(packed, (1, 30, 32))
  for m, caption in enumerate(captions[0]):
    alone = encode(params, *text.pack_captions([[caption]], 10))
    real = slice(0, max(len(caption) + 1, 1))
    np.testing.assert_allclose(packed[0, 10 * m:10 * m + 10][real], alone[0][real], atol=1e-5)


@pytest.mark.parametrize("kind,text_shape", [("bytes", ()), ("embeddings", (24,))])
def test_every_captioned_parameter_has_logical_axis_names(kind, text_shape):
  model = dit.DiT(dit.DiTConfig(token_dim=12, width=32, depth=2, num_heads=2, text=kind))
  tokens = jax.ShapeDtypeStruct((2, 16, 12), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  captions = jax.ShapeDtypeStruct((2, 8, *text_shape), jnp.float32 if text_shape else jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens,
                         jax.ShapeDtypeStruct((2, 16, 3), jnp.int32), ids,
                         jax.ShapeDtypeStruct((2, 16), jnp.float32), None, captions,
                         jax.ShapeDtypeStruct((2, 8), jnp.int32))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)
  names = str(jax.tree_util.tree_structure(boxed))
  assert "cross_attention" in names
  assert ("text_encoder" if kind == "bytes" else "text_projection") in names


def test_gradients_reach_the_text_encoder_through_the_loss():
  """dit_loss with caption dropout on a row with a BOS-only clip and padding: finite, and the
  caption's encoder learns."""
  model = dit.DiT(dit.DiTConfig(token_dim=12, width=32, depth=1, num_heads=2, text="bytes",
                                text_depth=1))
  grids = [(2, 2, 3), (1, 3, 2)]
  positions = np.concatenate([patches.positions(g) for g in grids] + [np.zeros((2, 3), np.int32)])
  segment_ids = np.repeat([1, 2, 0], [12, 6, 2])[None].astype(np.int32)
  tokens, text_segment_ids = text.pack_captions([["a ball falls", "", None]], 8)
  batch = {"tokens": jax.random.normal(jax.random.PRNGKey(0), (1, 20, 12)),
           "positions": jnp.asarray(positions[None]), "segment_ids": jnp.asarray(segment_ids),
           "text": jnp.asarray(tokens), "text_segment_ids": jnp.asarray(text_segment_ids)}
  diffusion_cfg = ml_collections.ConfigDict(dict(
      logit_normal_mean=0.0, logit_normal_std=1.0, per_frame_noise=0.5, shift_base_tokens=256,
      max_shift=4.0, caption_dropout=0.5))
  params = random_params(model, batch["tokens"], batch["positions"], batch["segment_ids"],
                         jnp.zeros((1, 20)), None, batch["text"], batch["text_segment_ids"])
  loss_and_grads = jax.jit(jax.value_and_grad(functools.partial(
      step.dit_loss, model=model, diffusion_cfg=diffusion_cfg)))
  loss, grads = loss_and_grads(params["params"], batch=batch, rng=jax.random.PRNGKey(3))
  chex.assert_tree_all_finite((loss, grads))
  encoder_grads = jax.tree.leaves(grads["text_encoder"])
  assert encoder_grads and all(float(jnp.abs(g).max()) > 0 for g in encoder_grads)
