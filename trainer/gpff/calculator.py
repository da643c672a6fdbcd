"""ASE calculator for gpff models, evaluated by the C++ inference core (gpff._core).

    from gpff.calculator import GPFFCalculator
    atoms.calc = GPFFCalculator("ethanol.gpff")      # or a mapped force field, "Si.gpff"
    atoms.get_potential_energy()   # eV
    atoms.get_forces()             # (N, 3) eV/Å

Source: energies, forces and virials come from the C++ core (plugin/core/sgdml.cpp,
plugin/core/mff.cpp; the equations are in docs/model_file.md and docs/mff.md) through the Cython
binding gpff._core; they are converted from the model's energy unit (kcal/mol or eV) to ASE's
units with gpff.units.energy_factor.
"""

import os

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .errors import SpeciesError
from .units import energy_factor, virial_to_stress


class GPFFCalculator(Calculator):
    """ASE calculator for a `.gpff` model: sGDML (one molecule) or mapped force field (mff).

    Parameters
    ----------
    model : str or os.PathLike
        Path of the `.gpff` file. Loading errors raise gpff.errors.ModelFileError.
    **kwargs
        Passed to ase.calculators.calculator.Calculator (e.g. label).

    Results (ASE units)
    -------------------
    energy, free_energy : float, eV
    forces : (N, 3) float, eV/Å
    stress : (6,) float, eV/Å^3, Voigt xx yy zz yz xz xy -- only when the Atoms have a 3-D
        periodic cell (stress = -W / V from the molecule's virial W, gpff.units.virial_to_stress);
        an isolated (non-periodic) molecule has no stress.

    energies : (N,) float, eV -- per-atom energies (mff models only)

    sGDML: the Atoms' atomic numbers must equal the model's, in the model's atom order; otherwise
    gpff.errors.SpeciesError names the model file and the first mismatch. Positions are taken
    as given (the molecule must be unwrapped; no periodic images are used).
    mff: any number of atoms of the model's species, periodic (any cell shape, periodic images
    within the cutoff included) or not; an element the model lacks raises SpeciesError.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model, **kwargs):
        from . import _core  # compiled extension; imported here so gpff imports without it
        from .modelfile import model_kind

        Calculator.__init__(self, **kwargs)
        self.model_path = os.fspath(model)
        self.kind = model_kind(self.model_path)
        self.model = (_core.MFFModel if self.kind == "mff" else _core.SGDMLModel)(self.model_path)
        #: factor from the model's energy unit to eV
        self.energy_factor = energy_factor(self.model.energy_unit, "eV")

    def _check_species(self, atoms):
        numbers = [int(z) for z in atoms.get_atomic_numbers()]
        expected = self.model.atomic_numbers
        name = self.model_path
        if len(numbers) != len(expected):
            raise SpeciesError(
                f"{name}: the model has {len(expected)} atoms ({''.join(self.model.species)}), "
                f"the Atoms object has {len(numbers)}")
        for i, (z, z_model) in enumerate(zip(numbers, expected)):
            if z != z_model:
                raise SpeciesError(
                    f"{name}: atom {i} is {atoms[i].symbol} (Z={z}) but the model expects "
                    f"{self.model.species[i]} (Z={z_model}); atoms must be in the model's order "
                    f"{self.model.species}")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        if self.kind == "mff":
            from .evaluate import mff_compute

            energy, energies, forces, virial = mff_compute(self.model, atoms)
            self.results["energies"] = energies * self.energy_factor
        else:
            self._check_species(atoms)
            energy, forces, virial = self.model.compute(np.asarray(atoms.get_positions(), dtype=float))
        k = self.energy_factor
        self.results["energy"] = energy * k
        self.results["free_energy"] = energy * k
        self.results["forces"] = forces * k
        if "stress" in properties:
            if atoms.cell.rank == 3 and all(atoms.pbc):
                self.results["stress"] = virial_to_stress(virial * k, atoms.get_volume())
            else:
                from ase.calculators.calculator import PropertyNotImplementedError

                raise PropertyNotImplementedError(
                    f"{self.model_path}: stress is defined only for a 3-D periodic cell; "
                    "these atoms are not periodic in 3-D")
