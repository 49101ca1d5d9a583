"""Will this config fit? Compiles its train steps for N devices and reports per-device memory.

  python -m worldsim.aot --config=experiments/physics_tiny.py --devices=8 --memory_gb=16 \
      --config.mesh.data=1 --config.mesh.fsdp=8
  python -m worldsim.aot --config=experiments/physics_tiny.py:XL --topology=v5p-128 \
      --memory_gb=95 --config.mesh.data=-1 --config.mesh.fsdp=16   # needs libtpu

--devices=N compiles for N fake CPU devices (set up here, before JAX starts); --topology for
a Cloud TPU slice without its chips; neither, for the devices attached. Prints a table, a
verdict, and one JSON line last; exits 1 when a step does not fit --memory_gb per device,
2 when the config or the topology is unusable. See worldsim/parallel/aot.py.
"""
import os
import re
import sys


def _force_host_devices(argv) -> None:
  """--devices=N without --topology: N CPU devices. XLA reads the flag when JAX creates its
  CPU client, so it must be in the environment before anything asks JAX for devices."""
  count = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), None)
  if not count or int(count) <= 0 or any(a.startswith("--topology=") and a != "--topology="
                                         for a in argv):
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = " ".join(f"{flags} --xla_force_host_platform_device_count={count}"
                                     .split())
  import jax                  # already imported by the worldsim package; no backend yet
  jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
  _force_host_devices(sys.argv)

import json  # noqa: E402  (after the device flags)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from worldsim import config as config_lib  # noqa: E402
from worldsim.parallel import aot  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs: importing this module (tests do) must not
  claim --config, which worldsim.main defines too."""
  config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 0, "compile for this many fake CPU devices (0: the devices "
                       "attached, or --topology's)")
  flags.DEFINE_string("topology", "", f"a Cloud TPU slice to compile for without its chips "
                      f"(needs libtpu): one of {sorted(aot.TPU_SLICES)} or a topology such as "
                      f"'v5:4x4x8'")
  flags.DEFINE_integer("num_slices", 1, "slices of --topology (multislice)")
  flags.DEFINE_float("memory_gb", None, "memory per device in GiB (e.g. 95 for v5p, 31 for "
                     "v6e); without it the report has no verdict")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  try:
    devices = (aot.tpu_topology_devices(FLAGS.topology, FLAGS.num_slices) if FLAGS.topology
               else FLAGS.devices or None)
    report = aot.memory_report(FLAGS.config, devices, FLAGS.memory_gb)
  except (aot.TopologyUnavailable, config_lib.ConfigError, ValueError) as e:
    print(f"worldsim.aot: {e}", file=sys.stderr)
    return 2
  print(aot.table(report))
  print(aot.verdict(report))
  print(json.dumps(report))
  return 1 if report["fits"] is False else 0


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
