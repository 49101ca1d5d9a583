"""Scaling-law fits of sweep results (numpy + scipy.optimize).

  fit_power_law(C, L)          L(C) = E + A (C / C_ref)^-alpha; bootstrap_power_law adds
                               percentile intervals from resampled points
  fit_parametric(N, D, L)      L(N, D) = E + A / N^a + B / D^b, Chinchilla's way: Huber loss
                               on log residuals of the log-sum-exp form, from a grid of starts
  isoflop_profiles(C, N, L)    per compute level, the N of least loss (parabola in log N)
  compute_optimal(fit, ...)    N_opt(C), D_opt(C) from the parametric fit, for C = k N D
  fit_sweep(results)           all of the above for a sweep's result.json rows -> report

Why variable projection for L(C): for a fixed alpha, E and A are a linear least-squares
problem with a closed form, so the fit is a 1-D search over alpha. That makes it immune to
bad starts, and vectorised over bootstrap resamples (as weights: a resample is a multinomial
count per point), so hundreds of resamples cost milliseconds.
"""
from typing import Optional, Sequence

import numpy as np
from scipy import optimize

ALPHA_GRID = np.geomspace(1e-3, 4.0, 200)
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def r_squared(y, y_hat) -> float:
  y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
  total = np.sum((y - y.mean()) ** 2)
  return float(1.0 - np.sum((y - y_hat) ** 2) / total) if total > 0 else float("nan")


# ----------------------------------------------------------------------------- L(C)

def _solve_linear(sw, swz, swy, swzz, swzy, swyy):
  """Weighted least squares of y = E + A z from the weighted sums of 1, z, y, z^2, z y, y^2
  (any matching shapes), with E >= 0 (an irreducible loss cannot be negative: refitted with
  E = 0 where it would be). Returns E, A and the weighted SSE."""
  var = swzz - swz ** 2 / sw
  a = np.where(var > 0, (swzy - swz * swy / sw) / np.where(var > 0, var, 1.0), 0.0)
  e = (swy - a * swz) / sw
  a0 = swzy / np.where(swzz > 0, swzz, 1.0)          # E = 0
  a, e = np.where(e < 0, a0, a), np.maximum(e, 0.0)
  sse = swyy - 2 * e * swy - 2 * a * swzy + e * e * sw + 2 * e * a * swz + a * a * swzz
  return e, a, sse


def _solve_at(alpha, u, y, w):
  """E, A, SSE for one alpha per row of w (B, n)."""
  z = u[None, :] ** -alpha[:, None]
  return _solve_linear(w.sum(1), (w * z).sum(1), w @ y, (w * z * z).sum(1),
                       (w * z) @ y, w @ (y * y))


def _fit_weighted(u, y, w):
  """Best (E, A, alpha) per row of weights w (B, n) for y = E + A u^-alpha: a grid over
  alpha (sums as matrix products, no (B, grid, n) array), then golden-section search
  between the grid neighbours of the best node."""
  z = u[None, :] ** -ALPHA_GRID[:, None]                              # (G, n)
  sw, swy, swyy = w.sum(1)[:, None], (w @ y)[:, None], (w @ (y * y))[:, None]
  _, _, sse = _solve_linear(sw, w @ z.T, swy, w @ (z * z).T, (w * y) @ z.T, swyy)  # (B, G)
  best = np.argmin(sse, axis=1)
  lo = ALPHA_GRID[np.maximum(best - 1, 0)]
  hi = ALPHA_GRID[np.minimum(best + 1, len(ALPHA_GRID) - 1)]
  for _ in range(40):                     # the bracket shrinks to 0.618^40 ~ 4e-9 of itself
    c, d = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    left = _solve_at(c, u, y, w)[2] < _solve_at(d, u, y, w)[2]
    hi, lo = np.where(left, d, hi), np.where(left, lo, c)
  alpha = (lo + hi) / 2
  return (*_solve_at(alpha, u, y, w)[:2], alpha)


def power_law(c, fit: dict):
  """The fitted L(C) at compute c."""
  return fit["E"] + fit["A"] * (np.asarray(c, float) / fit["C_ref"]) ** -fit["alpha"]


