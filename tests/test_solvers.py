"""Iterative solver (gpff.solvers): Nyström-preconditioned CG of Chmiela et al., Sci. Adv. 2023.

The operator is a dense, sGDML-like gradient-domain kernel: frames q_m ∈ R^B (B = `block`
"Cartesian" coordinates) are mapped to descriptors x_m = tanh(A q_m) ∈ R^d with d < B, so every
frame's B columns have rank ≤ d (like the rigid-motion null space of sGDML frames), and
K[m, n] = J_mᵀ H(x_m, x_n) J_n with H the Hessian (force-force) kernel of an RBF on x. The frames
follow a correlated random walk (like MD samples) plus a few outlying frames, so K is strongly
ill-conditioned at λ = 1e-10 · mean diag K and has non-uniform leverage scores.
"""

import math
import os

import numpy as np
import pytest
import torch

from gpff.errors import TrainingError
from gpff.solvers import (KernelOperator, NystromPreconditioner, frame_columns, pcg,
                          preconditioner_bytes, ridge_leverage_scores, solve)


def eigvalsh(A):
    """Eigenvalues of a symmetric matrix, ascending (numpy's LAPACK: fast and steady here)."""
    return torch.from_numpy(np.linalg.eigvalsh(A.numpy()))


class DenseOperator:
    """Explicit K (n × n, without λ) implementing gpff.solvers.KernelOperator; counts calls."""

    def __init__(self, K: torch.Tensor, lam: float, block: int):
        self.K = K
        self.n = K.shape[0]
        self.lam = float(lam)
        self.dtype, self.device = K.dtype, K.device
        self.block = block
        self.matvecs = 0
        self.column_calls = 0

    def matvec(self, V):
        self.matvecs += 1
        return self.K @ V + self.lam * V

    def columns(self, idx):
        self.column_calls += 1
        return self.K[idx].T                                      # as the sGDML operator: a view

    def diagonal(self):
        return self.K.diagonal().clone()

    def dense(self):
        return self.K + self.lam * torch.eye(self.n, dtype=self.K.dtype)


def sgdml_like_kernel(m=80, block=9, d=6, ell=15.0, step=0.2, outliers=6, seed=0):
    """(m·block)² gradient-domain kernel J_mᵀ H(x_m, x_n) J_n, rank ≤ d per frame; see module doc.

    Returns K (n, n) and the per-frame Jacobians J (m, d, block)."""
    g = torch.Generator().manual_seed(seed)
    steps = step * torch.randn(m, block, generator=g, dtype=torch.float64)
    q = torch.cumsum(steps, 0)                                    # correlated trajectory
    q[-outliers:] += 10 * step * torch.randn(outliers, block, generator=g, dtype=torch.float64)
    A = torch.randn(d, block, generator=g, dtype=torch.float64) / math.sqrt(block)
    x = torch.tanh(q @ A.T)                                       # (m, d) descriptors
    J = (1 - x ** 2)[:, :, None] * A[None]                        # (m, d, block)
    x = x / (ell * 0.1)
    U = x[:, None] - x[None]                                      # (m, m, d)
    k = torch.exp(-0.5 * (U ** 2).sum(-1))
    H = k[..., None, None] * (torch.eye(d, dtype=torch.float64) - U[..., :, None] * U[..., None, :])
    HJ = torch.einsum("mnde,nel->mndl", H, J)
    K = torch.einsum("mdk,mndl->mknl", J, HJ).reshape(m * block, m * block)
    return 0.5 * (K + K.T), J


KERNEL, JAC = sgdml_like_kernel()


@pytest.fixture(scope="module")
def kernel():
    return KERNEL


def make_op(K, rel_lam, block=9):
    return DenseOperator(K, rel_lam * float(K.diagonal().mean()), block)


def rhs(K, seed=1, noise=1e-2, J=None):
    """Force-like right-hand side: a smooth part in the range of K plus noise Jᵀη, which, like
    real forces (no net force or torque), has no component in the per-frame null space."""
    J = JAC if J is None else J
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K.shape[0], 1, generator=g, dtype=torch.float64)
    y = K @ w
    eta = torch.randn(J.shape[0], J.shape[1], generator=g, dtype=torch.float64)
    e = torch.einsum("mdk,md->mk", J, eta).reshape(-1, 1)
    return y + noise * float(y.std() / e.std()) * e


def rel_res(op, x, y):
    return float(torch.linalg.vector_norm(y - op.matvec(x)) / torch.linalg.vector_norm(y))


