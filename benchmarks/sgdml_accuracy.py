#!/usr/bin/env python3
"""rMD17 suite: gpff sGDML vs the PyPI `sgdml` 1.0.3 reference, side by side, one script.

What it measures
----------------
For each rMD17 molecule (``--molecules``, default all six: ethanol, malonaldehyde, uracil,
benzene, toluene, naphthalene) and split 01, every method trains on the first ``--n-train``
frames (default all 1000) of ``rmd17_<mol>_train_01.npz`` and predicts the 1000 frames of
``rmd17_<mol>_test_01.npz`` (never trained on). Data directory: ``--data-dir`` (default
``../shared/data/rmd17`` next to the repository, falling back to the bundled ``data/rmd17``).

Methods (``--methods``, default all three):

``sgdml``
    sgdml 1.0.3 in its own interpreter (``--sgdml-python``, default ``.venv-sgdml/bin/python``;
    it needs ``numpy<2``) through its Python API: ``GDMLTrain(max_memory=--sgdml-max-memory
    GB).create_task(train, n, train, 0, sig=σ, lam=λ, use_sym=True)`` (``use_E_cstr`` False,
    its default) and ``train``, then ``GDMLPredict``. At 1000 frames its analytic solver needs
    more memory than a 24 GB machine has; ``max_memory`` ≈ 10 GB (default) makes it use its
    iterative solver. It gets exactly ``--n-train`` frames, so its sampler takes all of them.
``gpff-same``
    requirement (a), the same model as sgdml: ``gpff.SGDML(sigma=σ, lam=λ, kernel="matern52",
    p=1, use_energies=False, solver=--gpff-solver, max_memory=--gpff-max-memory).fit(train)``
    (solver "auto" by default).
``gpff-best``
    requirement (b), gpff's defaults: ``gpff.sgdml.train_sgdml(train, sigmas=None,
    solver="auto", max_memory=--gpff-max-memory)`` — the hyperparameter search (descriptor,
    kernel/σ/p grid, then gradient σ/p, then λ, on hold-out *training* frames, gpff.hyperopt), energies on, then a
    refit on all frames; what ``gpff train sgdml DATA -o M`` does. The chosen σ, p and the search are recorded.

σ for ``sgdml`` and ``gpff-same``: ``--sigma`` (default 10) or ``--sigma-per-molecule
mol=σ,...``; λ = ``--lam`` (default 1e-10; gpff-best searches it unless given). ``--gpff-max-memory`` (GB) is gpff's memory budget:
"auto" picks Cholesky when the dense kernel fits it, else Nyström-preconditioned CG. Default: 11
GB for naphthalene — CG, which is what keeps naphthalene × 1000 frames within 12 GB (the scale
requirement) — and gpff's own default (80 % of RAM) for the other molecules (on 24 GB: Cholesky
for the five others, up to toluene, n = 46000 with energies, 16.9 GB for the kernel). With CG,
α is checkpointed every few minutes to ``--checkpoint-dir`` and a rerun of the same entry resumes from it.

Each training runs in its own child process, one after the other (never two at once). Per run:
force MAE / RMSE (per component) and energy MAE / RMSE (per frame) on the test frames, all
computed by ``gpff.evaluate.error_metrics`` from the predictions the child writes (stored in
kcal/mol, printed in meV/Å and meV with ``gpff.units.energy_factor``); the training wall time
(measured inside the child around the training calls: symmetries, search, kernel, solve); the
peak resident memory of the training process (``ru_maxrss`` from ``os.wait4``, GB = 10^9 bytes);
the number of symmetries; the solver with, for CG, iterations, restarts and preconditioner size
(``model.provenance["solver"]``); the 1-minute load average when the run started (other jobs on
the machine slow it down).

Results go, per (molecule, method), into ``--json`` (default ``out/sgdml_accuracy.json``;
``out/sgdml_accuracy_n<N>.json`` with a smaller ``--n-train``) as each run finishes, written
atomically, so a long suite can be split over several invocations: entries already present are
skipped unless ``--force``. A results file of the first version of this script (one ethanol run,
sgdml vs gpff at σ = 10, forces only, Cholesky) is converted on first use into the ``ethanol``
``sgdml`` and ``gpff-same`` entries. The table (meV/Å, meV; ``--kcal`` adds kcal/mol columns)
is printed at the end with the ratios gpff-same/sgdml and pass/fail of:

(a) gpff-same's force and energy MAE ≤ 1.02 × sgdml's and its training time ≤ 0.5 × sgdml's;
(b) gpff-best's force MAE ≤ FCHL19's on rMD17 (MACE paper, NeurIPS 2022, Table 1): ethanol 6.2,
    malonaldehyde 10.3, uracil 4.2, benzene 2.6, toluene 8.8, naphthalene 6.5 meV/Å;
scale: each naphthalene gpff run at 1000 frames with peak RSS ≤ 12 GB (time, CG iterations and
    preconditioner size are in the table).

How to run (from the repository root; 2 cores: sgdml ~5 min per ethanol-size molecule, longer
for bigger ones; gpff-same ~2.5 min, gpff-best ~6 min for ethanol)::

    .venv/bin/python benchmarks/sgdml_accuracy.py                        # everything
    .venv/bin/python benchmarks/sgdml_accuracy.py --molecules ethanol --methods gpff-best
    .venv/bin/python benchmarks/sgdml_accuracy.py --molecules naphthalene --methods gpff-same \\
        --n-train 200                                                    # quick check
    .venv/bin/python benchmarks/sgdml_accuracy.py --report out/sgdml_accuracy.json  # re-print

Exit status: 0 when every requested run finished (the criteria are reported, not enforced), 1
with ``--check`` when a criterion that could be evaluated fails, 2 when a child failed (the other
runs still go ahead; the error is printed and nothing is recorded for that run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import gpff  # noqa: F401
except ImportError:                                    # running from a source checkout
    sys.path.insert(0, os.path.join(ROOT, "trainer"))
    import gpff  # noqa: F401
from gpff.evaluate import error_metrics  # noqa: E402
from gpff.modelfile import write_atomic  # noqa: E402
from gpff.units import energy_factor  # noqa: E402

MOLECULES = ("ethanol", "malonaldehyde", "uracil", "benzene", "toluene", "naphthalene")
METHODS = ("sgdml", "gpff-same", "gpff-best")
# FCHL19 force MAE on rMD17 (meV/Å), MACE paper (Batatia et al., NeurIPS 2022), Table 1.
FCHL19 = {"ethanol": 6.2, "malonaldehyde": 10.3, "uracil": 4.2, "benzene": 2.6, "toluene": 8.8,
          "naphthalene": 6.5}
DATA_DIRS = (os.path.join(os.path.dirname(ROOT), "shared", "data", "rmd17"),
             os.path.join(ROOT, "data", "rmd17"))
MEV = energy_factor("kcal/mol", "eV") * 1000.0      # kcal/mol -> meV
ERR_RATIO = 1.02          # (a): errors within 2 % of sgdml's
TIME_RATIO = 0.5          # (a): training time at most half of sgdml's
SCALE_MOLECULE, SCALE_RSS, SCALE_GPFF_MEMORY = "naphthalene", 12e9, 11.0
FORMAT = "rmd17_suite/1"

# Runs inside the sgdml interpreter (numpy<2, sgdml 1.0.3). argv[1]: JSON config.
SGDML_CHILD = r'''
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
import sgdml                               # logs its own progress ([INFO] ...) to the terminal
from sgdml.predict import GDMLPredict
from sgdml.train import GDMLTrain
from sgdml.utils import io

def dataset(path, n, name):
    """sgdml dataset dict (type 'd') of the first n frames of an rMD17 npz file."""
    with np.load(path) as d:
        ds = {"type": "d", "code_version": sgdml.__version__, "name": np.array(name),
              "theory": np.array("PBE/def2-SVP (rMD17)"), "z": d["nuclear_charges"].astype(int),
              "R": np.array(d["coords"][:n], dtype=float), "E": np.array(d["energies"][:n], dtype=float),
              "F": np.array(d["forces"][:n], dtype=float), "r_unit": np.array("Ang"),
              "e_unit": np.array("kcal/mol")}
    ds["md5"] = io.dataset_md5(ds)
    return ds

train = dataset(cfg["train"], cfg["n_train"], cfg["name"] + "_train")
n = train["R"].shape[0]
assert n == cfg["n_train"], (n, cfg["n_train"])
gdml = GDMLTrain(max_memory=cfg["max_memory"], max_processes=cfg["max_processes"])
t0 = time.perf_counter()
# n_valid = 0 with the training set as "validation" set: sgdml excludes the training indices from
# the validation draw, and train() never looks at validation frames.
task = gdml.create_task(train, n, train, 0, sig=cfg["sigma"], lam=cfg["lam"], use_sym=True,
                        use_E_cstr=False)
assert np.array_equal(task["idxs_train"], np.arange(n)), "sgdml did not take all training frames"
model = gdml.train(task)
t_train = time.perf_counter() - t0

test = dataset(cfg["test"], None, cfg["name"] + "_test")
pred = GDMLPredict(model, max_memory=cfg["max_memory"], max_processes=cfg["max_processes"])
t0 = time.perf_counter()
E, F = pred.predict(test["R"].reshape(len(test["R"]), -1))
t_pred = time.perf_counter() - t0
np.savez(cfg["out_pred"], E=np.asarray(E, dtype=float).ravel(),
         F=np.asarray(F, dtype=float).reshape(test["F"].shape))
info = {"version": sgdml.__version__, "numpy": np.__version__, "train_seconds": t_train,
        "predict_seconds": t_pred, "n_train": int(n), "n_perms": int(model["perms"].shape[0]),
        "sigma": float(cfg["sigma"]), "lam": float(cfg["lam"]), "p": 1.0, "kernel": "matern52",
        "use_energies": False,
        "solver": {"solver": str(model["solver_name"]), "iterations": model.get("solver_iters")},
        "max_memory_gb": cfg["max_memory"]}
def plain(v):
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v.item() if hasattr(v, "item") else v
with open(cfg["out_info"], "w") as fh:
    json.dump(plain(info), fh)
'''

# Runs in this script's interpreter (gpff importable through PYTHONPATH). argv[1]: JSON config.
GPFF_CHILD = r'''
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
import torch
import gpff
from gpff.data import load_dataset
from gpff.sgdml import train_sgdml
train = load_dataset(cfg["train"]).subset(np.arange(cfg["n_train"]))
test = load_dataset(cfg["test"])
common = {"lam": cfg["lam"], "solver": cfg["solver"], "max_memory": cfg["max_memory"],
          "progress": cfg["progress"]}
if cfg["checkpoint"]:                   # CG saves α there every few minutes; resume from it
    common.update(checkpoint=cfg["checkpoint"], resume=True)
t0 = time.perf_counter()
if cfg["method"] == "gpff-same":
    model = gpff.SGDML(sigma=cfg["sigma"], kernel="matern52", p=1.0, use_energies=False,
                       **common).fit(train)
else:                                   # gpff-best: the defaults (search, energies when present)
    model = train_sgdml(train, sigmas=None, **common)
t_train = time.perf_counter() - t0
t0 = time.perf_counter()
E, F = model.predict(test.R)
t_pred = time.perf_counter() - t0
np.savez(cfg["out_pred"], E=E, F=F)
if cfg["model_out"]:
    model.save(cfg["model_out"])
prov = model.provenance
solver = {k: v for k, v in prov.get("solver", {}).items() if k != "inducing"}
info = {"version": gpff.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "train_seconds": t_train, "refit_seconds": prov.get("train_seconds"),
        "predict_seconds": t_pred, "n_train": int(model.n_train), "n_perms": int(len(model.perms)),
        "sigma": float(model.sigma), "descriptor": model.descriptor,
        "p": float(model.p) if model.descriptor == "inverse_distance" else None, "kernel": model.kernel,
        "use_energies": bool(model.use_energies), "lam": float(model.lam), "solver": solver,
        "max_memory_gb": cfg["max_memory"], "solver_option": cfg["solver"],
        "model": cfg["model_out"]}
search = prov.get("hyperparameter_search")
if search is not None:
    info["hyperparameter_search"] = search
with open(cfg["out_info"], "w") as fh:
    json.dump(info, fh)
'''


def run_child(python, code, cfg, env=None, log=None):
    """Run `code` in `python` with the JSON config; return (info, E, F, wall s, peak RSS bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code, json.dumps(cfg)], env=env)
    try:
        _, status, usage = os.wait4(proc.pid, 0)          # this child's own rusage
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{python}: child exited with status {proc.returncode} "
                           f"(its error is printed above)")
    with open(cfg["out_info"]) as fh:
        info = json.load(fh)
    with np.load(cfg["out_pred"]) as d:
        E, F = d["E"], d["F"]
    return info, E, F, wall, usage.ru_maxrss * 1024   # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------------- results document