def fit_power_law(c, y) -> dict:
  """L(C) = E + A (C / C_ref)^-alpha by least squares on L (E >= 0; A may be negative, for a
  metric that grows with compute). C_ref is the points' geometric mean compute; A_raw is A
  in raw units, L = E + A_raw C^-alpha."""
  c, y = np.asarray(c, float), np.asarray(y, float)
  c_ref = float(np.exp(np.mean(np.log(c))))
  e, a, alpha = _fit_weighted(c / c_ref, y, np.ones((1, len(c))))
  fit = {"E": float(e[0]), "A": float(a[0]), "alpha": float(alpha[0]), "C_ref": c_ref}
  fit["A_raw"] = fit["A"] * c_ref ** fit["alpha"]
  fit["r2"] = r_squared(y, power_law(c, fit))
  fit["alpha_at_grid_edge"] = bool(fit["alpha"] <= ALPHA_GRID[1] or fit["alpha"] >= ALPHA_GRID[-2])
  fit["num_points"] = len(c)
  return fit


def bootstrap_power_law(c, y, samples: int = 500, seed: int = 0, level: float = 0.95,
                        band_at: Optional[Sequence[float]] = None) -> dict:
  """fit_power_law plus percentile intervals over `samples` resamples of the points (with
  replacement; resamples with fewer than 4 distinct points, which any 3-parameter curve
  interpolates, are dropped), and the band of L(C) at the computes `band_at`."""
  c, y = np.asarray(c, float), np.asarray(y, float)
  fit = fit_power_law(c, y)
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(len(c), np.full(len(c), 1.0 / len(c)), size=samples).astype(float)
  counts = counts[(counts > 0).sum(1) >= 4]
  e, a, alpha = _fit_weighted(c / fit["C_ref"], y, counts)
  q = [50 * (1 - level), 50 * (1 + level)]
  fit["ci_level"] = level
  fit["ci"] = {name: np.percentile(v, q).tolist() for name, v in (("E", e), ("A", a),
                                                                    ("alpha", alpha))}
  fit["bootstrap_samples"] = len(counts)
  if band_at is not None:
    u = np.asarray(band_at, float) / fit["C_ref"]
    curves = e[:, None] + a[:, None] * u[None, :] ** -alpha[:, None]
    fit["band"] = {"C": list(map(float, band_at)),
                   "lower": np.percentile(curves, q[0], axis=0).tolist(),
                   "upper": np.percentile(curves, q[1], axis=0).tolist()}
  return fit


def frontier(c, y) -> np.ndarray:
  """Mask of the compute-efficient points: lower loss than every point of less compute."""
  c, y = np.asarray(c, float), np.asarray(y, float)
  mask = np.zeros(len(c), bool)
  best = np.inf
  for i in np.argsort(c, kind="stable"):
    if y[i] < best:
      mask[i], best = True, y[i]
  return mask


# ----------------------------------------------------------------------------- L(N, D)

def _lse_form(theta, log_n, log_d):
  """log L(N, D) = LSE(a' - a log N, b' - b log D, e), theta = (a', a, b', b, e)."""
  a_, a, b_, b, e = theta
  terms = np.stack([a_ - a * log_n, b_ - b * log_d, np.full_like(log_n, e)])
  top = terms.max(axis=0)
  return top + np.log(np.exp(terms - top).sum(axis=0)), terms


def _huber_objective(theta, log_n, log_d, log_l, delta):
  pred, terms = _lse_form(theta, log_n, log_d)
  r = pred - log_l
  small = np.abs(r) <= delta
  value = np.sum(np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)))
  dr = np.where(small, r, delta * np.sign(r))                  # d huber / d r
  s = np.exp(terms - pred)                                     # softmax weights of the terms
  grad = np.array([np.sum(dr * s[0]), -np.sum(dr * s[0] * log_n),
                   np.sum(dr * s[1]), -np.sum(dr * s[1] * log_d), np.sum(dr * s[2])])
  return value, grad


