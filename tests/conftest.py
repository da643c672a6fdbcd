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