def _empty_doc() -> dict:
    return {"benchmark": "sgdml_accuracy", "format": FORMAT, "suite": "rMD17 split 01",
            "units": {"energy": "kcal/mol", "force": "kcal/mol/Å", "rss": "bytes", "time": "s"},
            "fchl19_force_mae_mev_per_A": FCHL19, "results": {}}


def _convert_v1(old: dict) -> dict:
    """The results file of the first version (one ethanol run) as suite entries."""
    doc = _empty_doc()
    ent = {}
    note = ("from the first version of this script (one ethanol run, written before gpff had "
            "energy training: gpff trained on forces only, Matérn 5/2, p = 1, Cholesky)")
    for old_name, method in (("sgdml", "sgdml"), ("gpff", "gpff-same")):
        r = dict(old["results"][old_name])
        solver = r.pop("solver")
        iters = r.pop("solver_iters", None)
        r.update({"method": method, "molecule": "ethanol", "n_train": old["n_train"],
                  "n_test": old["n_test"], "sigma": old["sigma"], "lam": old["lam"], "p": 1.0,
                  "kernel": "matern52", "use_energies": False, "cpus": old.get("cpus"),
                  "solver": {"solver": solver, "iterations": iters}, "note": note,
                  "train_file": old.get("train_file"), "test_file": old.get("test_file")})
        ent[method] = r
    doc["results"]["ethanol"] = ent
    return doc