def test_protocol(kernel):
    assert isinstance(make_op(kernel, 1e-10), KernelOperator)


def test_kernel_is_realistically_ill_conditioned(kernel):
    ev = eigvalsh(kernel)
    lam = 1e-10 * float(kernel.diagonal().mean())
    assert float(ev.max() / (ev.clamp_min(0).min() + lam)) > 1e9      # cond(K + λI)
    assert float(ev.min()) > -1e-10 * float(ev.max())                 # PSD to rounding


# ------------------------------------------------------------------ (a) CG = Cholesky


def test_cg_matches_cholesky(kernel):
    op = make_op(kernel, 1e-8)
    y = rhs(kernel)
    alpha, info = solve(op, y, tol=1e-8, progress=False, max_iter=2000, n_inducing=360)
    assert info["residual"] <= 1e-8
    assert rel_res(op, alpha, y) <= 1e-8
    L = torch.linalg.cholesky(op.dense())
    a_ch = torch.cholesky_solve(y, L)
    assert rel_res(op, a_ch, y) <= 1e-8
    # same coefficients to what the conditioning allows, same fitted forces K α
    d = torch.linalg.vector_norm(alpha - a_ch) / torch.linalg.vector_norm(a_ch)
    assert float(d) < 1e-3, float(d)
    fit = torch.linalg.vector_norm(kernel @ (alpha - a_ch)) / torch.linalg.vector_norm(y)
    assert float(fit) < 2e-8


def test_cg_matches_cholesky_well_conditioned(kernel):
    op = make_op(kernel, 1e-5)
    y = rhs(kernel, seed=3)
    alpha, info = solve(op, y, tol=1e-10, progress=False)
    a_ch = torch.linalg.solve(op.dense(), y)
    assert float(torch.linalg.vector_norm(alpha - a_ch) / torch.linalg.vector_norm(a_ch)) < 1e-6


def test_pcg_plain_and_shapes(kernel):
    op = make_op(kernel, 1e-3)
    y = rhs(kernel)[:, 0]
    x, info = pcg(op, y, None, tol=1e-9, max_iter=3000)
    assert x.shape == y.shape and info["status"] == "converged"
    assert rel_res(op, x[:, None], y[:, None]) <= 1e-9
    x0, info0 = pcg(op, torch.zeros_like(y), None)
    assert float(x0.abs().max()) == 0.0 and info0["iterations"] == 0


# ------------------------------------------------------------------ (b) leverage scores


def exact_scores(op):
    K = op.K
    return torch.linalg.solve(op.dense(), K).diagonal()          # diag(K (K+λI)⁻¹), K symmetric


@pytest.mark.parametrize("rel_lam", [1e-2, 1e-4])
def test_leverage_scores_track_exact(kernel, rel_lam):
    op = make_op(kernel, rel_lam)
    tau = exact_scores(op)
    g = torch.Generator().manual_seed(5)
    est = ridge_leverage_scores(op, n_sketch=op.n // 2, generator=g)
    assert est.shape == (op.n,)
    assert float(est.min()) >= -1e-12 and float(est.max()) <= 1 + 1e-12
    assert float((est - tau).max()) <= 1e-6                      # a lower estimate: K̃ ≼ K
    # per-frame (what the sampler uses): strong rank correlation with the exact scores
    ft, fe = tau.reshape(-1, 9).sum(1), est.reshape(-1, 9).sum(1)
    rank = lambda v: torch.argsort(torch.argsort(v)).double()
    rho = float(torch.corrcoef(torch.stack([rank(ft), rank(fe)]))[0, 1])
    assert rho > 0.8, rho
    top = lambda v, k: set(torch.topk(v, k).indices.tolist())
    assert len(top(ft, 20) & top(fe, 20)) >= 12
    # sum of scores = effective dimension, captured to within 30 %
    assert 0.7 * float(tau.sum()) <= float(est.sum()) <= float(tau.sum()) + 1e-6


def test_sampling_prefers_high_score_frames(kernel):
    from gpff.solvers import _frame_scores, _sample_frames

    op = make_op(kernel, 1e-2)
    fs = _frame_scores(op, exact_scores(op))
    hi = set(torch.topk(fs, 20).indices.tolist())
    lo = set(torch.topk(-fs, 20).indices.tolist())
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(fs))
    for _ in range(200):
        counts[_sample_frames(fs, 10, torch.zeros(0, dtype=torch.long), g)] += 1
    assert counts[list(hi)].sum() > 2 * counts[list(lo)].sum()
    ex = torch.tensor(sorted(hi))
    s = _sample_frames(fs, 30, ex, g)
    assert len(set(s.tolist())) == 30 and not set(s.tolist()) & hi


