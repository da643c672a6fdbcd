"""n-body GP (docs/mff.md): data reader, environments, kernels (grid quadrature vs direct sums vs
automatic differentiation), energy conservation, symmetries, learning known potentials, the
g₂/g₃ reconstruction identity, the marginal likelihood and its gradient, bad input."""

import itertools
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.neighborlist import neighbor_list

import gpff
from gpff import nbody_kernels as nk
from gpff.data import Configurations, load_configurations
from gpff.environments import FrameEnvironment, cutoff_function
from gpff.nbody import NBodyGP, n_envs_within

from conftest import ROOT

MLEARN_SI = str(ROOT / "data/mlearn/mlearn_Si_train.extxyz")
NI19 = str(ROOT / "data/ni19/ni19_300K_forces.xyz")

RC, RC3, WIDTH = 4.0, 3.2, 1.0


# --------------------------------------------------------------------------- reference potentials
def _fc(r, rc, d=WIDTH):
    x = torch.clamp((r - rc + d) / d, 0, 1)
    return 0.5 * (1 + torch.cos(math.pi * x))


def lj_energy(R, cell, pbc, numbers, rc=RC):
    """Lennard-Jones with the smooth cutoff (ε, σ per species pair), periodic images included."""
    at = Atoms(numbers=numbers, positions=R.detach().numpy(), cell=cell, pbc=pbc)
    i, j, S = neighbor_list("ijS", at, rc)
    d = R[j] - R[i] + torch.as_tensor(S, dtype=torch.float64) @ torch.as_tensor(cell, dtype=torch.float64)
    r = torch.linalg.norm(d, dim=1)
    z = torch.as_tensor(numbers)
    eps = torch.where(z[i] == z[j], 0.3, 0.2)
    sig = torch.where(z[i] == z[j], 1.9, 2.1)
    return 0.5 * (4 * eps * ((sig / r) ** 12 - (sig / r) ** 6) * _fc(r, rc)).sum()


def sw3_energy(R, cell, pbc, numbers, rc3=RC3, lam=1.5, beta=0.4):
    """Stillinger-Weber-like 3-body term in the model's form, S₃-symmetric:
    Σ_i Σ_{j<k} f_c(r_ij) f_c(r_ik) λ Σ_{c∈ijk} (cos θ_c + 1/3)² e^{-β (r_ij + r_ik + r_jk)}."""
    at = Atoms(numbers=numbers, positions=R.detach().numpy(), cell=cell, pbc=pbc)
    i, j, S = neighbor_list("ijS", at, rc3)
    d = R[j] - R[i] + torch.as_tensor(S, dtype=torch.float64) @ torch.as_tensor(cell, dtype=torch.float64)
    E = 0.0 * R.sum()
    for c in range(len(numbers)):
        idx = np.nonzero(i == c)[0]
        for p in range(len(idx)):
            for q in range(p + 1, len(idx)):
                a, b = d[idx[p]], d[idx[q]]
                e = b - a
                ra, rb, re = a.norm(), b.norm(), e.norm()
                cos = ((a * b).sum() / (ra * rb), -(a * e).sum() / (ra * re), (b * e).sum() / (rb * re))
                G = lam * sum((x + 1.0 / 3) ** 2 for x in cos) * torch.exp(-beta * (ra + rb + re))
                E = E + _fc(ra, rc3) * _fc(rb, rc3) * G
    return E


def fs_energy(R, cell, pbc, numbers, rc=RC, beta=1.0):
    """Finnis-Sinclair-like embedding energy Σ_i -√(ρ_i + 0.1) with the model's density
    ρ_i = Σ_j f_c(r_ij) exp(-β r_ij), periodic images included."""
    at = Atoms(numbers=numbers, positions=R.detach().numpy(), cell=cell, pbc=pbc)
    i, j, S = neighbor_list("ijS", at, rc)
    d = R[j] - R[i] + torch.as_tensor(S, dtype=torch.float64) @ torch.as_tensor(cell, dtype=torch.float64)
    r = torch.linalg.norm(d, dim=1)
    rho = torch.zeros(len(numbers), dtype=torch.float64).index_add(
        0, torch.as_tensor(i), _fc(r, rc) * torch.exp(-beta * r))
    return -torch.sqrt(rho + 0.1).sum()


def label(frames, energy_fn):
    E, F = [], []
    for at in frames:
        R = torch.tensor(at.positions, dtype=torch.float64, requires_grad=True)
        e = energy_fn(R, at.cell.array, at.pbc, at.numbers)
        (g,) = torch.autograd.grad(e, R)
        E.append(float(e.detach()))
        F.append(-g.numpy())
    return Configurations.from_frames(frames, E, F)


def random_clusters(n_frames, sizes, symbols, seed, box=3.6, dmin=1.8):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_frames:
        n = int(rng.integers(*sizes))
        R = rng.uniform(0, box, size=(n, 3))
        dd = np.linalg.norm(R[:, None] - R[None], axis=-1)[np.triu_indices(n, 1)]
        if dd.min() > dmin:
            out.append(Atoms(symbols=[symbols[k % len(symbols)] for k in range(n)], positions=R))
    return out


def rattled_si(seed, size=(1, 1, 1), amp=0.08):
    at = bulk("Si", "diamond", a=5.43, cubic=True).repeat(size)
    at.rattle(amp, seed=seed)
    return at


def fd_forces(model, at, h=1e-4):
    F = np.zeros((len(at), 3))
    for a in range(len(at)):
        for c in range(3):
            e = []
            for s in (-1, 1):
                b = at.copy()
                b.positions[a, c] += s * h
                e.append(model.predict(b)["energy"][0])
            F[a, c] = -(e[1] - e[0]) / (2 * h)
    return F


def fd_stress(model, at, h=1e-5):
    """ASE stress (1/V) dE/dε by central differences of a symmetric strain."""
    G = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            e = []
            for s in (-1, 1):
                eps = np.zeros((3, 3))
                eps[i, j] += s * h / 2
                eps[j, i] += s * h / 2
                b = at.copy()
                b.set_cell(at.cell.array @ (np.eye(3) + eps), scale_atoms=True)
                e.append(model.predict(b)["energy"][0])
            G[i, j] = G[j, i] = (e[1] - e[0]) / (2 * h)
    G /= at.get_volume()
    return np.array([G[0, 0], G[1, 1], G[2, 2], G[1, 2], G[0, 2], G[0, 1]])


