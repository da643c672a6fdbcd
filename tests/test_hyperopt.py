"""The defaults' hyperparameter search (gpff.hyperopt): grid, gradients through the solve, choice."""

import math

import numpy as np
import pytest
import torch

from gpff.descriptor import InverseDistance
from gpff.hyperopt import (FCHL19_SIGMAS, LAMBDAS, MATERN_SIGMAS, RBF_EXPONENTS,
                           RBF_SIGMA_PER_P, SIGMA_SIZE_EXPONENT, choose_hyperparameters,
                           search_grid, validation_loss)


def test_search_grid():
    grid = search_grid()
    rbf = [(s, p) for k, s, p in grid if k == "rbf"]
    assert sorted({p for _, p in rbf}) == sorted(RBF_EXPONENTS)
    assert sorted({round(s / p, 12) for s, p in rbf}) == sorted(RBF_SIGMA_PER_P)
    assert [(s, p) for k, s, p in grid if k == "matern52"] == [(s, 1.0) for s in MATERN_SIGMAS]
    assert search_grid(("rbf",), p=0.5) == [("rbf", r * 0.5, 0.5) for r in RBF_SIGMA_PER_P]
    assert search_grid(("matern52", "rbf"), p=2.0, sigmas=[3.0]) == [("matern52", 3.0, 2.0),
                                                                   ("rbf", 3.0, 2.0)]


@pytest.mark.parametrize("kernel", ["rbf", "matern52"])
def test_validation_loss_gradient_matches_finite_differences(ethanol_train, kernel):
    """d loss / d(σ, p) by autograd through the Cholesky solve equals central differences."""
    train, valid = ethanol_train.subset(np.arange(12)), ethanol_train.subset(np.arange(12, 20))
    perms = torch.arange(train.n_atoms)[None]
    s0, p0 = (1.2, 0.4) if kernel == "rbf" else (8.0, 1.0)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    loss = validation_loss(train, valid, perms, kernel, s, InverseDistance(p), 1e-6,
                           use_energies=True)
    gs, gp = torch.autograd.grad(loss, (s, p))

    def f(ds, dp):
        with torch.no_grad():
            return float(validation_loss(train, valid, perms, kernel, s0 + ds,
                                         InverseDistance(p0 + dp), 1e-6, True))

    def d4(g, h):                                   # fourth-order central difference
        return (-g(2 * h) + 8 * g(h) - 8 * g(-h) + g(-2 * h)) / (12 * h)
    assert float(gs) == pytest.approx(d4(lambda d: f(d, 0), 1e-3 * s0), rel=1e-7)
    assert float(gp) == pytest.approx(d4(lambda d: f(0, d), 1e-3 * p0), rel=1e-7)


def test_choose_hyperparameters_picks_the_grid_best_then_descends(ethanol_train):
    data = ethanol_train.subset(np.arange(40))
    perms = np.arange(data.n_atoms)[None]
    out = choose_hyperparameters(data, perms, kernels=("rbf",), use_energies=True, p=0.5,
                                 n_sub=20, n_valid=20, n_grad=15, steps=4, progress=False)
    assert [(g["kernel"], g["sigma"], g["p"]) for g in out["grid"]] == search_grid(("rbf",), p=0.5)
    start = min(out["grid"], key=lambda g: g["force_rmse"])
    assert out["kernel"] == "rbf" and out["gradient"][0]["sigma"] == pytest.approx(start["sigma"])
    assert all(g["p"] == pytest.approx(0.5) for g in out["gradient"]) and out["p"] == pytest.approx(0.5)     # p was given
    best = min(out["gradient"], key=lambda g: g["force_rmse"])
    assert out["sigma_validated"] == best["sigma"] and math.isfinite(best["force_rmse"])
    # σ validated with 15 training frames, scaled to the 40 of `data` the caller refits on
    assert out["sigma"] == pytest.approx(best["sigma"] * (40 / 15) ** -SIGMA_SIZE_EXPONENT)
    assert out["lam"] == min(out["lambda_scan"], key=lambda g: g["force_rmse"])["lam"]
    assert [g["lam"] for g in out["lambda_scan"]] == list(LAMBDAS)
    fixed = choose_hyperparameters(data, perms, kernels=("rbf",), use_energies=True, p=0.5,
                                   lam=1e-9, n_sub=20, n_valid=20, n_grad=15, steps=1,
                                   progress=False)
    assert fixed["lam"] == 1e-9 and fixed["lambda_scan"] is None


def test_auto_descriptor_competes_on_the_hold_out(ethanol_train):
    """descriptor "auto": the inverse-distance grid plus FCHL19 points; the best grid point fixes
    the descriptor of the rest of the search; FCHL19 is left out when its expansion does not fit
    the memory budget."""
    data = ethanol_train.subset(np.arange(40))
    perms = np.arange(data.n_atoms)[None]
    args = dict(kernels=("rbf",), use_energies=True, lam=1e-9, n_sub=20, n_valid=20, n_grad=15,
                steps=2, progress=False)
    out = choose_hyperparameters(data, perms, descriptor="auto", **args)
    assert [(g["kernel"], g["sigma"], g["p"]) for g in out["grid"]] == search_grid(("rbf",), descriptor="auto")
    assert {g["descriptor"] for g in out["grid"]} == {"inverse_distance", "fchl19"}
    start = min(out["grid"], key=lambda g: g["force_rmse"])
    assert out["descriptor"] == start["descriptor"]
    assert (out["p"] is None) == (start["descriptor"] == "fchl19")
    assert out["gradient"][0]["sigma"] == pytest.approx(start["sigma"])
    # the FCHL19 expansion of 40 frames (2 · 8 · 40 · 9 · 312 · 21 bytes = 38 MB) over 50 % of 10 MB
    small = choose_hyperparameters(data, perms, descriptor="auto", max_memory=0.01, **args)
    assert {g["descriptor"] for g in small["grid"]} == {"inverse_distance"}
    assert small["descriptor"] == "inverse_distance"
    forced = choose_hyperparameters(data, perms, descriptor="fchl19", **{**args, "steps": 1})
    assert forced["descriptor"] == "fchl19" and forced["p"] is None
    assert [g["sigma"] for g in forced["grid"]] == list(FCHL19_SIGMAS)