EXPONENT_GRID = np.geomspace(0.02, 2.0, 32)


def _starts(log_n, log_d, log_l, count: int = 6):
  """Starts for the Huber fit from a grid over the exponents (a, b): for fixed exponents,
  E, A and B are a linear least-squares problem (relative residuals), solved for all grid
  nodes at once; the `count` best nodes with E, A, B > 0 become starts. The problem has
  many poor local minima (a large E traded for a flat D term), so starts near the global
  one matter more than many starts (which is what Chinchilla's 4,500-start grid buys)."""
  a, b = (g.ravel() for g in np.meshgrid(EXPONENT_GRID, EXPONENT_GRID))
  # N and D relative to their geometric means keep the columns near 1 (well conditioned).
  n_ref, d_ref = np.exp(log_n.mean()), np.exp(log_d.mean())
  n, d, y = np.exp(log_n) / n_ref, np.exp(log_d) / d_ref, np.exp(log_l)
  x = np.stack([np.ones((len(a), len(n))), n[None, :] ** -a[:, None],
                d[None, :] ** -b[:, None]], axis=-1) / y[None, :, None]     # (G, n, 3)
  xtx = np.einsum("gni,gnj->gij", x, x) + 1e-12 * np.eye(3)
  coef = np.linalg.solve(xtx, x.sum(axis=1)[..., None])[..., 0]             # (G, 3)
  sse = np.sum((np.einsum("gni,gi->gn", x, coef) - 1.0) ** 2, axis=1)
  ok = np.all(coef > 0, axis=1)
  best = np.flatnonzero(ok)[np.argsort(sse[ok])][:count]
  starts = [[np.log(coef[g, 1]) + a[g] * np.log(n_ref), a[g],
             np.log(coef[g, 2]) + b[g] * np.log(d_ref), b[g], np.log(coef[g, 0])]
            for g in best]
  # Fallbacks in Chinchilla's style, for data no positive (E, A, B) fits.
  starts += [[5.0, 0.3, 5.0, 0.3, 0.0], [0.0, 0.1, 0.0, 0.1, -1.0]]
  return np.array(starts)


