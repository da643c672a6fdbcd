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
#: the training-row tensors of an sGDML file by descriptor (docs/model_file.md): the rows x_m and
#: v_m themselves, or (fchl19, whose rows are long) the training geometries and the Cartesian
#: force coefficients they are recomputed from at load
SGDML_ROW_TENSORS = {"inverse_distance": ("R_desc", "R_d_desc_alpha"), "fchl19": ("R_train", "alpha")}


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
    """Write a trained :class:`gpff.sgdml.SGDML` to `path` (an fchl19 model as its training
    geometries ``R_train`` and force coefficients ``alpha``, any other as its rows ``R_desc`` and
    ``R_d_desc_alpha``)."""
    from safetensors.numpy import save_file

    meta = {
        "format_version": FORMAT_VERSION, "model": "sgdml", "gpff_version": _version(),
        "units": {"energy": model.energy_unit, "length": "Angstrom"},
        "species": [chemical_symbols[int(a)] for a in model.z], "n_atoms": int(model.n_atoms),
        "kernel": model.kernel, **model.descriptor_fn().metadata(), "sigma": model.sigma,
        "lam": model.lam, "integration_constant": model.integration_constant,
        "n_train": int(model.n_train), "n_perms": int(len(model.perms)),
        "molecule_extent": model.molecule_extent, "provenance": model.provenance,
    }
    tensors = {
        "z": np.ascontiguousarray(model.z, dtype=np.int32),
        "perms": np.ascontiguousarray(model.perms, dtype=np.int32),
        **{name: np.ascontiguousarray(getattr(model, name), dtype=np.float64)
           for name in SGDML_ROW_TENSORS[model.descriptor]},
    }
    if model.alpha_E is not None:
        tensors["alpha_E"] = np.ascontiguousarray(model.alpha_E, dtype=np.float64)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"gpff": json.dumps(meta)}))


def save_mff(model, path) -> None:
    """Write a :class:`gpff.mapping.MappedForceField` to `path` (docs/mff.md)."""
    from safetensors.numpy import save_file

    sp = model.species
    tensors, pair_tables, triplet_tables = {}, [], []
    for (a, b), (coef, axis) in sorted(model.pair_tables.items()):
        name = f"pair_{sp[a]}_{sp[b]}"
        tensors[name] = np.ascontiguousarray(coef, dtype=np.float64)
        pair_tables.append({"species": [sp[a], sp[b]], "tensor": name, "r_min": axis.start,
                            "spacing": axis.spacing, "n_points": axis.n_points})
    for (c, j, k), (coef, axes) in sorted(model.triplet_tables.items()):
        name = f"triplet_{sp[c]}_{sp[j]}_{sp[k]}"
        tensors[name] = np.ascontiguousarray(coef, dtype=np.float64)
        triplet_tables.append({"species": [sp[c], sp[j], sp[k]], "tensor": name,
                               "grid": [ax.to_json() for ax in axes]})
    meta = {
        "format_version": FORMAT_VERSION, "model": "mff", "gpff_version": _version(),
        "units": {"energy": model.energy_unit, "length": "Angstrom"}, "species": sp,
        "order": model.order, "cutoff": model.cutoff, "cutoff_width": model.cutoff_width,
        "energy_offsets": [float(e) for e in model.energy_offsets],
        "pair_tables": pair_tables, "hyperparameters": model.hyperparameters,
        "mapping_error": model.mapping_error, "provenance": model.provenance,
    }
    if model.order == 3:
        meta["cutoff_3body"] = model.cutoff_3body
        meta["triplet_tables"] = triplet_tables
    if model.embedding_tables:
        tables = []
        for a, (coef, axis) in sorted(model.embedding_tables.items()):
            name = f"embedding_{sp[a]}"
            tensors[name] = np.ascontiguousarray(coef, dtype=np.float64)
            tables.append({"species": [sp[a]], "tensor": name, "rho_min": axis.start,
                           "spacing": axis.spacing, "n_points": axis.n_points})
        meta["embedding"] = {"density_decay": model.density_decay, "tables": tables}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"gpff": json.dumps(meta)}))