def test_quadrature_box_matches_direct_sums_small_length_scale():
    """With a short ℓ₃ the 3-body grid is the box of nk.Grid3 (pair axes cut at r_c3 + 6ℓ): the
    3-body kernel (energy-energy and energy-force blocks by quadrature) and ḡ₃ on the grid
    equal the direct sums (1e-12 and 1e-10 relative) on real Si cells (mlearn)."""
    data = load_configurations(MLEARN_SI).subset(np.arange(0, 214, 40))
    K = {}
    for method in ("grid", "direct"):
        m = NBodyGP(order=3, cutoff=5.0, cutoff_3body=3.5, length_scale_3=0.2, sigma_3=0.1,
                    kernel_method=method, progress=False).fit(data, n_envs=8, seed=1)
        K[method] = m._unit_kernel("k3", m._train, None, m.length_scale_3)[0]
    grid = m._grid3(m.length_scale_3)
    assert grid.n01 < 0.6 * grid.n                                  # the box, not the cube
    assert float((K["grid"] - K["direct"]).abs().max()) < 1e-12 * float(K["direct"].abs().max())
    lo, hi = m._means["3"]["range"]
    r = np.linspace(lo[0], 3.5, 9)
    G = m.g3_on_grid("Si", "Si", "Si", r, r, np.linspace(lo[2], 7.0, 11))
    ell = torch.tensor(m.length_scale_3, dtype=torch.float64)
    X, Y, Zc = np.meshgrid(r, r, np.linspace(lo[2], 7.0, 11), indexing="ij")
    q = torch.as_tensor(np.stack([X.ravel(), Y.ravel(), Zc.ravel()], 1))
    c = torch.zeros(q.shape[0], dtype=torch.long)
    direct = m.sigma_3 ** 2 * sum(nk.eval_direct3(t, ell, q, c, 1) for t in m._means["3"]["terms"])
    assert np.max(np.abs(G.ravel() - direct.numpy())) < 1e-10 * float(direct.abs().max())


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lj_data():
    frames = random_clusters(26, (3, 7), ["Ar", "Kr"], seed=1)
    return label(frames, lj_energy)


@pytest.fixture(scope="module")
def model2(lj_data):
    # energies weakly weighted: on clusters the least-squares e₀ (docs/mff.md) leaves a
    # per-atom constant that no 2/3-body term can represent
    return NBodyGP(order=2, cutoff=RC, length_scale_2=0.26, sigma_2=6.0, sigma_energy=0.3,
                   sigma_force=1e-4, progress=False).fit(lj_data.subset(np.arange(20)))


@pytest.fixture(scope="module")
def si_data():
    frames = [rattled_si(s, amp=0.12) for s in range(6)]
    return label(frames, lambda R, c, p, z: lj_energy(R, c, p, z, rc=RC) + sw3_energy(R, c, p, z))


@pytest.fixture(scope="module")
def model3_si(si_data):
    return NBodyGP(order=3, cutoff=RC, cutoff_3body=RC3, length_scale_2=0.4, sigma_2=0.5,
                   length_scale_3=0.7, sigma_3=0.2, sigma_energy=5e-3, sigma_force=2e-2,
                   progress=False).fit(si_data, n_envs=24, seed=3)


@pytest.fixture(scope="module")
def model3_mix(lj_data):
    data = lj_data.subset(np.arange(10))
    return NBodyGP(order=3, cutoff=RC, cutoff_3body=RC3, length_scale_2=0.4, sigma_2=0.5,
                   length_scale_3=0.8, sigma_3=0.2, sigma_energy=5e-3, sigma_force=2e-2,
                   progress=False).fit(data, n_envs=25, seed=1)


# --------------------------------------------------------------------------- data reader
def test_load_configurations_real_files():
    si = load_configurations(MLEARN_SI)
    assert si.n_frames == 214 and si.n_atoms_total == 13233 and si.species == ["Si"]
    assert si.energy_unit == "eV" and si.energies.shape == (214,) and len(si.sha256) == 64
    assert all(f.shape == (len(a), 3) for a, f in zip(si.frames, si.forces))
    assert all(a.pbc.all() for a in si.frames)
    sub = si.subset([5, 2])
    assert sub.indices.tolist() == [5, 2] and sub.energies[0] == si.energies[5]
    counts = {t: si.config_types.count(t) for t in set(si.config_types)}
    assert counts == {"AIMD-NVT": 90, "Vacancy": 57, "Elastic": 55, "Surface": 12}
    assert sub.config_types == [si.config_types[5], si.config_types[2]]
    ni = load_configurations(NI19)
    assert ni.energies is None and ni.n_frames == 792 and ni.forces[0].shape == (19, 3)
    assert not ni.frames[0].pbc.any()


def _write(tmp_path, frames, energies=None, forces=None, name="x.extxyz"):
    out = []
    for k, at in enumerate(frames):
        at = at.copy()
        kw = {}
        if energies is not None and energies[k] is not None:
            kw["energy"] = energies[k]
        if forces is not None and forces[k] is not None:
            kw["forces"] = forces[k]
        if kw:
            at.calc = SinglePointCalculator(at, **kw)
        out.append(at)
    write(tmp_path / name, out)
    return tmp_path / name


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("nan", "NaN or inf"),
    ("nothing", "neither energies nor forces"),
    ("mixed", "energies are given for some frames but missing for frame"),
])
def test_load_configurations_errors(tmp_path, case, message):
    frames = random_clusters(3, (3, 4), ["Ar"], seed=0)
    E = [1.0, 2.0, 3.0]
    F = [np.ones((len(a), 3)) for a in frames]
    if case == "missing":
        path = tmp_path / "nope.extxyz"
    elif case == "nan":
        E[1] = float("nan")
        path = _write(tmp_path, frames, E, F)
    elif case == "nothing":
        path = _write(tmp_path, frames)
    else:
        path = _write(tmp_path, frames, [1.0, None, 3.0], F)
    with pytest.raises(gpff.DatasetError, match=message) as err:
        load_configurations(path)
    assert str(path) in str(err.value)


def test_configurations_shape_errors():
    frames = random_clusters(2, (3, 4), ["Ar"], seed=0)
    with pytest.raises(gpff.DatasetError, match="forces of frame 1 have shape"):
        Configurations.from_frames(frames, [0.0, 0.0], [np.zeros((3, 3)), np.zeros((2, 3))])
    with pytest.raises(gpff.DatasetError, match="forces contain NaN"):
        Configurations.from_frames(frames, None, [np.zeros((3, 3)), np.full((3, 3), np.nan)])


# --------------------------------------------------------------------------- environments
def test_cutoff_function_is_c1():
    r = torch.linspace(0.5, 5.0, 2001, dtype=torch.float64)
    f, df = cutoff_function(r, 4.0, 1.0)
    assert float(f[r <= 3.0].min()) == 1.0 and float(f[r >= 4.0].abs().max()) == 0.0
    fd = (f[2:] - f[:-2]) / (r[2:] - r[:-2])
    smooth = ((r[1:-1] - 3.0).abs() > 0.01) & ((r[1:-1] - 4.0).abs() > 0.01)    # f'' jumps at the ends
    assert float((fd - df[1:-1])[smooth].abs().max()) < 5e-5
    assert float((fd - df[1:-1]).abs().max()) < 1e-2                          # f' continuous
    assert float(df[r >= 4.0].abs().max()) == 0.0


