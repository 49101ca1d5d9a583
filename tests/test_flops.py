import flax.linen as nn
import numpy as np
import jax
import pytest

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
  setup = trainer.build(tiny_config, mesh_lib.make_mesh(tiny_config.mesh))
  boxed = jax.eval_shape(setup.model.init, jax.random.PRNGKey(0),
                         *trainer.example_batch(tiny_config).values(),
                         jax.ShapeDtypeStruct((8, 256), "float32"))
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