def model_kind(path) -> str:
    """The ``model`` entry ("sgdml", "mff") of a `.gpff` file, reading only its header.

    Raises ModelFileError naming the file when it is missing or not a gpff model file.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(path, framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get("gpff", "null"))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a valid .gpff (safetensors) file: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise ModelFileError(f"{path}: no gpff metadata with a model kind: not a gpff model file")
    return meta["model"]


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


def _fchl19_rows(path, descriptor, R, alpha):
    """The training rows x_m = x(R_m) and v_m = J(R_m) α_m, (M, D) each, of an fchl19 model file's
    training geometries R and force coefficients alpha, (M, N, 3) each
    (:func:`gpff.descriptor.training_rows`). Raises ModelFileError naming the file (and the
    frame): NaN/inf, coincident atoms, a collinear triplet (gpff.fchl19)."""
    import torch

    from .descriptor import training_rows

    for name, values in (("R_train", R), ("alpha", alpha)):
        if not np.all(np.isfinite(values)):
            raise ModelFileError(f"{path}: tensor {name!r} contains non-finite values")
    i, j = np.tril_indices(R.shape[1], -1)
    same = np.argwhere(np.all(R[:, i] == R[:, j], axis=-1))
    if len(same):
        f, pair = same[0]
        raise ModelFileError(f"{path}: tensor 'R_train': atoms {i[pair]} and {j[pair]} of frame {f} "
                             "coincide")
    try:
        x, v = training_rows(descriptor, torch.as_tensor(R), torch.as_tensor(alpha))
    except ValueError as err:
        raise ModelFileError(f"{path}: tensor 'R_train', {err}") from None
    return x.numpy(), v.numpy()


def load_sgdml(path, meta, tensors):
    """Rebuild a :class:`gpff.sgdml.SGDML` from a file's metadata and tensors (an fchl19 model's
    rows recomputed from its training geometries and force coefficients)."""
    from .sgdml import SGDML

    _require(path, meta, tensors, ("sigma", "lam", "integration_constant", "units", "n_atoms"),
             ("z", "perms"))
    z, perms = tensors["z"], tensors["perms"]
    n = int(meta["n_atoms"])
    if z.shape != (n,):
        raise ModelFileError(f"{path}: tensor z has shape {z.shape}, expected ({n},) (n_atoms)")
    descriptor = meta.get("descriptor", "inverse_distance")
    fchl19 = ({k[len("fchl19_"):]: v for k, v in meta.items() if k.startswith("fchl19_")}
              if descriptor == "fchl19" else None)
    try:
        model = SGDML(sigma=meta["sigma"], lam=meta["lam"], perms=perms,
                      kernel=meta.get("kernel", "matern52"),
                      p=meta.get("descriptor_exponent", 1.0), descriptor=descriptor,
                      fchl19=fchl19, progress=False)
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: {err}") from None
    rows = SGDML_ROW_TENSORS[descriptor]
    for name in (t for d, names in SGDML_ROW_TENSORS.items() if d != descriptor for t in names):
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} does not belong in a model with "
                                 f"descriptor {descriptor!r}, whose file stores "
                                 f"{' and '.join(rows)} (docs/model_file.md)")
    _require(path, meta, tensors, (), rows)
    a, b = tensors[rows[0]], tensors[rows[1]]
    expected = (n, 3) if descriptor == "fchl19" else (n * (n - 1) // 2,)
    if (perms.ndim != 2 or perms.shape[1] != n or a.ndim != 1 + len(expected)
            or a.shape[1:] != expected or b.shape != a.shape):
        raise ModelFileError(f"{path}: inconsistent tensor shapes (z {z.shape}, perms {perms.shape}, "
                             f"{rows[0]} {a.shape}, {rows[1]} {b.shape}; expected (M, "
                             f"{', '.join(map(str, expected))}) for {n} atoms)")
    model.z = z.astype(np.int32)
    if descriptor == "fchl19":
        model.R_train, model.alpha = a, b
        xk, vk = _fchl19_rows(path, model.descriptor_fn(), a, b)
    else:
        model.R_train = model.alpha = None
        xk, vk = a, b
    beta = tensors.get("alpha_E")
    if beta is not None and beta.shape != (xk.shape[0],):
        raise ModelFileError(f"{path}: alpha_E has shape {beta.shape}, expected ({xk.shape[0]},)")
    if not all(np.all(np.isfinite(t)) for t in (xk, vk) + (() if beta is None else (beta,))):
        raise ModelFileError(f"{path}: model tensors contain NaN or inf")
    model.alpha_E = beta
    model.use_energies = beta is not None
    model.R_desc, model.R_d_desc_alpha = xk, vk
    model.integration_constant = float(meta["integration_constant"])
    model.energy_unit = meta["units"]["energy"]
    model.molecule_extent = float(meta.get("molecule_extent", 0.0))
    model.provenance = dict(meta.get("provenance", {}))
    return model


def _axis(path, spec, what):
    from .bspline import Axis

    try:
        axis = Axis(float(spec["min"]), float(spec["spacing"]), int(spec["n_points"]))
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"{path}: {what}: grid needs numbers min, spacing, n_points") from None
    if not (axis.n_points >= 4 and axis.spacing > 0 and np.isfinite(axis.start)
            and np.isfinite(axis.spacing)):
        raise ModelFileError(f"{path}: {what}: invalid grid {spec} (n_points >= 4, spacing > 0)")
    return axis


def _table(path, tensors, entry, index, arity, what):
    """(species-index key, coefficient tensor) of one table entry, validated."""
    try:
        key = tuple(index[s] for s in entry["species"])
        coef = tensors[entry["tensor"]]
    except KeyError as err:
        raise ModelFileError(f"{path}: {what} {entry.get('species')}: unknown species or missing "
                             f"tensor {err}") from None
    if len(key) != arity:
        raise ModelFileError(f"{path}: {what} {entry['species']}: needs {arity} species")
    if not np.all(np.isfinite(coef)):
        raise ModelFileError(f"{path}: {what} {entry['species']}: coefficients contain NaN or inf")
    return key, coef


def load_mff(path, meta, tensors):
    """Rebuild a :class:`gpff.mapping.MappedForceField` from a file's metadata and tensors."""
    import itertools

    from .mapping import MappedForceField

    _require(path, meta, tensors, ("species", "order", "cutoff", "cutoff_width", "energy_offsets",
                                   "pair_tables", "units"), ())
    species, order = list(meta["species"]), meta["order"]
    index = {s: i for i, s in enumerate(species)}
    if order not in (2, 3):
        raise ModelFileError(f"{path}: order {order!r} is not 2 or 3")
    if len(meta["energy_offsets"]) != len(species):
        raise ModelFileError(f"{path}: {len(meta['energy_offsets'])} energy_offsets for "
                             f"{len(species)} species")
    pairs, triplets = {}, {}
    for entry in meta["pair_tables"]:
        key, coef = _table(path, tensors, entry, index, 2, "pair table")
        axis = _axis(path, {"min": entry.get("r_min"), "spacing": entry.get("spacing"),
                            "n_points": entry.get("n_points")}, f"pair table {entry['species']}")
        if coef.shape != (axis.n_points + 2,) or key[0] > key[1]:
            raise ModelFileError(f"{path}: pair table {entry['species']}: shape {coef.shape} or "
                                 f"species order does not match the grid")
        pairs[key] = (coef, axis)
    for entry in meta.get("triplet_tables", []) if order == 3 else []:
        key, coef = _table(path, tensors, entry, index, 3, "triplet table")
        grid = entry.get("grid")
        if not isinstance(grid, list) or len(grid) != 3:
            raise ModelFileError(f"{path}: triplet table {entry['species']}: grid needs 3 axes")
        axes = tuple(_axis(path, g, f"triplet table {entry['species']}") for g in grid)
        if coef.shape != tuple(a.n_points + 2 for a in axes) or key[1] > key[2]:
            raise ModelFileError(f"{path}: triplet table {entry['species']}: shape {coef.shape} or "
                                 f"species order does not match the grid")
        triplets[key] = (coef, axes)
    n = len(species)
    embedding, decay = {}, None
    if "embedding" in meta:
        emb = meta["embedding"]
        if not isinstance(emb, dict) or not isinstance(emb.get("tables"), list):
            raise ModelFileError(f"{path}: embedding must be an object with a list 'tables'")
        decay = emb.get("density_decay")
        if (isinstance(decay, bool) or not isinstance(decay, (int, float))
                or not (np.isfinite(decay) and decay >= 0)):
            raise ModelFileError(f"{path}: embedding: density_decay must be a number >= 0, "
                                 f"got {decay!r}")
        if decay * float(meta["cutoff"]) > 700.0:       # as the C++ core
            raise ModelFileError(f"{path}: embedding: density_decay {decay} is too large "
                                 f"(exp(-density_decay cutoff) underflows)")
        for entry in emb["tables"]:
            if not isinstance(entry, dict):
                raise ModelFileError(f"{path}: embedding tables must be objects")
            (key,), coef = _table(path, tensors, entry, index, 1, "embedding table")
            axis = _axis(path, {"min": entry.get("rho_min"), "spacing": entry.get("spacing"),
                                "n_points": entry.get("n_points")},
                         f"embedding table {entry['species']}")
            if coef.shape != (axis.n_points + 2,) or key in embedding:
                raise ModelFileError(f"{path}: embedding table {entry['species']}: shape "
                                     f"{coef.shape} does not match the grid, or a second table")
            embedding[key] = (coef, axis)
        if set(embedding) != set(range(n)):
            raise ModelFileError(f"{path}: the embedding tables do not cover every species")
    want_pairs = set(itertools.combinations_with_replacement(range(n), 2))
    want_triplets = {(c, j, k) for c in range(n) for j, k in want_pairs} if order == 3 else set()
    if set(pairs) != want_pairs or set(triplets) != want_triplets:
        raise ModelFileError(f"{path}: the tables do not cover every species pair"
                             f"{' and triplet' if order == 3 else ''} exactly once")
    return MappedForceField(species, order, meta["cutoff"], meta["cutoff_width"],
                            meta["energy_offsets"], pairs, triplets, meta.get("cutoff_3body"),
                            meta["units"]["energy"], meta.get("hyperparameters"),
                            meta.get("mapping_error"), meta.get("provenance"), embedding, decay)


_LOADERS = {"sgdml": load_sgdml, "mff": load_mff}


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
