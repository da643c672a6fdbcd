"""Exceptions raised by gpff. Every message names the file (where there is one) and the problem."""


class GpffError(Exception):
    """Base class of all gpff errors."""


class DatasetError(GpffError, ValueError):
    """A dataset file is missing, malformed, inconsistent or contains non-finite values."""


class ModelFileError(GpffError, ValueError):
    """A `.gpff` model file is missing, truncated, corrupted, of an unknown version or kind."""


class SpeciesError(GpffError, ValueError):
    """Atoms, elements or atom order do not match the model."""


class UnitError(GpffError, ValueError):
    """An unknown or unsupported unit."""


class TrainingError(GpffError, RuntimeError):
    """Training failed (for example the kernel matrix is not positive definite)."""