def test_environment_counts_images_and_triplets():
    at = bulk("Si", "diamond", a=5.43)          # 2 atoms, cutoff > half the cell: many images
    env = FrameEnvironment(at, ["Si"], 4.0, 3.0)
    i, j, d = neighbor_list("ijd", at, 4.0)
    assert env.n_pairs == len(i)
    n3 = np.bincount(neighbor_list("i", at, 3.0), minlength=2)
    assert env.n_triplets == int((n3 * (n3 - 1) // 2).sum()) == 12
    q, *_ = env.triplet_features("cpu")
    assert torch.allclose(q[:, :2], torch.full_like(q[:, :2], 5.43 * math.sqrt(3) / 4))
    assert torch.allclose(q[:, 2], torch.full_like(q[:, 2], 5.43 / math.sqrt(2)))


# --------------------------------------------------------------------------- kernels
def test_quadrature_matches_direct_sums(model3_mix, lj_data):
    """Exact grid quadrature vs direct sums: 2-body design matrices, 3-body energy blocks,
    posterior-mean functions g₃; to 1e-10 relative."""
    m = model3_mix
    obs = m._train
    ell2 = torch.tensor(m.length_scale_2, dtype=torch.float64)
    g2 = m._grid2(m.length_scale_2)
    PE = nk.design2(obs.pairsE, m._pair_codes, g2, ell2)
    PF = nk.design2(obs.pairsF, m._pair_codes, g2, ell2)
    P = torch.cat([PE, PF])
    Kgrid = g2.weight(ell2) * P @ P.T
    top = torch.cat([nk.direct2(obs.pairsE, obs.pairsE, ell2), nk.direct2(obs.pairsE, obs.pairsF, ell2)], 1)
    bot = torch.cat([nk.direct2(obs.pairsF, obs.pairsE, ell2), nk.direct2(obs.pairsF, obs.pairsF, ell2)], 1)
    Kdir = torch.cat([top, bot])
    assert float((Kgrid - Kdir).abs().max()) < 1e-10 * float(Kdir.abs().max())
    for method in ("grid", "direct"):
        m.kernel_method = method
        K = m._unit_kernel("k3", obs, None, m.length_scale_3)[0]
        if method == "grid":
            Kg = K
    m.kernel_method = "auto"
    assert float((Kg - K).abs().max()) < 1e-10 * float(K.abs().max())
    # g₃ on the grid vs by direct sums, at training-like and random points
    rng = np.random.default_rng(0)
    q = torch.as_tensor(rng.uniform(1.8, 3.2, size=(300, 3)), dtype=torch.float64)
    for code in m._tri_codes[:3]:
        c = torch.full((300,), code, dtype=torch.long)
        mean = m._means["3"]
        ell3 = torch.tensor(m.length_scale_3, dtype=torch.float64)
        grid = nk.eval_grid3(mean["theta"], m._tri_codes, mean["grid"], ell3, q, c)
        direct = m.sigma_3 ** 2 * sum(nk.eval_direct3(t, ell3, q, c, m.n_species) for t in mean["terms"])
        assert float((grid - direct).abs().max()) < 1e-10 * max(1.0, float(direct.abs().max()))


def test_direct_prediction_equals_grid_prediction(model3_mix, lj_data):
    """predict(direct=True), the textbook sums over all training terms, equals the quadrature-grid
    prediction (energy, forces, virial); the chunked sums with their analytic gradient give the
    same values and gradients whatever the chunk size."""
    m = model3_mix
    frames = lj_data.frames[10:12]
    grid, direct = m.predict(frames), m.predict(frames, direct=True)
    assert np.allclose(direct["energy"], grid["energy"], rtol=1e-10, atol=1e-10)
    for fd, fg in zip(direct["forces"], grid["forces"]):
        assert np.abs(fd - fg).max() < 1e-9 * max(1.0, np.abs(fg).max())
    assert np.abs(direct["virial"] - grid["virial"]).max() < 1e-9 * max(1.0, np.abs(grid["virial"]).max())
    mean = m._means["3"]
    ell3 = torch.tensor(m.length_scale_3, dtype=torch.float64)
    q0 = torch.as_tensor(np.random.default_rng(1).uniform(1.8, 3.2, size=(40, 3)), dtype=torch.float64)
    c = torch.full((40,), m._tri_codes[0], dtype=torch.long)
    vals, grads = [], []
    for chunk in (1 << 22, 97):
        q = q0.clone().requires_grad_(True)
        v = sum(nk.eval_direct3(t, ell3, q, c, m.n_species, chunk=chunk) for t in mean["terms"])
        vals.append(v.detach())
        grads.append(torch.autograd.grad(v.sum(), q)[0])
    assert torch.allclose(vals[0], vals[1], rtol=1e-12, atol=1e-14)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def _brute_force_cov3(env_a, env_b, atoms_a, atoms_b, ell, rc3):
    """Cov(E_a, E_b), Cov(E_a, F_b), Cov(F_a, F_b) of the unit 3-body kernel by autograd of
    Σ_{t,t'} w w' Σ_π k(q, π q') (single species)."""

    def feats(env, R):
        g = env.tensors("cpu", positions=R)
        q = torch.stack([g["d_ij"].norm(dim=1), g["d_ik"].norm(dim=1), g["d_jk"].norm(dim=1)], 1)
        return q, _fc(q[:, 0], rc3) * _fc(q[:, 1], rc3)

    def S(Ra, Rb):
        qa, wa = feats(env_a, Ra)
        qb, wb = feats(env_b, Rb)
        tot = 0
        for _, sg in nk.PERMS3:
            d = qa[:, None] - qb[None, :, list(sg)]
            tot = tot + torch.exp(-(d * d).sum(-1) / (2 * ell * ell))
        return (wa[:, None] * tot * wb[None, :]).sum()

    Ra = torch.tensor(env_a.positions, requires_grad=True)
    Rb = torch.tensor(env_b.positions, requires_grad=True)
    H = torch.autograd.functional.hessian(lambda x: S(x[:len(Ra)], x[len(Ra):]),
                                          torch.cat([Ra, Rb]).detach())
    H = H[:len(Ra), :, len(Ra):, :]
    s = S(Ra, Rb)
    (gb,) = torch.autograd.grad(s, Rb)
    EF = -gb[atoms_b].reshape(-1)
    FF = H[atoms_a][:, :, atoms_b].reshape(3 * len(atoms_a), 3 * len(atoms_b))
    return float(s), EF, FF


def test_force_covariances_match_autograd():
    """The energy/force functionals (A, B coefficients) and the direct 3-body sums reproduce the
    covariances obtained by differentiating the energy kernel with autograd (eqs. 5.11-5.13)."""
    m = NBodyGP(order=3, cutoff=3.0, cutoff_3body=3.0, length_scale_3=0.6, progress=False)
    a = rattled_si(0, amp=0.15)
    b = rattled_si(1, amp=0.15)
    m.species = ["Si"]
    envs = [FrameEnvironment(x, ["Si"], m.cutoff, m.cutoff_3body) for x in (a, b)]
    obs = m._observations(envs, [0, 1], [(0, 1), (0, 4), (1, 2), (1, 7)])
    ell = torch.tensor(0.6, dtype=torch.float64)
    EE = nk.direct3(obs.tripE, None, ell, 1, symmetric=True)
    EF = nk.direct3(obs.tripE, obs.tripF, ell, 1)
    FF = nk.direct3(obs.tripF, None, ell, 1, symmetric=True)
    s, ef, ff = _brute_force_cov3(envs[0], envs[1], [1, 4], [2, 7], 0.6, 3.0)
    assert abs(float(EE[0, 1]) - s) < 1e-10 * abs(s)
    assert torch.allclose(EF[0, 6:], ef, rtol=0, atol=1e-10 * float(ef.abs().max()))
    assert torch.allclose(FF[:6, 6:], ff, rtol=0, atol=1e-10 * float(ff.abs().max()))
    assert torch.allclose(FF, FF.T, atol=1e-12)


def test_joint_kernel_matrix_symmetric_positive_definite(model3_si, model3_mix):
    for m in (model3_si, model3_mix):
        C = m._covariance(None)
        K = C - torch.diag(m._noise_diag(m._train, m.sigma_energy, m.sigma_force))
        assert float((K - K.T).abs().max()) < 1e-10 * float(K.abs().max())
        ev = torch.linalg.eigvalsh(K)
        assert float(ev.min()) > -1e-9 * float(ev.max())          # K ⪰ 0 (a covariance)
        assert float(torch.linalg.eigvalsh(C).min()) > 0


# --------------------------------------------------------------------------- exact GP
def test_training_mean_matches_kernel_formula(model3_si):
    """Energies and forces of the prediction path (autograd of the g₂/g₃ representation) equal
    the GP mean K α at the training observations."""
    m = model3_si
    obs = m._train
    K = m._covariance(None) - torch.diag(m._noise_diag(obs, m.sigma_energy, m.sigma_force))
    mean = (K @ m._alpha).numpy()
    frames = [Atoms(numbers=[14] * e.n_atoms, positions=e.positions, cell=e.cell, pbc=e.pbc)
              for e in obs.envs]
    p = m.predict(frames)
    e0 = np.array([m._e0[e.species].sum() for e in obs.envs])
    np.testing.assert_allclose(p["energy"], mean[:obs.n_E] + e0, rtol=0, atol=1e-9)
    F = np.array([p["forces"][c][a] for c, a in obs.force_index]).reshape(-1)
    np.testing.assert_allclose(F, mean[obs.n_E:], rtol=0, atol=1e-9)


def test_forces_and_stress_are_derivatives_periodic(model3_si):
    at = rattled_si(11, amp=0.1)
    p = model3_si.predict(at)
    np.testing.assert_allclose(p["forces"][0], fd_forces(model3_si, at), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["stress"][0], fd_stress(model3_si, at), rtol=0, atol=1e-6)
    assert np.abs(p["forces"][0].sum(0)).max() < 1e-10


def test_forces_are_derivatives_two_species_cluster(model3_mix):
    at = random_clusters(1, (5, 6), ["Ar", "Kr"], seed=7)[0]
    p = model3_mix.predict(at)
    np.testing.assert_allclose(p["forces"][0], fd_forces(model3_mix, at), rtol=0, atol=1e-6)
    assert np.isnan(p["stress"][0]).all()
    assert np.abs(p["forces"][0].sum(0)).max() < 1e-10


def test_small_cell_several_images(model3_si):
    """A 2-atom cell whose cutoff exceeds half the cell: FD-consistent forces and stress, and the
    same energy per cell and forces as a 2x2x2 supercell."""
    at = bulk("Si", "diamond", a=5.3)
    at.positions[1] += [0.05, -0.03, 0.02]
    at.set_cell(at.cell.array @ np.array([[1, 0.02, 0], [0, 1, 0.01], [0, 0, 1]]), scale_atoms=True)
    p = model3_si.predict(at)
    np.testing.assert_allclose(p["forces"][0], fd_forces(model3_si, at), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["stress"][0], fd_stress(model3_si, at), rtol=0, atol=1e-6)
    big = at.repeat((2, 2, 2))
    q = model3_si.predict(big)
    assert abs(q["energy"][0] - 8 * p["energy"][0]) < 1e-9
    np.testing.assert_allclose(q["forces"][0], np.tile(p["forces"][0], (8, 1)), atol=1e-9)
    np.testing.assert_allclose(q["stress"][0], p["stress"][0], atol=1e-10)


def test_dimer_energy_vanishes_continuously_at_cutoff(model2):
    e0 = model2.energy_offsets["Ar"] + model2.energy_offsets["Kr"]
    E, F = [], []
    for r in (RC - 0.1, RC - 0.01, RC - 0.001, RC, RC + 0.1):
        p = model2.predict(Atoms("ArKr", positions=[[0, 0, 0], [r, 0, 0]]))
        E.append(p["energy"][0] - e0)
        F.append(np.abs(p["forces"][0]).max())
    E, F = np.abs(E), np.array(F)
    assert E[0] > E[1] > E[2] and E[2] < 1e-3 * E[0]                 # f_c ~ (r_c - r)²
    assert E[3] == 0 and E[4] == 0 and F[3] == 0 and F[4] == 0
    assert F[0] > F[1] > F[2] and F[2] < 0.2 * F[1]                    # f_c' ~ (r_c - r)


def test_invariances(model3_mix, model3_si):
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    at = random_clusters(1, (6, 7), ["Ar", "Kr"], seed=5)[0]
    si = rattled_si(4)
    for m, a in ((model3_mix, at), (model3_si, si)):
        p = m.predict(a)
        b = a.copy()
        b.positions = a.positions @ Q.T + [0.3, -1.2, 2.0]
        b.set_cell(a.cell.array @ Q.T)
        perm = rng.permutation(len(a))
        c = a[perm]
        pb, pc = m.predict(b), m.predict(c)
        assert abs(pb["energy"][0] - p["energy"][0]) < 1e-10
        assert abs(pc["energy"][0] - p["energy"][0]) < 1e-10
        np.testing.assert_allclose(pb["forces"][0], p["forces"][0] @ Q.T, atol=1e-10)
        np.testing.assert_allclose(pc["forces"][0], p["forces"][0][perm], atol=1e-10)
        if a.pbc.all():
            def full(s):
                return np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
            np.testing.assert_allclose(full(pb["stress"][0]), Q @ full(p["stress"][0]) @ Q.T, atol=1e-10)


def test_g2_g3_reconstruction_identity(model3_mix):
    """E_exact (k*ᵀα by direct kernel sums) = Σ e₀ + Σ_pairs f_c g₂ + Σ_triplets f_c f_c g₃ with
    the public g2/g3, over ASE neighbour lists, to 1e-10 (periodic 2-species cell)."""
    m = model3_mix
    rng = np.random.default_rng(2)
    at = Atoms("Ar3Kr3", positions=rng.uniform(0, 4.6, (6, 3)), cell=[4.6, 4.8, 5.0], pbc=True)
    at = at[[k for k in range(6)]]
    while True:
        i, j, d = neighbor_list("ijd", at, 1.9)
        if len(i) == 0:
            break
        at.positions = rng.uniform(0, 4.6, (6, 3))
    m.kernel_method = "direct"
    try:
        E_exact = m._predict_energy_kernel([at])[0]
    finally:
        m.kernel_method = "auto"
    sym = at.get_chemical_symbols()
    E = sum(m.energy_offsets[s] for s in sym)
    i, j, d = neighbor_list("ijd", at, m.cutoff)
    fc = _fc(torch.as_tensor(d), m.cutoff).numpy()
    for a in range(len(i)):
        E += fc[a] * m.g2(sym[i[a]], sym[j[a]], d[a])
    i, j, D = neighbor_list("ijD", at, m.cutoff_3body)
    for c in range(len(at)):
        idx = np.nonzero(i == c)[0]
        for p in range(len(idx)):
            for q in range(p + 1, len(idx)):
                d1, d2 = D[idx[p]], D[idx[q]]
                r1, r2, r3 = np.linalg.norm(d1), np.linalg.norm(d2), np.linalg.norm(d2 - d1)
                w = float(_fc(torch.tensor(r1), m.cutoff_3body) * _fc(torch.tensor(r2), m.cutoff_3body))
                E += w * m.g3(sym[c], sym[j[idx[p]]], sym[j[idx[q]]], r1, r2, r3)
    assert abs(E - E_exact) < 1e-10
    assert abs(m.predict(at)["energy"][0] - E_exact) < 1e-10
    # g₃ symmetry under the joint permutation of atoms and distances
    r = (2.3, 2.9, 3.7)
    g = m.g3("Ar", "Kr", "Ar", *r)
    assert abs(g - m.g3("Ar", "Ar", "Kr", r[1], r[0], r[2])) < 1e-12
    assert abs(g - m.g3("Kr", "Ar", "Ar", r[0], r[2], r[1])) < 1e-12
    assert abs(m.g2("Ar", "Kr", 2.5) - m.g2("Kr", "Ar", 2.5)) == 0


def test_g3_on_grid_equals_pointwise(model3_mix):
    """The tensor-contraction evaluation used by the mapping equals g3 node by node, inside the
    exact range of the quadrature grid and outside it (direct sums), to 1e-12."""
    m = model3_mix
    lo, hi = m._means["3"]["range"]
    x = np.linspace(lo[0] - 0.3, 3.0, 7)          # some nodes below the exact range
    y = np.linspace(1.6, 3.0, 5)
    z = np.linspace(1.7, 5.9, 6)
    G = m.g3_on_grid("Kr", "Ar", "Kr", x, y, z)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    ref = m.g3("Kr", "Ar", "Kr", X, Y, Z)
    assert G.shape == (7, 5, 6)
    assert np.max(np.abs(G - ref)) < 1e-12 * max(1.0, np.max(np.abs(ref)))
    assert np.max(np.abs(ref)) > 1e-6


def test_species_triplet_absent_from_training_maps_to_zero():
    """A species triplet the training data never had (Kr; Kr, Kr: at most two Kr per cluster)
    has the prior mean g₃ = 0, node by node and on the mapping grid; the model maps."""
    from gpff.mapping import map_gp
    data = label(random_clusters(8, (3, 5), ["Ar", "Kr"], seed=2), lj_energy)
    m = NBodyGP(order=3, cutoff=RC, cutoff_3body=RC3, length_scale_2=0.4, sigma_2=0.5,
                length_scale_3=0.8, sigma_3=0.2, sigma_energy=5e-3, sigma_force=2e-2,
                progress=False).fit(data)
    x = np.linspace(1.8, 3.0, 4)
    assert not np.any(m.g3_on_grid("Kr", "Kr", "Kr", x, x, x))
    assert not np.any(m.g3("Kr", "Kr", "Kr", x, x, x))
    assert np.abs(m.g3_on_grid("Ar", "Kr", "Kr", x, x, x)).max() > 0
    mapped = map_gp(m, n_points=60, n_points_3body=8)
    coef, _ = mapped.triplet_tables[(1, 1, 1)]
    assert not np.any(coef)


def test_learns_lennard_jones(model2, lj_data):
    test = lj_data.subset(np.arange(20, 26))
    p = model2.predict(test)
    F, Fr = np.concatenate(p["forces"]), np.concatenate(test.forces)
    assert np.mean(np.abs(F - Fr)) < 0.01 * np.mean(np.abs(Fr))
    # the learned pair function is LJ (2 g₂ = V per bond; up to the constant absorbed by e₀)
    r = np.linspace(2.2, 2.9, 8)
    v = 4 * 0.2 * ((2.1 / r) ** 12 - (2.1 / r) ** 6)
    g = 2 * model2.g2("Ar", "Kr", r)
    assert np.std(g - v) < 1e-3 * np.std(v)


def test_learns_three_body_potential():
    """Pair (LJ) + Stillinger-Weber-like 3-body potential: the 2+3-body GP learns it, the
    2-body GP cannot."""
    fn = (lambda R, c, p, z: lj_energy(R, c, p, z, rc=RC) + sw3_energy(R, c, p, z, rc3=3.0))
    data = label(random_clusters(34, (4, 6), ["Si"], seed=4, box=3.4, dmin=1.9), fn)
    train, test = data.subset(np.arange(28)), data.subset(np.arange(28, 34))
    Fr = np.concatenate(test.forces)
    errs = {}
    for order in (2, 3):
        m = NBodyGP(order=order, cutoff=RC, cutoff_3body=3.0, length_scale_2=0.26, sigma_2=6.0,
                    length_scale_3=1.0, sigma_3=0.5, sigma_energy=0.05, sigma_force=1e-3,
                    progress=False).fit(train)
        errs[order] = np.mean(np.abs(np.concatenate(m.predict(test)["forces"]) - Fr))
    scale = np.mean(np.abs(Fr))
    assert errs[3] < 0.01 * scale, (errs, scale)
    assert errs[2] > 0.2 * scale, (errs, scale)


@pytest.fixture(scope="module")
def model_emb(si_data):
    """2+3-body GP with the embedding term on the LJ + SW-like Si cells."""
    return NBodyGP(order=3, cutoff=RC, cutoff_3body=RC3, length_scale_2=0.4, sigma_2=0.5,
                   length_scale_3=0.7, sigma_3=0.2, embedding=True, density_decay=1.0,
                   length_scale_embedding=0.05, sigma_embedding=0.3, sigma_energy=5e-3,
                   sigma_force=2e-2, progress=False).fit(si_data, n_envs=24, seed=3)


def test_embedding_mean_matches_kernel_formula(model_emb):
    """With the embedding term: energies and forces of the prediction path (autograd of the
    ḡ₂, ḡ₃, F̄ representations; grid and direct sums) equal the GP mean K α at the training
    observations; forces and stress are the derivatives of the energy."""
    m = model_emb
    assert m.hyperparameter_names[4:6] == ["length_scale_embedding", "sigma_embedding"]
    obs = m._train
    assert obs.embE.n_terms == sum(e.n_atoms for e in obs.envs) and obs.embF.n_terms > obs.n_F
    K = m._covariance(None) - torch.diag(m._noise_diag(obs, m.sigma_energy, m.sigma_force))
    mean = (K @ m._alpha).numpy()
    frames = [Atoms(numbers=[14] * e.n_atoms, positions=e.positions, cell=e.cell, pbc=e.pbc)
              for e in obs.envs]
    e0 = np.array([m._e0[e.species].sum() for e in obs.envs])
    for direct in (False, True):
        p = m.predict(frames, direct=direct)
        np.testing.assert_allclose(p["energy"], mean[:obs.n_E] + e0, rtol=0, atol=1e-9)
        F = np.array([p["forces"][c][a] for c, a in obs.force_index]).reshape(-1)
        np.testing.assert_allclose(F, mean[obs.n_E:], rtol=0, atol=1e-9)
    # the embedding part is not negligible: without it the mean differs
    Kemb = m.sigma_embedding ** 2 * m._unit_kernel("kemb", obs, None, m.length_scale_embedding)[0]
    assert np.abs((Kemb @ m._alpha).numpy()[obs.n_E:]).max() > 1e-2
    at = rattled_si(11, amp=0.1)
    p = m.predict(at)
    np.testing.assert_allclose(p["forces"][0], fd_forces(m, at), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["stress"][0], fd_stress(m, at), rtol=0, atol=1e-6)
    # the embedding function queried beyond the grid's exact range (direct sums) is the same GP
    rho = np.linspace(0.0, 3.0 * m.density_range[1], 7)
    np.testing.assert_allclose(m.embedding_function("Si", rho), _direct_embedding(m, rho),
                               rtol=0, atol=1e-9)


def _direct_embedding(m, rho):
    x = torch.as_tensor(rho, dtype=torch.float64)
    code = torch.zeros(len(rho), dtype=torch.long)
    with torch.no_grad():
        return m._embedding_torch(x, code, direct=True).numpy()


def test_embedding_log_marginal_likelihood_gradient(model_emb):
    m = model_emb
    th = torch.tensor(m.log_hyperparameters(), requires_grad=True)
    m.log_marginal_likelihood(th).backward()
    h = 1e-5
    for k in (4, 5):                                   # ℓ_ρ, σ_ρ
        e = np.zeros(len(th))
        e[k] = h
        fd = (float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() + e)))
              - float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() - e)))) / (2 * h)
        assert abs(float(th.grad[k]) - fd) < 1e-5 * max(1.0, abs(fd)), (m.hyperparameter_names[k], fd)


