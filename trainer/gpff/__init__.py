"""gpff: Gaussian-process force fields (sGDML; n-body GP / MFF), from training to LAMMPS.

Python API::

    ds = gpff.load_dataset("rmd17_ethanol_train_01.npz")
    model = gpff.SGDML(sigma=10).fit(ds)
    model.save("ethanol.gpff")
    E, F = gpff.load("ethanol.gpff").predict(ds.R[:5])
"""

__version__ = "0.1.0"

from .data import Dataset, load_dataset  # noqa: E402
from .errors import (DatasetError, GpffError, ModelFileError, SpeciesError,  # noqa: E402
                     TrainingError, UnitError)
from .modelfile import load  # noqa: E402
from .sgdml import SGDML  # noqa: E402

__all__ = ["Dataset", "load_dataset", "load", "SGDML", "GpffError", "DatasetError",
           "ModelFileError", "SpeciesError", "TrainingError", "UnitError", "__version__"]
