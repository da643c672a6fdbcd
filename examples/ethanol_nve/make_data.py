"""Write the LAMMPS data file of the ethanol NVE example.

    python make_data.py [--dataset ../../data/rmd17/rmd17_ethanol_train_01.npz] [--copies 2]
                        [--box 20] [--seed 1] [-o ethanol8.data]

Places copies x copies x copies ethanol molecules (rMD17 geometries, randomly rotated) on a grid in
a periodic cubic box, one molecule ID per molecule. Atom IDs within a molecule follow the atom order
of the dataset, which is the model's atom order for a model trained on it: `pair_style sgdml`
matches atoms to the model by ascending atom ID and checks the elements.
Atom types: 1 = C, 2 = H, 3 = O (pair_coeff * * model.gpff C H O).
"""

import argparse
import os

import numpy as np

MASSES = {"C": 12.011, "H": 1.008, "O": 15.999}
SYMBOLS = {1: "H", 6: "C", 8: "O"}
TYPES = ["C", "H", "O"]


def rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--dataset", default=os.path.join(here, "..", "..", "data", "rmd17",
                                                      "rmd17_ethanol_train_01.npz"))
    ap.add_argument("--copies", type=int, default=2, help="molecules per box edge")
    ap.add_argument("--box", type=float, default=20.0, help="box edge, Å")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", default="ethanol8.data")
    args = ap.parse_args()

    d = np.load(args.dataset)
    species = [SYMBOLS[int(z)] for z in d["nuclear_charges"]]
    frames = d["coords"]
    rng = np.random.default_rng(args.seed)
    spacing = args.box / args.copies
    atoms = []
    mol = 0
    for ix in range(args.copies):
        for iy in range(args.copies):
            for iz in range(args.copies):
                R = frames[rng.integers(len(frames))]
                R = (R - R.mean(axis=0)) @ rotation(rng).T
                R += spacing * (np.array([ix, iy, iz]) + 0.5)
                for k, r in enumerate(R):
                    r = np.mod(r, args.box)
                    atoms.append(f"{mol * len(R) + k + 1} {mol + 1} {TYPES.index(species[k]) + 1} "
                                 f"{r[0]:.10f} {r[1]:.10f} {r[2]:.10f}")
                mol += 1
    lines = [f"ethanol x {mol} for gpff pair_style sgdml (make_data.py, seed {args.seed})", "",
             f"{len(atoms)} atoms", f"{len(TYPES)} atom types", "",
             f"0.0 {args.box} xlo xhi", f"0.0 {args.box} ylo yhi", f"0.0 {args.box} zlo zhi", "",
             "Masses", ""]
    lines += [f"{i + 1} {MASSES[e]}  # {e}" for i, e in enumerate(TYPES)]
    lines += ["", "Atoms # molecular", ""] + atoms
    with open(args.output, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.output}: {mol} molecules, {len(atoms)} atoms")


if __name__ == "__main__":
    main()
