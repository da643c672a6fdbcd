"""Reading and writing `.gpff` model files (safetensors container; docs/model_file.md).

Writes are atomic: a temporary file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from ase.data import chemical_symbols

from .errors import ModelFileError

FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__
    return __version__


def write_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` and move the result to `path` atomically (never a partial file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_sgdml(model, path) -> None:
    """Write a trained :class:`gpff.sgdml.SGDML` to `path`."""
    from safetensors.numpy import save_file

    meta = {
        "format_version": FORMAT_VERSION, "model": "sgdml", "gpff_version": _version(),
        "units": {"energy": model.energy_unit, "length": "Angstrom"},
        "species": [chemical_symbols[int(a)] for a in model.z], "n_atoms": int(model.n_atoms),
        "kernel": model.kernel, "descriptor": "inverse_distance",
        "descriptor_exponent": model.p, "sigma": model.sigma,
        "lam": model.lam, "integration_constant": model.integration_constant,
        "n_train": int(model.n_train), "n_perms": int(len(model.perms)),
        "molecule_extent": model.molecule_extent, "provenance": model.provenance,
    }
    tensors = {
        "z": np.ascontiguousarray(model.z, dtype=np.int32),
        "perms": np.ascontiguousarray(model.perms, dtype=np.int32),
        "R_desc": np.ascontiguousarray(model.R_desc, dtype=np.float64),
        "R_d_desc_alpha": np.ascontiguousarray(model.R_d_desc_alpha, dtype=np.float64),
    }
    if model.alpha_E is not None:
        tensors["alpha_E"] = np.ascontiguousarray(model.alpha_E, dtype=np.float64)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"gpff": json.dumps(meta)}))


def read_model_file(path):
    """Metadata document (dict) and tensors (dict of numpy arrays) of a `.gpff` file.

    Raises ModelFileError naming the file: missing, not safetensors, no gpff metadata, unknown
    format version.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(path, framework="numpy") as fh:
            raw = (fh.metadata() or {}).get("gpff")
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a valid .gpff (safetensors) file: {err}") from None
    if raw is None:
        raise ModelFileError(f"{path}: no 'gpff' metadata: not a gpff model file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: gpff metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: gpff metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format_version {version!r} is not supported by this gpff "
                             f"(reads version {FORMAT_VERSION})")
    return meta, tensors


def _require(path, meta, tensors, keys, names):
    missing = [k for k in keys if k not in meta] + [n for n in names if n not in tensors]
    if missing:
        raise ModelFileError(f"{path}: missing {', '.join(missing)}")


def load_sgdml(path, meta, tensors):
    """Rebuild a :class:`gpff.sgdml.SGDML` from a file's metadata and tensors."""
    from .sgdml import SGDML

    _require(path, meta, tensors, ("sigma", "lam", "integration_constant", "units", "n_atoms"),
             ("z", "perms", "R_desc", "R_d_desc_alpha"))
    z, perms = tensors["z"], tensors["perms"]
    n = int(meta["n_atoms"])
    d = n * (n - 1) // 2
    xk, vk = tensors["R_desc"], tensors["R_d_desc_alpha"]
    if (z.shape != (n,) or perms.ndim != 2 or perms.shape[1] != n or xk.ndim != 2
            or xk.shape[1] != d or vk.shape != xk.shape):
        raise ModelFileError(f"{path}: inconsistent tensor shapes (z {z.shape}, perms {perms.shape}, "
                             f"R_desc {xk.shape}, R_d_desc_alpha {vk.shape}) for {n} atoms")
    beta = tensors.get("alpha_E")
    if beta is not None and beta.shape != (xk.shape[0],):
        raise ModelFileError(f"{path}: alpha_E has shape {beta.shape}, expected ({xk.shape[0]},)")
    if not all(np.all(np.isfinite(t)) for t in (xk, vk) + (() if beta is None else (beta,))):
        raise ModelFileError(f"{path}: model tensors contain NaN or inf")
    try:
        model = SGDML(sigma=meta["sigma"], lam=meta["lam"], perms=perms,
                      kernel=meta.get("kernel", "matern52"),
                      p=meta.get("descriptor_exponent", 1.0), progress=False)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
    model.alpha_E = beta
    model.use_energies = beta is not None
    model.z = z.astype(np.int32)
    model.R_desc, model.R_d_desc_alpha = xk, vk
    model.integration_constant = float(meta["integration_constant"])
    model.energy_unit = meta["units"]["energy"]
    model.molecule_extent = float(meta.get("molecule_extent", 0.0))
    model.provenance = dict(meta.get("provenance", {}))
    return model


_LOADERS = {"sgdml": load_sgdml}


def load(path):
    """Load a `.gpff` model for exact prediction in Python (``model.predict(R)``).

    Raises:
        ModelFileError: missing/corrupted file, unknown version or model kind, inconsistent tensors.
    """
    meta, tensors = read_model_file(path)
    kind = meta.get("model")
    if kind not in _LOADERS:
        raise ModelFileError(f"{os.fspath(path)}: unknown model kind {kind!r}")
    model = _LOADERS[kind](os.fspath(path), meta, tensors)
    model.metadata = meta
    return model
