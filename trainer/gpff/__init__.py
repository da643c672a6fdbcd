"""gpff: Gaussian-process force fields (sGDML; n-body GP / MFF), from training to LAMMPS.

Python API::

    ds = gpff.load_dataset("rmd17_ethanol_train_01.npz")
    model = gpff.SGDML(sigma=10).fit(ds)
    model.save("ethanol.gpff")
    E, F = gpff.load("ethanol.gpff").predict(ds.R[:5])

The heavy modules (torch) are imported on first use, so that `lmp`, which imports
`gpff.lammps` to find the plugin, starts fast.
"""

import importlib

from .errors import (DatasetError, GpffError, ModelFileError, SpeciesError,  # noqa: F401
                     TrainingError, UnitError)

__version__ = "0.1.0"

_LAZY = {"Dataset": "data", "load_dataset": "data", "load": "modelfile", "SGDML": "sgdml",
         "Configurations": "data", "load_configurations": "data", "NBodyGP": "nbody",
         "MappedForceField": "mapping", "map_gp": "mapping"}

__all__ = ["Dataset", "load_dataset", "load", "SGDML", "Configurations", "load_configurations",
           "NBodyGP", "MappedForceField", "map_gp", "GpffError", "DatasetError",
           "ModelFileError", "SpeciesError", "TrainingError", "UnitError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gpff' has no attribute {name!r}")
