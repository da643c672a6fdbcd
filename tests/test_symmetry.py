"""Permutational symmetries: gpff's multi-partite matching vs the PyPI sgdml 1.0.3 package."""

import json
import os
import pathlib
import subprocess

import numpy as np

from gpff.symmetry import find_permutations

from conftest import ETHANOL_TRAIN, ROOT

SGDML_PYTHON = os.environ.get("GPFF_SGDML_PYTHON", str(ROOT / ".venv-sgdml" / "bin" / "python"))

_SGDML_SCRIPT = """
import json, sys, numpy as np
from sgdml.utils import perm
d = np.load(sys.argv[1])
p = perm.find_perms(d['coords'], d['nuclear_charges'], max_processes=1)
print(json.dumps(p.tolist()))
"""


def test_ethanol_symmetries_match_sgdml(ethanol_train):
    assert pathlib.Path(SGDML_PYTHON).exists(), (
        f"{SGDML_PYTHON} missing: setup.sh creates the sgdml 1.0.3 reference environment")
    out = subprocess.run([SGDML_PYTHON, "-c", _SGDML_SCRIPT, str(ETHANOL_TRAIN)], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    theirs = {tuple(p) for p in json.loads(out.strip().splitlines()[-1])}
    ours = find_permutations(ethanol_train.R, ethanol_train.z, progress=False)
    assert len(theirs) == 6
    assert {tuple(p) for p in ours.tolist()} == theirs
    np.testing.assert_array_equal(ours[0], np.arange(9))


def test_symmetries_form_a_group_of_equal_elements(ethanol_train):
    perms = find_permutations(ethanol_train.R[:50], ethanol_train.z, progress=False)
    group = {tuple(p) for p in perms.tolist()}
    for p in perms:
        np.testing.assert_array_equal(ethanol_train.z[p], ethanol_train.z)
        for q in perms:
            assert tuple(p[q]) in group