def test_learns_embedding_potential():
    """Pair (LJ) + Finnis-Sinclair-like embedding energy: the 2-body GP with the embedding term
    learns it, the 2-body GP alone cannot; the mapped model reproduces the GP."""
    from gpff.mapping import map_gp
    fn = (lambda R, c, p, z: lj_energy(R, c, p, z, rc=RC) + 3.0 * fs_energy(R, c, p, z))
    data = label(random_clusters(34, (4, 8), ["Ar"], seed=6, box=4.0, dmin=1.9), fn)
    train, test = data.subset(np.arange(28)), data.subset(np.arange(28, 34))
    Fr = np.concatenate(test.forces)
    errs, models = {}, {}
    for emb in (False, True):
        m = NBodyGP(order=2, cutoff=RC, length_scale_2=0.26, sigma_2=6.0, embedding=emb,
                    length_scale_embedding=0.1, sigma_embedding=1.0, sigma_energy=0.01,
                    sigma_force=1e-3, progress=False).fit(train)
        errs[emb] = np.mean(np.abs(np.concatenate(m.predict(test)["forces"]) - Fr))
        models[emb] = m
    scale = np.mean(np.abs(Fr))
    assert errs[True] < 0.01 * scale, (errs, scale)
    assert errs[False] > 0.05 * scale, (errs, scale)
    mapped = map_gp(models[True], map_error=1e-5)
    assert mapped.density_decay == 1.0 and set(mapped.embedding_tables) == {0}
    exact = models[True].predict(test)
    for k, at in enumerate(test.frames):
        r = mapped.predict(at)
        assert abs(r["energy"] - exact["energy"][k]) < 1e-6
        assert np.abs(r["forces"] - exact["forces"][k]).max() < 1e-4


