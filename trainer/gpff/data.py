"""Reading reference datasets: positions (Å), energies, forces, species, units.

Formats
-------
- rMD17 npz: keys ``nuclear_charges`` (N,), ``coords`` (M, N, 3) Å, ``energies`` (M,) kcal/mol,
  ``forces`` (M, N, 3) kcal/mol/Å (Christensen & von Lilienfeld 2020).
- sGDML dataset npz: keys ``z`` (N,), ``R`` (M, N, 3) Å, ``E`` (M,) or (M, 1), ``F`` (M, N, 3);
  units from the optional ``e_unit`` / ``r_unit`` keys, else kcal/mol and Å.
- anything ASE reads (extxyz, ...) with per-frame energies and forces: eV and Å.

Every problem raises :class:`gpff.errors.DatasetError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import DatasetError, UnitError
from .units import check_energy_unit, check_length_unit

_SGDML_UNIT_NAMES = {"kcal/mol": "kcal/mol", "ev": "eV", "kj/mol": "kJ/mol", "ang": "Angstrom",
                     "angstrom": "Angstrom", "au": "Hartree", "hartree": "Hartree"}


@dataclass
class Dataset:
    """Frames of one molecule or material.

    Attributes:
        z: (N,) int atomic numbers (the same in every frame: one molecule).
        R: (M, N, 3) float64 positions, Å.
        E: (M,) float64 total energies in ``energy_unit``, or None (forces-only data).
        F: (M, N, 3) float64 forces in ``energy_unit``/Å.
        energy_unit, length_unit: unit names (see :mod:`gpff.units`).
        path: file the frames came from; sha256: its SHA-256 (hex).
    """

    z: np.ndarray
    R: np.ndarray
    E: np.ndarray | None
    F: np.ndarray
    energy_unit: str = "kcal/mol"
    length_unit: str = "Angstrom"
    path: str = ""
    sha256: str = ""
    indices: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_frames(self) -> int:
        return self.R.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.R.shape[1]

    def subset(self, idx) -> "Dataset":
        """The frames `idx` (index array into this dataset), remembering their indices."""
        idx = np.asarray(idx, dtype=int)
        base = self.indices if self.indices is not None else np.arange(self.n_frames)
        return Dataset(self.z, self.R[idx], None if self.E is None else self.E[idx], self.F[idx],
                       self.energy_unit, self.length_unit, self.path, self.sha256, base[idx])

    def validate(self) -> "Dataset":
        """Check shapes and finiteness; raise DatasetError naming the file and the problem."""
        where = self.path or "<dataset>"
        z, R, E, F = self.z, self.R, self.E, self.F
        if z.ndim != 1 or z.size == 0:
            raise DatasetError(f"{where}: atomic numbers must have shape (N,), got {z.shape}")
        n = z.size
        if R.ndim != 3 or R.shape[1:] != (n, 3):
            raise DatasetError(f"{where}: positions must have shape (M, {n}, 3), got {R.shape}")
        if R.shape[0] == 0:
            raise DatasetError(f"{where}: no frames")
        if F.shape != R.shape:
            raise DatasetError(f"{where}: forces have shape {F.shape}, positions {R.shape}")
        if E is not None and E.shape != (R.shape[0],):
            raise DatasetError(f"{where}: energies have shape {E.shape}, expected ({R.shape[0]},)")
        if np.any(z < 1) or np.any(z > 118):
            raise DatasetError(f"{where}: atomic numbers outside 1..118")
        for name, arr in (("positions", R), ("forces", F), ("energies", E)):
            if arr is not None and not np.all(np.isfinite(arr)):
                bad = np.unique(np.nonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0])
                raise DatasetError(f"{where}: {name} contain NaN or inf in frame(s) {bad[:10].tolist()}")
        try:
            check_energy_unit(self.energy_unit)
            check_length_unit(self.length_unit)
        except UnitError as err:
            raise DatasetError(f"{where}: {err}") from None
        return self


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_npz(path: str):
    try:
        with np.load(path, allow_pickle=False) as d:
            keys = set(d.files)
            if {"nuclear_charges", "coords", "forces"} <= keys:
                e = d["energies"] if "energies" in keys else None
                return d["nuclear_charges"], d["coords"], e, d["forces"], "kcal/mol", "Angstrom"
            if {"z", "R", "F"} <= keys:
                e_unit = str(d["e_unit"]) if "e_unit" in keys else "kcal/mol"
                r_unit = str(d["r_unit"]) if "r_unit" in keys else "Angstrom"
                e = d["E"] if "E" in keys else None
                if e is not None and e.ndim == 2 and e.shape[1] == 1:
                    e = e[:, 0]
                return (d["z"], d["R"], e, d["F"], _SGDML_UNIT_NAMES.get(e_unit.lower(), e_unit),
                        _SGDML_UNIT_NAMES.get(r_unit.lower(), r_unit))
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable npz file ({err})") from None
    raise DatasetError(f"{path}: npz file has neither rMD17 keys (nuclear_charges, coords, energies, "
                       f"forces) nor sGDML keys (z, R, E, F); found {sorted(keys)}")


def _ase_frames(path: str) -> list:
    """All frames of a file ASE reads; DatasetError naming the file if it cannot or finds none."""
    from ase.io import read

    try:
        frames = read(path, index=":")
    except Exception as err:  # ASE raises many types for malformed files
        raise DatasetError(f"{path}: ASE cannot read this file ({type(err).__name__}: {err})") from None
    if not frames:
        raise DatasetError(f"{path}: no frames")
    return frames


def _read_ase(path: str):
    frames = _ase_frames(path)
    z = frames[0].numbers
    R, E, F = [], [], []
    for k, at in enumerate(frames):
        if not np.array_equal(at.numbers, z):
            raise DatasetError(f"{path}: frame {k} has different atoms or atom order than frame 0 "
                               f"(sGDML models one molecule with a fixed atom order)")
        try:
            F.append(at.get_forces())
        except Exception:
            raise DatasetError(f"{path}: frame {k} has no forces") from None
        try:
            E.append(at.get_potential_energy())
        except Exception:
            E.append(np.nan if E else None)
        R.append(at.positions)
    e = None if E[0] is None else np.array(E, dtype=float)
    return z, np.array(R), e, np.array(F), "eV", "Angstrom"


def load_dataset(path: str | os.PathLike, energy_unit: str | None = None,
                 length_unit: str | None = None) -> Dataset:
    """Read a dataset file (rMD17 npz, sGDML npz, or any ASE format with energies and forces).

    Args:
        path: the file.
        energy_unit, length_unit: override the unit the format implies (e.g. an extxyz in kcal/mol).
    Returns:
        a validated :class:`Dataset` (positions (M, N, 3) Å, energies (M,), forces (M, N, 3)).
    Raises:
        DatasetError: missing or unreadable file, unknown keys, inconsistent shapes, NaN/inf,
        unknown units.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    reader = _read_npz if path.endswith(".npz") else _read_ase
    z, R, E, F, e_unit, r_unit = reader(path)
    try:
        ds = Dataset(np.asarray(z).astype(np.int64), np.asarray(R, dtype=np.float64),
                     None if E is None else np.asarray(E, dtype=np.float64),
                     np.asarray(F, dtype=np.float64), energy_unit or e_unit, length_unit or r_unit,
                     path, _sha256(path))
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: malformed arrays ({err})") from None
    return ds.validate()


