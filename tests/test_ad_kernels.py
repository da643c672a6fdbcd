"""AD kernels (gpff.ad_kernels): scalar kernels, everything else by torch.func, checked against the
hand-derived fast path (gpff.sgdml_kernel) to 1e-10."""

import math

import numpy as np
import pytest
import torch

from gpff.ad_kernels import (MATERN52, RBF, ADTrainingKernel, ScalarKernel, ad_evaluate,
                             get_scalar_kernel, matern52_scalar)
from gpff.descriptor import InverseDistance, inverse_distance_jacobian
from gpff.kernels import get_kernel, matern52
from gpff.sgdml_kernel import TrainingKernel, evaluate
from gpff.symmetry import find_permutations

from conftest import finite_difference_forces

# torch warns once when forward-mode AD first loads its decompositions (torch.jit.script)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

TOL = 1e-10
# (kernel, σ, p): σ scaled to the descriptor range of each exponent
KERNELS = [(MATERN52, 10.0, 1.0), (MATERN52, 5.0, 1.5), (RBF, 3.0, 1.0), (RBF, 2.0, 1.5)]
IDS = [f"{k.name}-p{p}" for k, _, p in KERNELS]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def frames(ethanol_train):
    train = ethanol_train.subset(np.arange(0, 1000, 100))          # 10 frames
    R = torch.as_tensor(train.R)
    perms = torch.as_tensor(find_permutations(train.R, train.z, progress=False)).long()
    assert perms.shape[0] > 1                                       # symmetries are exercised
    return train, R, perms


def _pair(frames, kernel, sigma, p, use_energies):
    _, R, perms = frames
    fast = TrainingKernel(R, perms, get_kernel(kernel.name), sigma, InverseDistance(p), 1e-8, use_energies, block=5)
    ad = ADTrainingKernel(R, perms, kernel, sigma, InverseDistance(p), 1e-8, use_energies, block=5)
    return fast, ad


@pytest.mark.parametrize("use_energies", [False, True], ids=["forces", "energies"])
@pytest.mark.parametrize("kernel, sigma, p", KERNELS, ids=IDS)
def test_training_kernel_matches_fast_path(frames, kernel, sigma, p, use_energies):
    fast, ad = _pair(frames, kernel, sigma, p, use_energies)
    assert (ad.n, ad.nf, ad.m, ad.block) == (fast.n, fast.nf, fast.m, fast.block)
    K = fast.assemble(progress=False)
    Kad = ad.assemble(progress=False)
    assert torch.isfinite(Kad).all()
    assert rel_err(Kad, K) < TOL
    # rows of a frame subset (force and energy rows, the cross-covariances included)
    f = torch.tensor([7, 0, 3])
    assert rel_err(ad.force_rows(f), fast.force_rows(f)) < TOL
    if use_energies:
        assert rel_err(ad.energy_rows(f), fast.energy_rows(f)) < TOL
    # the diagonal (each frame against itself: d = 0), element by element
    diag = ad.diagonal()
    assert torch.isfinite(diag).all()
    assert torch.allclose(diag, fast.diagonal(), rtol=TOL, atol=0)
    assert torch.allclose(diag + ad.lam, Kad.diagonal(), rtol=1e-12, atol=0)
    idx = torch.tensor([5, 0, ad.block + 2, ad.n - 1, 3 * ad.block + 7])
    assert rel_err(ad.columns(idx), fast.columns(idx)) < TOL
    # kernel-vector products by early contraction: vs the fast path and vs the dense matrix
    V = torch.randn(ad.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    KV = ad.matvec(V)
    assert rel_err(KV, fast.matvec(V)) < TOL
    assert rel_err(KV, Kad @ V) < TOL


@pytest.mark.parametrize("with_beta", [False, True], ids=["forces", "energies"])
@pytest.mark.parametrize("kernel, sigma, p", KERNELS, ids=IDS)
def test_ad_evaluate_matches_evaluate(frames, ethanol_test, kernel, sigma, p, with_beta):
    _, R, perms = frames
    xm, J = inverse_distance_jacobian(R, p)
    g = torch.Generator().manual_seed(2)
    vm = torch.einsum("mdl,ml->md", J, torch.randn(R.shape[0], J.shape[-1], generator=g,
                                                   dtype=torch.float64))
    beta = torch.randn(R.shape[0], generator=g, dtype=torch.float64) if with_beta else None
    Rq = torch.as_tensor(ethanol_test.R[:5])
    Rq = torch.cat([Rq, R[:2]])                    # training geometries too: d = 0 for one term
    E, F = evaluate(Rq, xm, vm, beta, perms, get_kernel(kernel.name), sigma, InverseDistance(p))
    Ead, Fad = ad_evaluate(Rq, xm, vm, beta, perms, kernel, sigma, InverseDistance(p), batch=3)
    assert Ead.shape == E.shape and Fad.shape == F.shape
    assert rel_err(Ead, E) < TOL
    assert rel_err(Fad, F) < TOL


@pytest.mark.parametrize("t", [0.0, 1e-12, 1e-6, 0.99e-4, 1.01e-4, 1e-3, 0.1, 1.0, 4.0])
def test_matern_derivatives_near_zero_distance(t):
    """AD gradient and Hessian of the scalar Matérn 5/2 equal the closed forms k₁ u and
    −k₂ u uᵀ − k₁ I, including d = 0 and both sides of the series switch."""
    sigma = 7.0
    a = math.sqrt(5.0) / sigma
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10, generator=g, dtype=torch.float64)
    u = torch.randn(10, generator=g, dtype=torch.float64)
    u = u * (t / a) / u.norm()
    xp = x - u
    u = x - xp                                      # the difference as rounded
    k, k1, k2 = matern52(u.norm(), sigma)
    grad = torch.func.grad(matern52_scalar, argnums=0)(x, xp, sigma)
    H = torch.func.jacfwd(torch.func.jacrev(matern52_scalar, argnums=0), argnums=1)(x, xp, sigma)
    assert torch.isfinite(H).all()
    assert abs(float(matern52_scalar(x, xp, sigma)) - float(k)) < 1e-15
    if t == 0.0:
        assert float(grad.abs().max()) == 0.0
    else:
        assert rel_err(grad, k1 * u) < TOL
    H_ref = -k2 * torch.outer(u, u) - k1 * torch.eye(10, dtype=torch.float64)
    assert rel_err(H, H_ref) < TOL


