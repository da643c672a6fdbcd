"""Tests of the C++ inference core through gpff._core, and of the ASE calculator.

Synthetic but valid sGDML `.gpff` files are written here with safetensors (docs/model_file.md);
the C++ forces are checked against finite differences of the C++ energy, the virial against
sum_i r_i (x) F_i, invariances, and every kind of broken file against ModelFileError.
The exact Python model (gpff.sgdml) is compared with the core elsewhere (parity tests).
"""

import json
import os
import struct
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from gpff import _core

from conftest import (check_load_error, finite_difference_forces, load_fuzzed, raw_safetensors,
                      split_file)
from gpff.errors import ModelFileError, SpeciesError

SPECIES = ["C", "C", "H", "H", "O"]
Z = [6, 6, 1, 1, 8]
PERMS = [[0, 1, 2, 3, 4], [1, 0, 3, 2, 4]]    # identity, swap C0<->C1 and H2<->H3


def geometry(rng, n=5):
    """Random molecule-like geometry (n, 3) in Å with all distances >= 0.9 Å."""
    while True:
        r = rng.normal(scale=1.0, size=(n, 3))
        d = np.linalg.norm(r[:, None] - r[None], axis=-1)
        if np.all(d[np.triu_indices(n, 1)] > 0.9):
            return r


def inv_dist(r):
    """Inverse-distance descriptor, pairs i > j row-major lower triangle (D,)."""
    i, j = np.tril_indices(len(r), -1)
    return 1.0 / np.linalg.norm(r[i] - r[j], axis=-1)


