"""B-spline tables, the mapped force field's Python reference evaluation, its file and the
LAMMPS pair_style table export."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from gpff import modelfile
from gpff.bspline import Axis, evaluate_1d, evaluate_3d, interpolate
from gpff.errors import ModelFileError, SpeciesError
from gpff.mapping import cutoff_function, map_functions
from gpff.table import pair_table, write_pair_table


def lj(a, b, r):
    eps = {"Si": 0.10, "C": 0.05}
    return 4 * np.sqrt(eps[a] * eps[b]) * ((2.0 / r) ** 12 - (2.0 / r) ** 6)


def sw3(c, j, k, x, y, z):
    """A Stillinger–Weber-like angular term, symmetric in (j, x) <-> (k, y)."""
    cos = (x * x + y * y - z * z) / (2 * x * y)
    w = {"Si": 1.0, "C": 0.7}
    return 0.4 * w[c] * w[j] * w[k] * (cos + 1 / 3) ** 2 * np.exp(-(x - 2.3) ** 2 - (y - 2.3) ** 2)


@pytest.fixture(scope="module")
def model():
    return map_functions(["Si", "C"], lj, sw3, cutoff=4.5, cutoff_3body=3.4, cutoff_width=1.0,
                         r_min=1.7, energy_offsets=[-1.5, -2.5], map_error=1e-3)


def fs(s, rho):
    """A Finnis-Sinclair-like embedding function F^s(ρ), F(0) = 0."""
    w = {"Si": 0.5, "C": 0.3}[s]
    return -w * (np.sqrt(rho + 0.1) - np.sqrt(0.1)) + 0.05 * rho ** 2


@pytest.fixture(scope="module")
def model_emb():
    """The model of `model` with an embedding term F^s(ρ_i), ρ_i = Σ_j f_c(r_ij) exp(-0.9 r_ij)."""
    return map_functions(["Si", "C"], lj, sw3, cutoff=4.5, cutoff_3body=3.4, cutoff_width=1.0,
                         r_min=1.7, energy_offsets=[-1.5, -2.5], map_error=1e-3,
                         embedding=(fs, 0.9, 3.0))


@pytest.fixture(params=["plain", "embedding"])
def either(request, model, model_emb):
    return model if request.param == "plain" else model_emb


def configurations():
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.08, seed=3)
    si.numbers[[1, 5]] = 6
    small = bulk("Si", "diamond", a=5.43)            # 2-atom cell, cutoffs > half the cell
    small.rattle(0.05, seed=4)
    rng = np.random.default_rng(5)
    cluster = Atoms("Si4C2", positions=rng.uniform(0, 3.2, (6, 3)))
    while cluster.get_all_distances()[np.triu_indices(6, 1)].min() < 1.9:
        cluster.positions = rng.uniform(0, 3.6, (6, 3))
    return [si, small, cluster]


def test_spline_interpolates_and_converges():
    f = lambda x: np.sin(2 * x) * np.exp(-x / 3)       # noqa: E731
    errors = []
    for n in (11, 21, 41):
        ax = Axis.spanning(1.0, 5.0, n)
        c = interpolate(f(ax.nodes))
        assert c.shape == (n + 2,)
        assert np.allclose(evaluate_1d(c, ax, ax.nodes)[0], f(ax.nodes), atol=1e-12)
        x = np.linspace(1.0, 5.0, 997)
        errors.append(np.abs(evaluate_1d(c, ax, x)[0] - f(x)).max())
    assert errors[1] < errors[0] / 10 and errors[2] < errors[1] / 10    # O(h^4)


def test_tricubic_gradient_is_the_interpolant_derivative():
    axes = [Axis.spanning(1, 3, 9), Axis.spanning(1, 3, 9), Axis.spanning(1, 6, 14)]
    G = np.stack(np.meshgrid(*[a.nodes for a in axes], indexing="ij"), -1)
    c = interpolate(np.cos(G[..., 0] * G[..., 1]) + G[..., 2] ** 2)
    X = np.random.default_rng(0).uniform([0.8, 0.8, 0.8], [3.2, 3.2, 6.2], (50, 3))
    v, g = evaluate_3d(c, axes, X)
    h = 1e-6
    fd = np.stack([(evaluate_3d(c, axes, X + h * e)[0] - evaluate_3d(c, axes, X - h * e)[0]) / (2 * h)
                   for e in np.eye(3)], -1)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)
    assert np.allclose(evaluate_3d(c, axes, G.reshape(-1, 3))[0],
                       (np.cos(G[..., 0] * G[..., 1]) + G[..., 2] ** 2).ravel(), atol=1e-11)


def test_cutoff_function_is_smooth_and_zero_beyond():
    r = np.linspace(0, 6, 6001)
    f, df = cutoff_function(r, 5.0, 1.5)
    assert np.all(f[r <= 3.5] == 1) and np.all(f[r >= 5.0] == 0)
    assert np.all(np.diff(f) <= 0) and np.abs(np.diff(f)).max() < 3e-3
    np.testing.assert_allclose(df[1:-1], np.gradient(f, r)[1:-1], atol=1e-3)  # kinks: O(h)


def test_mapping_reaches_its_target(model, model_emb):
    assert set(model_emb.mapping_error["embedding"]) == {"Si", "C"}
    for entry in model_emb.mapping_error["embedding"].values():
        assert entry["max_gradient_error"] <= 1e-3 and entry["rho_max"] == 3.0
    rep = model.mapping_error
    assert set(rep["pair"]) == {"Si-Si", "Si-C", "C-C"}
    assert len(rep["triplet"]) == 6
    for entry in list(rep["pair"].values()) + list(rep["triplet"].values()):
        assert entry["max_gradient_error"] <= 1e-3


@pytest.mark.parametrize("k", range(3))
def test_reference_forces_and_virial_are_energy_derivatives(either, k):
    model = either
    atoms = configurations()[k]
    res = model.predict(atoms)
    assert res["energies"].shape == (len(atoms),)
    assert abs(res["energies"].sum() - res["energy"]) < 1e-10
    h = 1e-5
    for a in range(min(len(atoms), 3)):
        for x in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[a, x] += h
            m.positions[a, x] -= h
            fd = -(model.predict(p)["energy"] - model.predict(m)["energy"]) / (2 * h)
            assert abs(fd - res["forces"][a, x]) < 1e-7 * max(1, abs(fd))
    np.testing.assert_allclose(res["forces"].sum(0), 0, atol=1e-10)
    if atoms.cell.rank == 3:
        W = np.zeros((3, 3))
        for x in range(3):
            for y in range(3):
                e = []
                for sign in (1, -1):
                    p = atoms.copy()
                    F = np.eye(3)
                    F[x, y] += sign * h
                    p.set_cell(atoms.cell @ F.T, scale_atoms=True)
                    e.append(model.predict(p)["energy"])
                W[x, y] = -(e[0] - e[1]) / (2 * h)
        np.testing.assert_allclose(res["virial"], W[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]],
                                   atol=1e-6)


def test_energy_goes_to_zero_at_the_cutoff(model):
    d = np.linspace(4.3, 4.6, 301)
    e = [model.predict(Atoms("Si2", positions=[[0, 0, 0], [r, 0, 0]]))["energy"] + 3.0 for r in d]
    assert np.all(np.abs(np.array(e)[d >= 4.5]) < 1e-14)
    assert np.abs(np.diff(e)).max() < 1e-4                  # continuous
    e1, e2 = e[np.searchsorted(d, 4.49)], e[np.searchsorted(d, 4.48)]
    assert abs(e1) < 0.3 * abs(e2)                          # vanishes quadratically: C1 at r_c


def test_species_the_model_lacks(model):
    with pytest.raises(SpeciesError, match="contains O"):
        model.predict(Atoms("SiO", positions=[[0, 0, 0], [1.6, 0, 0]]))


def test_file_round_trip(either, tmp_path):
    model = either
    path = tmp_path / "m.gpff"
    model.save(path)
    back = modelfile.load(path)
    atoms = configurations()[0]
    assert back.predict(atoms)["energy"] == model.predict(atoms)["energy"]
    assert back.density_decay == model.density_decay
    assert set(back.embedding_tables) == set(model.embedding_tables)
    assert back.mapping_error == model.mapping_error
    assert modelfile.model_kind(path) == "mff"


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    import json

    from safetensors.numpy import save_file

    meta, tensors = modelfile.read_model_file(src)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"gpff": json.dumps(meta)})


@pytest.mark.parametrize("edit_meta, edit_tensors, message", [
    (lambda m: m["pair_tables"].pop(), None, "every species pair"),
    (lambda m: m.__setitem__("order", 4), None, "order 4"),
    (lambda m: m["pair_tables"][0].__setitem__("n_points", 3), None, "invalid grid"),
    (lambda m: m["pair_tables"][0].__setitem__("species", ["Si", "Xx"]), None, "unknown species"),
    (lambda m: m["triplet_tables"][0]["grid"].pop(), None, "3 axes"),
    (lambda m: m["energy_offsets"].pop(), None, "energy_offsets"),
    (None, lambda t: t.__setitem__("pair_C_C", t["pair_C_C"][:-1].copy()), "shape"),
    (None, lambda t: t["triplet_Si_Si_Si"].__setitem__((0, 0, 0), np.nan), "NaN"),
    (lambda m: m["embedding"]["tables"].pop(), None, "do not cover every species"),
    (lambda m: m["embedding"]["tables"].__setitem__(0, 3), None, "tables must be objects"),
    (lambda m: m["embedding"].pop("tables"), None, "list 'tables'"),
    (lambda m: m["embedding"].__setitem__("density_decay", -1), None, "density_decay"),
    (lambda m: m["embedding"].__setitem__("density_decay", 200.0), None, "underflows"),
    (lambda m: m["embedding"]["tables"][0].__setitem__("species", ["Xx"]), None, "unknown species"),
    (lambda m: m["embedding"]["tables"].append(m["embedding"]["tables"][0]), None, "second table"),
    (None, lambda t: t.__setitem__("embedding_C", t["embedding_C"][:-1].copy()), "shape"),
    (None, lambda t: t["embedding_Si"].__setitem__(0, np.inf), "NaN or inf"),
])
def test_bad_model_files_are_refused(model_emb, tmp_path, edit_meta, edit_tensors, message):
    model = model_emb
    model.save(tmp_path / "good.gpff")
    _rewrite(tmp_path / "good.gpff", tmp_path / "bad.gpff", edit_meta, edit_tensors)
    with pytest.raises(ModelFileError, match=message):
        modelfile.load(tmp_path / "bad.gpff")


def test_pair_table_is_the_two_body_pair_potential(model, tmp_path):
    path = tmp_path / "m.table"
    keys = write_pair_table(model, path, n_points=500)
    assert keys == ["Si_Si", "Si_C", "C_C"]
    text = path.read_text().split("\n")
    start = text.index("Si_C")
    assert text[start + 1].startswith("N 500 R 1.7 4.5")
    r, e, f = pair_table(model, 0, 1, 500)
    row = text[start + 3 + 250].split()
    assert int(row[0]) == 251 and float(row[1]) == pytest.approx(r[250])
    assert float(row[2]) == pytest.approx(e[250], rel=1e-14)
    # a dimer's mapped energy is e0 + e0 + phi(r)
    from scipy.interpolate import CubicSpline

    phi = CubicSpline(r, e)
    for d in (2.1, 3.0, 4.4):
        dimer = Atoms("SiC", positions=[[0, 0, 0], [d, 0, 0]])
        assert model.predict(dimer)["energy"] == pytest.approx(-4.0 + phi(d), abs=1e-7)
    np.testing.assert_allclose(f, -phi(r, 1), rtol=1e-3, atol=1e-6)


def test_lammps_pair_style_table_reproduces_the_export(tmp_path):
    """The exported table in stock `pair_style table` gives the 2-body model's energy and forces."""
    import gpff.lammps as glmp

    model = map_functions(["Si"], lj, None, cutoff=4.5, cutoff_width=1.0, r_min=1.7,
                          energy_offsets=[0.0], map_error=1e-5)
    write_pair_table(model, tmp_path / "si.table", n_points=4000)
    atoms = configurations()[0]
    atoms.numbers[:] = 14
    atoms.wrap()
    ref = model.predict(atoms)
    lmp = glmp.new_lammps()
    c = atoms.cell
    lmp.commands_list([
        "units metal", "atom_style atomic", "atom_modify map array", "boundary p p p",
        f"region box prism 0 {c[0, 0]} 0 {c[1, 1]} 0 {c[2, 2]} 0 0 0", "create_box 1 box",
        *[f"create_atoms 1 single {x} {y} {z} units box" for x, y, z in atoms.positions],
        "mass 1 28.0855", "pair_style table spline 4000",
        f"pair_coeff 1 1 {tmp_path / 'si.table'} Si_Si", "run 0"])
    energy = lmp.get_thermo("pe")
    forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3)).reshape(-1, 3)
    lmp.close()
    assert energy == pytest.approx(ref["energy"], rel=1e-7)
    np.testing.assert_allclose(forces, ref["forces"], atol=1e-6)
