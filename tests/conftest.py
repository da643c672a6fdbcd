"""Shared fixtures: the bundled rMD17 ethanol data and a small trained sGDML model."""

import os
import pathlib

import numpy as np
import pytest

import gpff

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "rmd17"
ETHANOL_TRAIN = DATA / "rmd17_ethanol_train_01.npz"
ETHANOL_TEST = DATA / "rmd17_ethanol_test_01.npz"


def finite_difference_forces(energy, R, h=1e-4):
    """-dE/dR of `energy` (a function of positions (N, 3)) by the 4th-order central stencil."""
    F = np.zeros_like(R)
    for a in range(R.shape[0]):
        for c in range(3):
            e = []
            for step in (-2, -1, 1, 2):
                Rs = R.copy()
                Rs[a, c] += step * h
                e.append(energy(Rs))
            F[a, c] = -(e[0] - 8 * e[1] + 8 * e[2] - e[3]) / (12 * h)
    return F


@pytest.fixture(scope="session")
def ethanol_train():
    return gpff.load_dataset(ETHANOL_TRAIN)


@pytest.fixture(scope="session")
def ethanol_test():
    return gpff.load_dataset(ETHANOL_TEST)


@pytest.fixture(scope="session")
def ethanol_model(ethanol_train):
    """sGDML model (σ = 10, 6 symmetries, forces only) trained on 200 frames of rMD17 ethanol
    split 01."""
    idx = np.random.default_rng(0).choice(ethanol_train.n_frames, 200, replace=False)
    return gpff.SGDML(sigma=10.0, use_energies=False,
                      progress=False).fit(ethanol_train.subset(np.sort(idx)))


@pytest.fixture(scope="session")
def ethanol_model_path(ethanol_model, tmp_path_factory):
    """Path of `ethanol_model` saved as a .gpff file (kcal/mol, Å)."""
    path = tmp_path_factory.mktemp("models") / "ethanol.gpff"
    ethanol_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def sgdml_model_path(ethanol_model_path):
    return ethanol_model_path


# ---- mapped force fields (model kind "mff", docs/mff.md) ------------------------------------------

MFF_SPECIES = ["Si", "C"]


def lj_g2(a, b, r):
    """Lennard-Jones pair function g2 (eV), minimum at 2.36 Å; per-species well depths."""
    eps = {"Si": 0.4, "C": 0.6}
    x = (2.1 / np.asarray(r)) ** 6
    return 4.0 * np.sqrt(eps[a] * eps[b]) * (x * x - x)


def sw_g3(c, j, k, r_cj, r_ck, r_jk):
    """Stillinger-Weber-like 3-body function g3 (eV): (cos θ_jck + 1/3)² with a radial decay,
    species weights, and a small term in r_jk; symmetric under (j, r_cj) <-> (k, r_ck)."""
    w = {"Si": 1.0, "C": 0.7}
    cos = (r_cj ** 2 + r_ck ** 2 - r_jk ** 2) / (2.0 * r_cj * r_ck)
    return (1.5 * w[c] * w[j] * w[k] * (cos + 1.0 / 3.0) ** 2 * np.exp(-(r_cj + r_ck) / 2.5)
            + 0.02 * w[j] * w[k] * np.exp(-r_jk))


def make_mff(path, species=MFF_SPECIES, order=3, energy_unit="eV", cutoff=5.0,
             cutoff_3body=4.0, cutoff_width=1.0, r_min=1.5, n_points=300, n_points_3body=12):
    """Map lj_g2 (and sw_g3 for order 3) with gpff.mapping onto B-spline tables and save the
    model to `path` (docs/mff.md). Returns the MappedForceField (its .predict is the Python
    reference evaluation). Energy offsets -1.5, -2.5, ... per species."""
    from gpff.mapping import map_functions

    model = map_functions(list(species), lj_g2, sw_g3 if order == 3 else None, cutoff=cutoff,
                          cutoff_3body=cutoff_3body if order == 3 else None,
                          cutoff_width=cutoff_width, r_min=r_min,
                          energy_offsets=[-1.5 - k for k in range(len(species))],
                          energy_unit=energy_unit, n_points=n_points,
                          n_points_3body=n_points_3body)
    model.save(str(path))
    return model


def mff_core_compute(core, atoms):
    """(energy, energies, forces, virial, atom_virial) of ase.Atoms from a gpff._core.MFFModel,
    the neighbour list (all images within core.max_cutoff) from ase.neighborlist."""
    from ase.neighborlist import neighbor_list

    species = np.array([core.species.index(s) for s in atoms.get_chemical_symbols()],
                       dtype=np.int32)
    i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
    return core.compute(species, i, j, D)


def rewrite_model_file(src, dst, change):
    """Copy the .gpff file `src` to `dst` with change(meta, tensors) applied to its metadata
    document and tensors (dict of numpy arrays); returns str(dst)."""
    import json
    import struct

    from safetensors.numpy import load_file, save_file

    with open(src, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["gpff"])
    tensors = load_file(str(src))
    change(meta, tensors)
    save_file(tensors, str(dst), metadata={"gpff": json.dumps(meta)})
    return str(dst)


@pytest.fixture(scope="session")
def mff3_path(tmp_path_factory):
    """Si/C 2-body + 3-body mapped model (eV; r_c 5 Å, r_c3 4 Å, d 1 Å)."""
    path = tmp_path_factory.mktemp("mff") / "sic3.gpff"
    make_mff(path)
    return str(path)


@pytest.fixture(scope="session")
def mff2_path(tmp_path_factory):
    """Si/C 2-body mapped model (eV; r_c 5 Å, d 1 Å)."""
    path = tmp_path_factory.mktemp("mff") / "sic2.gpff"
    make_mff(path, order=2)
    return str(path)
