"""VAEConfig.norm, sample_posterior, shortcuts, upsample(_kernel_t, _width), res_kernel_t and
zero_init: the options the tiny recipe trains with, and defaults that keep the parameter tree
of VAEs saved before them."""
import dataclasses

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from tests.random_params import random_params
from worldsim.models import vae


def _clip(frames=5, size=16):
  return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)),
                     jnp.float32)


def _shapes(model):
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), _clip())["params"])
  return {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_defaults_keep_the_parameter_tree_saved_before_the_options():
  """norm='rms', sample_posterior=True and res_kernel_t=3 are the defaults: the same names and
  shapes as before the options, so VAEs saved then still load."""
  cfg = vae.VAEConfig.from_variant("tiny")
  assert cfg.norm == "rms" and cfg.sample_posterior and cfg.res_kernel_t == 3
  assert cfg.upsample_kernel_t == 3 and cfg.upsample_width == "level" and not cfg.zero_init
  shapes = _shapes(vae.VAE(cfg))
  assert "encoder/level_0_block_0/norm_1/scale" in shapes
  assert "decoder/norm_out/scale" in shapes
  assert shapes["decoder/mid_block_0/conv_1/conv/kernel"][0] == 3


def test_norm_none_drops_only_the_norm_scales():
  tiny = lambda **kw: vae.VAE(vae.VAEConfig.from_variant("tiny", **kw))
  rms, none = _shapes(tiny()), _shapes(tiny(norm="none"))
  assert none == {k: v for k, v in rms.items() if "norm" not in k}
  with pytest.raises(ValueError, match="norm"):
    vae.VAEConfig.from_variant("tiny", norm="group")


def test_sample_posterior_false_decodes_the_mean_even_with_an_rng():
  model = vae.VAE(vae.VAEConfig.from_variant("tiny", sample_posterior=False))
  x = _clip(frames=1, size=8)
  params = random_params(model, x)
  with_rng, _, _ = model.apply(params, x, jax.random.PRNGKey(1))
  without, _, _ = model.apply(params, x)
  np.testing.assert_array_equal(with_rng, without)
  sampling = vae.VAE(vae.VAEConfig.from_variant("tiny"))
  assert not np.allclose(sampling.apply(params, x, jax.random.PRNGKey(1))[0], without)


def test_norm_none_streams_exactly():
  """No norm is per voxel too: chunked coding still equals whole-clip coding."""
  model = vae.VAE(vae.VAEConfig.from_variant("tiny", norm="none"))
  x = _clip(9)
  params = random_params(model, x[:, :1])
  whole = model.apply(params, x, method=vae.VAE.encode)[0]
  streamed = vae.stream_encode(model, params, x, chunk_frames=4)[0]
  np.testing.assert_allclose(streamed, whole, atol=1e-5)


# --------------------------------------------------------------------------- shortcuts

SHORTCUT_CFG = vae.VAEConfig.from_variant("tiny", norm="none", shortcuts=True,
                                          upsample="subpixel")


def test_shortcuts_add_no_parameters_and_subpixel_widens_only_the_up_convs():
  tiny = lambda **kw: vae.VAE(vae.VAEConfig.from_variant("tiny", norm="none", **kw))
  plain = _shapes(tiny())
  assert _shapes(tiny(shortcuts=True)) == plain
  subpixel = _shapes(tiny(upsample="subpixel"))
  changed = {k for k in plain if subpixel[k] != plain[k]}
  assert changed and all("_up/" in k for k in changed)
  # level 1 -> 0 doubles time too: 2 frames x 2 x 2 outputs per input voxel
  kernel = "decoder/level_1_up/conv/conv/kernel"
  assert subpixel[kernel][-1] == 8 * plain[kernel][-1]
  with pytest.raises(ValueError, match="upsample"):
    vae.VAEConfig.from_variant("tiny", upsample="bilinear")


def test_pool_shortcut_is_a_causal_average_pool():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 4, 4, 2)), jnp.float32)
  pooled = vae._pool_shortcut(x, time=True, features=2)
  assert pooled.shape == (1, 3, 2, 2, 2)
  np.testing.assert_allclose(pooled[0, 0, 0, 0], x[0, 0, :2, :2].mean((0, 1)), atol=1e-6)
  np.testing.assert_allclose(pooled[0, 2, 1, 0], x[0, 3:5, 2:, :2].mean((0, 1, 2)), atol=1e-6)
  # A later streaming chunk (an even number of frames) pairs its frames from the start.
  np.testing.assert_allclose(vae._pool_shortcut(x[:, 1:], True, 2), pooled[:, 1:], atol=1e-6)
  # Channels: averaged in consecutive groups, or repeated; anything else is refused.
  np.testing.assert_allclose(vae._match_channels(x, 1)[..., 0], x.mean(-1), atol=1e-6)
  np.testing.assert_array_equal(vae._match_channels(x, 4)[..., 2:], jnp.repeat(x[..., 1:], 2, -1))
  with pytest.raises(ValueError, match="cannot map 2 channels to 3"):
    vae._match_channels(x, 3)


def test_shortcuts_and_subpixel_upsampling_stream_exactly_and_stay_causal():
  model = vae.VAE(SHORTCUT_CFG)
  x = _clip(13)
  params = random_params(model, x[:, :5])
  encode = jax.jit(lambda p, v: model.apply(p, v, method=vae.VAE.encode))
  mean, logvar = encode(params, x)
  np.testing.assert_allclose(vae.stream_encode(model, params, x, 4)[0], mean, atol=1e-5)
  decode = jax.jit(lambda p, z: model.apply(p, z, method=vae.VAE.decode))
  whole = decode(params, mean)
  np.testing.assert_allclose(vae.stream_decode(model, params, mean, 1), whole, atol=1e-5)
  np.testing.assert_allclose(decode(params, mean.at[:, 2].add(1.0))[:, :5], whole[:, :5],
                             atol=1e-6)                    # latent 2 decodes to frames 5..8
  edited = encode(params, x.at[:, 6].set(-x[:, 6]))[0]      # frame 6 is in latent frame 2
  np.testing.assert_allclose(edited[:, :2], mean[:, :2], atol=1e-6)
  assert not np.allclose(edited[:, 2], mean[:, 2], atol=1e-3)


