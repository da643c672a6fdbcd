"""The C++ core's mapped force field (gpff._core.MFFModel, plugin/core/mff.cpp; docs/mff.md).

Models are produced by gpff.mapping from analytic functions (conftest: a Lennard-Jones g2 and a
Stillinger-Weber-like g3). The core is checked against the Python reference evaluation of the
same tables (MappedForceField.predict), finite differences of its own energy (forces, and the
virial as the strain derivative), and every kind of broken file or input against clear errors.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from ase import Atoms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpff import _core
from gpff.errors import SpeciesError

from conftest import (MFF_CONFIGS, check_load_error, cluster, finite_difference_forces,
                      load_fuzzed, make_mff, mff_core_compute, raw_safetensors,
                      rewrite_model_file, si_cell, split_file)


# ---- configurations --------------------------------------------------------------------------

CONFIGS = MFF_CONFIGS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{order: (core, python reference)} for the Si/C test models of conftest; orders "2e", "3e"
    have the embedding term as well."""
    from gpff.modelfile import load

    d = tmp_path_factory.mktemp("mffcore")
    out = {}
    for order in (2, 3, "2e", "3e"):
        path = d / f"sic{order}.gpff"
        make_mff(path, order=int(str(order)[0]), embedding=str(order).endswith("e"))
        out[order] = (_core.MFFModel(str(path)), load(str(path)))
    return out


def energy_fn(core, atoms):
    def energy(R):
        a = atoms.copy()
        a.positions = R
        return mff_core_compute(core, a)[0]
    return energy


# ---- properties --------------------------------------------------------------------------------

def test_properties(models, mff3_path, mff2_path):
    core3 = _core.MFFModel(mff3_path)
    assert core3.species == ["Si", "C"]
    assert core3.order == 3
    assert (core3.cutoff, core3.cutoff_3body, core3.cutoff_width) == (5.0, 4.0, 1.0)
    assert core3.max_cutoff == 5.0
    assert core3.energy_unit == "eV"
    assert core3.units == {"energy": "eV", "length": "Angstrom"}
    assert np.array_equal(core3.energy_offsets, [-1.5, -2.5])
    assert core3.path == mff3_path
    assert core3.n_coefficients > 0
    core2 = _core.MFFModel(mff2_path)
    assert core2.order == 2 and core2.cutoff_3body is None and core2.max_cutoff == 5.0
    assert core2.density_decay is None and core3.density_decay is None
    assert models["3e"][0].density_decay == 0.8 and models["2e"][0].max_cutoff == 5.0
    assert _core.MFFModel.kernel_isa() in ("avx2", "baseline")


def test_pathlike(mff2_path):
    import pathlib
    assert _core.MFFModel(pathlib.Path(mff2_path)).order == 2


# ---- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [2, 3, "2e", "3e"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_python_reference(models, order, config):
    """energy, per-atom energies, forces and virial = MappedForceField.predict (<= 1e-9)."""
    core, ref = models[order]
    atoms = CONFIGS[config]()
    e, energies, f, w, aw = mff_core_compute(core, atoms)
    r = ref.predict(atoms)
    assert e == pytest.approx(r["energy"], rel=1e-9, abs=1e-12)
    scale = np.abs(r["forces"]).max()
    assert scale > 0.1                                 # the configuration is not trivial
    assert np.abs(energies - r["energies"]).max() <= 1e-9 * np.abs(r["energies"]).max()
    assert np.abs(f - r["forces"]).max() <= 1e-9 * scale
    assert np.abs(w - r["virial"]).max() <= 1e-9 * np.abs(r["virial"]).max()
    # sums: per-atom energies, per-atom virial; no net force (translation invariance)
    assert energies.sum() == pytest.approx(e, rel=1e-12)
    assert np.abs(aw.sum(axis=0) - w).max() <= 1e-12 * np.abs(w).max()
    assert np.abs(f.sum(axis=0)).max() <= 1e-11 * scale


