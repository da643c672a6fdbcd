#!/usr/bin/env python
"""One force call, gpff C++ core vs the sgdml 1.0.3 predictor, both single-threaded.

    .venv/bin/python benchmarks/bench_force_call.py [--model out/ethanol.gpff]
        [--sgdml-model MODEL.npz] [--sgdml-python .venv-sgdml/bin/python] [--repeats 7]

What is compared: one energy + force evaluation of one ethanol geometry.

- gpff: `gpff._core.SGDMLModel.compute(positions)` (energy, forces, virial), called from Python.
- sgdml: `sgdml.predict.GDMLPredict(model, max_processes=1, use_torch=False).predict(r)` (energy,
  forces), numpy code path, run in its own interpreter (`--sgdml-python`, the `.venv-sgdml` that
  ./setup.sh creates: sgdml 1.0.3, numpy<2) as a subprocess.

Both run single-threaded: OMP/MKL/OPENBLAS_NUM_THREADS=1 (and NUMEXPR), and both processes are
pinned to the same single CPU (--cpu, default the last one the process may use).

Same training frames and sigma: by default the sgdml model is *built from the gpff model file
itself* (z, perms, sigma, c, and its M training rows: R_desc = x_m^T, R_d_desc_alpha = -v_m, sgdml's
sign convention; sgdml expands them over the S permutations itself with its `tril_perms_lin`). The
two predictors then evaluate exactly the same function of the same M, S, D and sigma, and the
script checks that they agree (energy and forces, printed). With --sgdml-model a model trained by
sgdml itself is timed instead (the script warns when its M, S or sigma differ from the gpff model's;
the cost of one call depends only on M, S and N).

Timing: after a warm-up, each of >= 5 repeats times a loop of calls lasting >= --min-time seconds;
the per-call time of a repeat is loop time / calls, and the median over repeats is reported.

FLOP count (the same nominal count for both codes, so the GFLOP/s ratio equals the speed ratio):
M * S * (10 D + 40) per call, D = N(N-1)/2: for each training row m, query ordering q and
descriptor entry, 5 flops to form u = x_q - x_m, |u|^2 and u.v_m and 5 to accumulate
c1 u - g v_m into the gradient (an FMA counts 2), plus ~40 per (m, q) for sqrt, exp and the scalar
factors. The descriptor, its Jacobian and the force assembly (O(S N^2)) are not counted.
(`gpff._core.SGDMLModel.flops_per_call` returns the same number.)
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs inside the sgdml interpreter: argv[1] = input .npz, argv[2] = settings JSON.
SGDML_SCRIPT = r'''
import json, os, sys, time
import numpy as np
settings = json.loads(sys.argv[2])
if settings["cpu"] is not None:
    os.sched_setaffinity(0, {settings["cpu"]})
import sgdml
from sgdml.predict import GDMLPredict
from sgdml.utils.desc import Desc

inp = np.load(sys.argv[1], allow_pickle=False)
r = inp["r"].reshape(1, -1)
if settings["sgdml_model"]:
    model = dict(np.load(settings["sgdml_model"], allow_pickle=True))
else:
    perms = inp["perms"].astype(int)
    dim_d = inp["x_m"].shape[1]
    tril_perms = np.array([Desc.perm(p) for p in perms])          # as sgdml's trainer does
    tril_perms_lin = (tril_perms + np.arange(len(perms))[:, None] * dim_d).flatten("F")
    model = {"type": "m", "z": inp["z"].astype(int), "perms": perms,
             "tril_perms_lin": tril_perms_lin, "sig": float(inp["sigma"]),
             "c": float(inp["c"]), "std": 1.0,
             "R_desc": np.ascontiguousarray(inp["x_m"].T),          # (D, M)
             "R_d_desc_alpha": np.ascontiguousarray(-inp["v_m"])}   # sgdml's sign is -v_m
gdml = GDMLPredict(model, max_processes=1, use_torch=False)
E, F = gdml.predict(r)
for _ in range(settings["warmup"]):
    gdml.predict(r)
calls = 1
while True:                                   # calls per repeat: >= min_time seconds per loop
    t = time.perf_counter()
    for _ in range(calls):
        gdml.predict(r)
    if time.perf_counter() - t >= settings["min_time"]:
        break
    calls *= 2
per_call = []
for _ in range(settings["repeats"]):
    t = time.perf_counter()
    for _ in range(calls):
        gdml.predict(r)
    per_call.append((time.perf_counter() - t) / calls)
print(json.dumps({"sgdml_version": sgdml.__version__, "numpy_version": np.__version__,
                  "E": float(E[0]), "F": F.reshape(-1).tolist(), "per_call": per_call,
                  "calls": calls, "n_train": int(model["R_desc"].shape[1]),
                  "n_perms": int(model["perms"].shape[0]), "sigma": float(model["sig"])}))
'''


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def read_model(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        meta = json.loads(fh.metadata()["gpff"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return meta, tensors


def pick_geometry(args):
    """One geometry (N, 3), Å: frame --frame of --geometry (default: the first rMD17 ethanol
    test frame, never trained on)."""
    import gpff

    path = pathlib.Path(args.geometry)
    ds = gpff.load_dataset(path)
    return np.ascontiguousarray(ds.R[args.frame], dtype=np.float64), f"{path.name}[{args.frame}]"


def time_core(core, r, repeats, min_time, warmup):
    for _ in range(warmup):
        core.compute(r)
    calls = 1
    while True:
        t = time.perf_counter()
        for _ in range(calls):
            core.compute(r)
        if time.perf_counter() - t >= min_time:
            break
        calls *= 2
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            core.compute(r)
        per_call.append((time.perf_counter() - t) / calls)
    return per_call, calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "out" / "ethanol.gpff"), help="trained gpff sGDML model")
    ap.add_argument("--sgdml-model", default=None,
                    help="an sgdml-trained model .npz to time (default: the gpff model converted)")
    ap.add_argument("--sgdml-python", default=os.environ.get("GPFF_SGDML_PYTHON",
                                                             str(ROOT / ".venv-sgdml" / "bin" / "python")),
                    help="interpreter with sgdml 1.0.3 (default .venv-sgdml/bin/python)")
    ap.add_argument("--geometry", default=str(ROOT / "data" / "rmd17" / "rmd17_ethanol_test_01.npz"),
                    help="dataset to take the geometry from")
    ap.add_argument("--frame", type=int, default=0, help="frame index in that dataset")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (>= 5; median reported)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repeat")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin both processes to")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")

    cpu = args.cpu
    if hasattr(os, "sched_setaffinity"):
        if cpu is None:
            cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    from gpff import _core

    meta, tensors = read_model(args.model)
    n, s = int(meta["n_atoms"]), int(meta["n_perms"])
    m, d = tensors["R_desc"].shape
    if m != int(meta["n_train"]):
        sys.exit(f"{args.model}: R_desc has {m} rows but n_train = {meta['n_train']} "
                 "(an old expanded-layout file? re-save it)")
    r, where = pick_geometry(args)

    core = _core.SGDMLModel(args.model)
    flops = core.flops_per_call
    e, f, _ = core.compute(r)
    core_times, core_calls = time_core(core, r, args.repeats, args.min_time, args.warmup)

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "input.npz")
        np.savez(inp, r=r, z=tensors["z"], perms=tensors["perms"], x_m=tensors["R_desc"],
                 v_m=tensors["R_d_desc_alpha"], sigma=meta["sigma"], c=meta["integration_constant"])
        settings = {"cpu": cpu, "repeats": args.repeats, "min_time": args.min_time,
                    "warmup": args.warmup,
                    "sgdml_model": os.path.abspath(args.sgdml_model) if args.sgdml_model else None}
        if not os.path.exists(args.sgdml_python):
            sys.exit(f"sgdml interpreter {args.sgdml_python} not found (./setup.sh creates "
                     ".venv-sgdml; or pass --sgdml-python / GPFF_SGDML_PYTHON)")
        proc = subprocess.run([args.sgdml_python, "-c", SGDML_SCRIPT, inp, json.dumps(settings)],
                              capture_output=True, text=True, env=dict(os.environ), cwd=tmp)
        if proc.returncode != 0:
            sys.exit(f"sgdml run failed:\n{proc.stderr[-4000:]}")
        sg = json.loads(proc.stdout.strip().splitlines()[-1])

    t_core = statistics.median(core_times)
    t_sg = statistics.median(sg["per_call"])
    print(f"machine: {cpu_model()} ({platform.machine()}), pinned to CPU {cpu}, 1 thread")
    print(f"model: {args.model}: N={n} D={d} M={m} S={s} sigma={meta['sigma']:g}; geometry {where}")
    print(f"flop count per call: M*S*(10*D + 40) = {flops:.4g}")
    print(f"gpff C++ core ({_core.kernel_isa()} kernel), {args.repeats} repeats x {core_calls} calls: "
          f"median {t_core * 1e9:,.0f} ns/call ({t_core * 1e6:.1f} us), "
          f"{flops / t_core * 1e-9:.1f} GFLOP/s  [min {min(core_times) * 1e6:.1f} us, "
          f"max {max(core_times) * 1e6:.1f} us]")
    print(f"sgdml {sg['sgdml_version']} predictor (numpy {sg['numpy_version']}, use_torch=False, "
          f"max_processes=1), {args.repeats} repeats x {sg['calls']} calls: "
          f"median {t_sg * 1e9:,.0f} ns/call ({t_sg * 1e6:.1f} us), {flops / t_sg * 1e-9:.2f} GFLOP/s  "
          f"[min {min(sg['per_call']) * 1e6:.1f} us, max {max(sg['per_call']) * 1e6:.1f} us]")
    print(f"speed-up gpff / sgdml: {t_sg / t_core:.1f}x")
    f_sg = np.array(sg["F"]).reshape(-1, 3)
    same = (sg["n_train"] == m and sg["n_perms"] == s and abs(sg["sigma"] - meta["sigma"]) < 1e-12)
    if not same:
        print(f"WARNING: the sgdml model has M={sg['n_train']} S={sg['n_perms']} sigma={sg['sigma']:g}, "
              f"the gpff model M={m} S={s} sigma={meta['sigma']:g}: not the same size")
    print(f"parity ({'same model' if not args.sgdml_model else 'separately trained models'}): "
          f"|E_gpff - E_sgdml| = {abs(e - sg['E']):.2e}, max |F_gpff - F_sgdml| = "
          f"{np.max(np.abs(f - f_sg)):.2e} (max |F| = {np.max(np.abs(f)):.3g}) {meta['units']['energy']}")
    if args.json:
        print(json.dumps({"machine": cpu_model(), "N": n, "D": int(d), "M": int(m), "S": s,
                          "flops_per_call": flops, "gpff_ns": t_core * 1e9, "sgdml_ns": t_sg * 1e9,
                          "gpff_per_call_s": core_times, "sgdml_per_call_s": sg["per_call"],
                          "speedup": t_sg / t_core, "kernel": _core.kernel_isa(),
                          "dE": abs(e - sg["E"]), "dF": float(np.max(np.abs(f - f_sg)))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
