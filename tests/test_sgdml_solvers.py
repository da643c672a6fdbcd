"""sGDML with the iterative solver: same model as Cholesky, memory budget, automatic choice."""

import subprocess
import sys

import numpy as np

from gpff.sgdml import SGDML

from conftest import ETHANOL_TRAIN


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


_BUDGET_PROBE = """
import resource, sys
import numpy as np, gpff
train = gpff.load_dataset(sys.argv[1]).subset(np.arange(150))
budget = float(sys.argv[2])
gpff.SGDML(sigma=10.0, use_energies=False, perms=np.arange(9)[None], progress=False,
           solver="cg", max_memory=budget).fit(train.subset(np.arange(30)))   # warm-up
base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
m = gpff.SGDML(sigma=10.0, use_energies=False, progress=False, max_memory=budget).fit(train)
print(m.provenance["solver"]["solver"], base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_auto_picks_cg_within_a_small_memory_budget():
    """150 frames: the dense kernel needs 0.13 GB; with a 0.1 GB budget auto solves by CG and the
    training stays within the budget (measured peak RSS above the warmed-up process)."""
    out = subprocess.run([sys.executable, "-c", _BUDGET_PROBE, str(ETHANOL_TRAIN), "0.1"],
                         check=True, capture_output=True, text=True).stdout.split()
    solver, base, peak = out[-3], int(out[-2]), int(out[-1])
    assert solver == "cg"
    assert peak - base <= 0.1e9, f"peak {(peak - base) / 1e9:.3f} GB over the process's base"
