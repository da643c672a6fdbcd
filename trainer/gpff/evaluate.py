"""Test-set errors of a model file, evaluated through the C++ inference core."""

from __future__ import annotations

import os

import numpy as np

from .data import Dataset
from .errors import SpeciesError
from .modelfile import write_atomic
from .units import energy_factor


def error_metrics(E_pred, F_pred, E_ref, F_ref) -> dict:
    """MAE and RMSE of energies (per structure) and force components.

    E_pred, E_ref: (M,) or None; F_pred, F_ref: (M, N, 3). Returns a dict with ``n_frames``,
    ``energy_mae``, ``energy_rmse`` (None without reference energies), ``force_mae``, ``force_rmse``.
    """
    dF = np.asarray(F_pred) - np.asarray(F_ref)
    out = {"n_frames": int(dF.shape[0]), "force_mae": float(np.mean(np.abs(dF))),
           "force_rmse": float(np.sqrt(np.mean(dF ** 2))), "energy_mae": None, "energy_rmse": None}
    if E_ref is not None and E_pred is not None:
        dE = np.asarray(E_pred) - np.asarray(E_ref)
        out["energy_mae"] = float(np.mean(np.abs(dE)))
        out["energy_rmse"] = float(np.sqrt(np.mean(dE ** 2)))
    return out


def predict_with_core(model_path, R) -> tuple[np.ndarray, np.ndarray]:
    """Energies (M,) and forces (M, N, 3) of geometries R (M, N, 3) from the C++ core."""
    from ._core import SGDMLModel

    core = SGDMLModel(os.fspath(model_path))
    E = np.empty(len(R))
    F = np.empty_like(np.asarray(R, dtype=float))
    for k, r in enumerate(R):
        E[k], F[k], _ = core.compute(r)
    return E, F


def mff_compute(core, atoms):
    """Energy, per-atom energies (N,), forces (N, 3) and virial (6,) of one configuration from a
    C++ core `MFFModel`.

    The neighbour list (all periodic images within the model's largest cutoff) comes from
    ase.neighborlist; the core evaluates the tables (docs/mff.md). Energies in the model's unit.
    Raises SpeciesError for an element the model lacks.
    """
    from ase.neighborlist import neighbor_list

    index = {s: k for k, s in enumerate(core.species)}
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(index))
    if missing:
        raise SpeciesError(f"{core.path}: the configuration contains {', '.join(missing)}; the "
                           f"model has {', '.join(core.species)}")
    species = np.array([index[s] for s in symbols], dtype=np.int32)
    i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
    return core.compute(species, i.astype(np.int32), j.astype(np.int32),
                        np.ascontiguousarray(D, dtype=np.float64))[:4]


def evaluate_mff(model_path, configs, plot: str | None = None) -> dict:
    """Errors of a mapped force field on configurations (gpff.data.Configurations).

    Returns dict: n_frames, n_atoms, energy_mae / energy_rmse per atom (None without energies),
    force_mae / force_rmse over all components, units, model and data paths.
    """
    from ._core import MFFModel

    core = MFFModel(os.fspath(model_path))
    k = energy_factor(configs.energy_unit, core.energy_unit)
    results = [mff_compute(core, atoms) for atoms in configs.frames]
    n_atoms = np.array([len(a) for a in configs.frames])
    F = np.concatenate([r[2] for r in results])
    F_ref = None if configs.forces is None else np.concatenate(configs.forces) * k
    out = {"n_frames": len(results), "n_atoms": int(n_atoms.sum()), "energy_mae": None,
           "energy_rmse": None, "force_mae": None, "force_rmse": None,
           "energy_unit": core.energy_unit, "length_unit": "Angstrom",
           "model": os.fspath(model_path), "data": configs.path}
    E = np.array([r[0] for r in results])
    E_ref = None if configs.energies is None else np.asarray(configs.energies) * k
    if E_ref is not None:
        dE = (E - E_ref) / n_atoms
        out.update(energy_mae=float(np.mean(np.abs(dE))), energy_rmse=float(np.sqrt(np.mean(dE ** 2))))
    if F_ref is not None:
        dF = F - F_ref
        out.update(force_mae=float(np.mean(np.abs(dF))), force_rmse=float(np.sqrt(np.mean(dF ** 2))))
    if plot:
        parity_plot(plot, None if E_ref is None else E / n_atoms,
                    None if E_ref is None else E_ref / n_atoms, F, F_ref, core.energy_unit)
    return out


def evaluate_model(model_path, data: Dataset, plot: str | None = None) -> dict:
    """Errors of the model in `model_path` on `data`, in the model's units.

    Raises SpeciesError when the dataset's atoms (elements, order) differ from the model's.
    """
    from .modelfile import read_model_file

    meta, tensors = read_model_file(model_path)
    z_model = tensors["z"]
    if not np.array_equal(np.asarray(data.z), z_model):
        raise SpeciesError(f"{data.path}: atoms {data.z.tolist()} do not match the model "
                           f"{os.fspath(model_path)} ({z_model.tolist()})")
    unit = meta["units"]["energy"]
    k = energy_factor(data.energy_unit, unit)
    E_ref = None if data.E is None else data.E * k
    F_ref = data.F * k
    E, F = predict_with_core(model_path, data.R)
    out = error_metrics(E, F, E_ref, F_ref)
    out.update({"energy_unit": unit, "length_unit": meta["units"]["length"],
                "model": os.fspath(model_path), "data": data.path})
    if plot:
        parity_plot(plot, E, E_ref, F, F_ref, unit)
    return out


def parity_plot(path, E, E_ref, F, F_ref, unit) -> None:
    """Predicted-vs-reference scatter plots of energies and forces, written atomically to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("force", F_ref.ravel(), F.ravel(), f"{unit}/Å")]
    if E_ref is not None:
        panels.insert(0, ("energy", E_ref, E, unit))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (name, ref, pred, u) in zip(np.atleast_1d(axes), panels):
        ax.scatter(ref, pred, s=2, alpha=0.5)
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {name} ({u})")
        ax.set_ylabel(f"predicted {name} ({u})")
        ax.set_title(f"{name}: MAE {np.mean(np.abs(pred - ref)):.3g} {u}")
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=ext))
    plt.close(fig)
