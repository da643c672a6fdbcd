"""sGDML with the iterative solver: same model as Cholesky, memory budget, automatic choice."""

import numpy as np

from gpff.sgdml import SGDML


def test_cg_equals_cholesky(ethanol_train, ethanol_test):
    train = ethanol_train.subset(np.arange(0, 1000, 25))              # 40 frames
    kw = dict(sigma=10.0, lam=1e-6, use_energies=True, progress=False)
    exact = SGDML(solver="cholesky", **kw).fit(train)
    cg = SGDML(solver="cg", tol=1e-10, **kw).fit(train)
    assert exact.provenance["solver"]["solver"] == "cholesky"
    info = cg.provenance["solver"]
    assert info["solver"] == "cg" and info["residual"] <= 1e-10 and info["iterations"] > 0
    E1, F1 = exact.predict(ethanol_test.R[:20])
    E2, F2 = cg.predict(ethanol_test.R[:20])
    assert np.abs(F1 - F2).max() < 1e-6 * np.abs(F1).max()
    assert np.abs(E1 - E2).max() < 1e-6


def test_auto_choice_and_preconditioner_follow_the_memory_budget(ethanol_train):
    """40 frames: dense kernel 5.6 MB (n = 40 · 21 in the rigid-motion-free bases) + 6.8 MB
    workspace. A 20 MB budget takes Cholesky; an 11 MB budget takes CG, whose preconditioner is
    sized to what the budget leaves."""
    train = ethanol_train.subset(np.arange(0, 1000, 25))
    kw = dict(sigma=10.0, lam=1e-8, use_energies=False, perms=np.arange(9)[None], progress=False)
    assert SGDML(max_memory=0.020, **kw).fit(train).provenance["solver"]["solver"] == "cholesky"
    model = SGDML(max_memory=0.011, **kw).fit(train)
    info = model.provenance["solver"]
    assert info["solver"] == "cg" and info["residual"] <= 1e-4
    assert 0 < info["preconditioner_bytes"] <= 0.9 * 0.011e9 - 6.7e6