def split_indices(n_frames: int, sizes, seed: int = 0):
    """Disjoint random index sets of the given `sizes` drawn from range(n_frames).

    Raises DatasetError when the sizes add up to more than `n_frames`.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n_frames:
        raise DatasetError(f"cannot draw {' + '.join(map(str, sizes))} frames from {n_frames}")
    perm = np.random.default_rng(seed).permutation(n_frames)
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(perm[start:start + s]))
        start += s
    return out


# ------------------------------------------------------------------ configurations (n-body GP)
@dataclass
class Configurations:
    """Frames of a material or of clusters, any composition and size (n-body GP / MFF data).

    Attributes:
        frames: list of ``ase.Atoms`` (positions Å, cell, pbc, numbers; no calculator).
        energies: (n,) float64 total energies in ``energy_unit``, or None (forces-only data).
        forces: list of (N_c, 3) float64 forces in ``energy_unit``/Å (one per frame), or None.
        energy_unit: unit name (see :mod:`gpff.units`); "eV" for ASE formats.
        path: file the frames came from; sha256: its SHA-256 (hex).
        indices: (n,) indices of the frames in the file (set by :meth:`subset`).
        config_types: (n,) list of each frame's configuration type (str, or None where the
            frame has none), from ``info['config_type']`` as in GAP's training files; None when
            no frame has one. :class:`gpff.nbody.NBodyGP` can give each type its own noise.
    """

    frames: list
    energies: np.ndarray | None
    forces: list | None
    energy_unit: str = "eV"
    path: str = ""
    sha256: str = ""
    indices: np.ndarray | None = field(default=None, repr=False)
    config_types: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def n_atoms_total(self) -> int:
        """Total number of atoms over all frames."""
        return int(sum(len(at) for at in self.frames))

    @property
    def species(self) -> list:
        """Sorted unique element symbols of all frames."""
        return sorted({s for at in self.frames for s in at.get_chemical_symbols()})

    def subset(self, idx) -> "Configurations":
        """The frames `idx` (index array into this set), remembering their indices in the file."""
        idx = np.asarray(idx, dtype=int).reshape(-1)
        base = self.indices if self.indices is not None else np.arange(self.n_frames)
        return Configurations([self.frames[k] for k in idx],
                              None if self.energies is None else self.energies[idx],
                              None if self.forces is None else [self.forces[k] for k in idx],
                              self.energy_unit, self.path, self.sha256, base[idx],
                              None if self.config_types is None
                              else [self.config_types[k] for k in idx])

    def validate(self) -> "Configurations":
        """Check shapes, finiteness and units; raise DatasetError naming the file and the problem."""
        where = self.path or "<configurations>"
        if not self.frames:
            raise DatasetError(f"{where}: no frames")
        if self.energies is None and self.forces is None:
            raise DatasetError(f"{where}: the frames have neither energies nor forces")
        for k, at in enumerate(self.frames):
            if len(at) == 0:
                raise DatasetError(f"{where}: frame {k} has no atoms")
            if not np.all(np.isfinite(at.positions)):
                raise DatasetError(f"{where}: positions contain NaN or inf in frame {k}")
            if not np.all(np.isfinite(at.cell.array)):
                raise DatasetError(f"{where}: cell contains NaN or inf in frame {k}")
        if self.energies is not None:
            e = np.asarray(self.energies, dtype=np.float64)
            if e.shape != (self.n_frames,):
                raise DatasetError(f"{where}: energies have shape {e.shape}, expected ({self.n_frames},)")
            bad = np.nonzero(~np.isfinite(e))[0]
            if bad.size:
                raise DatasetError(f"{where}: energies contain NaN or inf in frame(s) {bad[:10].tolist()}")
            self.energies = e
        if self.forces is not None:
            if len(self.forces) != self.n_frames:
                raise DatasetError(f"{where}: {len(self.forces)} force arrays for {self.n_frames} frames")
            forces = []
            for k, (at, f) in enumerate(zip(self.frames, self.forces)):
                f = np.asarray(f, dtype=np.float64)
                if f.shape != (len(at), 3):
                    raise DatasetError(f"{where}: forces of frame {k} have shape {f.shape}, "
                                       f"expected ({len(at)}, 3)")
                if not np.all(np.isfinite(f)):
                    raise DatasetError(f"{where}: forces contain NaN or inf in frame {k}")
                forces.append(f)
            self.forces = forces
        if self.config_types is not None:
            if len(self.config_types) != self.n_frames:
                raise DatasetError(f"{where}: {len(self.config_types)} config types for "
                                   f"{self.n_frames} frames")
            self.config_types = [None if c is None else str(c) for c in self.config_types]
        try:
            check_energy_unit(self.energy_unit)
        except UnitError as err:
            raise DatasetError(f"{where}: {err}") from None
        return self

    @classmethod
    def from_frames(cls, frames, energies=None, forces=None, energy_unit: str = "eV",
                    path: str = "", config_types=None) -> "Configurations":
        """Validated configurations from in-memory ``ase.Atoms`` (copied without calculators),
        energies (n,), forces (list of (N_c, 3)) and config types ((n,) str or None; default:
        each frame's ``info['config_type']``). Raises DatasetError like the file reader."""
        from ase import Atoms

        clean = [Atoms(numbers=at.numbers, positions=at.positions, cell=at.cell, pbc=at.pbc)
                 for at in frames]
        return cls(clean, None if energies is None else np.asarray(energies, dtype=np.float64),
                   None if forces is None else [np.asarray(f, dtype=np.float64) for f in forces],
                   energy_unit, path,
                   config_types=_config_types(frames) if config_types is None
                   else list(config_types)).validate()


def _config_types(frames):
    """Each frame's ``info['config_type']`` (None where missing), or None when no frame has one."""
    types = [at.info.get("config_type") for at in frames]
    return None if all(t is None for t in types) else types


def _frame_energy(at):
    if at.calc is not None:
        try:
            return float(at.calc.get_potential_energy(at))
        except Exception:  # a calculator without energy (forces-only frames)
            pass
    for key in ("energy", "Energy", "total_energy"):
        if key in at.info:
            return float(at.info[key])
    return None


def _frame_forces(at):
    if at.calc is not None:
        try:
            return np.array(at.calc.get_forces(at), dtype=np.float64)
        except Exception:
            pass
    for key in ("forces", "force"):
        if key in at.arrays:
            return np.array(at.arrays[key], dtype=np.float64)
    return None


def load_configurations(path: str | os.PathLike, energy_unit: str | None = None) -> Configurations:
    """Read frames of any composition and size from a file ASE reads (extxyz, xyz, ...).

    Energies come from the frame's calculator or ``info['energy']``, forces from the calculator,
    ``arrays['forces']`` or ``arrays['force']``, the configuration type from
    ``info['config_type']`` (GAP's convention; optional). Periodic cells of any shape and clusters without
    a cell are both fine.

    Args:
        path: the file.
        energy_unit: the energy unit of the file (default "eV", the unit of ASE formats).
    Returns:
        validated :class:`Configurations` (positions Å; energies (n,) or None; forces list of
        (N_c, 3) or None).
    Raises:
        DatasetError: missing or unreadable file, no frames, NaN/inf, neither energies nor
        forces, forces of the wrong shape, energies (or forces) on some frames only, unknown unit.
    """
    from ase import Atoms

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    raw = _ase_frames(path)
    frames, energies, forces = [], [], []
    for at in raw:
        energies.append(_frame_energy(at))
        forces.append(_frame_forces(at))
        frames.append(Atoms(numbers=at.numbers, positions=at.positions, cell=at.cell, pbc=at.pbc))
    for name, values in (("energies", energies), ("forces", forces)):
        have = [v is not None for v in values]
        if any(have) and not all(have):
            missing = [k for k, h in enumerate(have) if not h]
            raise DatasetError(f"{path}: {name} are given for some frames but missing for frame(s) "
                               f"{missing[:10]}")
    e = None if energies[0] is None else np.array(energies, dtype=np.float64)
    f = None if forces[0] is None else forces
    return Configurations(frames, e, f, energy_unit or "eV", path, _sha256(path),
                          config_types=_config_types(raw)).validate()
