"""Scaling-law fitters on synthetic data with known exponents (no training)."""
import numpy as np
import pytest

from worldsim.scaling import fit, plots

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): the truth the fitters recover.
E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28


def chinchilla(n, d):
  return E + A / n ** ALPHA + B / d ** BETA


def test_power_law_recovers_exponent_and_bootstrap_covers_it():
  c = np.geomspace(1e15, 1e21, 16)
  truth = {"E": 1.0, "A": 3.0, "alpha": 0.3, "C_ref": 1e18}
  covered = 0
  for repeat in range(20):
    rng = np.random.default_rng(repeat)
    loss = fit.power_law(c, truth) * np.exp(0.01 * rng.standard_normal(len(c)))
    f = fit.bootstrap_power_law(c, loss, samples=100, seed=repeat)
    assert abs(f["alpha"] - truth["alpha"]) < 0.03
    assert f["r2"] > 0.99
    lo, hi = f["ci"]["alpha"]
    covered += lo <= truth["alpha"] <= hi
  assert covered >= 16, f"95% intervals covered the truth in {covered} of 20 repeats"


def test_power_law_band_brackets_the_fit():
  c = np.geomspace(1e10, 1e13, 10)
  loss = 0.5 + 2.0 * (c / 1e11) ** -0.2 * np.exp(0.01 * np.random.default_rng(0).normal(size=10))
  f = fit.bootstrap_power_law(c, loss, samples=100, band_at=c)
  middle = fit.power_law(c, f)
  assert np.all(np.array(f["band"]["lower"]) <= middle + 1e-9)
  assert np.all(middle <= np.array(f["band"]["upper"]) + 1e-9)
  assert f["A_raw"] * c[0] ** -f["alpha"] == pytest.approx(f["A"] * (c[0] / f["C_ref"]) ** -f["alpha"])


def test_parametric_recovers_both_exponents():
  n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
  loss = chinchilla(n, d) * np.exp(0.005 * np.random.default_rng(0).standard_normal(n.size))
  f = fit.fit_parametric(n, d, loss)
  assert abs(f["a"] - ALPHA) < 0.03 and abs(f["b"] - BETA) < 0.03
  assert f["r2"] > 0.99


def test_isoflop_minimum_agrees_with_closed_form():
  """On noiseless L(N, D) at C = 6ND, each IsoFLOP parabola's minimum lands near the
  closed-form compute-optimal N (a parabola in log N is only locally exact)."""
  computes = np.array([1e19, 1e20, 1e21])
  law = {"E": E, "A": A, "a": ALPHA, "B": B, "b": BETA}
  optimal = fit.compute_optimal(law, computes, 6.0)
  rows = [(c_, n_, c_ / (6 * n_)) for c_, centre in zip(computes, optimal["N"])
          for n_ in centre * np.geomspace(0.25, 4.0, 7)]
  c, n, d = map(np.array, zip(*rows))
  iso = fit.isoflop_profiles(c, n, fit.parametric(n, d, law))
  assert len(iso["levels"]) == 3 and all(p["inside"] for p in iso["levels"])
  for profile, expected in zip(iso["levels"], optimal["N"]):
    assert profile["n_opt"] == pytest.approx(expected, rel=0.15)
  assert iso["n_exponent"] == pytest.approx(optimal["n_exponent"], abs=0.03)
  assert optimal["n_exponent"] + optimal["d_exponent"] == pytest.approx(1.0)


def test_frontier_and_levels():
  c = np.array([1.0, 1.1, 2.0, 2.1, 4.0])
  assert fit.frontier(c, [5, 4, 4.5, 3, 3.5]).tolist() == [True, True, False, True, False]
  assert fit.compute_levels(c, tolerance=0.1).tolist() == [0, 0, 1, 1, 2]


def test_fit_sweep_report_and_plots(tmp_path):
  """fit_sweep on result rows shaped like result.json, then every plot is written."""
  rng = np.random.default_rng(1)
  results = []
  for c in (1e18, 4e18, 1.6e19):
    for n in np.geomspace(2e7, 5e8, 4):
      d = c / (6 * n)
      results.append({"name": f"n{n:.0f}_c{c:.0e}", "train_flops": c, "params": n, "tokens": d,
                      "val_loss": chinchilla(n, d) * np.exp(0.003 * rng.standard_normal()),
                      "physics": {"position_error": 0.1 + 30 * c ** -0.1}})
  report = fit.fit_sweep(results, bootstrap=100, parametric_bootstrap=0)
  assert report["num_points"] == 12
  assert report["loss_vs_compute_all_points"]["alpha"] > 0
  assert set(report["compute_optimal"]) == {"C_6ND", "C_analytic"}
  assert report["compute_optimal"]["C_analytic"]["flops_per_param_token"] == pytest.approx(6.0)
  assert report["physics_vs_compute"]["position_error"]["alpha"] == pytest.approx(0.1, abs=0.03)
  paths = plots.plot_report(report, results, tmp_path)
  assert {p.name for p in paths} == {"loss_vs_compute.png", "isoflop.png",
                                     "compute_optimal.png", "physics_vs_compute.png"}
  assert all(p.stat().st_size > 10_000 for p in paths)
