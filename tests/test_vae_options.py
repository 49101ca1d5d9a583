"""VAEConfig.norm and sample_posterior: the options the tiny recipe trains with, and defaults
that keep the bundled model's parameter tree."""
import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from worldsim.models import vae


def _clip(frames=5, size=16):
  return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)),
                     jnp.float32)


def _shapes(model):
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), _clip())["params"])
  return {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_defaults_keep_the_bundled_parameter_tree():
  """norm='rms' and sample_posterior=True are the defaults: the same names and shapes as
  before the options (what worldsim/assets/physics_tiny/vae.npz holds)."""
  cfg = vae.VAEConfig.from_variant("tiny")
  assert cfg.norm == "rms" and cfg.sample_posterior
  names = set(_shapes(vae.VAE(cfg)))
  assert "encoder/level_0_block_0/norm_1/scale" in names
  assert "decoder/norm_out/scale" in names


def test_norm_none_drops_only_the_norm_scales():
  tiny = lambda **kw: vae.VAE(vae.VAEConfig.from_variant("tiny", **kw))
  rms, none = _shapes(tiny()), _shapes(tiny(norm="none"))
  assert none == {k: v for k, v in rms.items() if "norm" not in k}
  with pytest.raises(ValueError, match="norm"):
    vae.VAEConfig.from_variant("tiny", norm="group")


def test_sample_posterior_false_decodes_the_mean_even_with_an_rng():
  model = vae.VAE(vae.VAEConfig.from_variant("tiny", sample_posterior=False))
  x = _clip()
  params = model.init(jax.random.PRNGKey(0), x)
  with_rng, _, _ = model.apply(params, x, jax.random.PRNGKey(1))
  without, _, _ = model.apply(params, x)
  np.testing.assert_array_equal(with_rng, without)
  sampling = vae.VAE(vae.VAEConfig.from_variant("tiny"))
  assert not np.allclose(sampling.apply(params, x, jax.random.PRNGKey(1))[0], without)


def test_norm_none_streams_exactly():
  """No norm is per voxel too: chunked coding still equals whole-clip coding."""
  model = vae.VAE(vae.VAEConfig.from_variant("tiny", norm="none"))
  x = _clip(9)
  params = model.init(jax.random.PRNGKey(0), x)
  whole = model.apply(params, x, method=vae.VAE.encode)[0]
  streamed = vae.stream_encode(model, params, x, chunk_frames=4)[0]
  np.testing.assert_allclose(streamed, whole, atol=1e-5)
