#!/usr/bin/env bash
# README command 1: set up (scripts/setup.sh) and run the main job, `velotune demo`:
# fine-tune the real small model on the bundled data and save adapter + merged model.
#   extra arguments go to `velotune demo`, e.g. scripts/demo.sh --max-steps 40
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
velotune demo "$@"
