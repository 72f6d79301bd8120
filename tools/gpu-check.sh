#!/usr/bin/env bash
# Every GPU check in one prepared run (at most 8 minutes on one H100/H200), or its dry run on the CPU.
#   bash tools/gpu-check.sh [--gpu|--cpu|--dry-run] OUT_DIR
# Default: --gpu if torch sees a CUDA device, else --cpu (= --dry-run: the same checks with device=cpu at small
# sizes; CI runs it through tests/test_bench.py). Each check runs as its own process under its own time limit,
# logs to OUT_DIR/logs/NAME.log and leaves its measurement in OUT_DIR/raw/NAME.json; the end writes
# OUT_DIR/report.md and OUT_DIR/report.json (goal, measured value and pass/fail of every check). Exit status 0 when
# every check ran (goals met or not), 1 when one crashed or timed out. The checks are documented in nbs/11_bench.ipynb.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}; [ -x "$PY" ] || PY=$(command -v python3)  # e.g. a GPU machine without .venv
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # saev_nb importable without installing it
mode=auto
case "${1:-}" in
  --gpu) mode=gpu; shift ;;
  --cpu|--dry-run) mode=cpu; shift ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
esac
[ $# -eq 1 ] || { echo "usage: bash tools/gpu-check.sh [--gpu|--cpu|--dry-run] OUT_DIR" >&2; exit 2; }
mkdir -p "$1/raw" "$1/logs" && OUT=$(cd "$1" && pwd)
if [ "$mode" = auto ]; then
  mode=$("$PY" -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")') || exit 1
fi
if [ "$mode" = gpu ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu-check: torch sees no CUDA device; run with --cpu for the dry run" >&2; exit 2; }
  dev=cuda; threads=$(( $(nproc) > 8 ? 8 : $(nproc) ))
  LOADER=(--size-gb 2.5 --n-repeats 5 --n-threads "$threads")
  TRAIN=(--amp bfloat16 --tf32 --d-model 768 --exp-factor 32 --batch-size 16384 --n-steps 10 --n-saes 8)
  E2E=(--amp bfloat16 --tf32 --d-model 768 --exp-factor 32 --batch-size 16384 --n-saes 1 --no-step --no-bmm
       --no-overhead --no-profile --e2e-gb 1 --e2e-tokens 20000000 --e2e-threads "$threads")
  SHARDS=(--ckpt ViT-B-16/random --batch-size 256 --n-images 1024 --n-workers "$threads" --n-repeats 2)
  DET=(); CELLS=(--run); PAPER=()
  T_SELFTEST=60 T_LOADER=75 T_TRAIN=90 T_E2E=60 T_SHARDS=75 T_CELLS=45 T_PAPER=75 T_DET=30  # 510 s in all
else
  dev=cpu
  LOADER=(--size-gb 0.02 --shard-gb 0.008 --d-model 64 --content-tokens 64 --batch-size 2048 --block-tokens 8 --n-repeats 1)
  TRAIN=(--d-model 64 --exp-factor 4 --batch-size 512 --n-steps 2 --n-saes 2 --n-overhead-steps 30)
  E2E=(--d-model 32 --exp-factor 2 --batch-size 256 --n-saes 1 --no-step --no-bmm --no-overhead --no-profile
       --e2e-gb 0.005 --e2e-tokens 20000)
  SHARDS=(--n-images 16 --batch-size 16 --n-workers 0 --n-repeats 1)
  DET=(--d-model 16 --batch-size 64 --n-steps 24 --ckpt-every 8 --interrupt-after 20); CELLS=(--no-run)
  PAPER=(--prepare-only)
  T_LOADER=60 T_TRAIN=60 T_E2E=60 T_SHARDS=60 T_CELLS=30 T_PAPER=60 T_DET=60
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # toy sizes: threads only add barrier waits on a shared CPU
fi
export TQDM_DISABLE=1

check() {  # check NAME SECONDS COMMAND...: run it under a time limit; its exit status and time go to raw/NAME.status.json
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1; local rc=$?
  local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  echo "{\"rc\": $rc, \"seconds\": $dt, \"limit_s\": $limit}" > "$OUT/raw/$name.status.json"
  printf 'gpu-check: %-12s rc=%-3s %6.1f s\n' "$name" "$rc" "$dt" >&2
}

# which of the packages the checks import are missing here (a bare GPU machine lacks some; see nbs/11_bench.ipynb)
"$PY" - "$OUT/raw/preflight.json" <<'PYEOF'
import importlib.util, json, sys
mods = ['torch', 'numpy', 'tyro', 'fastcore', 'open_clip', 'safetensors', 'submitit', 'scipy', 'pandas', 'matplotlib',
        'papermill', 'nbdev', 'execnb', 'IPython', 'ipykernel', 'nbclient']
json.dump({'missing_packages': [m for m in mods if importlib.util.find_spec(m) is None]}, open(sys.argv[1], 'w'))
PYEOF

SAEV=("$PY" -m saev_nb.cli)
if [ "$mode" = gpu ]; then  # first: does this installation compute what it should here? (the suite runs it on the CPU)
  check selftest "$T_SELFTEST" "${SAEV[@]}" selftest --device cuda --out "$OUT/selftest"
fi
check loader "$T_LOADER" "${SAEV[@]}" bench loader --device $dev "${LOADER[@]}" --json-fpath "$OUT/raw/loader.json"
check train "$T_TRAIN" "${SAEV[@]}" bench train --device $dev "${TRAIN[@]}" --json-fpath "$OUT/raw/train.json"
check e2e "$T_E2E" "${SAEV[@]}" bench train --device $dev "${E2E[@]}" --json-fpath "$OUT/raw/e2e.json"
check shards "$T_SHARDS" "${SAEV[@]}" bench shards --device $dev "${SHARDS[@]}" --json-fpath "$OUT/raw/shards.json"
check cells "$T_CELLS" "${SAEV[@]}" bench cells --root "$ROOT" "${CELLS[@]}" --json-fpath "$OUT/raw/cells.json"
mkdir -p "$OUT/paper"
check paper "$T_PAPER" "$PY" -m papermill "$ROOT/papers/semseg.ipynb" "$OUT/paper/semseg.ipynb" --cwd "$ROOT/papers" \
  -k python3 -p device $dev -p out_dir "$OUT/paper/out" ${PAPER[@]+"${PAPER[@]}"}
check determinism "$T_DET" "${SAEV[@]}" bench determinism --device $dev ${DET[@]+"${DET[@]}"} \
  --json-fpath "$OUT/raw/determinism.json"

"${SAEV[@]}" bench report --out "$OUT" --mode $mode || exit 1
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["all_ran"] else 1)' "$OUT/report.json"
