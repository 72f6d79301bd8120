#!/usr/bin/env bash
# Authoring helper: .authoring/NAME.py (jupytext percent) -> nbs/NAME.ipynb (or papers/NAME.ipynb with --papers),
# executed in-process with outputs saved, cleaned, and exported. Usage: bash tools/nb.sh 03b_loaders [--papers] [--no-run]
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; shift
dest=nbs; run=1
for a in "$@"; do case "$a" in --papers) dest=papers;; --no-run) run=0;; esac; done
V=.venv/bin
"$V/jupytext" --quiet --to ipynb ".authoring/$name.py" -o "$dest/$name.ipynb"
"$V/python" - "$dest/$name.ipynb" <<'PY'
import json, sys
p = sys.argv[1]; nb = json.load(open(p))
nb['metadata'] = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
json.dump(nb, open(p, 'w'), indent=1)
PY
if [ "$dest" = nbs ]; then "$V/nbdev_export" --path "$dest/$name.ipynb"; fi
if [ "$run" = 1 ]; then "$V/python" tools/run_nb.py "$dest/$name.ipynb"; fi
"$V/nbdev_clean" --fname "$dest/$name.ipynb"
echo "ok: $dest/$name.ipynb"