def load_doc(path: str) -> dict:
    if not path or not os.path.exists(path):
        return _empty_doc()
    with open(path) as fh:
        doc = json.load(fh)
    if doc.get("format") == FORMAT:
        return doc
    if doc.get("benchmark") == "sgdml_accuracy" and "ratio_gpff_over_sgdml" in doc:
        return _convert_v1(doc)
    raise SystemExit(f"{path}: not a results file of this script")


def save_entry(path: str, mol: str, method: str, entry: dict) -> None:
    """Add one entry to the results file (re-read first: another invocation may have written)."""
    doc = load_doc(path)
    doc["results"].setdefault(mol, {})[method] = entry

    def _write(tmp):
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
    write_atomic(path, _write)


# --------------------------------------------------------------------------------- criteria
def criteria(doc: dict) -> dict:
    """Per molecule: (a), (b) and scale verdicts (None when the entries are missing)."""
    out = {}
    for mol, ent in doc["results"].items():
        s, g, b = ent.get("sgdml"), ent.get("gpff-same"), ent.get("gpff-best")
        c = {"a": None, "b": None, "scale": None, "ratios": None}
        if s and g:
            r = {"force_mae": g["force_mae"] / s["force_mae"],
                 "energy_mae": g["energy_mae"] / s["energy_mae"],
                 "train_seconds": g["train_seconds"] / s["train_seconds"],
                 "peak_rss": g["peak_rss_bytes"] / s["peak_rss_bytes"]}
            c["ratios"] = r
            c["a"] = bool(r["force_mae"] <= ERR_RATIO and r["energy_mae"] <= ERR_RATIO
                          and r["train_seconds"] <= TIME_RATIO)
        if b and mol in FCHL19:
            c["b"] = bool(b["force_mae"] * MEV <= FCHL19[mol])
        if mol == SCALE_MOLECULE:
            runs = [e for m, e in ent.items() if m != "sgdml" and e.get("n_train", 0) >= 1000]
            if runs:
                c["scale"] = bool(all(e["peak_rss_bytes"] <= SCALE_RSS for e in runs))
        out[mol] = c
    return out


