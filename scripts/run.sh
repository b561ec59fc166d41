#!/usr/bin/env bash
# The main job: creates/refreshes the virtual environment, then runs the benchmark harness.
#   bash scripts/run.sh                      # the reduced default: `tta-norm bench quick --overwrite` (a few minutes)
#   bash scripts/run.sh continual -s n_examples=2000   # add --resume or --overwrite to rerun into the same output
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ "$#" -eq 0 ]; then
    set -- quick --overwrite  # the main job reruns from scratch into runs/quick
fi
exec tta-norm bench "$@"