def make_model_arrays(seed=0, n_train=4, species=SPECIES, perms=PERMS, sigma=0.7, kernel="matern52",
                      p=None, beta=False):
    """Tensors and metadata of a valid sGDML model: M = n_train rows x_m (descriptors of random
    geometries, 1/r^p) and v_m (random), (M, D) each; perms (S, N) a group; with `beta` random
    energy coefficients alpha_E (M,); `p` None leaves descriptor_exponent out of the metadata
    (docs/model_file.md)."""
    rng = np.random.default_rng(seed)
    n = len(species)
    x_m, v_m = [], []
    for _ in range(n_train):
        x_m.append(inv_dist(geometry(rng, n)) ** (1.0 if p is None else p))
        v_m.append(rng.normal(size=n * (n - 1) // 2))
    tensors = {
        "z": np.array([{"C": 6, "H": 1, "O": 8, "N": 7}[s] for s in species], dtype=np.int32),
        "perms": np.array(perms, dtype=np.int32),
        "R_desc": np.array(x_m, dtype=np.float64),
        "R_d_desc_alpha": np.array(v_m, dtype=np.float64),
    }
    if beta:
        tensors["alpha_E"] = rng.normal(size=n_train)
    meta = {
        "format_version": 1, "model": "sgdml", "gpff_version": "0.1.0",
        "units": {"energy": "kcal/mol", "length": "Angstrom"},
        "species": list(species), "n_atoms": n, "kernel": kernel,
        "descriptor": "inverse_distance", "sigma": sigma, "lam": 1e-10,
        "integration_constant": -97.5, "n_train": n_train, "n_perms": len(perms),
        "molecule_extent": 3.2, "provenance": {"dataset": "synthetic"},
    }
    if p is not None:
        meta["descriptor_exponent"] = p
    return tensors, meta


def kernel_k_k1_k2(meta, d):
    """k(d), k1(d) = k'(d)/d, k2(d) = (k''(d) - k'(d)/d)/d^2 of the model's kernel (the table in
    docs/model_file.md, "Prediction")."""
    sigma = meta["sigma"]
    if meta["kernel"] == "matern52":
        a = np.sqrt(5.0) / sigma
        e = np.exp(-a * d)
        return ((1.0 + a * d + (a * d) ** 2 / 3.0) * e, -(a * a / 3.0) * (1.0 + a * d) * e,
                (a ** 4 / 3.0) * e)
    assert meta["kernel"] == "rbf"
    k = np.exp(-d * d / (2.0 * sigma * sigma))
    return k, -k / sigma ** 2, k / sigma ** 4


def reference(r, tensors, meta):
    """The contract's prediction (docs/model_file.md) in numpy, written from the document's
    formulas: E = c + sum_q E0(R[p_q]), F_{p_q[a]} = sum_q F0_a(R[p_q]). Returns (E, F)."""
    p = meta.get("descriptor_exponent", 1.0)
    x_m, v_m = tensors["R_desc"], tensors["R_d_desc_alpha"]
    beta = tensors.get("alpha_E", np.zeros(len(x_m)))
    energy = meta["integration_constant"]
    forces = np.zeros_like(r)
    i, j = np.tril_indices(len(r), -1)
    for perm in tensors["perms"]:
        rq = r[perm]
        rij = rq[i] - rq[j]
        dist = np.linalg.norm(rij, axis=-1)
        u = dist ** -p - x_m                                       # x_q - x_m, (M, D)
        d = np.linalg.norm(u, axis=1)
        k, k1, k2 = kernel_k_k1_k2(meta, d)
        uv = np.einsum("md,md->m", u, v_m)
        energy += np.sum(beta * k + k1 * uv)
        g = ((k2 * uv)[:, None] * u + k1[:, None] * (v_m + beta[:, None] * u)).sum(axis=0)
        fpair = (g * p / dist ** (p + 2))[:, None] * rij           # (D, 3) on atom i, minus on j
        f0 = np.zeros_like(r)
        np.add.at(f0, i, fpair)
        np.add.at(f0, j, -fpair)
        forces[perm] += f0
    return energy, forces


def reference_energy(r, tensors, meta):
    return reference(r, tensors, meta)[0]


def write_model(path, tensors, meta):
    save_file(tensors, str(path), metadata={"gpff": json.dumps(meta)})
    return str(path)


@pytest.fixture
def model_file(tmp_path):
    tensors, meta = make_model_arrays()
    return write_model(tmp_path / "synthetic.gpff", tensors, meta)


@pytest.fixture
def model(model_file):
    return _core.SGDMLModel(model_file)


# ---- loading and properties -------------------------------------------------------------------

def test_properties(model, model_file):
    assert model.n_atoms == 5
    assert model.atomic_numbers == Z
    assert model.species == SPECIES
    assert model.energy_unit == "kcal/mol"
    assert model.molecule_extent == 3.2
    assert model.n_perms == 2
    assert model.n_train == 4
    assert model.sigma == 0.7
    assert model.integration_constant == -97.5
    assert model.path == model_file
    assert model.kernel == "matern52"
    assert model.descriptor_exponent == 1.0
    assert model.has_energy_coefficients is False


def test_pathlike(model_file):
    import pathlib

    assert _core.SGDMLModel(pathlib.Path(model_file)).n_atoms == 5


# ---- physics ----------------------------------------------------------------------------------

def test_forces_are_minus_energy_gradient(model):
    rng = np.random.default_rng(1)
    for _ in range(3):
        r = geometry(rng)
        e, f, _ = model.compute(r)
        assert f.shape == (5, 3) and np.isfinite(e)
        f_fd = finite_difference_forces(lambda x: model.compute(x)[0], r)
        assert np.max(np.abs(f_fd - f)) <= 1e-6 * np.max(np.abs(f))


def test_virial_is_sum_r_outer_f(model):
    rng = np.random.default_rng(2)
    r = geometry(rng) + np.array([3.0, -7.0, 11.0])
    _, f, w = model.compute(r)
    full = r.T @ f    # W_ab = sum_i r_ia F_ib
    expected = np.array([full[0, 0], full[1, 1], full[2, 2], full[0, 1], full[0, 2], full[1, 2]])
    assert w.shape == (6,)
    assert np.allclose(w, expected, rtol=1e-10, atol=1e-10 * np.max(np.abs(expected)))
    # a free molecule has no torque: W symmetric
    assert np.allclose(full, full.T, atol=1e-10 * np.max(np.abs(full)))
    # and no net force
    assert np.allclose(f.sum(axis=0), 0.0, atol=1e-10 * np.max(np.abs(f)))


def test_translation_rotation_invariance(model):
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    r = geometry(rng)
    e, f, _ = model.compute(r)
    rot = Rotation.random(random_state=4).as_matrix()
    r2 = r @ rot.T + np.array([10.0, -5.0, 2.5])
    e2, f2, _ = model.compute(r2)
    assert e2 == pytest.approx(e, rel=1e-12, abs=1e-12)
    assert np.allclose(f2, f @ rot.T, rtol=1e-10, atol=1e-10 * np.max(np.abs(f)))


def test_far_apart_atoms_finite(model):
    r = np.array([[0.0, 0.0, 0.0], [40.0, 0, 0], [0, 40.0, 0], [0, 0, 40.0], [40.0, 40.0, 40.0]])
    e, f, w = model.compute(r)
    assert np.isfinite(e) and np.all(np.isfinite(f)) and np.all(np.isfinite(w))


# a non-abelian symmetry group: all 6 orderings of the three methyl H atoms (1, 2, 3)
SPECIES_S3 = ["C", "H", "H", "H", "O", "H"]
PERMS_S3 = [[0] + [1 + k for k in p] + [4, 5]
            for p in [(0, 1, 2), (1, 2, 0), (2, 0, 1), (1, 0, 2), (0, 2, 1), (2, 1, 0)]]


@pytest.fixture(scope="module")
def s3_model(tmp_path_factory):
    tensors, meta = make_model_arrays(seed=21, n_train=7, species=SPECIES_S3, perms=PERMS_S3,
                                      sigma=1.3)
    path = write_model(tmp_path_factory.mktemp("s3") / "s3.gpff", tensors, meta)
    return _core.SGDMLModel(path), tensors, meta


def test_symmetric_model_invariant_under_its_permutations(s3_model):
    model, tensors, meta = s3_model
    assert model.n_perms == 6 and model.n_train == 7
    rng = np.random.default_rng(22)
    for _ in range(3):
        r = geometry(rng, 6)
        e, f, w = model.compute(r)
        assert e == pytest.approx(reference_energy(r, tensors, meta), rel=1e-12)
        for p in PERMS_S3:
            e_p, f_p, w_p = model.compute(r[p])          # atom a of the query is atom p[a] of r
            assert e_p == pytest.approx(e, rel=1e-13, abs=1e-13)
            assert np.allclose(f_p, f[p], rtol=0, atol=1e-12 * np.max(np.abs(f)))
            assert np.allclose(w_p, w, rtol=0, atol=1e-12 * np.max(np.abs(w)))
        # a permutation outside the group (swap H1 and the hydroxyl H5) changes the energy
        q = [0, 5, 2, 3, 4, 1]
        assert abs(model.compute(r[q])[0] - e) > 1e-8 * abs(e)


def assert_forces_are_minus_energy_gradient(model, seed, n_geometries):
    """Core forces equal finite differences of core energies (≤ 1e-6 relative), 6-atom geometries."""
    rng = np.random.default_rng(seed)
    for _ in range(n_geometries):
        r = geometry(rng, 6)
        _, f, _ = model.compute(r)
        f_fd = finite_difference_forces(lambda x: model.compute(x)[0], r)
        assert np.max(np.abs(f_fd - f)) <= 1e-6 * np.max(np.abs(f))


def test_symmetric_model_finite_difference_forces(s3_model):
    assert_forces_are_minus_energy_gradient(s3_model[0], 23, 3)


def test_energy_matches_contract_reference(tmp_path):
    """Many rows (not a multiple of the 8-row SIMD block) and S = 2: core == numpy formula."""
    tensors, meta = make_model_arrays(seed=24, n_train=29)
    model = _core.SGDMLModel(write_model(tmp_path / "ref.gpff", tensors, meta))
    rng = np.random.default_rng(25)
    for _ in range(5):
        r = geometry(rng)
        assert model.compute(r)[0] == pytest.approx(reference_energy(r, tensors, meta), rel=1e-12)
    # a query at a training geometry (d = 0 for that row, sqrt(0) in the kernel) is fine
    r0 = geometry(rng)
    tensors["R_desc"][0] = inv_dist(r0)
    model = _core.SGDMLModel(write_model(tmp_path / "ref0.gpff", tensors, meta))
    e, f, _ = model.compute(r0)
    assert e == pytest.approx(reference_energy(r0, tensors, meta), rel=1e-12)
    assert np.all(np.isfinite(f))


def _check_simd_kernels_agree(models, r):
    """GPFF_KERNEL forces the baseline / AVX2 kernel (in a fresh process): the same numbers as
    this process' kernel, for each model in `models` at positions r."""
    import subprocess
    import sys

    assert _core.kernel_isa() in ("avx512", "avx2", "baseline")
    ref = [m.compute(r) for m in models]
    code = ("import sys, json, numpy as np; from gpff import _core; "
            "r = np.array(json.loads(sys.argv[1])); "
            "out = [[float(x) for x in [v[0]]] + [v[1].tolist(), v[2].tolist()] "
            "for v in (_core.SGDMLModel(p).compute(r) for p in sys.argv[2:])]; "
            "print(json.dumps([_core.kernel_isa(), out]))")
    for kernel in ("baseline", "avx2", "avx512"):
        env = dict(os.environ, GPFF_KERNEL=kernel)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(r.tolist())] +
                             [m.path for m in models], env=env, capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(models[0].path))
        isa, results = json.loads(out.stdout)
        if kernel != "avx512":
            assert isa in (kernel, "baseline")
        for (e, f, w), (e2, f2, w2), m in zip(ref, results, models):
            assert e2 == pytest.approx(e, rel=1e-13), (kernel, m.path)
            assert np.allclose(f2, f, rtol=0, atol=1e-12 * np.max(np.abs(f))), (kernel, m.path)
            assert np.allclose(w2, w, rtol=0, atol=1e-12 * np.max(np.abs(w))), (kernel, m.path)