def test_log_marginal_likelihood_gradient(model3_mix):
    m = model3_mix
    th = torch.tensor(m.log_hyperparameters(), requires_grad=True)
    lml = m.log_marginal_likelihood(th)
    assert abs(float(lml) - float(m.log_marginal_likelihood())) < 1e-8 * abs(float(lml))
    lml.backward()
    h = 1e-5
    for k in range(len(th)):
        e = np.zeros(len(th))
        e[k] = h
        fd = (float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() + e)))
              - float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() - e)))) / (2 * h)
        assert abs(float(th.grad[k]) - fd) < 1e-5 * max(1.0, abs(fd)), (m.hyperparameter_names[k], fd)


def test_optimize_increases_marginal_likelihood(lj_data):
    data = lj_data.subset(np.arange(8))
    m = NBodyGP(order=2, cutoff=RC, length_scale_2=1.0, sigma_2=2.0, sigma_energy=0.05,
                sigma_force=0.2, progress=False)
    before = m.fit(data, n_envs=20).log_marginal_likelihood().item()
    m.optimize(data, n_envs=20, max_iter=15, fix_noise=True)
    assert m.log_marginal_likelihood().item() > before + 1.0
    opt = m.provenance["optimization"]
    assert m.sigma_force == 0.2 and opt["evaluations"] > 1 and opt["stopped"] == "L-BFGS"
    assert opt["n_rows"] == m._train.n_rows and opt["solve_seconds"] > 0


