"""The exact sGDML model in Python: physics, symmetries, consistency, file round trip."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import gpff
from gpff.sgdml import SGDML

from conftest import finite_difference_forces


def test_forces_are_minus_energy_gradient(ethanol_model, ethanol_test):
    for R in ethanol_test.R[:3]:
        _, F = ethanol_model.predict(R)
        fd = finite_difference_forces(lambda r: ethanol_model.predict(r)[0], R)
        assert np.abs(fd - F).max() / np.abs(F).max() < 1e-6


def test_rotation_translation_invariance(ethanol_model, ethanol_test):
    R = ethanol_test.R[5]
    E, F = ethanol_model.predict(R)
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    E2, F2 = ethanol_model.predict(R @ rot.T + np.array([3.0, -7.0, 11.0]))
    assert E2 == pytest.approx(E, rel=1e-12, abs=1e-9)
    assert np.abs(F2 - F @ rot.T).max() < 1e-9 * np.abs(F).max()


def test_permutation_invariance(ethanol_model, ethanol_test):
    R = ethanol_test.R[7]
    E, F = ethanol_model.predict(R)
    assert len(ethanol_model.perms) == 6
    for p in ethanol_model.perms:
        Ep, Fp = ethanol_model.predict(R[p])
        assert Ep == pytest.approx(E, rel=1e-12, abs=1e-9)
        assert np.abs(Fp - F[p]).max() < 1e-9 * np.abs(F).max()


def test_training_forces_reproduced(ethanol_train):
    """K α = F on the training set: the kernel matrix and the early-contraction predictor agree."""
    train = ethanol_train.subset(np.arange(0, 300, 10))
    model = SGDML(sigma=10.0, lam=1e-12, use_energies=False, progress=False).fit(train)
    _, F = model.predict(train.R)
    assert np.abs(F - train.F).max() / np.abs(train.F).max() < 1e-5


def test_plain_gdml_has_identity_only(ethanol_train):
    model = SGDML(sigma=10.0, use_sym=False, progress=False).fit(ethanol_train.subset(range(20)))
    np.testing.assert_array_equal(model.perms, np.arange(9)[None])


def test_accuracy_and_integration_constant(ethanol_model, ethanol_test):
    E, F = ethanol_model.predict(ethanol_test.R[:200])
    assert np.mean(np.abs(F - ethanol_test.F[:200])) < 1.2      # kcal/mol/Å, 200 training frames
    assert np.mean(np.abs(E - ethanol_test.E[:200])) < 0.3      # kcal/mol


def test_save_load_round_trip(ethanol_model, ethanol_model_path, ethanol_test):
    from safetensors import safe_open

    loaded = gpff.load(ethanol_model_path)
    E1, F1 = ethanol_model.predict(ethanol_test.R[:10])
    E2, F2 = loaded.predict(ethanol_test.R[:10])
    np.testing.assert_array_equal(E1, E2)
    np.testing.assert_array_equal(F1, F2)
    with safe_open(ethanol_model_path, framework="numpy") as fh:
        assert set(fh.keys()) == {"z", "perms", "R_desc", "R_d_desc_alpha"}
        assert "gpff" in fh.metadata()


def test_predict_rejects_wrong_atom_count(ethanol_model):
    with pytest.raises(gpff.SpeciesError, match="9-atom model"):
        ethanol_model.predict(np.zeros((8, 3)))


def test_save_is_atomic(ethanol_model, tmp_path, monkeypatch):
    import safetensors.numpy

    target = tmp_path / "m.gpff"
    target.write_bytes(b"previous model")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError):
        ethanol_model.save(target)
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gpff"]


_MEMORY_PROBE = """
import resource, sys
import numpy as np, gpff
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
train = gpff.load_dataset(sys.argv[1]).subset(np.arange(300))
gpff.SGDML(sigma=10.0, perms=np.arange(9)[None], use_energies=False, progress=False).fit(train)  # warm-up
base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
open('/proc/self/clear_refs', 'w').write('5')      # reset the peak (VmHWM) to the current RSS
gpff.SGDML(sigma=10.0, use_energies=False, progress=False).fit(train)
print(base, status('VmHWM:'))
"""


def test_peak_memory_is_one_kernel_matrix():
    """Training holds one (3NM)² kernel matrix, factorised in place: peak ≤ 1.3 × the matrix
    (the peak of the second fit alone: VmHWM reset after the warm-up fit)."""
    import subprocess
    import sys

    from conftest import ETHANOL_TRAIN

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(ETHANOL_TRAIN)], check=True,
                         capture_output=True, text=True).stdout.split()
    base, peak = int(out[-2]), int(out[-1])
    matrix = (27 * 300) ** 2 * 8
    assert peak - base <= 1.3 * matrix, f"peak {peak/1e9:.2f} GB, base {base/1e9:.2f} GB"


def test_saved_file_has_the_usual_mode(ethanol_model, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        ethanol_model.save(tmp_path / "m.gpff")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.gpff").stat().st_mode & 0o777 == 0o644
