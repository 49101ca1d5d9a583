"""A trained workdir as a small, self-contained release: what sampling needs and nothing else.

  python -m worldsim.export --workdir=runs/physics_tiny --out=my_model

writes
  config.json         the config the DiT trained with
  dit.npz             its EMA parameters, one array per leaf ('block_0/mlp_in/kernel', ...)
  vae.npz             the VAE's parameters (latent-space models)
  latent_stats.json   the shift and scale the DiT's latents were normalised with
  export.json         what was exported from where: the steps, the byte counts

Optimizer state, the raw (non-EMA) parameters, the data iterator and the datasets stay
behind, so a tiny model is a few MB and ships inside the package (worldsim/assets/). Arrays are
plain .npz read with allow_pickle=False: loading a release runs no code from it.
"""
import json
import pathlib
import shutil

import jax
import numpy as np
from absl import app, flags

FILES = ("config.json", "dit.npz")


def flatten(tree) -> dict:
  """{'a/b/c': array} of a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return flat


def unflatten(flat) -> dict:
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def is_export(path) -> bool:
  path = pathlib.Path(path)
  return all((path / f).exists() for f in FILES)


def load_arrays(path) -> dict:
  with np.load(path, allow_pickle=False) as arrays:
    return unflatten({k: arrays[k] for k in arrays.files})


def export(sim, out) -> pathlib.Path:
  """Writes a loaded WorldSim (worldsim.sampling) as a release in `out`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(sim.config.to_json(indent=2))
  np.savez_compressed(out / "dit.npz", **flatten(sim.params))
  info = {"source": str(sim.workdir), "dit_step": int(sim.step)}
  if sim.vae is not None:
    np.savez_compressed(out / "vae.npz", **flatten(sim.vae.variables["params"]))
    shutil.copyfile(pathlib.Path(sim.workdir) / "latent_stats.json", out / "latent_stats.json")
    info["vae_step"] = int(sim.vae.step)
  info["bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
  (out / "export.json").write_text(json.dumps(info, indent=2))
  return out


def main(argv):
  del argv
  from worldsim import sampling
  out = export(sampling.WorldSim(flags.FLAGS.workdir), flags.FLAGS.out)
  print(json.loads((out / "export.json").read_text()))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "a trained workdir (checkpoints/, vae/)")
  flags.DEFINE_string("out", None, "where the release goes")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
