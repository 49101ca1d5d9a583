"""Scale-out strategies and mixed precision against the one-device float32 reference.

Every strategy at the step level: data, fsdp, tensor, data x fsdp x tensor, Ulysses, ring,
Ulysses x ring, data x fsdp x Ulysses; gradient accumulation; and bfloat16 compute with float32
master weights. Compiling is what costs (the steps themselves
take milliseconds), so the model is one block with dense attention, the state is initialised
once and copied onto each mesh, and the reference's compiled step serves both the one-step
comparisons and the 20-step float32 run.
"""
import collections
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P

from data_pipelines import loader
from worldsim.models import dit
from worldsim.parallel import mesh as mesh_lib
from worldsim.train import trainer

STEPS = 20              # the bfloat16 run's length
# LLVM's -O0 on CPU: compiles ~40% faster. XLA's own passes (SPMD partitioning, fusion) still
# run, so what is compared is what a mesh computes; only the machine code is less tuned.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_reference = {}         # the one-device float32 run, computed by the first test that needs it


def _small(config):
  """The tiny config at one block with dense attention: the cheapest step to compile.
  Block-causal, so the frame mask crosses context shards too. No warmup: the first step
  moves the parameters at the peak learning rate, so comparing them after one step compares
  the gradients the strategies computed (a warmup from 0 would leave them at their start)."""
  with config.unlocked():
    config.model.depth, config.model.attention, config.model.causal = 1, "xla", True
    config.optim.warmup_steps = 0
  return config


def _set_mesh(config, mesh_shape):
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.context = (
        list(mesh_shape) + [1, 1, 1])[:4]
  return mesh_lib.make_mesh(config.mesh, jax.devices()[:math.prod(mesh_shape)])


def _run(config, mesh_shape, initial_state, batch, steps: int):
  """`steps` updates on one batch from `initial_state` (host arrays) on a mesh of
  `mesh_shape`: (state after the first step, on the host; the first step's metrics; every
  step's loss; the final state, on the mesh)."""
  setup = trainer.build(config, _set_mesh(config, mesh_shape))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    state = jax.device_put(initial_state, setup.state_shardings)
    device_batch = mesh_lib.global_batch(batch, setup.batch_shardings)
    train_step = setup.train_step.lower(state, device_batch).compile(FAST_COMPILE)
    losses = []
    for i in range(steps):
      state, step_metrics = train_step(state, device_batch)          # donates the state
      if i == 0:
        first_state, first_metrics = jax.device_get((state, step_metrics))
      losses.append(float(step_metrics["loss"]))
  return first_state, first_metrics, np.array(losses), state


def reference(tiny_config):
  """The one-device float32 run of STEPS steps, with the initial state and the batch."""
  if not _reference:
    config = _small(tiny_config.copy_and_resolve_references())
    batch = next(iter(loader.make_dataset(config.data, config.model.patch_size, config.seed,
                                          text=config.model.text)))
    setup = trainer.build(config, _set_mesh(config, (1,)))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      key = jax.random.PRNGKey(0)
      initial = jax.device_get(setup.init.lower(key).compile(FAST_COMPILE)(key))
    # adaLN-Zero starts every block as the identity, so at the initial parameters the blocks'
    # attention and MLP get no gradient; parameters a little off zero make one step exercise
    # every gradient the strategies compute.
    noise = np.random.default_rng(0)
    initial = initial.replace(params=jax.tree.map(
        lambda p: p + 0.02 * noise.standard_normal(p.shape).astype(p.dtype), initial.params))
    first_state, first_metrics, losses, final = _run(config, (1,), initial, batch, STEPS)
    _reference.update(initial=initial, batch=batch, state=first_state, metrics=first_metrics,
                      losses=losses, final_params=jax.device_get(final.params))
  return _reference


