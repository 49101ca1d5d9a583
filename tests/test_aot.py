"""The ahead-of-time memory check (worldsim/parallel/aot.py, python -m worldsim.aot)."""
import os

import jax

from worldsim import aot as aot_cli
from worldsim.parallel import aot


def test_fsdp_divides_the_state_and_a_small_budget_does_not_fit(tiny_config):
  """Compiled once for 8 devices with fsdp = 8: each holds about 1/8 of the parameters and
  the optimizer's moments (what stays whole: norm scales and the biases of 'mlp', which
  fsdp does not split); 16 GiB fits, 1 MiB does not, and the verdict says so."""
  with tiny_config.unlocked():
    tiny_config.model.depth = 1
    tiny_config.mesh.data, tiny_config.mesh.fsdp = 1, 8
  report = aot.memory_report(tiny_config, 8, memory_gb=16,
                             compiler_options={"xla_backend_optimization_level": 0})
  dit = report["steps"]["dit"]
  assert report["mesh"]["fsdp"] == 8 and list(report["steps"]) == ["dit"]
  state, unsharded = dit["params"] + dit["optimizer"], (
      dit["params_unsharded"] + dit["optimizer_unsharded"])
  assert unsharded / 8 <= state <= 1.1 * unsharded / 8, (state, unsharded)
  # The donated state is an argument, an output written over it, and counted once.
  assert dit["arguments"] >= state and dit["aliased"] >= state
  assert dit["total"] == (dit["arguments"] + dit["outputs"] - dit["aliased"]
                          + dit["temporaries"] + dit["generated_code"])
  assert report["fits"] and aot.verdict(report).startswith("fits")
  tight = aot.with_budget(report, memory_gb=1 / 1024)
  assert tight["fits"] is False and tight["peak"] == dit["total"] > tight["budget"]
  assert aot.verdict(tight).startswith("does not fit") and "fsdp" in aot.verdict(tight)
  assert "temporaries" in aot.table(report)


def test_the_cli_sets_fake_cpu_devices_before_jax_starts(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  monkeypatch.setattr(jax.config, "update", lambda *args: None)   # the backend is up here
  aot_cli._force_host_devices(["aot", "--devices=64", "--config=x.py"])
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_foo=1 "
                                     "--xla_force_host_platform_device_count=64")
  aot_cli._force_host_devices(["aot", "--devices=4", "--topology=v5p-8"])   # TPU: untouched
  assert os.environ["XLA_FLAGS"].endswith("count=64")


def test_a_tpu_topology_without_libtpu_says_what_is_missing():
  try:
    devices = aot.tpu_topology_devices("v5p-8")
  except aot.TopologyUnavailable as e:
    assert "libtpu" in str(e)
  else:                                   # a TPU VM: the slice's 4 chips, compile-only
    assert len(devices) == 4