def fit_parametric(n, d, loss, delta: float = 1e-3, starts: Optional[np.ndarray] = None,
                   bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> dict:
  """L(N, D) = E + A / N^a + B / D^b, minimising the Huber loss (delta on log L) of the LSE
  form with L-BFGS-B (exponents kept in [0, 4]) from several starts (`_starts`); the best
  start wins.
  With `bootstrap` > 0, percentile intervals from that many resamples, each refitted from
  the best fit (one start)."""
  log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
  bounds = [(None, None), (0.0, 4.0), (None, None), (0.0, 4.0), (None, None)]

  def solve(x0, idx):
    return optimize.minimize(_huber_objective, x0, args=(log_n[idx], log_d[idx], log_l[idx],
                                                         delta),
                             jac=True, method="L-BFGS-B", bounds=bounds)

  everything = np.arange(len(log_n))
  starts = _starts(log_n, log_d, log_l) if starts is None else starts
  best = min((solve(x0, everything) for x0 in starts), key=lambda r: r.fun)
  a_, a, b_, b, e = best.x
  fit = {"E": float(np.exp(e)), "A": float(np.exp(a_)), "a": float(a),
         "B": float(np.exp(b_)), "b": float(b), "huber_delta": delta,
         "objective": float(best.fun), "starts": len(starts), "num_points": len(log_n)}
  fit["r2"] = r_squared(np.exp(log_l), parametric(np.exp(log_n), np.exp(log_d), fit))
  if bootstrap:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
      idx = rng.integers(0, len(log_n), len(log_n))
      if len(np.unique(idx)) >= 5:
        samples.append(solve(best.x, idx).x)
    samples = np.array(samples)
    q = [50 * (1 - level), 50 * (1 + level)]
    fit["ci_level"], fit["bootstrap_samples"] = level, len(samples)
    fit["ci"] = {"a": np.percentile(samples[:, 1], q).tolist(),
                 "b": np.percentile(samples[:, 3], q).tolist(),
                 "E": np.percentile(np.exp(samples[:, 4]), q).tolist()}
  return fit


def parametric(n, d, fit: dict):
  n, d = np.asarray(n, float), np.asarray(d, float)
  return fit["E"] + fit["A"] / n ** fit["a"] + fit["B"] / d ** fit["b"]


def compute_optimal(fit: dict, computes, flops_per_param_token: float = 6.0) -> dict:
  """Minimising L(N, D) at C = k N D (k = flops_per_param_token) gives, in closed form,
  N_opt = G (C / k)^(b / (a + b)) and D_opt = (C / k)^(a / (a + b)) / G, with
  G = (a A / (b B))^(1 / (a + b))."""
  a, b, k = fit["a"], fit["b"], flops_per_param_token
  c = np.asarray(computes, float)
  if a <= 0 or b <= 0:
    return {"flops_per_param_token": k, "valid": False}
  g = (a * fit["A"] / (b * fit["B"])) ** (1.0 / (a + b))
  n_opt, d_opt = g * (c / k) ** (b / (a + b)), (c / k) ** (a / (a + b)) / g
  return {"flops_per_param_token": k, "valid": True, "G": float(g),
          "n_exponent": b / (a + b), "d_exponent": a / (a + b),
          "C": c.tolist(), "N": n_opt.tolist(), "D": d_opt.tolist(),
          "loss": parametric(n_opt, d_opt, fit).tolist()}


# ----------------------------------------------------------------------------- IsoFLOP

def compute_levels(c, tolerance: float = 0.15) -> np.ndarray:
  """A level index per point: points within `tolerance` decades of a level's cheapest point
  share it (a sweep aims its points at a few compute levels and lands near them)."""
  log_c = np.log10(np.asarray(c, float))
  levels, start, current = np.zeros(len(log_c), int), None, -1
  for i in np.argsort(log_c, kind="stable"):
    if start is None or log_c[i] - start > tolerance:
      start, current = log_c[i], current + 1
    levels[i] = current
  return levels


def isoflop_profiles(c, n, loss, tolerance: float = 0.15) -> dict:
  """Per compute level with >= 3 sizes: a parabola of L in log N, its minimum N_opt (and
  whether it lies inside the sizes trained), then N_opt = K C^exponent across the levels
  whose minimum is inside: Chinchilla's approach 2, a check on the parametric fit."""
  c, n, loss = (np.asarray(v, float) for v in (c, n, loss))
  levels = compute_levels(c, tolerance)
  profiles = []
  for level in np.unique(levels):
    idx = np.flatnonzero(levels == level)
    profile = {"compute": float(np.exp(np.mean(np.log(c[idx])))),
               "N": n[idx].tolist(), "loss": loss[idx].tolist()}
    if len(np.unique(n[idx])) >= 3:
      p2, p1, p0 = np.polyfit(np.log(n[idx]), loss[idx], 2)
      profile["parabola"] = [float(p2), float(p1), float(p0)]
      if p2 > 0:
        log_opt = -p1 / (2 * p2)
        profile["n_opt"] = float(np.exp(log_opt))
        profile["loss_opt"] = float(p0 + p1 * log_opt + p2 * log_opt ** 2)
        profile["inside"] = bool(np.log(n[idx]).min() <= log_opt <= np.log(n[idx]).max())
    profiles.append(profile)
  inside = [p for p in profiles if p.get("inside")]
  out = {"levels": profiles, "tolerance_decades": tolerance}
  if len(inside) >= 2:
    slope, intercept = np.polyfit(np.log([p["compute"] for p in inside]),
                                  np.log([p["n_opt"] for p in inside]), 1)
    out.update(n_exponent=float(slope), n_coefficient=float(np.exp(intercept)),
               levels_used=len(inside))
  return out


# ----------------------------------------------------------------------------- a sweep

def fit_sweep(results: Sequence[dict], loss_key: str = "val_loss", bootstrap: int = 1000,
              parametric_bootstrap: int = 100, seed: int = 0) -> dict:
  """The report of a sweep's result.json rows: L(C) on the compute-efficient frontier (and
  on all points), L(N, D), IsoFLOP profiles, N_opt(C) and D_opt(C), physics vs compute."""
  rows = [r for r in results if r.get(loss_key) is not None]
  c = np.array([r["train_flops"] for r in rows], float)
  n = np.array([r["params"] for r in rows], float)
  d = np.array([r["tokens"] for r in rows], float)
  loss = np.array([r[loss_key] for r in rows], float)
  band = np.geomspace(c.min() / 2, c.max() * 4, 64)
  on_frontier = frontier(c, loss)
  report = {"num_points": len(rows), "loss": loss_key,
            "compute": "analytic training FLOPs (worldsim/scaling/flops.py, attention within "
                       "clips included) = FLOPs per step x steps",
            "points": [{"name": r.get("name", r.get("point")), "C": ci, "N": ni, "D": di,
                        "loss": li, "frontier": bool(fi)}
                       for r, ci, ni, di, li, fi in zip(rows, c, n, d, loss, on_frontier)]}
  if on_frontier.sum() >= 3:
    report["loss_vs_compute"] = bootstrap_power_law(c[on_frontier], loss[on_frontier],
                                                    bootstrap, seed, band_at=band)
  report["loss_vs_compute_all_points"] = bootstrap_power_law(c, loss, bootstrap, seed,
                                                             band_at=band)
  if len(rows) >= 6:
    report["parametric"] = fit_parametric(n, d, loss, bootstrap=parametric_bootstrap, seed=seed)
    # What a FLOP buys: the sweep's analytic FLOPs per (parameter x token); above 6 for small
    # DiTs, whose attention and timestep/modulation layers cost more than 6N per token.
    k_eff = float(np.exp(np.mean(np.log(c / (n * d)))))
    targets = np.geomspace(c.min(), c.max() * 100, 8)
    report["compute_optimal"] = {
        "C_6ND": compute_optimal(report["parametric"], targets, 6.0),
        "C_analytic": compute_optimal(report["parametric"], targets, k_eff)}
  report["isoflop"] = isoflop_profiles(c, n, loss)
  report["physics_vs_compute"] = _physics_fits(rows, bootstrap, seed)
  report["headline"] = headline(report)
  return report


R2_GOAL = 0.95


def headline(report: dict) -> dict:
  """The figures a reader wants first: L(C)'s exponent, interval and R^2 against the goal,
  L(N, D)'s exponents, and the two estimates of how N_opt grows with compute."""
  law = report.get("loss_vs_compute") or report["loss_vs_compute_all_points"]
  out = {"points": report["num_points"],
         "sizes": len({p["N"] for p in report["points"]}),
         "fit_on": "frontier" if "loss_vs_compute" in report else "all points",
         "alpha": law["alpha"], "alpha_ci": law["ci"]["alpha"], "E": law["E"],
         "r2": law["r2"], "r2_goal": R2_GOAL, "r2_goal_met": bool(law["r2"] >= R2_GOAL),
         "r2_all_points": report["loss_vs_compute_all_points"]["r2"]}
  if "parametric" in report:
    p = report["parametric"]
    out.update(a=p["a"], b=p["b"], r2_parametric=p["r2"],
               n_opt_exponent_parametric=report["compute_optimal"]["C_analytic"].get("n_exponent"))
  out["n_opt_exponent_isoflop"] = report["isoflop"].get("n_exponent")
  return out


def _physics_fits(rows, bootstrap: int, seed: int):
  """Each physics headline metric (result['physics'][name]) against compute, all points;
  None when no point has physics figures (worldsim.eval absent)."""
  names = sorted({k for r in rows for k in (r.get("physics") or {}) if k != "clips"})
  fits = {}
  for name in names:
    pairs = [(r["train_flops"], r["physics"][name]) for r in rows
             if (r.get("physics") or {}).get(name) is not None]
    if len(pairs) >= 3:
      c, m = map(np.array, zip(*pairs))
      fits[name] = bootstrap_power_law(c, m, bootstrap, seed)
  return fits or None