def test_all_simd_kernels_agree(s3_model, tmp_path):
    """Every ISA variant of every kernel instantiation (matern52 / rbf, with and without the
    beta term, p = 1, 2, 1.5) gives the same numbers; S = 6 (chunks of orderings) and
    M = 11 rows (a padded second block)."""
    model, _, _ = s3_model
    models = [model]
    for kernel, p, beta in [("matern52", 2, True), ("matern52", 1.5, False), ("rbf", 1, False),
                            ("rbf", 1.5, True), ("rbf", 2, False)]:
        tensors, meta = make_model_arrays(seed=27, n_train=11, species=SPECIES_S3, perms=PERMS_S3,
                                          sigma=1.0, kernel=kernel, p=p, beta=beta)
        path = write_model(tmp_path / f"{kernel}_{p}_{beta}.gpff", tensors, meta)
        models.append(_core.SGDMLModel(path))
    _check_simd_kernels_agree(models, geometry(np.random.default_rng(26), 6))


# ---- the general contract: kernel x descriptor exponent x energy coefficients x symmetries ----

GENERAL_CASES = [(kernel, p, beta, s) for kernel in ("matern52", "rbf") for p in (1, 2, 1.5)
                 for beta in (False, True) for s in (1, 6)]


@pytest.fixture(scope="module", params=GENERAL_CASES,
                ids=[f"{k}-p{p}-{'beta' if b else 'nobeta'}-S{s}" for k, p, b, s in GENERAL_CASES])
