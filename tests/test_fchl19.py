"""The global FCHL19 descriptor (gpff.fchl19) and sGDML models on it: the representation and its
gradient against qml's reference implementation (qmllib), the analytic Jacobian against finite
differences, invariances, the long-descriptor (GEMM) path of the training kernel, training,
F = −∇E, the compact model file (training geometries and force coefficients, the rows rebuilt at
load by Python and by the C++ core's forward-mode FCHL19::jvp), its round trip and its errors."""

import json

import numpy as np
import pytest
import torch

import gpff
from conftest import check_load_error, finite_difference_forces
from gpff import _core
from gpff.descriptor import InverseDistance, training_rows
from gpff.errors import ModelFileError
from gpff.fchl19 import DEFAULTS, FCHL19Descriptor, check_params
from gpff.kernels import get_kernel
from gpff.sgdml import SGDML
from gpff.sgdml_kernel import TrainingKernel
from gpff.symmetry import find_permutations

#: a set that exercises both cutoffs inside an ethanol molecule (qmllib has one Fourier order;
#: TWO_FOURIER adds a second for the tests of gpff's own derivatives)
SHORT = {"n_rs2": 10, "n_rs3": 7, "rcut": 2.6, "acut": 2.3, "eta2": 0.5, "eta3": 3.0,
         "zeta": 2.0, "two_body_decay": 1.5, "three_body_decay": 0.8, "three_body_weight": 9.0}
TWO_FOURIER = {**SHORT, "n_fourier": 2}


