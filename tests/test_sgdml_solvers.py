"""sGDML with the iterative solver: same model as Cholesky, memory budget, automatic choice."""

import numpy as np
import pytest
import torch

from gpff.descriptor import InverseDistance
from gpff.kernels import get_kernel
from gpff.sgdml import SGDML
from gpff.sgdml_kernel import TrainingKernel
from gpff.solvers import NystromPreconditioner, frame_columns, pcg
from gpff.symmetry import find_permutations


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


@pytest.fixture(scope="module")
def ethanol_op(ethanol_train):
    """The training kernel operator of 60 ethanol frames with energies (n = 60 · 22)."""
    train = ethanol_train.subset(np.arange(0, 1000, 17)[:60])
    R = torch.as_tensor(train.R)
    perms = torch.as_tensor(find_permutations(train.R, train.z, progress=False)).long()
    op = TrainingKernel(R, perms, get_kernel("matern52"), 10.0, InverseDistance(), 1e-10, True,
                       block=8)
    return op, op.labels(train.F, train.E - train.E.mean())


def test_block_diagonal_preconditioner_equals_explicit_inverse(ethanol_op):
    """P = K̃ + blockdiag(K − K̃) + λI, with the frames' force blocks and the energy entries."""
    op, _ = ethanol_op
    K = op.assemble(progress=False) - op.lam * torch.eye(op.n, dtype=torch.float64)
    P = NystromPreconditioner(op, frame_columns(op, torch.tensor([3, 17, 40])), True)
    Kt = P.nystrom_factor() @ P.nystrom_factor().T
    idx = P.idx
    ref_Kt = K[:, idx] @ torch.linalg.solve(K[idx][:, idx] + P.jitter * torch.eye(len(idx),
                                            dtype=torch.float64), K[idx])
    assert torch.allclose(Kt, ref_Kt, rtol=0, atol=1e-10 * float(K.abs().max()))
    Delta = torch.zeros_like(K)
    r, m = op.block, op.m
    for f in range(m):
        s = slice(f * r, (f + 1) * r)
        Delta[s, s] = (K - Kt)[s, s]
    e = torch.arange(m * r, op.n)
    Delta[e, e] = (K - Kt)[e, e]
    Pd = Kt + Delta + op.lam * torch.eye(op.n, dtype=torch.float64)
    V = torch.randn(op.n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.linalg.solve(Pd, V)
    got = P.apply(V)
    assert float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)) < 1e-6
    with pytest.raises(ValueError, match="leverage"):
        P.leverage_scores()


def test_block_diagonal_preconditioner_cuts_iterations(ethanol_op):
    """Same inducing frames (10 %), λ = 1e-10: with the diagonal blocks CG converges (≈ 530
    iterations); with Δ = λI it is not there in twice as many (it needs > 3000)."""
    op, y = ethanol_op
    idx = frame_columns(op, torch.arange(0, 60, 10))
    _, block = pcg(op, y, NystromPreconditioner(op, idx, True), tol=1e-4, max_iter=3000)
    assert block["status"] == "converged"
    _, plain = pcg(op, y, NystromPreconditioner(op, idx, False), tol=1e-4,
                   max_iter=2 * block["iterations"])
    assert plain["status"] == "max_iter", (block["iterations"], plain["iterations"])
