import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from worldsim.models import vae
from tests.random_params import random_params
from worldsim.parallel import mesh as mesh_lib

CFG = vae.VAEConfig.from_variant("tiny")
MODEL = vae.VAE(CFG)


def _clip(frames, size=16, batch=1, seed=0):
  """Pixels in [-1, 1] (numpy's generator: jax.random would compile once per shape)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.0, 1.0, (batch, frames, size, size, 3)), jnp.float32)


@functools.partial(jax.jit, static_argnames="method")
def _apply(params, x, method):
  return MODEL.apply(params, x, method=method)


@pytest.fixture(scope="module")
def params():
  return random_params(MODEL, jnp.zeros((1, 1, 16, 16, 3)))


def _shape_of(params, x, method, **kwargs):
  """Shapes only (no compile): eval_shape traces the model, so length checks still run."""
  return jax.eval_shape(functools.partial(MODEL.apply, method=method, **kwargs), params, x)


def test_shapes_follow_the_one_plus_4k_rule(params):
  for frames, latent_frames in ((1, 1), (5, 2), (9, 3), (13, 4)):
    mean, logvar = _shape_of(params, _clip(frames), "encode")
    chex.assert_shape((mean, logvar), (1, latent_frames, 4, 4, CFG.latent_channels))
    assert CFG.latent_shape(frames, 16, 16) == mean.shape[1:]
    chex.assert_shape(_shape_of(params, mean, "decode"), (1, frames, 16, 16, 3))


def test_bad_lengths_raise_a_clear_error(params):
  with pytest.raises(ValueError, match=r"1 \+ 4k frames.*nearest valid lengths are 9 or 13"):
    _shape_of(params, _clip(10), "encode")
  with pytest.raises(ValueError, match=r"nearest valid lengths are 1 or 5"):
    _shape_of(params, _clip(4), "encode")
  with pytest.raises(ValueError, match=r"multiple of the VAE's spatial factor 4"):
    _shape_of(params, _clip(5, size=18), "encode")
  # pad=True repeats the last frame up to the next valid length.
  assert _shape_of(params, _clip(10), "encode", pad=True)[0].shape[1] == 4
  padded = vae.pad_frames(_clip(10), 4)
  np.testing.assert_array_equal(padded[:, 9:], jnp.repeat(_clip(10)[:, 9:], 4, axis=1))


# The tests below share one 13-frame clip, so its encode and decode compile once.
VIDEO = _clip(13)


def test_an_image_is_a_one_frame_clip(params):
  image_mean, _ = _apply(params, VIDEO[:, :1], "encode")
  video_mean, _ = _apply(params, VIDEO, "encode")
  chex.assert_trees_all_close(image_mean[:, 0], video_mean[:, 0], atol=1e-5)
  image = _apply(params, image_mean, "decode")
  chex.assert_shape(image, (1, 1, 16, 16, 3))
  chex.assert_trees_all_close(image[:, 0], _apply(params, video_mean, "decode")[:, 0], atol=1e-5)


def test_encoder_and_decoder_are_causal(params):
  changed_frame = 6                                 # lives in latent frame 1 + (6 - 1) // 4 = 2
  edited = VIDEO.at[:, changed_frame].set(-VIDEO[:, changed_frame])
  mean, _ = _apply(params, VIDEO, "encode")
  mean_edited, _ = _apply(params, edited, "encode")
  np.testing.assert_allclose(mean[:, :2], mean_edited[:, :2], atol=1e-6)
  assert not np.allclose(mean[:, 2], mean_edited[:, 2], atol=1e-3)
  # Decoded frame t depends on latents up to its own: changing latent 2 keeps frames 0..4.
  z_edited = mean.at[:, 2].add(1.0)
  frames, frames_edited = _apply(params, mean, "decode"), _apply(params, z_edited, "decode")
  np.testing.assert_allclose(frames[:, :5], frames_edited[:, :5], atol=1e-6)
  assert not np.allclose(frames[:, 5:9], frames_edited[:, 5:9], atol=1e-3)


def test_streaming_equals_whole_clip(params):
  mean, logvar = _apply(params, VIDEO, "encode")
  pixels = _apply(params, mean, "decode")
  for chunk_frames in (4, 8):                       # chunks of 5+4+4 and 9+4 frames
    stream_mean, stream_logvar = vae.stream_encode(MODEL, params, VIDEO, chunk_frames)
    chex.assert_trees_all_close((stream_mean, stream_logvar), (mean, logvar), atol=1e-5)
  for chunk_latents in (1, 2):                      # latents 2+1+1 and 3+1
    chex.assert_trees_all_close(vae.stream_decode(MODEL, params, mean, chunk_latents), pixels,
                                atol=1e-5)
  # The chunk API by hand: the cache carries the past, and a bad chunk length is refused.
  (m0, _), cache = vae.encode_chunk(MODEL, params, VIDEO[:, :9])
  with pytest.raises(ValueError, match="multiple of 4"):
    vae.encode_chunk(MODEL, params, VIDEO[:, 9:11], cache)
  (m1, _), _ = vae.encode_chunk(MODEL, params, VIDEO[:, 9:13], cache)
  chex.assert_trees_all_close(jnp.concatenate([m0, m1], axis=1), mean, atol=1e-5)


def test_tiled_decode_is_close_to_whole_decode(params):
  z = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 16, 16, CFG.latent_channels)),
                  jnp.float32)
  whole = np.asarray(_apply(params, z, "decode"))                        # 5 x 64 x 64 pixels
  tiled = np.asarray(vae.tiled_decode(MODEL, params, z, tile=12, overlap=8))
  chex.assert_equal_shape((whole, tiled))
  # Random weights spread every latent over the whole receptive field (wider than the
  # overlap), so seams remain: measured mean |error| 0.014 (3% of mean |x| = 0.44), max 0.25
  # (10% of max |x| = 2.4), PSNR 37.6 dB on the [-1, 1] range.
  error = np.abs(tiled - whole)
  assert error.mean() < 0.05 * np.abs(whole).mean(), (error.mean(), np.abs(whole).mean())
  assert error.max() < 0.2 * np.abs(whole).max(), (error.max(), np.abs(whole).max())
  assert 10 * np.log10(4.0 / np.mean(error ** 2)) > 34.0


def test_params_shard_by_the_rules_and_the_sharded_forward_matches():
  mesh_cfg = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, context=1))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  video = _clip(5, batch=4)
  # An rbg key: threefry's ~100 initialisers would take 30 s to compile on 2 CPU cores.
  key = jax.random.key(0, impl="unsafe_rbg")
  init_fn = lambda rng: MODEL.init(rng, video[:, :1])
  abstract, shardings = mesh_lib.abstract_sharded(init_fn, mesh, vae.RULES, key)
  params = mesh_lib.sharded_init(init_fn, shardings)(key)
  kernel = params["params"]["encoder"]["level_1_block_0"]["conv_2"]["conv"]["kernel"]
  expected = mesh_lib.logical_sharding(mesh, vae.RULES, (None, None, None, "conv_in", "conv_out"))
  assert kernel.sharding.spec == expected.spec == P(None, None, None, "fsdp", "tensor")
  assert abstract["params"]["encoder"]["level_1_block_0"]["conv_2"]["conv"]["kernel"].sharding \
      == kernel.sharding

  reference_params = jax.device_get(params)
  reference = jax.jit(MODEL.apply)(reference_params, video)
  video_sharding = mesh_lib.logical_sharding(mesh, vae.RULES, vae.PIXEL_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(vae.RULES):
    forward = jax.jit(MODEL.apply, in_shardings=(shardings, video_sharding))
    sharded = forward(params, jax.device_put(video, video_sharding))
  chex.assert_trees_all_close(sharded, reference, atol=1e-5)


def test_losses_and_discriminator():
  disc = vae.Discriminator(CFG)
  video = _clip(5, batch=2)
  disc_params = random_params(disc, video)
  logits = disc.apply(disc_params, video)
  chex.assert_shape(logits, (2, 2, 2, 2))           # 5 -> 3 -> 2 frames, 16 -> 2 pixels
  chex.assert_shape(disc.apply(disc_params, video[:, :1]), (2, 1, 2, 2))
  chex.assert_tree_all_finite(logits)
  assert float(vae.hinge_d_loss(jnp.full(4, 2.0), jnp.full(4, -2.0))) == 0.0
  assert float(vae.hinge_d_loss(jnp.zeros(4), jnp.zeros(4))) == 1.0
  assert float(vae.hinge_g_loss(jnp.full(4, 3.0))) == -3.0
  assert float(vae.kl_loss(jnp.zeros(3), jnp.zeros(3))) == 0.0
  assert float(vae.kl_loss(jnp.ones(3), jnp.zeros(3))) == 0.5
  assert float(vae.l1_loss(jnp.ones(3), -jnp.ones(3))) == 2.0
  assert float(vae.l2_loss(jnp.ones(3), -jnp.ones(3))) == 4.0


def test_a_few_optax_steps_reduce_l1_plus_kl(params):
  video = jnp.tanh(_clip(5, batch=2))
  tx = optax.adam(3e-3)

  def loss_fn(p, rng):
    reconstruction, mean, logvar = MODEL.apply(p, video, rng)
    return vae.l1_loss(reconstruction, video) + 1e-3 * vae.kl_loss(mean, logvar)

  @jax.jit
  def step(p, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  p, opt_state, losses = params, tx.init(params), []
  for i in range(6):      # rbg keys: compiling threefry's normal sampler alone costs ~8 s here
    p, opt_state, loss = step(p, opt_state, jax.random.key(i, impl="unsafe_rbg"))
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (1, 2, 2)])
def test_temporal_tap_conv_equals_a_3d_conv(strides):
  """The VAE's conv (one 2D conv per temporal tap, summed) is a 3D conv with 'same' spatial
  and no temporal padding, kernel for kernel."""
  conv = vae._TemporalTapConv(6, (3, 3, 3), strides, ("conv_in", "conv_out"), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 8, 10, 5))
  params = random_params(conv, x)
  kernel, bias = params["params"]["kernel"], params["params"]["bias"]
  expected = jax.lax.conv_general_dilated(
      x, kernel, strides, ((0, 0), (1, 1), (1, 1)),
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + bias
  np.testing.assert_allclose(conv.apply(params, x), expected, atol=1e-5, rtol=1e-5)