@pytest.mark.parametrize("params", [None, SHORT], ids=["defaults", "short"])
def test_matches_qml_reference(ethanol_train, params):
    """x and ∂x/∂R equal qmllib's generate_fchl19 (FCHL19's reference code) to 1e-12."""
    qml = pytest.importorskip("qmllib.representations")
    z, R = ethanol_train.z, ethanol_train.R[7]
    prm = check_params(params)
    x, J = FCHL19Descriptor(z, params)(torch.as_tensor(R)[None])
    ref, grad = qml.generate_fchl19(
        np.asarray(z, dtype=np.int32), R, elements=sorted(set(z.tolist())), nRs2=prm["n_rs2"],
        nRs3=prm["n_rs3"], nFourier=prm["n_fourier"], eta2=prm["eta2"], eta3=prm["eta3"],
        zeta=prm["zeta"], rcut=prm["rcut"], acut=prm["acut"],
        two_body_decay=prm["two_body_decay"], three_body_decay=prm["three_body_decay"],
        three_body_weight=prm["three_body_weight"], gradients=True)
    np.testing.assert_allclose(x[0].numpy(), ref.reshape(-1), rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(J[0].numpy(), grad.reshape(J.shape[1:]), rtol=0,
                               atol=1e-11 * np.abs(grad).max())


@pytest.mark.parametrize("params", [None, TWO_FOURIER], ids=["defaults", "short"])
def test_jacobian_matches_finite_differences(ethanol_train, params):
    """J against central differences; the forward-mode jvp (no J) against J dR."""
    desc = FCHL19Descriptor(ethanol_train.z, params)
    R = torch.as_tensor(ethanol_train.R[:3])
    x, J = desc(R)
    assert x.shape == (3, 9 * desc.nrep) and J.shape == (3, 9 * desc.nrep, 27)
    h = 1e-5
    for b in range(3):
        fd = torch.zeros_like(J[b])
        for k in range(27):
            dR = torch.zeros(27, dtype=torch.float64)
            dR[k] = h
            plus = desc(R[b] + dR.reshape(9, 3))[0]
            minus = desc(R[b] - dR.reshape(9, 3))[0]
            fd[:, k] = (plus - minus) / (2 * h)
        assert (fd - J[b]).abs().max() < 1e-8 * J[b].abs().max()
    dR = torch.as_tensor(np.random.default_rng(1).normal(size=R.shape))
    xj, dx = desc.jvp(R, dR, chunk=2)                           # forward mode, without J
    assert (xj - x).abs().max() <= 1e-14 * x.abs().max()
    ref = torch.einsum("bdk,bk->bd", J, dR.flatten(1))
    assert (dx - ref).abs().max() < 1e-12 * ref.abs().max()


def test_invariances(ethanol_train):
    """Rigid motions leave x unchanged; permuting equal atoms permutes x's atom blocks."""
    desc = FCHL19Descriptor(ethanol_train.z)
    R = ethanol_train.R[11]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    x = desc(torch.as_tensor(R))[0]
    moved = desc(torch.as_tensor(R @ q.T + np.array([1.0, -2.0, 0.5])))[0]
    assert (moved - x).abs().max() < 1e-12 * x.abs().max()
    perm = np.array([0, 1, 2, 4, 3, 5, 7, 6, 8])                  # swaps of H atoms 3-4, 6-7
    assert np.array_equal(ethanol_train.z[perm], ethanol_train.z)
    xp = desc(torch.as_tensor(R[perm]))[0].reshape(9, -1)
    assert torch.allclose(xp, x.reshape(9, -1)[perm], rtol=0, atol=1e-14)


def test_collinear_triplet_is_refused(ethanol_train):
    R = ethanol_train.R[0].copy()
    R[2] = 2 * R[1] - R[0]                       # atom 1 midway between atoms 0 and 2
    with pytest.raises(ValueError, match="collinear"):
        FCHL19Descriptor(ethanol_train.z)(torch.as_tensor(R))


def test_parameter_errors():
    assert check_params(None) == DEFAULTS
    assert check_params({"n_rs2": np.int64(12), "rcut": 5})["n_rs2"] == 12
    for bad in ({"n_rs2": 0}, {"n_rs3": 2.5}, {"n_rs3": "20"}, {"eta2": -1.0},
                {"rcut": float("nan")}, {"eta3": "2.7"}, {"acut": None}, {"zeta": -0.1},
                {"nRs2": 24}):
        with pytest.raises(ValueError, match="FCHL19 parameter"):
            check_params(bad)
    with pytest.raises(ValueError, match="inverse-distance"):
        SGDML(fchl19={"rcut": 5.0})
    with pytest.raises(ValueError, match="descriptor must be one of"):
        SGDML(descriptor="soap")


@pytest.fixture(scope="module")
def small_fchl(ethanol_train):
    return ethanol_train.subset(np.arange(0, 1000, 50))             # 20 frames


@pytest.mark.parametrize("use_energies", [False, True])
def test_long_descriptor_path_matches_dense_and_explicit(small_fchl, use_energies):
    """With D ≥ S·r the training kernel is assembled by GEMMs on JP laid out (D, M·S·r); it must
    equal the explicit-difference path and the model evaluated at the training frames
    (matvec, early contraction)."""
    R = torch.as_tensor(small_fchl.R)
    perms = torch.as_tensor(find_permutations(small_fchl.R, small_fchl.z, progress=False)).long()
    op = TrainingKernel(R, perms, get_kernel("rbf"), 3.0, FCHL19Descriptor(small_fchl.z, TWO_FOURIER),
                        1e-8, use_energies=use_energies, block=3)
    assert op._JPt is not None and len(perms) == 6
    K = op.assemble(progress=False)
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(op.matvec(V), K @ V, rtol=0, atol=1e-10 * (K @ V).abs().max())
    op._JPt = None                                                    # the explicit path
    K2 = op.assemble(progress=False)
    assert torch.allclose(K, K2, rtol=0, atol=1e-12 * K.abs().max())
    # and the inverse-distance descriptor through the GEMM path (D = 36 ≥ S·r with S = 1)
    ident = perms[:1]
    op = TrainingKernel(R, ident, get_kernel("matern52"), 8.0, InverseDistance(0.7), 1e-8,
                        use_energies=use_energies, block=3)
    assert op._JPt is not None
    K = op.assemble(progress=False)
    op._JPt = None
    assert torch.allclose(K, op.assemble(progress=False), rtol=0, atol=1e-12 * K.abs().max())


@pytest.mark.parametrize("kernel", ["rbf", "matern52"])
def test_fchl19_model_fits_is_conservative_and_round_trips(small_fchl, ethanol_test, kernel,
                                                           tmp_path):
    model = SGDML(sigma=10.0, kernel=kernel, descriptor="fchl19", lam=1e-10,
                  progress=False).fit(small_fchl)
    assert model.R_desc.shape == (20, 9 * 312) and len(model.perms) == 6
    E, F = model.predict(small_fchl.R)
    assert np.abs(F - small_fchl.F).max() < 1e-2 * np.abs(small_fchl.F).max()
    R = ethanol_test.R[3]
    fd = finite_difference_forces(lambda r: model.predict(r)[0], R, h=1e-3)
    assert np.abs(fd - model.predict(R)[1]).max() < 1e-6 * np.abs(fd).max()
    # symmetric: swapping equivalent atoms leaves the energy unchanged
    perm = model.perms[1]
    assert model.predict(R[perm])[0] == pytest.approx(model.predict(R)[0], rel=1e-12)
    # the compact file: training geometries and force coefficients, far smaller than the rows
    path = tmp_path / "m.gpff"
    model.save(path)
    assert set(_tensors(path)) == {"z", "perms", "R_train", "alpha", "alpha_E"}
    assert path.stat().st_size < 0.1 * 2 * model.R_desc.nbytes
    assert model.alpha.shape == model.R_train.shape == small_fchl.R.shape
    loaded = gpff.load(path)
    assert (loaded.descriptor, loaded.fchl19) == ("fchl19", DEFAULTS)
    np.testing.assert_array_equal(loaded.R_train, model.R_train)
    np.testing.assert_array_equal(loaded.alpha, model.alpha)
    (E1, F1), (E0, F0) = loaded.predict(ethanol_test.R[:3]), model.predict(ethanol_test.R[:3])
    np.testing.assert_allclose(E1, E0, rtol=1e-12, atol=0)
    assert np.abs(F1 - F0).max() < 1e-12 * np.abs(F0).max()


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _rewrite(src, dst, change):
    """Copy the model file `src` to `dst` with its gpff metadata and tensors changed by
    `change(meta, tensors)` (both dicts, changed in place)."""
    from safetensors.numpy import save_file
    from safetensors import safe_open

    with safe_open(src, "np") as f:
        meta = json.loads(f.metadata()["gpff"])
    tensors = _tensors(src)
    change(meta, tensors)
    save_file(tensors, dst, metadata={"gpff": json.dumps(meta)})


def _set(name, index, value):
    """A `change` for :func:`_rewrite`: tensors[name][index] = value."""
    def change(meta, tensors):
        tensors[name][index] = value
    return change


def _swap_layout(meta, tensors):
    """The fchl19 rows stored as an inverse-distance file stores them (the layout before the
    compact one): R_desc and R_d_desc_alpha instead of R_train and alpha."""
    R, alpha = (torch.as_tensor(tensors.pop(k)) for k in ("R_train", "alpha"))
    x, v = training_rows(FCHL19Descriptor(tensors["z"]), R, alpha)
    tensors.update(R_desc=x.numpy(), R_d_desc_alpha=v.numpy())


def _huge(meta, tensors):
    """FCHL19 parameters with D = 9 · 120 030 000 and M = 2000 copies of the frames: rows of
    ~35 TB that the 1 MB file does not back (the core refuses before allocating them)."""
    meta.update(fchl19_n_rs2=10000, fchl19_n_rs3=10000, fchl19_n_fourier=1000, n_train=2000)
    for name in ("R_train", "alpha", "alpha_E"):
        tensors[name] = np.resize(tensors[name], (2000,) + tensors[name].shape[1:])


def test_bad_fchl19_model_files(small_fchl, tmp_path):
    """Bad metadata (Python's loader) and bad compact tensors (Python's loader and the C++ core):
    ModelFileError naming the file, the tensor and, for a frame's geometry, the frame."""
    model = SGDML(sigma=10.0, kernel="rbf", descriptor="fchl19", progress=False).fit(small_fchl)
    good = tmp_path / "good.gpff"
    model.save(good)
    meta_cases = {
        "eta": (lambda m, t: m.update(fchl19_eta2=-0.3), "eta2"),
        "unknown": (lambda m, t: m.update(fchl19_bogus=1.0), "bogus"),
        "descriptor": (lambda m, t: m.update(descriptor="soap"), "descriptor must be one of"),
    }
    for name, (change, message) in meta_cases.items():
        bad = tmp_path / f"{name}.gpff"
        _rewrite(good, bad, change)
        with pytest.raises(ModelFileError, match=message):
            gpff.load(bad)

    R = model.R_train
    collinear = 2 * R[2, 1] - R[2, 0]            # atom 2 on the line of atoms 0 and 1 in frame 2
    cases = {     # change, phrase of Python's error, phrase of the core's error
        "old_layout": (_swap_layout, "tensor 'R_desc' does not belong in a model with descriptor 'fchl19'",
                       "tensor 'R_desc' does not belong in a model with descriptor 'fchl19'"),
        "missing": (lambda m, t: t.pop("alpha"), "missing alpha", "missing tensor 'alpha'"),
        "shape": (lambda m, t: t.update(R_train=t["R_train"][:, :, :2].copy()),
                  "inconsistent tensor shapes",
                  "tensor 'R_train' has shape (20, 9, 2), expected (M, N, 3) = (20, 9, 3)"),
        "alpha_shape": (lambda m, t: t.update(alpha=t["alpha"][:, :8].copy()),
                        "inconsistent tensor shapes",
                        "tensor 'alpha' has shape (20, 8, 3), expected (M, N, 3) = (20, 9, 3)"),
        "n_train": (lambda m, t: m.update(n_train=21), None,
                    "metadata n_train = 21 but tensor 'R_train' has shape (20, 9, 3)"),
        "huge": (_huge, None, "GB to rebuild the training rows, more than this machine's"),
        "nan": (_set("alpha", (3, 4, 1), np.nan), "tensor 'alpha' contains non-finite values",
                "tensor 'alpha' contains non-finite values"),
        "inf": (_set("R_train", (0, 0, 0), np.inf), "tensor 'R_train' contains non-finite values",
                "tensor 'R_train' contains non-finite values"),
        "coincident": (_set("R_train", (2, 5), R[2, 3]), "tensor 'R_train': atoms 5 and 3 of frame 2 coincide",
                       "tensor 'R_train': atoms 5 and 3 of frame 2 coincide"),
        "collinear": (_set("R_train", (2, 2), collinear), "tensor 'R_train', frame 2: ",
                      "tensor 'R_train', frame 2: "),
    }
    for name, (change, python_phrase, core_phrase) in cases.items():
        bad = tmp_path / f"{name}.gpff"
        _rewrite(good, bad, change)
        if python_phrase is not None:
            check_load_error(gpff.load, bad, python_phrase)
        message = check_load_error(_core.SGDMLModel, bad, core_phrase)
        assert name != "collinear" or "collinear" in message


def test_inverse_distance_file_refuses_the_compact_tensors(small_fchl, tmp_path):
    """An inverse-distance file stores its rows: R_train and alpha there are refused by both
    readers (a file never has two sources of its rows)."""
    model = SGDML(sigma=10.0, use_sym=False, progress=False).fit(small_fchl.subset(range(5)))
    good = tmp_path / "inverse.gpff"
    model.save(good)
    assert set(_tensors(good)) == {"z", "perms", "R_desc", "R_d_desc_alpha", "alpha_E"}
    bad = tmp_path / "both.gpff"
    _rewrite(good, bad, lambda m, t: t.update(R_train=model.R_train, alpha=model.alpha))
    phrase = "tensor 'R_train' does not belong in a model with descriptor 'inverse_distance'"
    check_load_error(gpff.load, bad, phrase)
    check_load_error(_core.SGDMLModel, bad, phrase)


def test_core_rebuilds_rows_by_forward_mode(ethanol_train, ethanol_test, tmp_path):
    """The C++ core rebuilds v_m = J(R_m) α_m from R_train and alpha by forward-mode
    differentiation (FCHL19::jvp). With random coefficients on real rMD17 frames and parameters
    whose cutoffs fall inside the molecule (two Fourier orders): Python's J(R_m) α_m equals the
    central difference of x along α_m, and the core loading the file predicts what the Python
    model with those rows predicts, to 1e-10, at the training frames and at test frames (the
    energy sums u·v_m over every descriptor entry, the forces contract v_m with J(R)ᵀ)."""
    R = ethanol_train.R[[0, 300, 600]]
    alpha = np.random.default_rng(0).normal(size=R.shape)
    desc = FCHL19Descriptor(ethanol_train.z, TWO_FOURIER)
    x, v = training_rows(desc, torch.as_tensor(R), torch.as_tensor(alpha))
    h = 1e-5
    for m in range(len(R)):
        step = torch.as_tensor(h * alpha[m])
        fd = (desc(torch.as_tensor(R[m]) + step)[0] - desc(torch.as_tensor(R[m]) - step)[0]) / (2 * h)
        assert (fd - v[m]).abs().max() < 1e-8 * v[m].abs().max()

    model = SGDML(sigma=3.0, kernel="rbf", descriptor="fchl19", fchl19=TWO_FOURIER,
                  perms=[list(range(9)), [0, 1, 2, 4, 3, 5, 7, 6, 8]], progress=False)
    model.z, model.R_train, model.alpha = ethanol_train.z.astype(np.int32), R, alpha
    model.R_desc, model.R_d_desc_alpha = x.numpy(), v.numpy()
    model.energy_unit, model.integration_constant, model.molecule_extent = "kcal/mol", 0.0, 3.0
    path = tmp_path / "random_alpha.gpff"
    model.save(path)
    core = _core.SGDMLModel(str(path))
    assert (core.n_train, core.n_perms, core.n_desc) == (3, 2, 9 * desc.nrep)
    queries = np.concatenate([R, ethanol_test.R[:5]])
    E, F = model.predict(queries)
    assert np.abs(E).min() > 1e-3 * np.abs(E).max()          # every query sees the rows
    for q in range(len(queries)):
        e, f, _ = core.compute(queries[q])
        assert e == pytest.approx(E[q], rel=1e-10)
        assert np.abs(f - F[q]).max() < 1e-10 * np.abs(F[q]).max()


@pytest.mark.parametrize("kernel", ["rbf", "matern52"])
def test_ad_kernel_matches_fast_path_on_fchl19(small_fchl, kernel):
    """The AD-derived training kernel (gpff.ad_kernels) on the FCHL19 descriptor equals the
    hand-derived GEMM path to 1e-10, energies included."""
    from gpff.ad_kernels import ADTrainingKernel, get_scalar_kernel

    train = small_fchl.subset(np.arange(6))
    R = torch.as_tensor(train.R)
    perms = torch.as_tensor(find_permutations(small_fchl.R, small_fchl.z, progress=False)).long()
    desc = FCHL19Descriptor(train.z, SHORT)
    fast = TrainingKernel(R, perms, get_kernel(kernel), 3.0, desc, 1e-8, True, block=4)
    ad = ADTrainingKernel(R, perms, get_scalar_kernel(kernel), 3.0, desc, 1e-8, True, block=4)
    K, Kad = fast.assemble(progress=False), ad.assemble(progress=False)
    assert torch.allclose(Kad, K, rtol=0, atol=1e-10 * K.abs().max())
