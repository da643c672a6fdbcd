"""Dataset reading: formats, units, and a clear DatasetError for every malformed input."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

import gpff
from gpff.data import split_indices

from conftest import ETHANOL_TRAIN


def _rmd17_arrays():
    with np.load(ETHANOL_TRAIN) as d:
        return {k: d[k][:5] if d[k].ndim > 1 or k == "energies" else d[k]
                for k in ("nuclear_charges", "coords", "energies", "forces")}


def test_rmd17_units_and_shapes(ethanol_train):
    assert ethanol_train.R.shape == (1000, 9, 3) and ethanol_train.F.shape == (1000, 9, 3)
    assert ethanol_train.energy_unit == "kcal/mol" and ethanol_train.length_unit == "Angstrom"
    assert len(ethanol_train.sha256) == 64


def test_sgdml_npz_and_extxyz_read_the_same_frames(tmp_path):
    d = _rmd17_arrays()
    np.savez(tmp_path / "sgdml.npz", z=d["nuclear_charges"], R=d["coords"], E=d["energies"][:, None],
             F=d["forces"], e_unit="kcal/mol", r_unit="Ang")
    a = gpff.load_dataset(tmp_path / "sgdml.npz")
    np.testing.assert_array_equal(a.E, d["energies"])
    frames = []
    for R, E, F in zip(d["coords"], d["energies"], d["forces"]):
        at = Atoms(numbers=d["nuclear_charges"], positions=R)
        at.calc = SinglePointCalculator(at, energy=E, forces=F)
        frames.append(at)
    write(tmp_path / "x.extxyz", frames)
    b = gpff.load_dataset(tmp_path / "x.extxyz", energy_unit="kcal/mol")
    assert b.energy_unit == "kcal/mol"
    np.testing.assert_allclose(b.R, a.R, atol=1e-7)
    np.testing.assert_allclose(b.F, a.F, atol=1e-7)
    assert gpff.load_dataset(tmp_path / "x.extxyz").energy_unit == "eV"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["forces"].__setitem__((2, 3, 1), np.nan), r"forces contain NaN or inf in frame\(s\) \[2\]"),
    (lambda d: d["coords"].__setitem__((4, 0, 0), np.inf), r"positions contain NaN or inf in frame\(s\) \[4\]"),
    (lambda d: d.__setitem__("forces", d["forces"][:3]), "forces have shape"),
    (lambda d: d.__setitem__("energies", d["energies"][:2]), "energies have shape"),
    (lambda d: d.__setitem__("coords", d["coords"][:, :8]), "positions must have shape"),
    (lambda d: d.pop("coords"), "neither rMD17 keys"),
])
def test_malformed_npz(tmp_path, mutate, message):
    d = _rmd17_arrays()
    mutate(d)
    path = tmp_path / "bad.npz"
    np.savez(path, **d)
    with pytest.raises(gpff.DatasetError, match=message) as err:
        gpff.load_dataset(path)
    assert str(path) in str(err.value)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(gpff.DatasetError, match="no such file"):
        gpff.load_dataset(tmp_path / "nope.npz")
    (tmp_path / "g.npz").write_bytes(b"not a zip file")
    with pytest.raises(gpff.DatasetError, match="not a readable npz"):
        gpff.load_dataset(tmp_path / "g.npz")
    (tmp_path / "g.xyz").write_text("3\nbroken\nH 0 0\n")
    with pytest.raises(gpff.DatasetError, match="ASE cannot read"):
        gpff.load_dataset(tmp_path / "g.xyz")


def test_atom_order_change_between_frames(tmp_path):
    d = _rmd17_arrays()
    frames = []
    for k, (R, E, F) in enumerate(zip(d["coords"], d["energies"], d["forces"])):
        z = d["nuclear_charges"][::-1] if k == 3 else d["nuclear_charges"]
        at = Atoms(numbers=z, positions=R)
        at.calc = SinglePointCalculator(at, energy=E, forces=F)
        frames.append(at)
    write(tmp_path / "x.extxyz", frames)
    with pytest.raises(gpff.DatasetError, match="frame 3 has different atoms or atom order"):
        gpff.load_dataset(tmp_path / "x.extxyz")


def test_unknown_unit(tmp_path):
    with pytest.raises(gpff.DatasetError, match="unknown energy unit 'furlong'"):
        gpff.load_dataset(ETHANOL_TRAIN, energy_unit="furlong")


def test_split_indices_disjoint():
    a, b = split_indices(100, [60, 30], seed=3)
    assert len(a) == 60 and len(b) == 30 and not set(a) & set(b)
    with pytest.raises(gpff.DatasetError, match="cannot draw 60 \\+ 50 frames from 100"):
        split_indices(100, [60, 50])