def test_optimize_time_limit_keeps_best_point(lj_data):
    """Past its time limit the search starts no evaluation and keeps the best point seen: with
    a zero limit that is the starting point, the one evaluation made."""
    data = lj_data.subset(np.arange(8))
    m = NBodyGP(order=2, cutoff=RC, length_scale_2=1.0, sigma_2=2.0, sigma_energy=0.05,
                sigma_force=0.2, progress=False)
    m.optimize(data, n_envs=20, max_iter=15, fix_noise=True, time_limit=0.0)
    opt = m.provenance["optimization"]
    assert opt["stopped"] == "time limit" and opt["evaluations"] == 1
    assert m.length_scale_2 == pytest.approx(1.0, rel=1e-12)
    assert m.sigma_2 == pytest.approx(2.0, rel=1e-12)
    assert m._lml == pytest.approx(opt["history"][0]["log_marginal_likelihood"], rel=1e-10)


def test_n_envs_within_budget():
    """The default --n-envs rule: rows extrapolated as √(time), floored at the optimisation's
    environments and capped."""
    opt = {"solve_seconds": 10.0, "n_rows": 650, "n_envs": 200}
    assert n_envs_within(40.0, opt, 100, 2000) == (1300 - 100) // 3
    assert n_envs_within(1e6, opt, 100, 2000) == 2000
    assert n_envs_within(0.0, opt, 100, 2000) == 200
    assert n_envs_within(0.0, opt, 100, 150) == 150


