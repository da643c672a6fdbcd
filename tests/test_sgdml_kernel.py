"""The sGDML training kernel operator and the model variants (RBF, descriptor exponent, energies)."""

import numpy as np
import pytest
import torch

import gpff
from gpff.descriptor import InverseDistance
from gpff.kernels import get_kernel
from gpff.sgdml import SGDML
from gpff.sgdml_kernel import TrainingKernel
from gpff.symmetry import find_permutations

from conftest import finite_difference_forces

# (kernel, p, use_energies, σ): σ scaled to the descriptor range of each exponent
VARIANTS = [("matern52", 1.0, False, 10.0), ("matern52", 2.0, True, 5.0), ("rbf", 1.0, True, 3.0),
            ("rbf", 1.5, False, 2.0)]


@pytest.fixture(scope="module")
def small_train(ethanol_train):
    return ethanol_train.subset(np.arange(0, 1000, 50))            # 20 frames


@pytest.fixture(scope="module")
def operators(small_train):
    R = torch.as_tensor(small_train.R)
    perms = torch.as_tensor(find_permutations(small_train.R, small_train.z, progress=False)).long()
    return {v: TrainingKernel(R, perms, get_kernel(v[0]), v[3], InverseDistance(v[1]), 1e-8,
                              use_energies=v[2],
                              block=3) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_matches_dense_kernel(operators, variant):
    op = operators[variant]
    K = op.assemble(progress=False)
    assert K.shape == (op.n, op.n)
    assert torch.allclose(K, K.T, rtol=0, atol=1e-10 * K.abs().max())
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(op.matvec(V), K @ V, rtol=0, atol=1e-9 * (K @ V).abs().max())
    idx = torch.tensor([5, 0, op.block + 2, op.n - 1, 3 * op.block + 7])
    Kc = K[:, idx].clone()
    Kc[idx, torch.arange(len(idx))] -= op.lam
    assert torch.allclose(op.columns(idx), Kc, rtol=0, atol=1e-12 * K.abs().max())
    assert torch.allclose(op.diagonal() + op.lam, K.diagonal(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("use_energies", [False, True])
def test_matvec_kernel_value_cache(small_train, use_energies):
    """With cache_bytes, the matvec keeps the kernel values of its first call (two arrays, three
    with energies, counted in workspace_bytes) and later calls reuse them: same products as
    without the cache and as the dense K."""
    R = torch.as_tensor(small_train.R)
    perms = torch.as_tensor(find_permutations(small_train.R, small_train.z, progress=False)).long()
    args = (R, perms, get_kernel("rbf"), 3.0, InverseDistance(1.0), 1e-8, use_energies, 3)
    plain, cached = TrainingKernel(*args), TrainingKernel(*args, cache_bytes=10 ** 9)
    m, s = len(R), len(perms)
    assert cached.workspace_bytes() - plain.workspace_bytes() == 8 * (2 + use_energies) * m * m * s
    assert TrainingKernel(*args, cache_bytes=8 * 2 * m * m * s - 1)._cache is None
    K = plain.assemble(progress=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        V = torch.randn(plain.n, 1, dtype=torch.float64, generator=g)
        assert torch.allclose(cached.matvec(V), plain.matvec(V), rtol=0,
                              atol=1e-13 * (K @ V).abs().max())
        assert torch.allclose(cached.matvec(V), K @ V, rtol=0, atol=1e-9 * (K @ V).abs().max())
    assert len(cached._cache) == 1


@pytest.mark.parametrize("kernel, p, use_energies, sigma", VARIANTS)
def test_variant_reproduces_training_data_and_is_conservative(small_train, ethanol_test, kernel, p,
                                                             use_energies, sigma, tmp_path):
    model = SGDML(sigma=sigma, kernel=kernel, p=p, use_energies=use_energies, lam=1e-12,
                  progress=False).fit(small_train)
    E, F = model.predict(small_train.R)
    assert np.abs(F - small_train.F).max() < 1e-3 * np.abs(small_train.F).max()
    if use_energies:
        assert np.abs(E - small_train.E).max() < 2e-3                       # kcal/mol
        assert model.alpha_E is not None and model.alpha_E.shape == (20,)
    # F = -∇E, checked on a well-conditioned fit (small coefficients, no round-off in E)
    smooth = SGDML(sigma=sigma, kernel=kernel, p=p, use_energies=use_energies, lam=1e-6,
                   perms=model.perms, progress=False).fit(small_train)
    R = ethanol_test.R[0]
    fd = finite_difference_forces(lambda r: smooth.predict(r)[0], R, h=1e-3)
    assert np.abs(fd - smooth.predict(R)[1]).max() < 1e-6 * np.abs(fd).max()
    model.save(tmp_path / "m.gpff")
    loaded = gpff.load(tmp_path / "m.gpff")
    assert (loaded.kernel, loaded.p) == (kernel, p)
    np.testing.assert_array_equal(loaded.predict(ethanol_test.R[:3])[1], model.predict(ethanol_test.R[:3])[1])


def test_energies_improve_energy_error(ethanol_train, ethanol_test):
    train = ethanol_train.subset(np.arange(0, 1000, 10))           # 100 frames
    plain = SGDML(sigma=10.0, use_energies=False, progress=False).fit(train)
    joint = SGDML(sigma=10.0, use_energies=True, progress=False).fit(train)
    e_plain = np.mean(np.abs(plain.predict(ethanol_test.R[:300])[0] - ethanol_test.E[:300]))
    e_joint = np.mean(np.abs(joint.predict(ethanol_test.R[:300])[0] - ethanol_test.E[:300]))
    assert e_joint < e_plain


def test_missing_energies_with_use_energies(small_train):
    no_e = gpff.Dataset(small_train.z, small_train.R, None, small_train.F, path="noE.npz")
    with pytest.raises(gpff.DatasetError, match="noE.npz: use_energies needs energies"):
        SGDML(use_energies=True, progress=False).fit(no_e)


def test_cholesky_over_budget_is_refused(small_train):
    with pytest.raises(gpff.TrainingError, match="over the .* GB budget: use --solver cg"):
        SGDML(solver="cholesky", max_memory=0.001, progress=False).fit(small_train)


def test_user_kernel_trains_by_ad_and_cannot_be_exported(small_train, ethanol_test, tmp_path):
    from gpff.ad_kernels import MATERN52, ScalarKernel

    def rational_quadratic(x, xp, sigma):              # (1 + d²/(2 a σ²))^-a, a = 2
        return (1.0 + torch.sum((x - xp) ** 2) / (4.0 * sigma ** 2)) ** -2.0

    user = ScalarKernel(rational_quadratic, "rational_quadratic")
    model = SGDML(sigma=3.0, kernel=user, use_energies=False, lam=1e-6, progress=False).fit(small_train)
    R = ethanol_test.R[1]
    fd = finite_difference_forces(lambda r: model.predict(r)[0], R, h=1e-3)
    assert np.abs(fd - model.predict(R)[1]).max() < 1e-6 * np.abs(fd).max()
    with pytest.raises(gpff.GpffError, match="kernel 'rational_quadratic' is a Python function"):
        model.save(tmp_path / "user.gpff")
    assert not (tmp_path / "user.gpff").exists()
    builtin = SGDML(sigma=10.0, kernel=MATERN52, use_energies=False, progress=False).fit(small_train)
    builtin.save(tmp_path / "m.gpff")                  # a built-in ScalarKernel takes the fast path
    assert gpff.load(tmp_path / "m.gpff").kernel == "matern52"
