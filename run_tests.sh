#!/usr/bin/env bash
# Installs what is missing (./setup.sh --no-example), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --no-example
cd tests && exec ../.venv/bin/python -m pytest -q "$@"