def test_energy_variance(model3_si):
    near = rattled_si(11, amp=0.1)
    far = rattled_si(12, amp=0.1)
    far.set_cell(far.cell.array * 1.08, scale_atoms=True)
    p = model3_si.predict([near, far], variance=True)
    v = p["energy_variance"]
    assert np.all(v > 0) and v[1] > v[0]
    # training frames: variance at most about the energy noise
    q = model3_si.predict(model3_si._train.envs and [rattled_si(0, amp=0.12)], variance=True)
    assert q["energy_variance"][0] < 4 * (8 * model3_si.sigma_energy) ** 2


def _many_S_reference(m, env_a, R_a, env_b, R_b):
    """Σ_{i∈a, j∈b} exp(-(k₃(ρ_i,ρ_i) + k₃(ρ_j,ρ_j) - 2k₃(ρ_i,ρ_j))/2ℓ²) (eq. 5.31; order 5:
    Σ k₃(ρ_i,ρ_j)², eq. 5.30) written out in torch, differentiable in the positions (an
    independent reference for tiny frames)."""
    def data(env, R):
        g = env.tensors("cpu", positions=R)
        q = torch.stack([torch.linalg.norm(g[k], dim=1) for k in ("d_ij", "d_ik", "d_jk")], dim=1)
        w = (cutoff_function(q[:, 0], m.cutoff_3body, m.cutoff_width)[0]
             * cutoff_function(q[:, 1], m.cutoff_3body, m.cutoff_width)[0])
        s = env.species
        onehot = torch.zeros(env.n_atoms, env.n_triplets, dtype=torch.float64)
        onehot[torch.as_tensor(env.trip_i), torch.arange(env.n_triplets)] = 1.0
        return q, w, (s[env.trip_i], s[env.trip_j], s[env.trip_k]), onehot

    def k3(a, b):
        (qa, wa, sa, oa), (qb, wb, sb, ob) = a, b
        tot = 0.0
        pair = {frozenset((0, 1)): 0, frozenset((0, 2)): 1, frozenset((1, 2)): 2}
        for perm in itertools.permutations(range(3)):   # relabel the atoms (i, j, k) of b
            qp = qb[:, [pair[frozenset((perm[0], perm[1]))], pair[frozenset((perm[0], perm[2]))],
                        pair[frozenset((perm[1], perm[2]))]]]
            same = np.all([sa[n][:, None] == sb[perm[n]][None, :] for n in range(3)], axis=0)
            gauss = torch.exp(-((qa[:, None] - qp[None]) ** 2).sum(-1) / (2 * m.length_scale_3 ** 2))
            tot = tot + gauss * torch.as_tensor(same)
        return oa @ (wa[:, None] * tot * wb[None, :]) @ ob.T

    A, B = data(env_a, R_a), data(env_b, R_b)
    if m.order == 5:
        return (k3(A, B) ** 2).sum()
    na, nb = torch.diagonal(k3(A, A)), torch.diagonal(k3(B, B))
    return torch.exp(-(na[:, None] + nb[None, :] - 2 * k3(A, B)) / (2 * m.length_scale_many ** 2)).sum()


@pytest.mark.parametrize("order", [5, "many"])
def test_many_body_kernel_matches_autograd_reference(order):
    """Every block of the many-body kernels (energy, force, mixed; two species; a periodic cell
    with images and clusters) equals the autograd derivatives of eqs. 5.30/5.31 written out."""
    frames = random_clusters(2, (4, 6), ["Ar", "Kr"], seed=21)
    cell = random_clusters(1, (4, 5), ["Ar", "Kr"], seed=22, box=3.4)[0]
    cell.set_cell([4.2, 4.0, 4.4])
    cell.pbc = True
    data = label(frames + [cell], lj_energy)
    m = NBodyGP(order=order, cutoff=RC, cutoff_3body=3.0, length_scale_3=0.9, length_scale_many=1.7,
                progress=False).fit(data, n_envs=7, seed=3)
    K = m._many_kernel(m._train, None, m.length_scale_3, m.length_scale_many)
    obs = m._train
    rows = m._many_rows(obs)
    ref = torch.zeros_like(K)
    for a, env_a in enumerate(obs.envs):
        for b, env_b in enumerate(obs.envs):
            Ra = torch.tensor(env_a.positions, requires_grad=True)
            Rb = torch.tensor(env_b.positions, requires_grad=True)
            S = _many_S_reference(m, env_a, Ra, env_b, Rb)
            ga, gb = torch.autograd.grad(S, (Ra, Rb), create_graph=True)
            ref[rows["E"][a], rows["E"][b]] = S.detach()
            for atom, r in rows["F"].get(a, []):
                ref[r:r + 3, rows["E"][b]] = -ga[atom].detach()
                for beta, rb in rows["F"].get(b, []):
                    for al in range(3):
                        h = torch.autograd.grad(ga[atom, al], Rb, retain_graph=True)[0]
                        ref[r + al, rb:rb + 3] = h[beta]
            for atom, r in rows["F"].get(b, []):
                ref[rows["E"][a], r:r + 3] = -gb[atom].detach()
    np.testing.assert_allclose(K.numpy(), ref.numpy(), rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    # the derivative rows of predictions: virial against a finite-difference strain, with
    # periodic images (strain rows) and without (Σ R ⊗ F)
    p = m.predict(cell)
    np.testing.assert_allclose(p["stress"][0], fd_stress(m, cell), rtol=0, atol=1e-7)
    cluster, h = frames[0], 1e-5
    W = np.zeros(6)
    for v, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        e = []
        for sgn in (-1, 1):
            eps = np.eye(3)
            eps[i, j] += sgn * h / 2
            eps[j, i] += sgn * h / 2
            b = cluster.copy()
            b.positions = cluster.positions @ eps
            e.append(m.predict(b)["energy"][0])
        W[v] = -(e[1] - e[0]) / (2 * h)
    np.testing.assert_allclose(m.predict(cluster)["virial"][0], W, rtol=0, atol=1e-7)


@pytest.mark.parametrize("order", [5, "many"])
def test_many_body_order(order):
    data = label(random_clusters(5, (3, 5), ["Ar"], seed=9), lj_energy)
    m = NBodyGP(order=order, cutoff=RC, cutoff_3body=3.2, length_scale_3=0.8, length_scale_many=2.0,
                sigma_many=1.0, sigma_energy=1e-2, sigma_force=5e-2, progress=False).fit(data, n_envs=6)
    at = random_clusters(1, (4, 5), ["Ar"], seed=10)[0]
    p = m.predict(at, variance=True)
    np.testing.assert_allclose(p["forces"][0], fd_forces(m, at, h=1e-5), rtol=0, atol=1e-6)
    assert p["energy_variance"][0] > 0
    th = torch.tensor(m.log_hyperparameters(), requires_grad=True)
    m.log_marginal_likelihood(th).backward()
    for k in (0, 1) if order == "many" else (0,):   # ℓ₃ and ℓ
        h = 1e-5
        e = np.zeros(len(th))
        e[k] = h
        fd = (float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() + e)))
              - float(m.log_marginal_likelihood(torch.tensor(m.log_hyperparameters() - e)))) / (2 * h)
        assert abs(float(th.grad[k]) - fd) < 1e-5 * max(1.0, abs(fd))
    with pytest.raises(ValueError, match="no pair function"):
        m.g2("Ar", "Ar", 2.0)


