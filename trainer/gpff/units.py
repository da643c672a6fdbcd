"""Units and the one virial -> stress conversion of gpff.

Lengths are Å everywhere. Energies are kept in the dataset's unit inside the trainer and recorded in
the model file; the ASE calculator converts to eV. Conversion factors come from ASE (CODATA 2014).
"""

import numpy as np
from ase import units as _ase_units

from .errors import UnitError

#: energy units understood by gpff and their value in eV
ENERGY_UNITS = {
    "eV": 1.0,
    "kcal/mol": _ase_units.kcal / _ase_units.mol,
    "kJ/mol": _ase_units.kJ / _ase_units.mol,
    "Hartree": _ase_units.Hartree,
}
LENGTH_UNITS = {"Angstrom": 1.0}


def check_energy_unit(unit: str) -> str:
    """Return `unit` if gpff knows it, else raise UnitError."""
    if unit not in ENERGY_UNITS:
        raise UnitError(f"unknown energy unit {unit!r}; known: {', '.join(ENERGY_UNITS)}")
    return unit


def check_length_unit(unit: str) -> str:
    """Return `unit` if gpff knows it (only 'Angstrom'), else raise UnitError."""
    if unit not in LENGTH_UNITS:
        raise UnitError(f"unknown length unit {unit!r}; gpff works in 'Angstrom'")
    return unit


def energy_factor(from_unit: str, to_unit: str) -> float:
    """Factor that converts an energy from `from_unit` to `to_unit` (e.g. kcal/mol -> eV)."""
    return ENERGY_UNITS[check_energy_unit(from_unit)] / ENERGY_UNITS[check_energy_unit(to_unit)]


def virial_to_stress(virial, volume: float) -> np.ndarray:
    """ASE stress (Voigt xx yy zz yz xz xy, energy/Å^3) from a virial in LAMMPS order.

    virial: (6,) W = sum_i r_i (x) F_i in the order xx yy zz xy xz yz (energy units).
    volume: cell volume in Å^3 (> 0).
    Returns sigma = -W / V reordered to ASE's Voigt order.
    """
    w = np.asarray(virial, dtype=float)
    if w.shape != (6,):
        raise ValueError(f"virial must have shape (6,), got {w.shape}")
    if not volume > 0:
        raise ValueError(f"cell volume must be positive, got {volume}")
    return -np.array([w[0], w[1], w[2], w[5], w[4], w[3]]) / volume
