"""Random parameters for tests, without compiling Flax's initialisers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(module, *args, seed=0):
  """Random parameters without compiling Flax's initialisers.

  Compiling threefry for the VAE's ~100 kernels costs 30 s of XLA time on 2 CPU cores; the
  shapes come from eval_shape and the values from numpy (kernels ~ N(0, 1 / fan_in), norm
  scales near 1, small biases so that they matter).
  """
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif "bias" in name:
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)
