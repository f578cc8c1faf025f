#!/usr/bin/env bash
# README command 2: set up (scripts/setup.sh) and run the CPU test suite. CI (.ci/run) calls this.
#   extra arguments go to pytest, e.g. scripts/test.sh -k merge
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE VELOTUNE_REQUIRE_FIXTURES=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -m "not gpu and not slow" "$@"
