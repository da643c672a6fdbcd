"""Mapped force fields (MFF): n-body GP local energies tabulated on B-spline grids.

nbody_gp_mff eqs. 5.38–5.39: with a 2-body or 3-body kernel the GP local energy is a sum of
functions of one distance (g₂) or of a triplet's three distances (g₃), fixed once the model is
trained; the same holds for the embedding functions F^s(ρ) of the density ρ of an EAM-like
term. :func:`map_functions` tabulates them on uniform grids and interpolates by cubic B-splines
(1-D, and tricubic tensor product for g₃; :mod:`gpff.bspline`), refining each grid until the
gradient of the interpolant matches the function's to a target. The result, a
:class:`MappedForceField`, is saved as a `.gpff` file (``model: "mff"``, docs/mff.md) that the C++
core and ``pair_style mff`` evaluate. :meth:`MappedForceField.predict` is the Python reference
evaluation of the same tables (numpy), used to report mapping errors and to test the core.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .bspline import Axis, evaluate_1d, evaluate_3d, interpolate
from .errors import SpeciesError
from .units import virial_to_stress

#: default target of the mapping: largest error of the interpolant's gradient, energy unit / Å
DEFAULT_MAP_ERROR = 1e-4
_MAX_POINTS_1D = 4097
_MAX_POINTS_3D = 97          # per axis of the r_cj, r_ck axes (r_jk has about twice as many)
_FD_STEP = 1e-5


def _on_numpy(name: str, r, *args):
    """gpff.environments.<name>(r, *args), a function of torch distances returning a value and
    its derivative, applied to numpy distances r (any shape), Å."""
    import torch

    from . import environments

    f, df = getattr(environments, name)(torch.as_tensor(np.asarray(r, dtype=np.float64)), *args)
    return f.numpy(), df.numpy()


def cutoff_function(r, cutoff: float, width: float):
    """Smooth cutoff f_c(r) and its derivative for numpy distances r (any shape), Å
    (gpff.environments.cutoff_function; docs/mff.md)."""
    return _on_numpy("cutoff_function", r, cutoff, width)


class MappedForceField:
    """A mapped 2-body or 2+3-body force field (docs/mff.md).

    Attributes:
        species: element symbols (model species order).
        order: 2 or 3.
        cutoff, cutoff_3body, cutoff_width: r_c, r_c3 (order 3) and the transition width d, Å.
        energy_offsets: (S,) one-body energies e₀ per species (energy unit).
        pair_tables: {(a, b) with a <= b: (coefficients (n+2,), Axis)}.
        triplet_tables: {(c, j, k) with j <= k: (coefficients (n1+2, n2+2, n3+2), (Axis,)*3)};
            axes (r_cj, r_ck, r_jk).
        embedding_tables: {s: (coefficients (n+2,), Axis)} of the embedding functions F^s(ρ)
            (ρ axis; empty without the embedding term); outside the table the end cubics are
            extrapolated, as for the pair tables.
        density_decay: β of the density ρ_i = Σ_{j, r_ij < r_c} f_c(r_ij; r_c) exp(-β r_ij), 1/Å
            (None without the embedding term).
        energy_unit: unit of energies ("eV" for materials data).
        hyperparameters, mapping_error, provenance: dicts recorded in the model file.
    """

    def __init__(self, species, order, cutoff, cutoff_width, energy_offsets, pair_tables,
                 triplet_tables=None, cutoff_3body=None, energy_unit="eV", hyperparameters=None,
                 mapping_error=None, provenance=None, embedding_tables=None, density_decay=None):
        self.species = list(species)
        self.order = int(order)
        self.cutoff = float(cutoff)
        self.cutoff_3body = None if cutoff_3body is None else float(cutoff_3body)
        self.cutoff_width = float(cutoff_width)
        self.energy_offsets = np.asarray(energy_offsets, dtype=np.float64)
        self.pair_tables = dict(pair_tables)
        self.triplet_tables = dict(triplet_tables or {})
        self.embedding_tables = dict(embedding_tables or {})
        self.density_decay = None if density_decay is None else float(density_decay)
        self.energy_unit = energy_unit
        self.hyperparameters = dict(hyperparameters or {})
        self.mapping_error = dict(mapping_error or {})
        self.provenance = dict(provenance or {})

    @property
    def max_cutoff(self) -> float:
        return max(self.cutoff, self.cutoff_3body or 0.0)

    def save(self, path) -> None:
        """Write the model to `path` (.gpff, atomically; gpff.modelfile.save_mff)."""
        from .modelfile import save_mff
        save_mff(self, path)

    # -- Python reference evaluation -------------------------------------------------------

    def species_indices(self, atoms) -> np.ndarray:
        """(N,) model species index of each atom; SpeciesError names a species the model lacks."""
        symbols = atoms.get_chemical_symbols()
        index = {s: i for i, s in enumerate(self.species)}
        missing = sorted(set(symbols) - set(index))
        if missing:
            raise SpeciesError(f"the configuration contains {', '.join(missing)}, which the model "
                               f"(species {', '.join(self.species)}) does not have")
        return np.array([index[s] for s in symbols], dtype=np.int64)

    def predict(self, atoms) -> dict:
        """Energy, per-atom energies, forces, virial (and stress if periodic) of one configuration.

        atoms: ase.Atoms (positions Å; periodic or not; any cell shape; a cell smaller than twice
            the cutoff is fine: all periodic images within the cutoff are included).
        Returns dict: ``energy`` float, ``energies`` (N,), ``forces`` (N, 3) energy/Å, ``virial``
            (6,) LAMMPS order xx yy zz xy xz yz, and ``stress`` (6,) ASE Voigt energy/Å^3 when the
            cell is 3-D periodic. Energies in the model's unit.
        Raises SpeciesError for a species the model lacks.
        """
        from ase.neighborlist import neighbor_list

        s = self.species_indices(atoms)
        n = len(atoms)
        i, j, d, D = neighbor_list("ijdD", atoms, self.max_cutoff)
        energies = self.energy_offsets[s].copy()
        forces = np.zeros((n, 3))
        virial = np.zeros((3, 3))

        pair = d < self.cutoff
        self._pair_terms(s, i[pair], j[pair], d[pair], D[pair], energies, forces, virial)
        if self.embedding_tables:
            self._embedding_terms(s, i[pair], j[pair], d[pair], D[pair], energies, forces, virial)
        if self.order == 3:
            tri = d < self.cutoff_3body
            self._triplet_terms(s, i[tri], j[tri], d[tri], D[tri], energies, forces, virial)

        out = {"energy": float(energies.sum()), "energies": energies, "forces": forces,
               "virial": virial[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]}
        if atoms.cell.rank == 3 and all(atoms.pbc):
            out["stress"] = virial_to_stress(out["virial"], atoms.get_volume())
        return out

    def _pair_terms(self, s, i, j, d, D, energies, forces, virial):
        fc, dfc = cutoff_function(d, self.cutoff, self.cutoff_width)
        lo, hi = np.minimum(s[i], s[j]), np.maximum(s[i], s[j])
        for (ka, kb), (coef, axis) in self.pair_tables.items():
            sel = np.nonzero((lo == ka) & (hi == kb))[0]
            if not len(sel):
                continue
            g, dg = evaluate_1d(coef, axis, d[sel])
            np.add.at(energies, i[sel], fc[sel] * g)
            grad = ((dfc[sel] * g + fc[sel] * dg) / d[sel])[:, None] * D[sel]  # dε_i/dr_j
            np.add.at(forces, j[sel], -grad)
            np.add.at(forces, i[sel], grad)
            virial -= D[sel].T @ grad

    def _embedding_terms(self, s, i, j, d, D, energies, forces, virial):
        phi, dphi = _on_numpy("density_function", d, self.cutoff, self.cutoff_width,
                              self.density_decay)
        rho = np.zeros(len(s))
        np.add.at(rho, i, phi)
        F, dF = np.zeros(len(s)), np.zeros(len(s))
        for a, (coef, axis) in self.embedding_tables.items():
            sel = np.nonzero(s == a)[0]
            F[sel], dF[sel] = evaluate_1d(coef, axis, rho[sel])
        energies += F
        grad = (dF[i] * dphi / d)[:, None] * D                          # dε_i/dr_j
        np.add.at(forces, j, -grad)
        np.add.at(forces, i, grad)
        virial -= D.T @ grad

    def _triplet_terms(self, s, i, j, d, D, energies, forces, virial):
        starts = np.searchsorted(i, np.arange(len(s) + 1))
        a_idx, b_idx = [], []
        for c in range(len(s)):
            lo, hi = starts[c], starts[c + 1]
            a, b = np.triu_indices(hi - lo, 1)
            a_idx.append(a + lo)
            b_idx.append(b + lo)
        a, b = np.concatenate(a_idx), np.concatenate(b_idx)
        swap = s[j[a]] > s[j[b]]
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        centre = i[a]
        Djk = D[b] - D[a]
        rjk = np.linalg.norm(Djk, axis=1)
        fa, dfa = cutoff_function(d[a], self.cutoff_3body, self.cutoff_width)
        fb, dfb = cutoff_function(d[b], self.cutoff_3body, self.cutoff_width)
        keys = np.stack([s[centre], s[j[a]], s[j[b]]], 1)
        for key, (coef, axes) in self.triplet_tables.items():
            sel = np.nonzero(np.all(keys == key, axis=1))[0]
            if not len(sel):
                continue
            X = np.stack([d[a[sel]], d[b[sel]], rjk[sel]], 1)
            g, dg = evaluate_3d(coef, axes, X)
            w = fa[sel] * fb[sel]
            np.add.at(energies, centre[sel], w * g)
            ga = ((dfa[sel] * fb[sel] * g + w * dg[:, 0]) / X[:, 0])[:, None] * D[a[sel]]
            gb = ((fa[sel] * dfb[sel] * g + w * dg[:, 1]) / X[:, 1])[:, None] * D[b[sel]]
            gjk = (w * dg[:, 2] / X[:, 2])[:, None] * Djk[sel]       # dε/dr_k; -(...) on j
            fj, fk = -(ga - gjk), -(gb + gjk)
            np.add.at(forces, j[a[sel]], fj)
            np.add.at(forces, j[b[sel]], fk)
            np.add.at(forces, centre[sel], -(fj + fk))
            virial += D[a[sel]].T @ fj + D[b[sel]].T @ fk


# -- mapping ----------------------------------------------------------------------------------

def _fd_gradient(fn, X: np.ndarray) -> np.ndarray:
    """Central finite-difference gradient (P, dim) of a vectorised function of X (P, dim)."""
    cols = []
    for k in range(X.shape[1]):
        e = np.zeros(X.shape[1])
        e[k] = _FD_STEP
        cols.append((fn(X + e) - fn(X - e)) / (2 * _FD_STEP))
    return np.stack(cols, -1)


def _map_1d(fn, lo, hi, target, n_points, rng):
    """Coefficients, Axis and achieved gradient error of a 1-D table of fn on [lo, hi]."""
    check = np.concatenate([rng.uniform(lo, hi, 400), [lo, hi]])
    dref = _fd_gradient(lambda X: fn(X[:, 0]), check[:, None])[:, 0]
    n = n_points or max(4, int(math.ceil((hi - lo) / 0.1)) + 1)
    while True:
        axis = Axis.spanning(lo, hi, n)
        coef = interpolate(fn(axis.nodes))
        err = float(np.max(np.abs(evaluate_1d(coef, axis, check)[1] - dref)))
        if n_points or err <= target or 2 * n - 1 > _MAX_POINTS_1D:
            return coef, axis, err
        n = 2 * n - 1


def _triangle_points(lo, hi, count, rng):
    """Random (r_cj, r_ck, r_jk) with r_cj, r_ck in [lo, hi] obeying the triangle inequality."""
    pts = []
    while sum(len(p) for p in pts) < count:
        X = rng.uniform([lo, lo, lo], [hi, hi, 2 * hi], size=(4 * count, 3))
        ok = (X[:, 2] <= X[:, 0] + X[:, 1]) & (X[:, 2] >= np.abs(X[:, 0] - X[:, 1]))
        pts.append(X[ok])
    return np.concatenate(pts)[:count]


def _map_3d(fn, grid_fn, lo, hi, target, n_points, rng):
    """Coefficients, axes and achieved gradient error of a triplet table of fn on the box
    [lo, hi]² × [lo, 2 hi] (axes r_cj, r_ck, r_jk); grid_fn(x, y, z) gives fn on the tensor
    grid x × y × z (None: fn at every node)."""
    check = _triangle_points(lo, hi, 300, rng)
    gref = _fd_gradient(fn, check)
    n = n_points or max(4, int(math.ceil((hi - lo) / 0.25)) + 1)
    while True:
        n3 = 2 * n - 1 + int(math.ceil(lo / ((hi - lo) / (n - 1))))
        axes = (Axis.spanning(lo, hi, n), Axis.spanning(lo, hi, n),
                Axis.spanning(lo, 2 * hi, max(4, n3)))
        if grid_fn is not None:
            values = grid_fn(*[a.nodes for a in axes])
        else:
            G = np.stack(np.meshgrid(*[a.nodes for a in axes], indexing="ij"), -1)
            values = fn(G.reshape(-1, 3)).reshape(G.shape[:3])
        coef = interpolate(values)
        err = float(np.max(np.linalg.norm(evaluate_3d(coef, axes, check)[1] - gref, axis=1)))
        if n_points or err <= target or 2 * n - 1 > _MAX_POINTS_3D:
            return coef, axes, err
        n = 2 * n - 1


def map_functions(species, g2, g3=None, *, g3_on_grid=None, cutoff, cutoff_width, r_min,
                  energy_offsets, cutoff_3body=None, energy_unit="eV", map_error=DEFAULT_MAP_ERROR,
                  n_points=None, n_points_3body=None, embedding=None, seed=0,
                  **metadata) -> MappedForceField:
    """Tabulate local-energy functions on B-spline grids (nbody_gp_mff eqs. 5.38–5.39).

    species: element symbols. g2(a, b, r): g₂ of species symbols a, b at distances r (P,) →
        (P,). g3(c, j, k, r_cj, r_ck, r_jk) → (P,), or None for a 2-body model. Neither includes
        the cutoff function. g3_on_grid(c, j, k, x, y, z) → (n_x, n_y, n_z): optional, g₃ on a
        tensor-product grid (faster than g3 at every node).
    cutoff, cutoff_3body, cutoff_width: r_c, r_c3, d (Å). r_min: smallest tabulated distance, Å.
    embedding: None, or (F, density_decay, rho_max) for an embedding term: F(s, rho) → (P,) the
        embedding function of centre species s at densities rho (P,), tabulated on [0, rho_max].
    energy_offsets: (S,) e₀ per species. map_error: target of the largest error of the table
        gradient (energy unit/Å), reached by refining the grid (each refinement halves the spacing);
        ignored where n_points (2-body) / n_points_3body (points on the r_cj axis) fix the grid.
    metadata: hyperparameters, provenance (dicts) stored in the file.
    Returns a MappedForceField; ``mapping_error`` reports the grids and the achieved error.
    """
    rng = np.random.default_rng(seed)
    pair_tables, triplet_tables = {}, {}
    report = {"target": map_error, "pair": {}, "triplet": {}}
    for a, b in itertools.combinations_with_replacement(range(len(species)), 2):
        sa, sb = species[a], species[b]
        coef, axis, err = _map_1d(lambda r: np.asarray(g2(sa, sb, r), dtype=np.float64),
                                  r_min, cutoff, map_error, n_points, rng)
        pair_tables[(a, b)] = (coef, axis)
        report["pair"][f"{sa}-{sb}"] = {"n_points": axis.n_points, "max_gradient_error": err}
    if g3 is not None:
        for c in range(len(species)):
            for j, k in itertools.combinations_with_replacement(range(len(species)), 2):
                sc, sj, sk = species[c], species[j], species[k]
                fn = lambda X: np.asarray(g3(sc, sj, sk, X[:, 0], X[:, 1], X[:, 2]),  # noqa: E731
                                          dtype=np.float64)
                grid_fn = None if g3_on_grid is None else (
                    lambda x, y, z: np.asarray(g3_on_grid(sc, sj, sk, x, y, z), dtype=np.float64))
                coef, axes, err = _map_3d(fn, grid_fn, r_min, cutoff_3body, map_error,
                                          n_points_3body, rng)
                triplet_tables[(c, j, k)] = (coef, axes)
                report["triplet"][f"{sc}-{sj}-{sk}"] = {
                    "n_points": [ax.n_points for ax in axes], "max_gradient_error": err}
    embedding_tables, density_decay = {}, None
    if embedding is not None:
        fn, density_decay, rho_max = embedding
        report["embedding"] = {}
        for a, sa in enumerate(species):
            coef, axis, err = _map_1d(lambda x: np.asarray(fn(sa, x), dtype=np.float64),
                                      0.0, rho_max, map_error, n_points, rng)
            embedding_tables[a] = (coef, axis)
            report["embedding"][sa] = {"n_points": axis.n_points, "rho_max": rho_max,
                                       "max_gradient_error": err}
    return MappedForceField(species, 3 if g3 is not None else 2, cutoff, cutoff_width,
                            energy_offsets, pair_tables, triplet_tables, cutoff_3body,
                            energy_unit, metadata.get("hyperparameters"), report,
                            metadata.get("provenance"), embedding_tables, density_decay)



def map_gp(model, map_error=DEFAULT_MAP_ERROR, n_points=None, n_points_3body=None,
           check_frames=None) -> MappedForceField:
    """Map a trained n-body GP (gpff.nbody.NBodyGP, order 2 or 3) onto B-spline tables.

    The tables start 0.1 Å below the shortest training distance ``model.r_min`` (shorter
    distances are extrapolation); the embedding tables span ρ from 0 to twice the largest
    training density.
    check_frames: configurations on which the mapped model is compared with the exact GP; the
        force MAE of mapped − exact (energy unit/Å) and the largest energy difference per atom
        are added to ``mapping_error``.
    Raises TrainingError for a many-body model, which has no mapped form.
    """
    from .errors import TrainingError

    if model.order not in (2, 3):
        raise TrainingError(f"a {model.order}-body model cannot be mapped; only orders 2 and 3 "
                            "(eqs. 5.38-5.39) decompose into tabulated functions")
    r_min = max(0.5, math.floor((model.r_min - 0.1) * 20) / 20)
    mapped = map_functions(
        model.species, model.g2, model.g3 if model.order == 3 else None,
        g3_on_grid=model.g3_on_grid if model.order == 3 else None, cutoff=model.cutoff,
        cutoff_3body=model.cutoff_3body if model.order == 3 else None,
        cutoff_width=model.cutoff_width, r_min=r_min,
        energy_offsets=[model.energy_offsets[s] for s in model.species],
        energy_unit=model.energy_unit, map_error=map_error, n_points=n_points,
        n_points_3body=n_points_3body, hyperparameters=model.hyperparameters,
        embedding=((model.embedding_function, model.density_decay, 2.0 * model.density_range[1])
                   if model.embedding else None))
    mapped.mapping_error["r_min"] = r_min
    if check_frames:
        exact = model.predict(check_frames)
        dF, dE = [], []
        for k, atoms in enumerate(check_frames):
            res = mapped.predict(atoms)
            dF.append(np.abs(res["forces"] - exact["forces"][k]).ravel())
            dE.append(abs(res["energy"] - exact["energy"][k]) / len(atoms))
        mapped.mapping_error["force_mae_vs_exact"] = float(np.mean(np.concatenate(dF)))
        mapped.mapping_error["max_energy_per_atom_vs_exact"] = float(max(dE))
        mapped.mapping_error["n_check_frames"] = len(check_frames)
    return mapped