def _solver_str(s: dict) -> str:
    if not s:
        return ""
    name = s.get("solver", "")
    if name == "cg" and "n_inducing" in s:
        return (f"cg it={s.get('iterations')} rst={s.get('restarts')} k={s.get('n_inducing')} "
                f"({s.get('n_inducing_frames')} fr, {s.get('preconditioner_bytes', 0) / 1e9:.2f} GB)")
    if s.get("iterations") is not None:
        return f"{name} it={s['iterations']}"
    return name


def _verdict(v) -> str:
    return "-" if v is None else ("PASS" if v else "FAIL")


def print_table(doc: dict, kcal: bool = False) -> None:
    mols = [m for m in MOLECULES if m in doc["results"]] + \
        [m for m in doc["results"] if m not in MOLECULES]
    crit = criteria(doc)
    print()
    print(f"{doc.get('suite', 'rMD17 split 01')}: F MAE meV/Å (per component), E MAE meV "
          f"(per frame), train = wall s of training, RSS = peak resident GB (10^9 B) of the "
          f"training process, load = 1-min load average at start")
    hdr = (f"{'molecule':<14}{'method':<11}{'n':>5}{'F MAE':>8}{'E MAE':>8}"
           + (f"{'F kcal':>9}{'E kcal':>9}" if kcal else "")
           + f"{'FCHL19':>8}{'train s':>9}{'RSS GB':>8}{'load':>6}{'σ':>8}{'p/desc':>7}{'kernel':>9}{'E?':>4}"
           f"{'sym':>5}  solver")
    print(hdr)
    print("-" * len(hdr))
    for mol in mols:
        ent = doc["results"][mol]
        for method in [m for m in METHODS if m in ent] + [m for m in ent if m not in METHODS]:
            r = ent[method]
            load = r.get("loadavg_1min")
            print(f"{mol:<14}{method:<11}{r.get('n_train', 0):>5d}{r['force_mae'] * MEV:>8.2f}"
                  f"{r['energy_mae'] * MEV:>8.2f}"
                  + (f"{r['force_mae']:>9.4f}{r['energy_mae']:>9.4f}" if kcal else "")
                  + (f"{FCHL19[mol]:>8.1f}" if method == "gpff-best" and mol in FCHL19
                     else f"{'':>8}")
                  + f"{r['train_seconds']:>9.1f}{r['peak_rss_bytes'] / 1e9:>8.2f}"
                  f"{(f'{load:.1f}' if load is not None else '?'):>6}{r['sigma']:>8.3g}"
                  + (f"{r['p']:>7.3g}" if r.get("p", 1.0) is not None else f"{'fchl19':>7}")
                  + f"{r.get('kernel', 'matern52'):>9}"
                  f"{('y' if r.get('use_energies') else 'n'):>4}"
                  f"{r.get('n_perms', 0):>5d}  {_solver_str(r.get('solver'))}")
    print()
    print(f"(a) gpff-same vs sgdml: F and E MAE ≤ {ERR_RATIO:g}×, train time ≤ {TIME_RATIO:g}×;"
          f" (b) gpff-best F MAE ≤ FCHL19; scale: {SCALE_MOLECULE} × 1000 gpff peak RSS ≤ "
          f"{SCALE_RSS / 1e9:g} GB")
    for mol in mols:
        c = crit[mol]
        r = c["ratios"]
        ratio = (f"F {r['force_mae']:.4f}  E {r['energy_mae']:.4f}  time {r['train_seconds']:.3f}"
                 f"  RSS {r['peak_rss']:.3f}") if r else "(needs sgdml and gpff-same)"
        line = f"  {mol:<14}(a) {_verdict(c['a']):<5}{ratio:<52}(b) {_verdict(c['b'])}"
        if mol == SCALE_MOLECULE:
            line += f"   scale {_verdict(c['scale'])}"
        print(line)