# ------------------------------------------------------------------ (c) preconditioner


def test_preconditioner_equals_explicit_woodbury(kernel):
    op = make_op(kernel, 1e-4)
    idx = frame_columns(op, torch.tensor([0, 7, 30, 31, 55, 60, 78]))
    P = NystromPreconditioner(op, idx)
    assert P.size == len(idx) and P.jitter >= op.lam
    C = kernel[:, idx]
    Kt = C @ torch.linalg.solve(kernel[idx][:, idx] + P.jitter * torch.eye(len(idx),
                                                                          dtype=C.dtype), C.T)
    Pd = Kt + op.lam * torch.eye(op.n, dtype=C.dtype)
    V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = torch.linalg.solve(Pd, V)
    got = P.apply(V)
    assert float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)) < 1e-8
    assert torch.allclose(P.nystrom_factor() @ P.nystrom_factor().T, Kt, rtol=0,
                          atol=1e-10 * float(Kt.abs().max()))
    assert P.apply(V[:, 0]).shape == (op.n,)
    with pytest.raises(ValueError, match="diagonal_blocks"):         # this operator has none
        NystromPreconditioner(op, idx, block_diagonal=True)


def test_preconditioner_reduces_condition_number_and_iterations(kernel):
    op = make_op(kernel, 1e-4)
    P = NystromPreconditioner(op, frame_columns(op, torch.arange(0, 80, 4)))    # 25 %
    A = op.dense()
    Pinv = P.apply(torch.eye(op.n, dtype=torch.float64))
    Pinv = 0.5 * (Pinv + Pinv.T)
    Lp = torch.linalg.cholesky(Pinv)
    ev = eigvalsh(Lp.T @ A @ Lp)                     # spectrum of P⁻¹(K+λI)
    ev0 = eigvalsh(A)
    assert float(ev.min()) > 1 - 1e-6                             # bounded below by 1 (Fig. 2)
    assert float(ev.max() / ev.min()) < 1e-3 * float(ev0.max() / ev0.min())
    y = rhs(kernel)
    _, plain = pcg(op, y, None, tol=1e-6, max_iter=5000)
    assert plain["status"] == "converged"
    _, pre = pcg(op, y, P, tol=1e-6, max_iter=5000)
    assert pre["status"] == "converged"
    assert pre["iterations"] < plain["iterations"] / 4, (pre["iterations"], plain["iterations"])


# ------------------------------------------------------------------ (d) checkpoint / resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_checkpoint_resume_after_interrupt(kernel, tmp_path, suffix):
    op = make_op(kernel, 1e-6)
    y = rhs(kernel)
    kw = dict(tol=1e-9, progress=False, n_inducing=360, max_iter=3000)
    a_ref, i_ref = solve(op, y, **kw)
    ck = tmp_path / f"cg{suffix}"
    seen = []

    def stop(it, x, rel):
        seen.append(os.path.exists(ck))
        if it == 12:
            raise Interrupt()

    with pytest.raises(Interrupt):
        solve(op, y, checkpoint=ck, checkpoint_every=0.0, callback=stop, **kw)
    assert ck.exists() and any(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.name]   # no temp file left
    a_res, i_res = solve(op, y, checkpoint=ck, resume=True, **kw)
    assert i_res["resumed"] and i_res["total_iterations"] >= 12
    assert i_res["residual"] <= 1e-9
    assert torch.equal(i_res["inducing"], i_ref["inducing"])        # same preconditioner
    assert i_res["iterations"] < i_ref["iterations"]                 # warm start
    d = torch.linalg.vector_norm(a_res - a_ref) / torch.linalg.vector_norm(a_ref)
    assert float(d) < 1e-3
    fit = torch.linalg.vector_norm(kernel @ (a_res - a_ref)) / torch.linalg.vector_norm(y)
    assert float(fit) < 2e-9