def general_model(request, tmp_path_factory):
    """(model, tensors, meta) for one combination; S = 6 is the S3 group of the methyl H atoms,
    S = 1 plain GDML; M = 11 (a full and a padded 8-row block)."""
    kernel, p, beta, s = request.param
    perms = PERMS_S3 if s == 6 else PERMS_S3[:1]
    tensors, meta = make_model_arrays(seed=31, n_train=11, species=SPECIES_S3, perms=perms,
                                      sigma=1.0, kernel=kernel, p=p, beta=beta)
    path = write_model(tmp_path_factory.mktemp("general") / "general.gpff", tensors, meta)
    return _core.SGDMLModel(path), tensors, meta


def test_general_properties(general_model):
    model, tensors, meta = general_model
    assert model.kernel == meta["kernel"]
    assert model.descriptor_exponent == meta["descriptor_exponent"]
    assert model.has_energy_coefficients == ("alpha_E" in tensors)
    assert model.n_perms == len(tensors["perms"]) and model.n_train == 11


def test_general_matches_contract_reference(general_model):
    """Energy and forces == the numpy transcription of the document's formulas."""
    model, tensors, meta = general_model
    rng = np.random.default_rng(32)
    for _ in range(3):
        r = geometry(rng, 6)
        e, f, _ = model.compute(r)
        e_ref, f_ref = reference(r, tensors, meta)
        assert e == pytest.approx(e_ref, rel=1e-11, abs=1e-11)
        assert np.max(np.abs(f - f_ref)) <= 1e-10 * np.max(np.abs(f_ref))


def test_general_finite_difference_forces(general_model):
    assert_forces_are_minus_energy_gradient(general_model[0], 33, 2)


def test_general_virial_is_sum_r_outer_f(general_model):
    model, _, _ = general_model
    r = geometry(np.random.default_rng(34), 6) + np.array([3.0, -7.0, 11.0])
    _, f, w = model.compute(r)
    full = r.T @ f
    expected = np.array([full[0, 0], full[1, 1], full[2, 2], full[0, 1], full[0, 2], full[1, 2]])
    assert np.allclose(w, expected, rtol=0, atol=1e-10 * np.max(np.abs(expected)))
    assert np.allclose(full, full.T, atol=1e-10 * np.max(np.abs(full)))
    assert np.allclose(f.sum(axis=0), 0.0, atol=1e-10 * np.max(np.abs(f)))


def test_general_permutation_invariance(general_model):
    """Invariant under the model's symmetries (S = 6); a permutation outside the group (or any
    non-trivial one for S = 1) changes the energy."""
    model, tensors, _ = general_model
    rng = np.random.default_rng(35)
    r = geometry(rng, 6)
    e, f, w = model.compute(r)
    for p in tensors["perms"]:
        e_p, f_p, w_p = model.compute(r[p])
        assert e_p == pytest.approx(e, rel=1e-13, abs=1e-13)
        assert np.allclose(f_p, f[p], rtol=0, atol=1e-12 * np.max(np.abs(f)))
        assert np.allclose(w_p, w, rtol=0, atol=1e-12 * np.max(np.abs(w)))
    outside = [[0, 5, 2, 3, 4, 1]] + ([[0, 2, 1, 3, 4, 5]] if len(tensors["perms"]) == 1 else [])
    for q in outside:
        assert abs(model.compute(r[q])[0] - e) > 1e-8 * abs(e)


def test_energy_coefficients_add_the_beta_term(tmp_path):
    """alpha_E adds sum_q sum_m beta_m k(d_qm) to the energy: a model whose v_m are all zero has
    E = c + sum beta k, and alpha_E = 0 gives the same numbers as no alpha_E."""
    for kernel in ("matern52", "rbf"):
        tensors, meta = make_model_arrays(seed=36, n_train=9, species=SPECIES_S3, perms=PERMS_S3,
                                          sigma=1.0, kernel=kernel, p=1.5, beta=True)
        r = geometry(np.random.default_rng(37), 6)
        only_beta = dict(tensors, R_d_desc_alpha=np.zeros_like(tensors["R_d_desc_alpha"]))
        m = _core.SGDMLModel(write_model(tmp_path / f"b_{kernel}.gpff", only_beta, meta))
        expected = meta["integration_constant"]
        for p in PERMS_S3:
            d = np.linalg.norm(inv_dist(r[p]) ** 1.5 - tensors["R_desc"], axis=1)
            expected += np.sum(tensors["alpha_E"] * kernel_k_k1_k2(meta, d)[0])
        assert m.compute(r)[0] == pytest.approx(expected, rel=1e-12)
        zero = dict(tensors, alpha_E=np.zeros(9))
        without = {k: v for k, v in tensors.items() if k != "alpha_E"}
        m0 = _core.SGDMLModel(write_model(tmp_path / f"z_{kernel}.gpff", zero, meta))
        m1 = _core.SGDMLModel(write_model(tmp_path / f"n_{kernel}.gpff", without, meta))
        assert m0.has_energy_coefficients and not m1.has_energy_coefficients
        e0, f0, w0 = m0.compute(r)
        e1, f1, w1 = m1.compute(r)
        assert e0 == pytest.approx(e1, rel=1e-14)
        assert np.allclose(f0, f1, rtol=0, atol=1e-13 * np.max(np.abs(f1)))