@pytest.mark.parametrize("order", [2, 3, "2e", "3e"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_finite_difference_forces(models, order, config):
    core, _ = models[order]
    atoms = CONFIGS[config]()
    f = mff_core_compute(core, atoms)[2]
    fd = finite_difference_forces(energy_fn(core, atoms), atoms.positions.copy(), h=1e-4)
    assert np.abs(fd - f).max() <= 1e-6 * np.abs(f).max()


@pytest.mark.parametrize("order", [2, 3, "2e", "3e"])
@pytest.mark.parametrize("config", ["si_cell", "tiny_cell"])
def test_virial_is_strain_derivative(models, order, config):
    """W_ab = -dE/dε_ab under the homogeneous strain r -> r (1 + ε) of cell and atoms."""
    core, _ = models[order]
    atoms = CONFIGS[config]()
    w = mff_core_compute(core, atoms)[3]
    h = 1e-5
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = []
            for s in (-2, -1, 1, 2):
                strained = atoms.copy()
                eps = np.eye(3)
                eps[a, b] += s * h
                strained.set_cell(atoms.cell[:] @ eps, scale_atoms=True)
                e.append(mff_core_compute(core, strained)[0])
            fd[a, b] = -(e[0] - 8 * e[1] + 8 * e[2] - e[3]) / (12 * h)
    expected = fd[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    assert np.abs(w - expected).max() <= 1e-6 * np.abs(w).max()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_three_body_cutoff_beyond_pair_cutoff(tmp_path, config):
    """r_c3 > r_c: matches the Python reference and finite differences."""
    ref = make_mff(tmp_path / "rc3.gpff", cutoff=4.0, cutoff_3body=4.6, cutoff_width=0.8)
    core = _core.MFFModel(str(tmp_path / "rc3.gpff"))
    assert core.max_cutoff == 4.6
    atoms = CONFIGS[config]()
    e, _, f, w, _ = mff_core_compute(core, atoms)
    r = ref.predict(atoms)
    assert e == pytest.approx(r["energy"], rel=1e-9)
    assert np.abs(f - r["forces"]).max() <= 1e-9 * np.abs(r["forces"]).max()
    assert np.abs(w - r["virial"]).max() <= 1e-9 * np.abs(r["virial"]).max()
    fd = finite_difference_forces(energy_fn(core, atoms), atoms.positions.copy(), h=1e-4)
    assert np.abs(fd - f).max() <= 1e-6 * np.abs(f).max()


def test_no_neighbours_gives_energy_offsets(models):
    """Atoms beyond every cutoff: energy = sum of e0, zero forces and virial; an empty neighbour
    list and entries beyond the cutoff are fine."""
    core, _ = models[3]
    atoms = Atoms("SiCSi", positions=[[0, 0, 0], [6, 0, 0], [0, 7, 0]])
    e, energies, f, w, aw = mff_core_compute(core, atoms)
    assert np.array_equal(energies, [-1.5, -2.5, -1.5]) and e == -5.5
    assert not f.any() and not w.any() and not aw.any()
    sp = np.array([0, 1, 0], dtype=np.int32)
    e2 = core.compute(sp, [0, 1], [1, 0], [[6.0, 0, 0], [-6.0, 0, 0]])[0]
    assert e2 == -5.5
    e3, en3, f3, w3, _ = core.compute(np.zeros(0, np.int32), [], [], np.zeros((0, 3)))
    assert e3 == 0.0 and en3.shape == (0,) and f3.shape == (0, 3) and not w3.any()


@pytest.mark.parametrize("order", [2, "2e"])
def test_cutoff_is_smooth(models, order):
    """Energy and force go continuously to zero at r_c: a dimer just inside r_c (with the
    embedding term: F(ρ) → F(0) = 0 as the density ρ → 0)."""
    core, _ = models[order]
    sp = np.array([0, 0], dtype=np.int32)
    for r in (4.999999, 5.0, 5.2):
        e, _, f, _, _ = core.compute(sp, [0, 1], [1, 0], [[r, 0, 0], [-r, 0, 0]])
        assert abs(e + 3.0) < 1e-10 and np.abs(f).max() < 1e-5


def test_index_types_and_dtypes(models):
    """i, j of any integer dtype (ASE gives intp), species int32 or int64, d any float."""
    core, _ = models[3]
    atoms = si_cell()
    ref = mff_core_compute(core, atoms)
    from ase.neighborlist import neighbor_list
    i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
    sp = np.array([core.species.index(s) for s in atoms.get_chemical_symbols()])
    out = core.compute(sp.astype(np.int64), i.astype(np.int32), j.astype(np.int16),
                       D.astype(np.float32).astype(np.float64))
    assert out[0] == pytest.approx(ref[0], rel=1e-6)
    out = core.compute(list(sp), list(i), list(j), D.tolist())
    assert out[0] == ref[0]


def test_threads_give_identical_results(models):
    import threading
    core, _ = models[3]
    atoms = si_cell()
    ref = mff_core_compute(core, atoms)
    results = [None] * 4

    def work(k):
        results[k] = mff_core_compute(core, atoms)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r[0] == ref[0] and np.array_equal(r[2], ref[2])


def test_simd_kernels_agree(models):
    """GPFF_KERNEL=baseline (fresh process) gives the numbers of this process' kernel."""
    core, _ = models[3]
    atoms = si_cell()
    e, _, f, w, _ = mff_core_compute(core, atoms)
    from ase.neighborlist import neighbor_list
    i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
    sp = [core.species.index(s) for s in atoms.get_chemical_symbols()]
    code = ("import sys, json, numpy as np; from gpff import _core; "
            "a = json.loads(sys.argv[2]); m = _core.MFFModel(sys.argv[1]); "
            "r = m.compute(np.array(a[0], np.int32), a[1], a[2], np.array(a[3])); "
            "print(json.dumps([m.kernel_isa(), r[0], r[2].tolist(), r[3].tolist()]))")
    arg = json.dumps([sp, i.tolist(), j.tolist(), D.tolist()])
    for kernel in ("baseline", "avx2"):
        env = dict(os.environ, GPFF_KERNEL=kernel)
        out = subprocess.run([sys.executable, "-c", code, core.path, arg], env=env,
                             capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(core.path))
        isa, e2, f2, w2 = json.loads(out.stdout)
        assert isa in (kernel, "baseline")
        assert e2 == pytest.approx(e, rel=1e-13)
        assert np.abs(np.array(f2) - f).max() <= 1e-12 * np.abs(f).max()
        assert np.abs(np.array(w2) - w).max() <= 1e-12 * np.abs(w).max()


@pytest.mark.parametrize("regrid", ["all", "r_jk", "r_cj_r_ck"])
def test_non_shared_triplet_grids(tmp_path, regrid):
    """One triplet table on its own grid (axes 0/1, axis 2 or all: the per-triplet basis paths
    instead of the shared-grid ones) agrees with the Python reference too."""
    from gpff.bspline import Axis, interpolate
    from gpff.modelfile import load
    from conftest import sw_g3

    ref = make_mff(tmp_path / "a.gpff")
    key = (0, 1, 1)                                   # (Si; C, C)
    old = ref.triplet_tables[key][1]
    axes = (Axis.spanning(1.4, 4.0, 11), Axis.spanning(1.5, 4.1, 13), Axis.spanning(1.5, 8.0, 29))
    if regrid == "r_jk":
        axes = (old[0], old[1], axes[2])
    elif regrid == "r_cj_r_ck":
        axes = (axes[0], axes[1], old[2])
    G = np.stack(np.meshgrid(*[a.nodes for a in axes], indexing="ij"), -1)
    shape = G.shape[:3]
    G = G.reshape(-1, 3)
    coef = interpolate(sw_g3("Si", "C", "C", G[:, 0], G[:, 1], G[:, 2]).reshape(shape))
    ref.triplet_tables[key] = (coef, axes)
    ref.save(str(tmp_path / "b.gpff"))
    core = _core.MFFModel(str(tmp_path / "b.gpff"))
    ref = load(str(tmp_path / "b.gpff"))
    for config in CONFIGS:
        atoms = CONFIGS[config]()
        e, _, f, w, _ = mff_core_compute(core, atoms)
        r = ref.predict(atoms)
        assert e == pytest.approx(r["energy"], rel=1e-9)
        assert np.abs(f - r["forces"]).max() <= 1e-9 * np.abs(r["forces"]).max()


# ---- bad input to compute --------------------------------------------------------------------

def _inputs(core):
    atoms = si_cell()
    from ase.neighborlist import neighbor_list
    i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
    sp = np.array([core.species.index(s) for s in atoms.get_chemical_symbols()], np.int32)
    return sp, i, j, D


def test_species_index_out_of_range(models):
    core, _ = models[3]
    sp, i, j, D = _inputs(core)
    sp[3] = 2
    with pytest.raises(SpeciesError, match=r"species_index must be in 0\.\.1 \(model species Si, C\)"):
        core.compute(sp, i, j, D)
    sp[3] = -1
    with pytest.raises(SpeciesError):
        core.compute(sp, i, j, D)


@pytest.mark.parametrize("change,phrase", [
    (lambda sp, i, j, D: (sp, i, j, D[:, :2]), r"d must have shape \(\d+, 3\)"),
    (lambda sp, i, j, D: (sp, i, j[:-1], D), "i and j must have the same shape"),
    (lambda sp, i, j, D: (sp, i, j, D[:-1]), r"d must have shape"),
    (lambda sp, i, j, D: (sp[:, None], i, j, D), r"species_index must have shape \(N,\)"),
    (lambda sp, i, j, D: (sp.astype(float), i, j, D), "species_index must be integers"),
    (lambda sp, i, j, D: (sp, i.astype(float), j, D), "i must be integers"),
    (lambda sp, i, j, D: (sp, i[::-1].copy(), j, D), "not sorted by centre atom"),
    (lambda sp, i, j, D: (sp, i, np.where(np.arange(len(j)) == 5, 8, j), D),
     r"neighbour list entry 5 \(0, 8\) is out of range for 8 atoms"),
    (lambda sp, i, j, D: (sp, np.where(np.arange(len(i)) == 0, -1, i), j, D), "out of range"),
    (lambda sp, i, j, D: (sp, i, j, np.where(np.arange(len(D))[:, None] == 3, np.nan, D)),
     r"entry 3 .* has a non-finite displacement"),
    (lambda sp, i, j, D: (sp, i, j, np.where(np.arange(len(D))[:, None] == 3, np.inf, D)),
     "non-finite displacement"),
    (lambda sp, i, j, D: (sp, i, j, np.where(np.arange(len(D))[:, None] == 7, 0.0, D)),
     r"atoms 0 and \d+ coincide \(neighbour list entry 7 has distance 0\)"),
])
def test_bad_compute_input(models, change, phrase):
    core, _ = models[3]
    args = change(*_inputs(core))
    with pytest.raises(ValueError, match=phrase):
        core.compute(*args)


def test_coincident_neighbours_of_a_centre_raise(models):
    """Two neighbours at the same place (an incomplete list that hides the pair itself): the
    non-finite result is refused, never returned."""
    core, _ = models[3]
    sp = np.array([0, 0, 0], np.int32)
    d = [[2.3, 0, 0], [2.3, 0, 0]]
    with pytest.raises(ValueError, match="non-finite energy or forces"):
        core.compute(sp, [0, 0], [1, 2], d)


# ---- broken model files ------------------------------------------------------------------------

def check_error(path, phrase):
    return check_load_error(_core.MFFModel, path, phrase)


def _pair(meta, a, b):
    return next(t for t in meta["pair_tables"] if t["species"] == [a, b])


def _triplet(meta, c, j, k):
    return next(t for t in meta["triplet_tables"] if t["species"] == [c, j, k])


BAD_FILES = [
    (lambda m, t: m.update(model="sgdml"), "model kind 'sgdml' is not 'mff'"),
    (lambda m, t: m.update(order=4), "order 4 is not supported (2 or 3)"),
    (lambda m, t: m.update(order="3"), "metadata key 'order' must be an integer"),
    (lambda m, t: m.update(cutoff=0.0), "cutoff must be > 0, got 0"),
    (lambda m, t: m.update(cutoff=-5.0), "cutoff must be > 0, got -5"),
    (lambda m, t: m.pop("cutoff"), "metadata key 'cutoff' is missing"),
    (lambda m, t: m.update(cutoff_3body=0.0), "cutoff_3body must be > 0"),
    (lambda m, t: m.pop("cutoff_3body"), "metadata key 'cutoff_3body' is missing"),
    (lambda m, t: m.update(cutoff_width=0.0), "cutoff_width must be in (0, 4]"),
    (lambda m, t: m.update(cutoff_width=4.5), "cutoff_width must be in (0, 4]"),
    (lambda m, t: m.update(cutoff_width=-1.0), "cutoff_width must be in (0, 4]"),
    (lambda m, t: m.update(units={"energy": "Ry", "length": "Angstrom"}), "energy unit 'Ry'"),
    (lambda m, t: m.update(units={"energy": "eV", "length": "bohr"}), "length unit 'bohr'"),
    (lambda m, t: m.update(species=[]), "species is empty"),
    (lambda m, t: m.update(species=["Si", "Xx"]), "species[1] = 'Xx' is not an element symbol"),
    (lambda m, t: m.update(species=["Si", "Si"]), "species 'Si' is listed twice"),
    (lambda m, t: m.update(species=["Si", "C", "N"]), "energy_offsets must be a list of 3"),
    (lambda m, t: m.update(energy_offsets=[1.0]), "energy_offsets must be a list of 2 numbers"),
    (lambda m, t: m.update(energy_offsets=[1.0, "x"]), "energy_offsets must be numbers"),
    (lambda m, t: m.pop("energy_offsets"), "metadata key 'energy_offsets' is missing"),
    (lambda m, t: m.pop("pair_tables"), "metadata key 'pair_tables' is missing"),
    (lambda m, t: m.update(pair_tables={}), "pair_tables must be a list"),
    (lambda m, t: m["pair_tables"].pop(1), "no pair table for species pair Si-C"),
    (lambda m, t: m["pair_tables"].append(dict(m["pair_tables"][0])), "two pair tables for Si-Si"),
    (lambda m, t: _pair(m, "Si", "C").update(species=["C", "Si"]),
     "pair table C-Si: species must be in model order (Si-C)"),
    (lambda m, t: _pair(m, "Si", "C").update(species=["Si", "N"]),
     "pair_tables[1]: species 'N' is not one of the model's species (Si C)"),
    (lambda m, t: _pair(m, "Si", "C").update(species=["Si"]), "'species' must be a list of 2"),
    (lambda m, t: _pair(m, "Si", "C").update(tensor="nope"),
     "pair table Si-C: missing tensor 'nope'"),
    (lambda m, t: t.pop("pair_Si_C"), "pair table Si-C: missing tensor 'pair_Si_C'"),
    (lambda m, t: _pair(m, "Si", "C").pop("tensor"), "pair table Si-C: 'tensor'"),
    (lambda m, t: _pair(m, "Si", "C").update(n_points=3), "pair table Si-C: n_points 3 out of range"),
    (lambda m, t: _pair(m, "Si", "C").update(n_points=2**40), "n_points 1099511627776 out of range"),
    (lambda m, t: _pair(m, "Si", "C").update(n_points=10.0), "'n_points' must be an integer"),
    (lambda m, t: _pair(m, "Si", "C").update(n_points=301),
     "tensor 'pair_Si_C' has shape (302,), expected (303,)"),
    (lambda m, t: _pair(m, "Si", "C").update(spacing=0.0), "pair table Si-C: spacing must be > 0"),
    (lambda m, t: _pair(m, "Si", "C").update(spacing=-0.1), "spacing must be > 0, got -0.1"),
    (lambda m, t: _pair(m, "Si", "C").update(spacing=1e-320), "is out of range"),
    (lambda m, t: _pair(m, "Si", "C").update(r_min=None), "'r_min' must be a number"),
    (lambda m, t: _pair(m, "Si", "C").pop("r_min"), "pair table Si-C: 'r_min' is missing"),
    (lambda m, t: t.update(pair_Si_C=t["pair_Si_C"].astype(np.float32)), "unsupported dtype F32"),
    (lambda m, t: t.update(pair_Si_C=t["pair_Si_C"].astype(np.int32)),
     "tensor 'pair_Si_C' has dtype I32, expected F64"),
    (lambda m, t: t.update(pair_Si_C=t["pair_Si_C"][None].copy()),
     "tensor 'pair_Si_C' has shape (1, 302), expected (302,)"),
    (lambda m, t: t["pair_C_C"].__setitem__(7, np.nan), "tensor 'pair_C_C' contains non-finite"),
    (lambda m, t: t["pair_C_C"].__setitem__(0, -np.inf), "tensor 'pair_C_C' contains non-finite"),
    (lambda m, t: m.pop("triplet_tables"), "metadata key 'triplet_tables' is missing (order 3)"),
    (lambda m, t: m["triplet_tables"].pop(4),
     "no triplet table for species triplet C-Si-C (centre C)"),
    (lambda m, t: m["triplet_tables"].append(dict(m["triplet_tables"][0])),
     "two triplet tables for Si-Si-Si"),
    (lambda m, t: _triplet(m, "C", "Si", "C").update(species=["C", "C", "Si"]),
     "triplet table C-C-Si: the two neighbour species must be in model order (C-Si-C)"),
    (lambda m, t: _triplet(m, "C", "Si", "C").update(species=["C", "Si", "Ge"]),
     "species 'Ge' is not one of the model's species"),
    (lambda m, t: _triplet(m, "C", "Si", "C").update(grid=[]),
     "triplet table C-Si-C: 'grid' must be a list of 3 axes"),
    (lambda m, t: _triplet(m, "C", "Si", "C")["grid"][2].update(n_points=2),
     "triplet table C-Si-C axis 2: n_points 2 out of range"),
    (lambda m, t: _triplet(m, "C", "Si", "C")["grid"][1].update(spacing=0),
     "triplet table C-Si-C axis 1: spacing must be > 0"),
    (lambda m, t: _triplet(m, "C", "Si", "C")["grid"][0].pop("min"),
     "triplet table C-Si-C axis 0: 'min' is missing"),
    (lambda m, t: _triplet(m, "C", "Si", "C")["grid"].__setitem__(0, 5),
     "axis 0: grid axis must be an object"),
    (lambda m, t: _triplet(m, "C", "Si", "C")["grid"][2].update(n_points=31),
     "tensor 'triplet_C_Si_C' has shape (14, 14, 32), expected (14, 14, 33)"),
    (lambda m, t: t.update(triplet_C_Si_C=t["triplet_C_Si_C"][:, :, :-1].copy()),
     "tensor 'triplet_C_Si_C' has shape (14, 14, 31), expected (14, 14, 32)"),
    (lambda m, t: t["triplet_Si_C_C"].__setitem__((3, 4, 5), np.nan),
     "tensor 'triplet_Si_C_C' contains non-finite values"),
    (lambda m, t: t.pop("triplet_Si_C_C"), "triplet table Si-C-C: missing tensor 'triplet_Si_C_C'"),
]


@pytest.mark.parametrize("change,phrase", BAD_FILES, ids=[str(k) for k in range(len(BAD_FILES))])
def test_bad_model_file(mff3_path, tmp_path, change, phrase):
    check_error(rewrite_model_file(mff3_path, tmp_path / "bad.gpff", change), phrase)


def _embedding(meta, s):
    return next(t for t in meta["embedding"]["tables"] if t["species"] == [s])


BAD_EMBEDDING_FILES = [
    (lambda m, t: m.update(embedding=[]), "embedding must be an object"),
    (lambda m, t: m["embedding"].pop("density_decay"), "embedding: 'density_decay' is missing"),
    (lambda m, t: m["embedding"].update(density_decay=-0.5), "density_decay must be >= 0"),
    (lambda m, t: m["embedding"].update(density_decay="1"), "'density_decay' must be a number"),
    (lambda m, t: m["embedding"].update(density_decay=200.0), "is too large (exp(-density_decay cutoff) underflows)"),
    (lambda m, t: m["embedding"].pop("tables"), "embedding: 'tables' must be a list"),
    (lambda m, t: m["embedding"]["tables"].pop(1), "no embedding table for species C"),
    (lambda m, t: m["embedding"]["tables"].append(dict(m["embedding"]["tables"][0])),
     "two embedding tables for Si"),
    (lambda m, t: _embedding(m, "C").update(species=["N"]),
     "species 'N' is not one of the model's species"),
    (lambda m, t: _embedding(m, "C").update(n_points=2), "embedding table C: n_points 2 out of"),
    (lambda m, t: _embedding(m, "C").pop("rho_min"), "embedding table C: 'rho_min' is missing"),
    (lambda m, t: t.pop("embedding_C"), "embedding table C: missing tensor 'embedding_C'"),
    (lambda m, t: t["embedding_Si"].__setitem__(2, np.nan),
     "tensor 'embedding_Si' contains non-finite values"),
    (lambda m, t: t.update(embedding_Si=t["embedding_Si"][:-1].copy()),
     "tensor 'embedding_Si' has shape (301,), expected (302,)"),
]


@pytest.mark.parametrize("change,phrase", BAD_EMBEDDING_FILES,
                         ids=[str(k) for k in range(len(BAD_EMBEDDING_FILES))])
def test_bad_embedding_tables(mff3e_path, tmp_path, change, phrase):
    check_error(rewrite_model_file(mff3e_path, tmp_path / "bad.gpff", change), phrase)


def test_order_2_ignores_triplet_tables(mff3_path, tmp_path):
    """An order-2 model needs no triplet tables and ignores any it carries."""
    def to_order_2(m, t):
        m["order"] = 2
        m.pop("cutoff_3body")
    core = _core.MFFModel(rewrite_model_file(mff3_path, tmp_path / "o2.gpff", to_order_2))
    assert core.order == 2 and core.max_cutoff == 5.0


def test_missing_and_truncated_files(mff3_path, tmp_path):
    check_error(tmp_path / "nope.gpff", "cannot open model file")
    b = open(mff3_path, "rb").read()
    (n,) = struct.unpack("<Q", b[:8])
    for k in sorted({0, 5, 8, 8 + n // 2, 8 + n, 8 + n + 100, len(b) // 2, len(b) - 1}):
        p = tmp_path / f"trunc_{k}.gpff"
        p.write_bytes(b[:k])
        msg = check_error(p, "")
        assert "truncated" in msg or "missing tensor" in msg or "outside the" in msg, (k, msg)


def test_not_a_gpff_file(mff3_path, tmp_path):
    header, data = split_file(mff3_path)
    p = tmp_path / "garbage.gpff"
    p.write_bytes(raw_safetensors(b"{not json", data))
    check_error(p, "invalid JSON in safetensors header")
    del header["__metadata__"]
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "no __metadata__")


def test_json_number_overflow(mff3_path, tmp_path):
    header, data = split_file(mff3_path)
    header["__metadata__"]["gpff"] = header["__metadata__"]["gpff"].replace(
        '"cutoff": 5.0', '"cutoff": 1e400')
    p = tmp_path / "overflow.gpff"
    p.write_bytes(raw_safetensors(header, data))
    check_error(p, "invalid JSON in __metadata__.gpff")


_VALID = None


def _valid_bytes():
    global _VALID
    if _VALID is None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.gpff")
            make_mff(path, n_points=20, n_points_3body=5)
            _VALID = open(path, "rb").read()
    return _VALID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)),
       header_only=st.booleans())
def test_fuzz_random_bytes_never_crash(flips, cut, header_only):
    """Random byte changes (in the header or anywhere) and truncations: ModelFileError naming the
    file, or a model that evaluates (finite, or ValueError)."""
    b = bytearray(_valid_bytes())
    (n,) = struct.unpack("<Q", bytes(b[:8]))
    span = min(len(b), 8 + n) if header_only else len(b)
    for pos, value in flips:
        b[int(pos * span)] = value
    if cut is not None:
        b = b[:int(cut * len(b))]
    m = load_fuzzed(_core.MFFModel, b)
    if m is None:
        return
    atoms = cluster()
    atoms.symbols[:] = [m.species[k % len(m.species)] for k in range(len(atoms))]
    try:
        e = mff_core_compute(m, atoms)[0]
        assert np.isfinite(e)
    except ValueError:
        pass
