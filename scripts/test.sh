#!/usr/bin/env bash
# Runs the test suite (fast tests; add `-m slow` for the long end-to-end runs) and the linter.
# Creates/refreshes the virtual environment first.  Usage: bash scripts/test.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
ruff check tta_norm corruptions scripts tests || exit 1
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as failure" >&2
    exit 1
fi
exit "$rc"