def test_descriptor_exponent_one_is_the_default(tmp_path):
    """descriptor_exponent: 1 written explicitly == left out (the p == 1 fast path either way)."""
    tensors, meta = make_model_arrays(seed=38, n_train=5)
    r = geometry(np.random.default_rng(39))
    a = _core.SGDMLModel(write_model(tmp_path / "absent.gpff", tensors, meta))
    b = _core.SGDMLModel(write_model(tmp_path / "one.gpff", tensors, dict(meta, descriptor_exponent=1.0)))
    assert a.descriptor_exponent == 1.0 and b.descriptor_exponent == 1.0
    ea, fa, wa = a.compute(r)
    eb, fb, wb = b.compute(r)
    assert ea == eb and np.array_equal(fa, fb) and np.array_equal(wa, wb)


def test_threads_give_identical_results(model):
    rng = np.random.default_rng(6)
    geoms = [geometry(rng) for _ in range(16)]
    ref = [model.compute(r) for r in geoms]
    out = [None] * len(geoms)

    def work(k):
        for _ in range(20):
            out[k] = model.compute(geoms[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(geoms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (e, f, w), (e2, f2, w2) in zip(ref, out):
        assert e == e2 and np.array_equal(f, f2) and np.array_equal(w, w2)


# ---- bad input to compute ---------------------------------------------------------------------

def test_wrong_atom_count_is_species_error(model):
    with pytest.raises(SpeciesError, match=r"expected shape \(5, 3\)"):
        model.compute(np.zeros((4, 3)))


@pytest.mark.parametrize("shape", [(5,), (15,), (5, 2), (5, 3, 1)])
def test_wrong_shape_is_value_error(model, shape):
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        model.compute(np.ones(shape))


def test_coincident_atoms_raise(model):
    r = geometry(np.random.default_rng(7))
    r[3] = r[1]
    with pytest.raises(ValueError, match=r"atoms 3 and 1 coincide"):
        model.compute(r)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions_raise(model, bad):
    r = geometry(np.random.default_rng(8))
    r[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite position of atom 2"):
        model.compute(r)


def test_huge_positions_raise_not_crash(model):
    r = geometry(np.random.default_rng(9)) * 1e200
    try:
        e, f, _ = model.compute(r)
        assert np.isfinite(e) and np.all(np.isfinite(f))
    except ValueError as err:
        assert "non-finite" in str(err) or "coincide" in str(err)


# ---- bad files --------------------------------------------------------------------------------

def check_error(path, phrase):
    return check_load_error(_core.SGDMLModel, path, phrase)


def test_missing_file(tmp_path):
    check_error(tmp_path / "nope.gpff", "cannot open model file")


def test_truncated_at_many_offsets(model_file, tmp_path):
    b = open(model_file, "rb").read()
    (n,) = struct.unpack("<Q", b[:8])
    offsets = sorted({0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 100,
                      len(b) // 2, len(b) - 8, len(b) - 1}
                     | set(range(8 + n, len(b), max(1, (len(b) - 8 - n) // 37))))
    for k in offsets:
        if k >= len(b):
            continue
        p = tmp_path / f"trunc_{k}.gpff"
        p.write_bytes(b[:k])
        with pytest.raises(ModelFileError) as info:
            _core.SGDMLModel(str(p))
        msg = str(info.value)
        assert p.name in msg, msg
        assert "truncated" in msg or "missing tensor" in msg, (k, msg)


def test_header_length_larger_than_file(model_file, tmp_path):
    b = bytearray(open(model_file, "rb").read())
    b[:8] = struct.pack("<Q", len(b))
    p = tmp_path / "hlen.gpff"
    p.write_bytes(bytes(b))
    check_error(p, "larger than the file")
    b[:8] = struct.pack("<Q", 2**64 - 1)
    p.write_bytes(bytes(b))
    check_error(p, "larger than the file")


def test_garbage_json(tmp_path):
    p = tmp_path / "garbage.gpff"
    p.write_bytes(raw_safetensors(b"{this is not json at all]", b"\0" * 16))
    check_error(p, "invalid JSON in safetensors header")
    p.write_bytes(raw_safetensors(b"\xff\xfe\x00garbage", b""))
    check_error(p, "invalid JSON in safetensors header")
    p.write_bytes(raw_safetensors(b"[1, 2, 3]"))
    check_error(p, "not a JSON object")


def test_not_a_gpff_file(model_file, tmp_path):
    header, data = split_file(model_file)
    del header["__metadata__"]
    p = tmp_path / "nometa.gpff"
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "no __metadata__")
    header["__metadata__"] = {"other": "x"}
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "no __metadata__.gpff")
    header["__metadata__"] = {"gpff": "{not json"}
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "invalid JSON in __metadata__.gpff")


def test_wrong_format_version(tmp_path):
    tensors, meta = make_model_arrays()
    meta["format_version"] = 2
    p = write_model(tmp_path / "v2.gpff", tensors, meta)
    check_error(p, "unsupported format_version 2")
    meta["format_version"] = "1"
    p = write_model(tmp_path / "vstr.gpff", tensors, meta)
    check_error(p, "format_version is not an integer")
    del meta["format_version"]
    p = write_model(tmp_path / "vnone.gpff", tensors, meta)
    check_error(p, "no format_version")


@pytest.mark.parametrize("name,dtype,phrase", [
    ("R_desc", np.float32, "unsupported dtype F32"),
    ("z", np.int64, "unsupported dtype I64"),
    ("R_d_desc_alpha", np.int32, "tensor 'R_d_desc_alpha' has dtype I32, expected F64"),
    ("perms", np.float64, "tensor 'perms' has dtype F64, expected I32"),
])
def test_wrong_dtype(tmp_path, name, dtype, phrase):
    tensors, meta = make_model_arrays()
    tensors[name] = tensors[name].astype(dtype)
    check_error(write_model(tmp_path / "dtype.gpff", tensors, meta), phrase)


def test_shape_offset_mismatch(model_file, tmp_path):
    header, data = split_file(model_file)
    header["R_desc"]["shape"] = [header["R_desc"]["shape"][0] + 1, header["R_desc"]["shape"][1]]
    p = tmp_path / "shape.gpff"
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "shape/offset mismatch")
    header, data = split_file(model_file)
    header["z"]["shape"] = [2**40, 2**40]
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "shape/offset mismatch")
    header, data = split_file(model_file)
    header["z"]["shape"] = [-5]
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "non-negative")


def test_offsets_outside_and_overlapping(model_file, tmp_path):
    header, data = split_file(model_file)
    b, e = header["z"]["data_offsets"]
    header["z"]["data_offsets"] = [len(data) - (e - b) + 4, len(data) + 4]
    p = tmp_path / "outside.gpff"
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "outside the")
    header, data = split_file(model_file)
    header["z"]["data_offsets"] = list(header["perms"]["data_offsets"])
    header["z"]["data_offsets"][1] = header["z"]["data_offsets"][0] + 20
    p = tmp_path / "overlap.gpff"
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "overlap")
    header, data = split_file(model_file)
    header["z"]["data_offsets"] = [8, 4]
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "outside the")


