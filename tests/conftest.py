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


@pytest.fixture(scope="session")
def ethanol_train():
    return gpff.load_dataset(ETHANOL_TRAIN)


@pytest.fixture(scope="session")
def ethanol_test():
    return gpff.load_dataset(ETHANOL_TEST)


@pytest.fixture(scope="session")
def ethanol_model(ethanol_train):
    """sGDML model (σ = 10, 6 symmetries) trained on 200 frames of rMD17 ethanol split 01."""
    idx = np.random.default_rng(0).choice(ethanol_train.n_frames, 200, replace=False)
    return gpff.SGDML(sigma=10.0, progress=False).fit(ethanol_train.subset(np.sort(idx)))


@pytest.fixture(scope="session")
def ethanol_model_path(ethanol_model, tmp_path_factory):
    """Path of `ethanol_model` saved as a .gpff file (kcal/mol, Å)."""
    path = tmp_path_factory.mktemp("models") / "ethanol.gpff"
    ethanol_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def sgdml_model_path(ethanol_model_path):
    return ethanol_model_path
