#!/usr/bin/env bash
# scripts/gpu_lean.sh - run scripts/gpu_lean.py, the headline-first GPU run (what a short GPU window runs first).
# The driver needs only a python 3 standard library; it picks, for its steps, the interpreter that imports a
# CUDA torch. Arguments pass through: bash scripts/gpu_lean.sh [--out DIR] [--budget S] [--simulate] ...
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
py="$(command -v python3 || command -v python)" || { echo "gpu_lean.sh: no python3 or python on PATH" >&2; exit 2; }
exec "$py" scripts/gpu_lean.py "$@"