@pytest.mark.parametrize("name", ["R_desc", "R_d_desc_alpha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_tensor(tmp_path, name, bad):
    tensors, meta = make_model_arrays()
    tensors[name][3, 2] = bad
    check_error(write_model(tmp_path / "nan.gpff", tensors, meta),
                f"tensor '{name}' contains non-finite values")


@pytest.mark.parametrize("row,phrase", [
    ([1, 0, 3, 3, 4], "perms row 1 is not a permutation"),
    ([1, 0, 3, 2, 5], "perms row 1 is not a permutation"),
    ([1, 0, 3, 2, -1], "perms row 1 is not a permutation"),
    ([2, 1, 0, 3, 4], "perms row 1 maps atom 0 onto atom 2 of another element"),
])
def test_bad_perms(tmp_path, row, phrase):
    tensors, meta = make_model_arrays()
    tensors["perms"][1] = row
    check_error(write_model(tmp_path / "perms.gpff", tensors, meta), phrase)


@pytest.mark.parametrize("perms,phrase", [
    ([[1, 0, 3, 2, 4], [0, 1, 2, 3, 4]], "perms row 0 is not the identity"),
    ([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], "perms rows 0 and 1 are equal: perms do not form a group"),
    ([[0, 1, 2, 3, 4], [1, 0, 3, 2, 4], [1, 0, 3, 2, 4]], "perms rows 1 and 2 are equal"),
    # {e, (0 1), (2 3)} misses (0 1)(2 3)
    ([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [0, 1, 3, 2, 4]], "perms do not form a group: row 1 composed with row 2"),
])
def test_perms_not_a_group(tmp_path, perms, phrase):
    tensors, meta = make_model_arrays(perms=perms)
    check_error(write_model(tmp_path / "group.gpff", tensors, meta), phrase)


def test_old_expanded_layout_is_refused(tmp_path):
    """Files written before the (M, D) layout stored M*S permuted rows: named in the error."""
    tensors, meta = make_model_arrays()
    for name in ("R_desc", "R_d_desc_alpha"):
        tensors[name] = np.concatenate([tensors[name]] * len(PERMS))
    check_error(write_model(tmp_path / "old.gpff", tensors, meta),
                "tensor 'R_desc' has shape (8, 10), expected (M, D) = (4, 10) (it has M*S rows")


@pytest.mark.parametrize("name", ["z", "perms", "R_desc", "R_d_desc_alpha"])
def test_missing_tensor(tmp_path, name):
    tensors, meta = make_model_arrays()
    del tensors[name]
    check_error(write_model(tmp_path / "missing.gpff", tensors, meta), f"missing tensor '{name}'")


@pytest.mark.parametrize("change,phrase", [
    (lambda t, m: m.update(model="mff"), "model kind 'mff' is not 'sgdml'"),
    (lambda t, m: m.pop("model"), "metadata key 'model' is missing"),
    (lambda t, m: m.update(kernel="laplace"),
     "unsupported kernel 'laplace' (the C++ core evaluates matern52 and rbf)"),
    (lambda t, m: m.update(kernel="RBF"), "unsupported kernel 'RBF'"),
    (lambda t, m: m.update(kernel=52), "metadata key 'kernel' must be a string"),
    (lambda t, m: m.update(descriptor_exponent=0), "descriptor_exponent must be > 0, got 0"),
    (lambda t, m: m.update(descriptor_exponent=-1.5), "descriptor_exponent must be > 0, got -1.5"),
    (lambda t, m: m.update(descriptor_exponent="2"),
     "metadata key 'descriptor_exponent' must be a number"),
    (lambda t, m: m.update(descriptor_exponent=None),
     "metadata key 'descriptor_exponent' must be a number"),
    # json.dumps writes NaN / Infinity, which are not JSON
    (lambda t, m: m.update(descriptor_exponent=float("nan")), "invalid JSON in __metadata__.gpff"),
    (lambda t, m: m.update(descriptor_exponent=float("inf")), "invalid JSON in __metadata__.gpff"),
    (lambda t, m: t.update(alpha_E=np.ones(5)), "tensor 'alpha_E' has shape (5,), expected (4,)"),
    (lambda t, m: t.update(alpha_E=np.ones((4, 1))), "tensor 'alpha_E' has shape (4, 1), expected (4,)"),
    (lambda t, m: t.update(alpha_E=np.ones(())), "tensor 'alpha_E' has shape (), expected (4,)"),
    (lambda t, m: t.update(alpha_E=np.ones(4, dtype=np.float32)),
     "tensor 'alpha_E': unsupported dtype F32"),
    (lambda t, m: t.update(alpha_E=np.ones(4, dtype=np.int32)),
     "tensor 'alpha_E' has dtype I32, expected F64"),
    (lambda t, m: t.update(alpha_E=np.array([1.0, np.nan, 0.0, 2.0])),
     "tensor 'alpha_E' contains non-finite values"),
    (lambda t, m: t.update(alpha_E=np.array([1.0, 0.0, -np.inf, 2.0])),
     "tensor 'alpha_E' contains non-finite values"),
    (lambda t, m: m.update(descriptor="coulomb"), "descriptor 'coulomb' is not supported"),
    (lambda t, m: m.update(sigma=0.0), "sigma must be > 0"),
    (lambda t, m: m.update(sigma=-1.0), "sigma must be > 0"),
    (lambda t, m: m.update(sigma="big"), "metadata key 'sigma' must be a number"),
    (lambda t, m: m.update(units={"energy": "Ry", "length": "Angstrom"}), "energy unit 'Ry'"),
    (lambda t, m: m.update(units={"energy": "eV", "length": "bohr"}), "length unit 'bohr'"),
    (lambda t, m: m.update(species=["C", "C", "H", "H"]), "species has 4 entries, expected N = 5"),
    (lambda t, m: m.update(species=["C", "C", "H", "H", "Xx"]), "'Xx' is not an element symbol"),
    (lambda t, m: m.update(species=["C", "C", "H", "O", "H"]), "does not match z[3] = 1"),
    (lambda t, m: m.update(n_atoms=6), "metadata n_atoms = 6"),
    (lambda t, m: m.update(n_train=5), "metadata n_train = 5 but tensor 'R_desc' has shape (4, 10)"),
    (lambda t, m: m.update(n_train=0), "metadata n_train = 0 out of range"),
    (lambda t, m: m.update(n_train=4.0), "metadata key 'n_train' must be an integer"),
    (lambda t, m: m.update(n_perms=1), "metadata n_perms = 1"),
    (lambda t, m: t.update(R_desc=t["R_desc"][:, :-1].copy()),
     "tensor 'R_desc' has shape (4, 9), expected (M, D) = (4, 10)"),
    (lambda t, m: t.update(R_desc=t["R_desc"][:-1].copy()),
     "metadata n_train = 4 but tensor 'R_desc' has shape (3, 10)"),
    (lambda t, m: t.update(R_d_desc_alpha=t["R_d_desc_alpha"][:-2].copy()),
     "tensor 'R_d_desc_alpha' has shape (2, 10), expected (M, D) = (4, 10)"),
    (lambda t, m: t.update(R_desc=t["R_desc"][None].copy()), "tensor 'R_desc' has shape (1, 4, 10)"),
    (lambda t, m: t.update(perms=t["perms"][:, :4].copy()), "tensor 'perms' has shape (2, 4)"),
    (lambda t, m: t.update(z=t["z"].reshape(5, 1).copy()), "tensor 'z' has shape (5, 1)"),
])
def test_bad_metadata_or_shapes(tmp_path, change, phrase):
    tensors, meta = make_model_arrays()
    change(tensors, meta)
    check_error(write_model(tmp_path / "bad.gpff", tensors, meta), phrase)


def test_descriptor_exponent_not_finite(tmp_path):
    """A JSON number that overflows a double (1e400) is refused by the JSON parser (the finite
    check of the metadata getters is the second line of defence)."""
    tensors, meta = make_model_arrays()
    meta["descriptor_exponent"] = 12345.0
    path = tmp_path / "pinf.gpff"
    save_file(tensors, str(path),
              metadata={"gpff": json.dumps(meta).replace("12345.0", "1e400")})
    check_error(path, "invalid JSON in __metadata__.gpff: [json.exception.out_of_range.406] "
                      "number overflow parsing '1e400'")


_VALID = None


def _valid_bytes():
    global _VALID
    if _VALID is None:
        with tempfile.TemporaryDirectory() as d:
            tensors, meta = make_model_arrays()
            _VALID = open(write_model(os.path.join(d, "m.gpff"), tensors, meta), "rb").read()
    return _VALID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_random_bytes_never_crash(flips, cut):
    b = bytearray(_valid_bytes())
    for pos, value in flips:
        b[int(pos * len(b))] = value
    if cut is not None:
        b = b[:int(cut * len(b))]
    m = load_fuzzed(_core.SGDMLModel, b)
    if m is None:
        return
    r = geometry(np.random.default_rng(0), m.n_atoms)
    try:
        e, f, w = m.compute(r)
        assert np.isfinite(e)
    except ValueError:
        pass


# ---- ASE calculator ---------------------------------------------------------------------------

def test_calculator_units_and_forces(model_file, model):
    from ase import Atoms

    from gpff.calculator import GPFFCalculator
    from gpff.units import energy_factor

    r = geometry(np.random.default_rng(10))
    atoms = Atoms(SPECIES, positions=r)
    atoms.calc = GPFFCalculator(model_file)
    e, f, _ = model.compute(r)
    k = energy_factor("kcal/mol", "eV")
    assert k == pytest.approx(0.0433641, rel=1e-5)
    assert atoms.get_potential_energy() == pytest.approx(e * k, rel=1e-14)
    assert np.allclose(atoms.get_forces(), f * k, rtol=1e-14, atol=0)
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(e * k, rel=1e-14)
    from ase.calculators.calculator import PropertyNotImplementedError

    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_calculator_stress_in_periodic_cell(model_file, model):
    from ase import Atoms

    from gpff.calculator import GPFFCalculator
    from gpff.units import energy_factor, virial_to_stress

    r = geometry(np.random.default_rng(11)) + 10.0
    atoms = Atoms(SPECIES, positions=r, cell=[20.0, 21.0, 22.0], pbc=True)
    atoms.calc = GPFFCalculator(model_file)
    _, _, w = model.compute(r)
    k = energy_factor("kcal/mol", "eV")
    s = atoms.get_stress()
    assert s.shape == (6,)
    assert np.allclose(s, virial_to_stress(w * k, 20.0 * 21.0 * 22.0), rtol=1e-12, atol=0)


def test_calculator_ev_model(tmp_path):
    from ase import Atoms

    from gpff.calculator import GPFFCalculator

    tensors, meta = make_model_arrays()
    meta["units"]["energy"] = "eV"
    p = write_model(tmp_path / "ev.gpff", tensors, meta)
    r = geometry(np.random.default_rng(12))
    atoms = Atoms(SPECIES, positions=r, calculator=GPFFCalculator(p))
    assert atoms.get_potential_energy() == pytest.approx(_core.SGDMLModel(p).compute(r)[0], rel=1e-15)


def test_calculator_species_errors(model_file):
    from ase import Atoms

    from gpff.calculator import GPFFCalculator

    r = geometry(np.random.default_rng(13))
    atoms = Atoms(["O", "C", "H", "H", "C"], positions=r)
    atoms.calc = GPFFCalculator(model_file)
    with pytest.raises(SpeciesError, match=r"synthetic\.gpff: atom 0 is O \(Z=8\) but the model expects C"):
        atoms.get_potential_energy()
    atoms = Atoms(["C", "C", "H", "H"], positions=r[:4])
    atoms.calc = GPFFCalculator(model_file)
    with pytest.raises(SpeciesError, match=r"synthetic\.gpff: the model has 5 atoms"):
        atoms.get_forces()


def test_calculator_bad_file(tmp_path):
    from gpff.calculator import GPFFCalculator

    with pytest.raises(ModelFileError, match="missing.gpff"):
        GPFFCalculator(tmp_path / "missing.gpff")
