"""PNG plots of a sweep's fits (matplotlib, Agg: no display needed).

  loss_vs_compute.png   every point, the compute-efficient frontier, L(C) and its band
  isoflop.png           loss against N per compute level, the parabolas and their minima
  compute_optimal.png   N_opt(C) and D_opt(C) from L(N, D), and the IsoFLOP minima
  physics_vs_compute.png  each physics metric against compute (when worldsim.eval gave any)
"""
import pathlib

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend)
import numpy as np  # noqa: E402

from worldsim.scaling import fit as fit_lib  # noqa: E402


def _save(fig, path, ax=None, legend_size=None):
  """Every plot ends the same way: its legend, a tight layout, a PNG, the figure freed."""
  if ax is not None:
    ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _points(report):
  p = report["points"]
  return (np.array([q["C"] for q in p]), np.array([q["N"] for q in p]),
          np.array([q["loss"] for q in p]), np.array([q["frontier"] for q in p]))


def _law_label(f, name="L"):
  ci = f.get("ci", {}).get("alpha")
  alpha = f"{f['alpha']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
  return f"{name} = {f['E']:.3g} + {f['A_raw']:.3g} C^-{alpha}  (R² {f['r2']:.3f})"


def plot_loss_vs_compute(report, path):
  c, n, loss, front = _points(report)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sc = ax.scatter(c, loss, c=np.log10(n), cmap="viridis", s=28, label="points")
  ax.scatter(c[front], loss[front], facecolors="none", edgecolors="red", s=90,
             label="compute-efficient frontier")
  fig.colorbar(sc, ax=ax, label="log10 parameters")
  for key, style in (("loss_vs_compute", "-"), ("loss_vs_compute_all_points", ":")):
    f = report.get(key)
    if not f:
      continue
    grid = np.array(f["band"]["C"])
    ax.plot(grid, fit_lib.power_law(grid, f), "k" + style,
            label=("frontier fit: " if key == "loss_vs_compute" else "all-points fit: ")
            + _law_label(f))
    if key == "loss_vs_compute":
      ax.fill_between(grid, f["band"]["lower"], f["band"]["upper"], color="k", alpha=0.12,
                      label=f"{100 * f['ci_level']:.0f}% bootstrap band")
  ax.set(xscale="log", xlabel="training FLOPs (analytic)", ylabel=f"validation {report['loss']}",
         title="loss vs compute")
  # The band may widen far beyond the data where few points pin the exponent: keep the
  # points in view.
  span = loss.max() - loss.min()
  ax.set_ylim(loss.min() - 0.5 * span, loss.max() + 0.5 * span)
  _save(fig, path, ax, legend_size=6)


def plot_isoflop(report, path):
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  levels = report["isoflop"]["levels"]
  colors = plt.cm.plasma(np.linspace(0.0, 0.85, max(len(levels), 1)))
  for profile, color in zip(levels, colors):
    n, loss = np.array(profile["N"]), np.array(profile["loss"])
    ax.plot(n, loss, "o", color=color, label=f"C ≈ {profile['compute']:.2g}")
    if "parabola" in profile:
      grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
      ax.plot(grid, np.polyval(profile["parabola"], np.log(grid)), "-", color=color, lw=1)
    if "n_opt" in profile:
      ax.plot(profile["n_opt"], profile["loss_opt"], "*", color=color, ms=12,
              mec="k" if profile.get("inside") else color)
  ax.set(xscale="log", xlabel="parameters N", ylabel=f"validation {report['loss']}",
         title="IsoFLOP profiles (star: parabola minimum)")
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # crowded on < 1 decade
  _save(fig, path, ax, legend_size=7)


def plot_compute_optimal(report, path):
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for key, style in (("C_analytic", "-"), ("C_6ND", "--")):
    opt = report.get("compute_optimal", {}).get(key)
    if not opt or not opt.get("valid"):
      continue
    k = opt["flops_per_param_token"]
    ax.plot(opt["C"], opt["N"], "b" + style,
            label=f"N_opt ∝ C^{opt['n_exponent']:.2f} (C = {k:.3g} N D)")
    ax.plot(opt["C"], opt["D"], "g" + style,
            label=f"D_opt ∝ C^{opt['d_exponent']:.2f} (C = {k:.3g} N D)")
  iso = [p for p in report["isoflop"]["levels"] if "n_opt" in p]
  if iso:
    ax.plot([p["compute"] for p in iso], [p["n_opt"] for p in iso], "b*", ms=10,
            label="IsoFLOP N_opt")
  c, n, _, _ = _points(report)
  ax.plot(c, n, "k.", ms=4, label="points trained (N)")
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="parameters / tokens",
         title="compute-optimal allocation from L(N, D)")
  _save(fig, path, ax, legend_size=6)


# The physics figures plotted (when present): one per kind of error.
PHYSICS_PLOTTED = ("position_error_px", "event_f1", "physics_iq_score", "ssim")


def plot_physics(report, results, path):
  fits = report.get("physics_vs_compute") or {}
  shown = [k for k in PHYSICS_PLOTTED if k in fits] or sorted(fits)[:4]
  fits = {k: fits[k] for k in shown}
  fig, axes = plt.subplots(1, len(fits), figsize=(4.2 * len(fits), 3.6), squeeze=False)
  for ax, (name, f) in zip(axes[0], sorted(fits.items())):
    pairs = [(r["train_flops"], r["physics"][name]) for r in results
             if (r.get("physics") or {}).get(name) is not None]
    c, m = map(np.array, zip(*pairs))
    grid = np.geomspace(c.min() / 2, c.max() * 4, 64)
    ax.plot(c, m, "o")
    ax.plot(grid, fit_lib.power_law(grid, f), "k-")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel=name,
           title=f"α {f['alpha']:.3f}, R² {f['r2']:.3f}")
  _save(fig, path)


def plot_report(report, results, out_dir) -> list:
  """Writes every plot the report has data for; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  paths = [out_dir / "loss_vs_compute.png", out_dir / "isoflop.png"]
  plot_loss_vs_compute(report, paths[0])
  plot_isoflop(report, paths[1])
  if "compute_optimal" in report:
    paths.append(out_dir / "compute_optimal.png")
    plot_compute_optimal(report, paths[-1])
  if report.get("physics_vs_compute"):
    paths.append(out_dir / "physics_vs_compute.png")
    plot_physics(report, results, paths[-1])
  return paths