def test_plain_sqrt_is_wrong_at_zero_distance():
    """Why matern52_scalar has a series branch: an ε-shifted square root gives a zero Hessian."""
    sigma = 10.0

    def naive(x, xp, sigma):
        t = math.sqrt(5.0) / sigma * torch.sqrt(((x - xp) ** 2).sum() + 1e-200)
        return (1.0 + t + t * t / 3.0) * torch.exp(-t)

    x = torch.rand(4, dtype=torch.float64)
    hess = torch.func.jacfwd(torch.func.jacrev(naive, argnums=0), argnums=1)
    assert float(hess(x, x, sigma).abs().max()) == 0.0
    assert torch.allclose(torch.func.jacfwd(torch.func.jacrev(matern52_scalar, argnums=0),
                                            argnums=1)(x, x, sigma).diagonal(),
                          torch.full((4,), 5.0 / sigma ** 2 / 3.0, dtype=torch.float64),
                          rtol=1e-15, atol=0)


def rational_quadratic(a: float) -> ScalarKernel:
    def fn(x, xp, sigma):
        return (1.0 + ((x - xp) ** 2).sum() / (2.0 * a * sigma * sigma)) ** (-a)
    return ScalarKernel(fn, f"rq{a:g}")


def _fit(op, train):
    """Dense Cholesky solve of the AD training kernel; the model's (v, β, c)."""
    K = op.assemble(progress=False)
    c = float(np.mean(train.E)) if op.use_energies else 0.0
    y = op.labels(train.F, train.E - c)
    coef = torch.cholesky_solve(y, torch.linalg.cholesky(K))[:, 0]
    alpha = coef[:op.nf].reshape(op.m, op.block)
    beta = coef[op.nf:] if op.use_energies else None
    return torch.einsum("mdl,ml->md", op.J0, alpha), beta, c


@pytest.mark.parametrize("use_energies", [False, True], ids=["forces", "energies"])
def test_user_kernel_trains_and_is_conservative(frames, ethanol_test, use_energies):
    train, R, perms = frames
    rq = rational_quadratic(2.0)
    sigma, p = 3.0, 1.0
    op = ADTrainingKernel(R, perms, rq, sigma, InverseDistance(p), 1e-12, use_energies, block=5)
    v, beta, c = _fit(op, train)
    E0, F = ad_evaluate(R, op.x0, v, beta, perms, rq, sigma, InverseDistance(p))
    assert rel_err(F, torch.as_tensor(train.F)) < 1e-3
    if use_energies:
        assert float((E0 + c - torch.as_tensor(train.E)).abs().max()) < 2e-3     # kcal/mol
    # F = −∇E on a well-conditioned fit
    op.lam = 1e-6
    v, beta, c = _fit(op, train)

    def energy(r):
        return float(ad_evaluate(torch.as_tensor(r)[None], op.x0, v, beta, perms, rq, sigma,
                                InverseDistance(p))[0])

    Rq = ethanol_test.R[0]
    fd = finite_difference_forces(energy, Rq, h=1e-3)
    F = ad_evaluate(torch.as_tensor(Rq)[None], op.x0, v, beta, perms, rq, sigma,
                    InverseDistance(p))[1][0].numpy()
    assert np.abs(fd - F).max() < 1e-6 * np.abs(fd).max()


def test_user_kernel_as_rbf_matches_fast_rbf(frames):
    """A user kernel that happens to be the RBF reproduces the hand-derived RBF operator."""
    _, R, perms = frames
    user = ScalarKernel(lambda x, xp, s: torch.exp(-((x - xp) ** 2).sum() / (2 * s * s)), "myrbf")
    ad = ADTrainingKernel(R, perms, user, 3.0, InverseDistance(), 0.0, True, block=7)
    fast = TrainingKernel(R, perms, get_kernel("rbf"), 3.0, InverseDistance(), 0.0, True, block=7)
    assert rel_err(ad.assemble(progress=False), fast.assemble(progress=False)) < TOL


def test_kernel_lookup():
    assert get_scalar_kernel("matern52") is MATERN52 and get_scalar_kernel(RBF) is RBF
    with pytest.raises(ValueError, match="unknown kernel 'foo'"):
        get_scalar_kernel("foo")