def test_select_order_reports_each_order():
    data = label(random_clusters(4, (3, 5), ["Ar"], seed=12), lj_energy)
    m = NBodyGP(order=2, cutoff=RC, cutoff_3body=3.2, progress=False)
    out = m.select_order(data, orders=(2, 3, 5, "many"), n_envs=4, max_iter=3)
    assert set(out) == {2, 3, 5, "many"} and all(np.isfinite(v) for v in out.values())


def test_forces_only_training_and_summary():
    frames = random_clusters(4, (4, 6), ["Ar"], seed=13)
    full = label(frames, lj_energy)
    data = Configurations.from_frames(full.frames, None, full.forces, path="forces-only")
    m = NBodyGP(order=2, cutoff=RC, progress=False).fit(data, n_envs=10, seed=1)
    assert m.energy_offsets == {"Ar": 0.0} and m._train.n_E == 0 and len(m.force_envs) == 10
    s = m.summary()
    assert s["model"] == "mff" and s["species"] == ["Ar"] and s["provenance"]["n_force_envs"] == 10
    assert s["hyperparameters"]["log_marginal_likelihood"] == m.log_marginal_likelihood().item()


def _typed(data, types):
    return Configurations.from_frames(data.frames, data.energies, data.forces, config_types=types)


def test_config_type_sigma_sets_the_noise_of_its_frames(lj_data):
    """Frames of a config type get that type's σ_E / σ_F (GAP's config_type_sigma): the noise
    diagonal carries them, the marginal likelihood does not depend on the global σ there, and a
    tight σ_E makes the GP reproduce those training energies."""
    data = lj_data.subset(np.arange(8))
    types = ["md"] * 6 + ["ref", None]
    kw = dict(order=2, cutoff=RC, length_scale_2=0.26, sigma_2=6.0, sigma_energy=0.3,
              sigma_force=1e-2, progress=False)
    plain = NBodyGP(**kw).fit(_typed(data, types), n_envs=12)
    typed = NBodyGP(**kw, config_type_sigma={"ref": 1e-6, "md": (None, 0.05)}).fit(
        _typed(data, types), n_envs=12)
    obs = typed._train
    D = typed._noise_diag(obs, 0.3, 1e-2).numpy()
    n_atoms = np.array([len(a) for a in data.frames])
    assert np.allclose(D[:8], np.where(np.arange(8) == 6, n_atoms * 1e-6, n_atoms * 0.3) ** 2,
                       rtol=1e-14, atol=0)
    fsig = np.where(obs.force_index[:, 0] < 6, 0.05, 1e-2).repeat(3)
    assert np.allclose(D[8:], fsig ** 2) and np.any(obs.force_index[:, 0] >= 6)
    # the typed rows do not move with the global σ (no gradient through them)
    s = torch.tensor([0.3, 1e-2], dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(typed._noise_diag(obs, s[0], s[1]).sum(), s)[0]
    rows_e = [k for k in range(8) if types[k] not in ("ref",)]
    assert np.isclose(g[0].item(), 2 * 0.3 * (n_atoms[rows_e] ** 2).sum())
    assert np.isclose(g[1].item(), 2 * 1e-2 * 3 * (obs.force_index[:, 0] >= 6).sum())
    # a tight σ_E fits that frame's energy; the global σ_E does not
    fit = lambda m: m.predict(data.frames[6])["energy"] - data.energies[6]
    assert abs(fit(typed)) < 1e-4 < abs(fit(plain))
    assert typed.summary()["config_type_sigma"] == {"ref": [1e-6, None], "md": [None, 0.05]}
    assert typed.copy().config_type_sigma == typed.config_type_sigma


def test_config_type_sigma_errors(lj_data):
    data = lj_data.subset(np.arange(4))
    with pytest.raises(gpff.DatasetError, match=r"config type\(s\) \['Elastc'\] that no frame has"):
        NBodyGP(order=2, cutoff=RC, config_type_sigma={"Elastc": 1e-3}, progress=False).fit(
            _typed(data, ["Elastic"] * 4))
    with pytest.raises(gpff.DatasetError, match="the frames' info\\['config_type'\\]: none"):
        NBodyGP(order=2, cutoff=RC, config_type_sigma={"Elastic": 1e-3}, progress=False).optimize(
            data, max_iter=1)
    for bad in (0.0, -1.0, float("nan"), "x", (None, None), (1e-3, 2e-3, 1.0)):
        with pytest.raises(ValueError, match="config_type_sigma"):
            NBodyGP(order=2, config_type_sigma={"Elastic": bad})
    with pytest.raises(gpff.DatasetError, match="3 config types for 4 frames"):
        _typed(data, ["a", "b", "c"])


def test_bad_input(model2, lj_data):
    at = Atoms("ArXe", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(gpff.SpeciesError, match="Xe"):
        model2.predict(at)
    bad = Atoms("ArKr", positions=[[0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(gpff.DatasetError, match="NaN"):
        model2.predict(bad)
    with pytest.raises(gpff.SpeciesError, match="Ne"):
        model2.g2("Ar", "Ne", 2.0)
    with pytest.raises(ValueError, match="no triplet function"):
        model2.g3("Ar", "Ar", "Ar", 2, 2, 2)
    frames = [a.copy() for a in lj_data.frames[:2]]
    frames[1].positions[0, 0] = np.inf
    with pytest.raises(gpff.DatasetError, match="frame 1"):
        NBodyGP(order=2, progress=False).fit(Configurations(frames, lj_data.energies[:2], lj_data.forces[:2]))
    with pytest.raises(gpff.TrainingError, match="not trained"):
        NBodyGP(order=2).predict(at)
    with pytest.raises(ValueError, match="order"):
        NBodyGP(order=4)
    with pytest.raises(ValueError, match="embedding term is for orders 2 and 3"):
        NBodyGP(order="many", embedding=True)
    with pytest.raises(ValueError, match="density_decay must be non-negative"):
        NBodyGP(order=3, embedding=True, density_decay=-1.0)
    with pytest.raises(ValueError, match="no embedding term"):
        model2.embedding_function("Ar", [0.5])