# (data, fsdp, tensor, context); the tiny model's 4 heads split over tensor x Ulysses. The
# last column: what each device holds of the (64, 256) MLP kernel, ('embed', 'mlp') ->
# ('fsdp', 'tensor').
@pytest.mark.parametrize("strategy,mesh_shape,context_parallel,kernel_shard", [
    ("data", (8,), "none", (64, 256)),
    ("fsdp", (1, 8), "none", (8, 256)),
    ("tensor", (1, 1, 2), "none", (64, 128)),
    ("data_fsdp_tensor", (2, 2, 2), "none", (32, 128)),
    ("ulysses", (1, 1, 1, 4), "ulysses", (64, 256)),
    ("ring", (1, 2, 2, 2), "ring", (32, 128)),
    ("ulysses_ring", (2, 1, 1, 4), "ulysses_ring", (64, 256)),
    ("data_fsdp_ulysses", (2, 2, 1, 2), "ulysses", (32, 256)),
])
def test_step_matches_one_device(tiny_config, strategy, mesh_shape, context_parallel,
                                 kernel_shard):
  """One step of each strategy gives the one-device loss (1e-5), gradient norm and
  parameters (1e-4), float32, from the same initial state and batch; parameters, optimizer
  moments and EMA are laid out as the rules say."""
  ref = reference(tiny_config)
  config = _small(tiny_config)
  with config.unlocked():
    config.model.context_parallel = context_parallel
    config.model.ulysses_degree = 2 if context_parallel == "ulysses_ring" else 1
  state, step_metrics, _, on_mesh = _run(config, mesh_shape, ref["initial"], ref["batch"], 1)
  np.testing.assert_allclose(step_metrics["loss"], ref["metrics"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(step_metrics["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-4)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref["state"].params,
                       ref["initial"].params)
  assert min(jax.tree.leaves(moved)) > 1e-4          # every parameter took a real step
  # Adam's first step moves each parameter by about lr * g / |g| (1e-3): an element whose
  # gradient is near Adam's eps moves by an amount that the summation order decides, so the
  # parameters match to 1% of that step; a wrong gradient moves them by the whole step.
  chex.assert_trees_all_close(state.params, ref["state"].params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state.opt_state, ref["state"].opt_state, rtol=1e-4, atol=1e-6)
  kernel = on_mesh.params["block_0"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == kernel_shard
  assert len(kernel.sharding.device_set) == math.prod(mesh_shape)
  # ('embed', 'heads', 'kv') -> ('fsdp', 'tensor', None); moments and EMA follow their params.
  assert on_mesh.params["block_0"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert on_mesh.opt_state[1][0].mu["block_0"]["mlp_in"]["kernel"].sharding.spec == \
      P("fsdp", "tensor")
  assert on_mesh.ema_params["block_0"]["mlp_in"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_gradient_accumulation_matches_one_pass(tiny_config):
  """8 rows on 2 devices in 4 parts of 2 rows: the loss, gradient norm and parameters of one
  pass over the batch (the noise is drawn for the whole batch first)."""
  ref = reference(tiny_config)
  config = _small(tiny_config)
  with config.unlocked():
    config.train.accum_steps = 4
  state, step_metrics, _, _ = _run(config, (2,), ref["initial"], ref["batch"], 1)
  np.testing.assert_allclose(step_metrics["loss"], ref["metrics"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(step_metrics["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-5)
  # atol: 1% of Adam's first step (see test_step_matches_one_device).
  chex.assert_trees_all_close(state.params, ref["state"].params, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights_and_tracks_float32(tiny_config):
  """bfloat16 compute from the same state and batch as the float32 reference, 20 steps:
  parameters, optimizer state and EMA stay float32; the losses stay within 1% of float32's
  at every step; the parameters' 20-step update is within 5% of float32's, yet differs
  from it by more than 0.1% (so bfloat16 really computed).

  Why those bounds: bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per
  operation). The loss is float32 (the velocity is cast up before the error is taken) and a
  mean over ~2k tokens, whose rounding errors largely cancel: measured, it differs from
  float32 by <= 1e-4 relative. The update is what rounding moves most (Adam normalises the
  gradient, so small gradient entries change their step a lot): measured 1%. A loss or
  softmax reduced in bfloat16 would move the first by percents; an optimizer stepping
  bfloat16 weights would stall updates smaller than 2^-9 of a weight; a compute dtype that
  silently stayed float32 would leave the update equal."""
  ref = reference(tiny_config)
  config = _small(tiny_config)
  with config.unlocked():
    config.model.dtype = "bfloat16"
  _, _, losses, state = _run(config, (1,), ref["initial"], ref["batch"], STEPS)
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  np.testing.assert_allclose(losses, ref["losses"], rtol=1e-2)
  assert losses[-5:].mean() < 0.95 * losses[:5].mean()     # and it still trains

  def update(params):                   # the 20 steps' change of every parameter, flat
    return np.concatenate([np.ravel(p - p0) for p, p0 in zip(
        jax.tree.leaves(params), jax.tree.leaves(ref["initial"].params))])

  f32_update = update(ref["final_params"])
  relative = (np.linalg.norm(update(jax.device_get(state.params)) - f32_update)
              / np.linalg.norm(f32_update))
  assert 1e-3 < relative < 0.05, relative


def _matmul_flops_by_dtype(jaxpr, flops=None) -> collections.Counter:
  """FLOPs of every dot_general and convolution in a jaxpr (and its sub-jaxprs: scans,
  custom VJPs, remat), keyed by the dtype of the left operand."""
  flops = collections.Counter() if flops is None else flops
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval
    lhs, rhs = (v.aval for v in eqn.invars[:2]) if len(eqn.invars) >= 2 else (None, None)
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      flops[str(lhs.dtype)] += 2 * math.prod(out.shape) * math.prod(
          lhs.shape[i] for i in contracting)
    elif eqn.primitive.name == "conv_general_dilated":
      # out elements x (kernel taps x input channels): the kernel's size / output channels.
      out_channels = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
      flops[str(lhs.dtype)] += 2 * math.prod(out.shape) * math.prod(rhs.shape) // out_channels
    for sub in _sub_jaxprs(eqn.params):
      _matmul_flops_by_dtype(sub, flops)
  return flops


def _sub_jaxprs(params):
  """The jaxprs an equation carries in its params (scan and cond bodies, custom VJPs)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _bf16_share(flops) -> float:
  return flops["bfloat16"] / sum(flops.values())


def test_bfloat16_model_runs_its_matmuls_in_bfloat16():
  """Traced, not compiled: at least 90% of the DiT's forward + backward matmul FLOPs are
  bfloat16 (what stays float32: the timestep MLP, 2 D^2 per token once, and the float32
  accumulations of attention's online softmax); its velocity is float32."""
  cfg = dit.DiTConfig(token_dim=48, width=256, depth=2, num_heads=4, attention="chunked",
                      dtype="bfloat16")
  model = dit.DiT(cfg)
  b, length = 2, 128
  inputs = (jnp.zeros((b, length, cfg.token_dim)), jnp.zeros((b, length, 3), jnp.int32),
            jnp.ones((b, length), jnp.int32), jnp.full((b, length), 0.5))
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  velocity = jax.eval_shape(lambda p: model.apply({"params": p}, *inputs), params)
  assert velocity.dtype == jnp.float32
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, *inputs)))
  flops = _matmul_flops_by_dtype(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert _bf16_share(flops) >= 0.9, flops


def test_bfloat16_vae_runs_its_convolutions_in_bfloat16(tiny_config):
  """The VAE (config.vae.dtype), traced: its convolutions are bfloat16, its parameters
  float32."""
  from worldsim.models import vae as vae_lib
  with tiny_config.unlocked():
    tiny_config.vae.dtype = "bfloat16"
  model = vae_lib.VAE(vae_lib.config_from(tiny_config.vae))
  video = jnp.zeros((1, 5, 16, 16, 3))
  rng = jax.random.PRNGKey(0)
  params = nn.unbox(jax.eval_shape(model.init, rng, video))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  loss = lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, video, rng)[0] - video))
  flops = _matmul_flops_by_dtype(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert _bf16_share(flops) >= 0.95, flops


def test_several_hosts_need_rows_of_their_own(tiny_config, monkeypatch):
  """Each host loads its own rows, so on 2 hosts (4 devices each) data x fsdp must split
  the batch over them, and tensor x context must stay within a host."""
  from worldsim import config as config_lib
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_device_count", lambda: 4)
  with tiny_config.unlocked():
    tiny_config.mesh.data, tiny_config.mesh.context = 2, 4
  config_lib.validate(tiny_config, 8)                       # one row shard per host
  with tiny_config.unlocked():
    tiny_config.mesh.data, tiny_config.mesh.context = 1, 8
  with pytest.raises(config_lib.ConfigError, match="multiple of the 2 hosts"):
    config_lib.validate(tiny_config, 8)
  with tiny_config.unlocked():
    tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = 1, 2, 4
    tiny_config.mesh.context = 1
  config_lib.validate(tiny_config, 8)