# --------------------------------------------------------------------------- res_kernel_t

def test_res_kernel_t_1_makes_only_the_block_convs_per_frame():
  tiny = lambda **kw: vae.VAE(vae.VAEConfig.from_variant("tiny", **kw))
  plain, per_frame = _shapes(tiny()), _shapes(tiny(res_kernel_t=1))
  changed = {k for k in plain if per_frame[k] != plain[k]}
  assert changed and all("_block_" in k and k.endswith("/conv/kernel") for k in changed)
  assert all(per_frame[k] == (1,) + plain[k][1:] for k in changed)
  assert per_frame.keys() == plain.keys()
  with pytest.raises(ValueError, match="res_kernel_t"):
    vae.VAEConfig.from_variant("tiny", res_kernel_t=2)


def test_res_kernel_t_1_streams_exactly_and_forgets_the_distant_past():
  """Per-frame blocks keep the temporal receptive field to a few latent frames: a change to
  frame 0 reaches latents 0-4 only, and a change to latent 0 no frame of latent 7 or later
  (frames 25 on), where 3-frame blocks reach the end of the clip."""
  x = _clip(29, size=8)
  for kernel_t, reaches_end in ((1, False), (3, True)):
    model = vae.VAE(dataclasses.replace(SHORTCUT_CFG, res_kernel_t=kernel_t))
    params = random_params(model, x[:, :5])
    encode = jax.jit(lambda p, v: model.apply(p, v, method=vae.VAE.encode)[0])
    decode = jax.jit(lambda p, z: model.apply(p, z, method=vae.VAE.decode))
    mean = encode(params, x)
    edited = encode(params, x.at[:, 0].set(-x[:, 0]))
    assert np.allclose(edited[:, 5:], mean[:, 5:], atol=1e-6) != reaches_end
    video = decode(params, mean)
    redone = decode(params, mean.at[:, 0].add(1.0))
    assert np.allclose(redone[:, 25:], video[:, 25:], atol=1e-6) != reaches_end
    if kernel_t == 1:
      np.testing.assert_allclose(vae.stream_encode(model, params, x, 8)[0], mean, atol=1e-5)
      np.testing.assert_allclose(vae.stream_decode(model, params, mean, 2), video, atol=1e-5)


# ------------------------------------------------- upsample_kernel_t, upsample_width, zero_init

def test_upsample_options_change_only_the_up_convs_and_next_block_skips():
  tiny = lambda **kw: _shapes(vae.VAE(dataclasses.replace(SHORTCUT_CFG, **kw)))
  plain = tiny()
  short = tiny(upsample_kernel_t=2)
  assert {k for k in plain if short[k] != plain[k]} == {
      f"decoder/level_{i}_up/conv/conv/kernel" for i in (1, 2)}
  assert short["decoder/level_1_up/conv/conv/kernel"][0] == 2
  narrow = tiny(upsample_width="next")
  # level 1 -> 0 now gives level 0's width (8, x 2 frames x 2 x 2 outputs per input voxel),
  # so level 0's first block needs no 1x1 skip any more
  assert narrow["decoder/level_1_up/conv/conv/kernel"][-1] == 8 * 8
  assert "decoder/level_0_block_0/skip/conv/kernel" in plain
  assert "decoder/level_0_block_0/skip/conv/kernel" not in narrow
  for bad in (dict(upsample_kernel_t=1), dict(upsample_width="wide")):
    with pytest.raises(ValueError, match=next(iter(bad))):
      dataclasses.replace(SHORTCUT_CFG, **bad)


def test_upsample_options_stream_exactly():
  model = vae.VAE(dataclasses.replace(SHORTCUT_CFG, res_kernel_t=1, upsample_kernel_t=2,
                                      upsample_width="next"))
  x = _clip(13)
  params = random_params(model, x[:, :5])
  mean = model.apply(params, x, method=vae.VAE.encode)[0]
  whole = model.apply(params, mean, method=vae.VAE.decode)
  np.testing.assert_allclose(vae.stream_decode(model, params, mean, 1), whole, atol=1e-5)


def test_zero_init_starts_every_block_as_the_identity_and_keeps_the_tree():
  cfg = dataclasses.replace(SHORTCUT_CFG, res_kernel_t=1)
  zero = vae.VAE(dataclasses.replace(cfg, zero_init=True))
  assert _shapes(zero) == _shapes(vae.VAE(cfg))
  x = _clip(5, size=8)
  params = nn.unbox(zero.init(jax.random.PRNGKey(0), x)["params"])
  flat = traverse_util.flatten_dict(params, sep="/")
  zeros = {k for k, v in flat.items() if k.endswith("kernel") and not np.any(v)}
  assert zeros and zeros == {k for k in flat if "/conv_2/conv/kernel" in k}
  block = vae.ResBlock(16, norm="none", kernel_t=1, zero_init=True)
  h = jnp.asarray(np.random.default_rng(2).standard_normal((1, 3, 4, 4, 16)), jnp.float32)
  np.testing.assert_array_equal(block.apply(block.init(jax.random.PRNGKey(0), h), h), h)
