import numpy as np
import pytest

from worldsim.models import patches


@pytest.mark.parametrize("shape,patch", [((8, 16, 24, 3), (1, 4, 4)), ((6, 8, 4, 5), (2, 2, 4)),
                                         ((1, 4, 4, 16), (1, 2, 2))])
def test_patchify_round_trip_is_exact(shape, patch):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  grid = patches.grid_shape(shape, patch)
  tokens = patches.patchify(x, patch)
  assert tokens.shape == (np.prod(grid), patches.token_dim(patch, shape[-1]))
  np.testing.assert_array_equal(patches.unpatchify(tokens, grid, patch, shape[-1]), x)
  batched = np.stack([x, x + 1])
  np.testing.assert_array_equal(
      patches.unpatchify(patches.patchify(batched, patch), grid, patch, shape[-1]), batched)


def test_token_holds_its_patch_and_positions_name_it():
  x = np.arange(4 * 4 * 6 * 1, dtype=np.float32).reshape(4, 4, 6, 1)
  patch = (2, 2, 3)
  tokens = patches.patchify(x, patch)
  pos = patches.positions(patches.grid_shape(x.shape, patch))
  for token, (t, h, w) in zip(tokens, pos):
    expected = x[t * 2:(t + 1) * 2, h * 2:(h + 1) * 2, w * 3:(w + 1) * 3].reshape(-1)
    np.testing.assert_array_equal(token, expected)
  # Frame-major order: the tokens of one latent frame are contiguous.
  assert np.all(np.diff(pos[:, 0]) >= 0)


def test_indivisible_grid_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of its patch size"):
    patches.patchify(np.zeros((8, 15, 16, 3)), (1, 4, 4))
