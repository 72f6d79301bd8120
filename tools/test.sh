#!/usr/bin/env bash
# One test command: every notebook in nbs/ and papers/ (nbdev's runner, tst_flags skip slow/gpu cells),
# the pytest suite in tests/, and the hygiene checks (export/clean leave no diff, README in sync,
# docs pre-processing). Ends with pytest's count line.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest tests -n 2 --durations=15 "$@"
