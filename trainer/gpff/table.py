"""Export the 2-body part of a mapped force field as a stock LAMMPS ``pair_style table`` file.

With full neighbour sums the 2-body energy is E₂ = Σ_i Σ_j f_c(r_ij) g₂(r_ij) = Σ_{i<j} φ(r_ij), so
the pair potential is φ(r) = 2 f_c(r) g₂(r) (docs/mff.md) and the tabulated force is −φ'(r). Each
species pair gets one section, keyword ``A_B``; use it as

    pair_style table spline N
    pair_coeff 1 1 model.table Si_Si

The one-body energies e₀ and any 3-body term are not part of the table (the file header says so).
"""

from __future__ import annotations

import numpy as np

from .bspline import evaluate_1d
from .mapping import MappedForceField, cutoff_function
from .modelfile import write_atomic


def pair_table(model: MappedForceField, a: int, b: int, n_points: int):
    """(r, φ(r), −φ'(r)), each (n_points,), of species pair (a, b) on [r_min, r_c]."""
    coef, axis = model.pair_tables[(min(a, b), max(a, b))]
    r = np.linspace(axis.start, model.cutoff, n_points)
    g, dg = evaluate_1d(coef, axis, r)
    fc, dfc = cutoff_function(r, model.cutoff, model.cutoff_width)
    return r, 2.0 * fc * g, -2.0 * (dfc * g + fc * dg)


def write_pair_table(model: MappedForceField, path, n_points: int | None = None,
                     source: str = "") -> list[str]:
    """Write every species pair's φ and force to a LAMMPS table file at `path` (atomically).

    n_points: table points per pair (default: the model's 2-body grid size).
    Returns the section keywords written, e.g. ["Si_Si"].
    """
    lines = [f"# 2-body part of the gpff mapped force field {source}".rstrip(),
             f"# energy unit {model.energy_unit}, distances Angstrom; phi(r) = 2 f_c(r) g2(r)",
             "# not included: the one-body energies e0"
             + (" and the 3-body term (order 3 model)" if model.order == 3 else ""), ""]
    keywords = []
    for (a, b), (_, axis) in sorted(model.pair_tables.items()):
        n = int(n_points or axis.n_points)
        r, e, f = pair_table(model, a, b, n)
        key = f"{model.species[a]}_{model.species[b]}"
        keywords.append(key)
        lines += [key, f"N {n} R {r[0]:.12g} {r[-1]:.12g}", ""]
        lines += [f"{k + 1} {r[k]:.12g} {e[k]:.16e} {f[k]:.16e}" for k in range(n)]
        lines.append("")

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines))

    write_atomic(path, write)
    return keywords