# ------------------------------------------------------------------------------------- main
def _parse_sigmas(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        mol, _, val = item.partition("=")
        if mol not in MOLECULES or not val:
            raise argparse.ArgumentTypeError(f"expected mol=σ with mol in {', '.join(MOLECULES)}, "
                                              f"got {item!r}")
        out[mol] = float(val)
    return out


def _parse_list(allowed):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from "
                                              f"{', '.join(allowed)}")
        return items
    return parse


def git_state() -> str | None:
    """HEAD of the checkout, with "+dirty" when trainer/ has uncommitted changes (None: no git)."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "trainer"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def data_file(data_dir, mol, part) -> str:
    name = f"rmd17_{mol}_{part}_01.npz"
    dirs = [data_dir] if data_dir else DATA_DIRS
    for d in dirs:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    raise SystemExit(f"{name}: not found in {', '.join(dirs)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", type=_parse_list(MOLECULES), default=list(MOLECULES),
                    help="comma-separated molecules (default all six)")
    ap.add_argument("--methods", type=_parse_list(METHODS), default=list(METHODS),
                    help="comma-separated methods: sgdml,gpff-same,gpff-best (default all)")
    ap.add_argument("--sigma", type=float, default=10.0,
                    help="σ of sgdml and gpff-same (default 10)")
    ap.add_argument("--sigma-per-molecule", type=_parse_sigmas, default={},
                    metavar="MOL=S,...", help="σ per molecule, overriding --sigma")
    ap.add_argument("--lam", type=float, help="regularisation λ (default: sgdml's 1e-10 for sgdml "
                    "and gpff-same; searched by gpff-best)")
    ap.add_argument("--n-train", type=int, default=1000,
                    help="first N frames of each training file (default 1000: all)")
    ap.add_argument("--data-dir", default=None,
                    help="directory of rmd17_<mol>_{train,test}_01.npz (default "
                         "../shared/data/rmd17, then data/rmd17)")
    ap.add_argument("--sgdml-python", default=os.path.join(ROOT, ".venv-sgdml", "bin", "python"),
                    help="interpreter with sgdml 1.0.3 and numpy<2 (default .venv-sgdml/bin/python)")
    ap.add_argument("--sgdml-max-memory", type=int, default=10,
                    help="sgdml max_memory in GB (default 10: its iterative solver at 1000 frames)")
    ap.add_argument("--gpff-max-memory", type=float, default=None,
                    help=f"gpff max_memory in GB (0: gpff's default, 80 %% of RAM; default: "
                         f"{SCALE_GPFF_MEMORY:g} for {SCALE_MOLECULE}, 0 for the others)")
    ap.add_argument("--checkpoint-dir", default=os.path.join(ROOT, "out", "rmd17"),
                    help="gpff CG checkpoints <mol>_<method>_n<N>.ckpt.npz, resumed when present "
                         "('' for none)")
    ap.add_argument("--gpff-solver", choices=("auto", "cholesky", "cg"), default="auto",
                    help="gpff solver (default auto: Cholesky when it fits; cg: the solver sgdml "
                         "itself uses at 1000 frames, e.g. benzene: 40 s against auto's 280 s)")
    ap.add_argument("--max-processes", type=int, default=None,
                    help="sgdml max_processes (default: all CPUs)")
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "out", "rmd17"),
                    help="where to write gpff models <mol>_<method>[_n<N>].gpff ('' to skip)")
    ap.add_argument("--json", default=None,
                    help="results file (default out/sgdml_accuracy.json, or "
                         "out/sgdml_accuracy_n<N>.json with a smaller --n-train)")
    ap.add_argument("--force", action="store_true", help="rerun entries already in --json")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a criterion (a), (b) or scale that could be evaluated fails")
    ap.add_argument("--kcal", action="store_true", help="also print kcal/mol columns")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars from gpff")
    ap.add_argument("--report", metavar="JSON",
                    help="only print the table of a results file (no training)")
    args = ap.parse_args(argv)

    def finish(doc, status):
        print_table(doc, args.kcal)
        bad = any(v is False for c in criteria(doc).values() for k, v in c.items() if k != "ratios")
        return status or (1 if args.check and bad else 0)

    if args.report:
        return finish(load_doc(args.report), 0)

    if not 1 <= args.n_train <= 1000:
        ap.error("--n-train must be in 1..1000")
    if args.json is None:
        args.json = os.path.join(ROOT, "out", "sgdml_accuracy.json" if args.n_train == 1000
                                 else f"sgdml_accuracy_n{args.n_train}.json")
    if "sgdml" in args.methods and not (os.path.isfile(args.sgdml_python)
                                        and os.access(args.sgdml_python, os.X_OK)):
        ap.error(f"{args.sgdml_python}: no sgdml interpreter (run ./setup.sh or pass --sgdml-python)")
    for p in (args.model_dir, os.path.dirname(os.path.abspath(args.json))):
        if p:
            os.makedirs(p, exist_ok=True)
    gpff_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(gpff.__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}

    status = 0
    with tempfile.TemporaryDirectory(prefix="gpff-bench-") as tmp:
        for mol in args.molecules:
            train_path, test_path = data_file(args.data_dir, mol, "train"), \
                data_file(args.data_dir, mol, "test")
            with np.load(train_path) as d:
                if d["coords"].shape[0] < args.n_train:
                    ap.error(f"{train_path}: fewer than {args.n_train} frames")
            test = None
            sigma = args.sigma_per_molecule.get(mol, args.sigma)
            for method in args.methods:
                have = load_doc(args.json)["results"].get(mol, {}).get(method)
                if have is not None and not args.force:
                    print(f"== {mol} {method}: already in {args.json} (--force to rerun)")
                    continue
                if test is None:
                    test = gpff.load_dataset(test_path)
                common = {"name": f"rmd17_{mol}_01", "train": os.path.abspath(train_path),
                          "test": os.path.abspath(test_path), "n_train": args.n_train,
                          "sigma": sigma, "method": method,
                          # gpff-best searches λ unless --lam is given; the others use sgdml's
                          "lam": (args.lam if method == "gpff-best"
                                  else 1e-10 if args.lam is None else args.lam),
                          "out_pred": os.path.join(tmp, f"{mol}_{method}_pred.npz"),
                          "out_info": os.path.join(tmp, f"{mol}_{method}_info.json")}
                if method == "sgdml":
                    cfg = {**common, "max_memory": args.sgdml_max_memory,
                           "max_processes": args.max_processes or os.cpu_count()}
                    python, code, env = args.sgdml_python, SGDML_CHILD, None
                else:
                    model_out = (os.path.abspath(os.path.join(
                        args.model_dir, f"{mol}_{method}"
                        + ("" if args.n_train == 1000 else f"_n{args.n_train}") + ".gpff"))
                                 if args.model_dir else "")
                    ckpt = (os.path.abspath(os.path.join(
                        args.checkpoint_dir, f"{mol}_{method}_n{args.n_train}.ckpt.npz"))
                        if args.checkpoint_dir else "")
                    mem = args.gpff_max_memory
                    if mem is None:
                        mem = SCALE_GPFF_MEMORY if mol == SCALE_MOLECULE else 0
                    cfg = {**common, "max_memory": mem if mem > 0 else None,
                           "solver": args.gpff_solver, "checkpoint": ckpt,
                           "progress": not args.no_progress,
                           "model_out": model_out}
                    python, code, env = sys.executable, GPFF_CHILD, gpff_env
                load = os.getloadavg()[0]
                started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                print(f"== {mol} {method}: training on {args.n_train} frames"
                      + ("" if method == "gpff-best" else f", σ = {sigma:g}")
                      + f" (load average {load:.1f})", flush=True)
                try:
                    info, E, F, wall, rss = run_child(python, code, cfg, env)
                except RuntimeError as err:
                    print(f"error: {mol} {method} failed: {err}", file=sys.stderr, flush=True)
                    status = 2
                    continue
                err = error_metrics(E, F, test.E, test.F)
                entry = {"molecule": mol, "method": method, **err, **info,
                         "n_test": int(test.n_frames),
                         "child_wall_seconds": wall, "peak_rss_bytes": rss,
                         "loadavg_1min": load, "started": started, "cpus": os.cpu_count(),
                         "git": git_state(),
                         "train_file": os.path.basename(train_path),
                         "test_file": os.path.basename(test_path)}
                save_entry(args.json, mol, method, entry)
                print(f"== {mol} {method}: force MAE {err['force_mae'] * MEV:.2f} meV/Å, energy "
                      f"MAE {err['energy_mae'] * MEV:.2f} meV, train {info['train_seconds']:.1f} s,"
                      f" peak RSS {rss / 1e9:.2f} GB, {_solver_str(info.get('solver'))}", flush=True)
    print(f"results: {args.json}")
    return finish(load_doc(args.json), status)


if __name__ == "__main__":
    sys.exit(main())