def test_resume_after_max_iter_and_atomic_write(kernel, tmp_path, monkeypatch):
    op = make_op(kernel, 1e-4)
    y = rhs(kernel)
    ck = tmp_path / "cg.npz"
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b)))
    with pytest.raises(TrainingError, match="resume"):
        solve(op, y, tol=1e-10, max_iter=4, n_inducing=180, checkpoint=ck, progress=False)
    assert replaced and all(b == str(ck) and a != b and os.path.dirname(a) == str(tmp_path)
                            for a, b in replaced)
    with np.load(ck) as z:
        assert int(z["total_iterations"]) == 4 and z["alpha"].shape == (op.n,)
    a, info = solve(op, y, tol=1e-10, max_iter=500, n_inducing=180, checkpoint=ck, resume=True,
                    progress=False)
    a_ref, _ = solve(op, y, tol=1e-10, max_iter=500, n_inducing=180, progress=False)
    assert info["resumed"] and info["residual"] <= 1e-10
    assert float(torch.linalg.vector_norm(a - a_ref) / torch.linalg.vector_norm(a_ref)) < 1e-6
    with pytest.raises(TrainingError, match="different system"):
        solve(op, 2 * y, tol=1e-10, checkpoint=ck, resume=True, progress=False)
    other = DenseOperator(2 * kernel, op.lam, 9)                  # same n, λ, y; another kernel
    with pytest.raises(TrainingError, match="different system"):
        solve(other, y, tol=1e-10, checkpoint=ck, resume=True, progress=False)


# ------------------------------------------------------------------ (e) memory budget


def test_memory_budget_caps_preconditioner(kernel):
    op = make_op(kernel, 1e-6)
    y = rhs(kernel)
    budget = preconditioner_bytes(op.n, 5 * 9)                    # room for 5 frames
    with pytest.warns(UserWarning, match="memory budget"):
        a, info = solve(op, y, tol=1e-6, n_inducing=400, max_memory_bytes=budget, progress=False)
    assert info["n_inducing"] == 45 and info["n_inducing_frames"] == 5
    assert info["preconditioner_bytes"] <= budget
    assert 8 * op.n * info["n_inducing"] <= budget
    assert info["residual"] <= 1e-6
    with pytest.raises(TrainingError, match="memory budget"):
        solve(op, y, max_memory_bytes=8 * op.n, progress=False)


def test_restart_grows_preconditioner(kernel):
    op = make_op(kernel, 1e-6)
    y = rhs(kernel)
    a, info = solve(op, y, tol=1e-9, n_inducing=9, stall_window=5, stall_factor=0.9,
                    progress=False, max_iter=3000)
    assert info["restarts"] >= 1 and info["n_inducing"] > 9
    assert rel_res(op, a, y) <= 1e-9


def test_slow_rule_predicts_time_to_tolerance():
    """_slow: the time CG needs at its recent rate against the rebuild time."""
    from gpff.solvers import _slow

    fast = [(0.1 * i, 10.0 ** -i) for i in range(30)]           # a decade per 0.1 s
    assert not _slow(fast[:5], 3, 1e-12, 1.0)                     # 8 more decades: 0.8 s < 1 s
    assert _slow(fast[:5], 3, 1e-12, 0.5)
    assert not _slow(fast, 3, 1e-12, 0.0)                         # already below tol
    flat = [(float(i), 0.5) for i in range(10)]                   # no progress: slow
    assert _slow(flat, 5, 1e-6, 1e9)


def test_slow_cg_grows_preconditioner(kernel):
    """grow_ratio 0: every rebuild 'pays for itself', so the preconditioner grows after each
    `probe` iterations up to all frames, and CG still converges; grow_ratio None: it never
    grows without a stall."""
    op = make_op(kernel, 1e-6)
    y = rhs(kernel)
    a, info = solve(op, y, tol=1e-9, n_inducing=9, grow_ratio=0.0, probe=3, stall_window=None,
                    progress=False, max_iter=3000)
    assert info["restarts"] >= 1 and info["n_inducing"] > 9
    assert rel_res(op, a, y) <= 1e-9
    with pytest.raises(TrainingError, match="after 0 restart"):
        solve(op, y, tol=1e-9, n_inducing=9, grow_ratio=None, stall_window=None, progress=False,
              max_iter=200)


# ------------------------------------------------------------------ (f) non-convergence


def test_nonconvergence_raises(kernel):
    op = make_op(kernel, 1e-10)
    y = rhs(kernel)
    with pytest.raises(TrainingError, match=r"did not converge within 3 iterations: relative "
                                            r"residual .* > tol"):
        solve(op, y, tol=1e-12, max_iter=3, n_inducing=9, progress=False)
