#!/usr/bin/env bash
# Two builds of saev_nb, alternating in one sitting: `bench loader` and `bench train` ratios of each, per round.
#   bash tools/bench_ab.sh BEFORE_CMD AFTER_CMD OUT_DIR [ROUNDS]
# BEFORE_CMD/AFTER_CMD run `saev_nb` of each build (e.g. a script running `PYTHONPATH=<worktree of the old commit>
# python -m saev_nb "$@"`, and .venv/bin/saev_nb). Prints the median of each figure over the rounds.
set -euo pipefail
BEFORE=$1; AFTER=$2; OUT=$3; ROUNDS=${4:-5}; mkdir -p "$OUT"; export TQDM_DISABLE=1
for round in $(seq "$ROUNDS"); do
  for who in before after; do
    B=$BEFORE; [ "$who" = after ] && B=$AFTER
    "$B" bench loader --size-gb 0.5 --n-repeats 3 --json-fpath "$OUT/loader-$who-$round.json" > /dev/null 2>&1
    "$B" bench train --d-model 256 --exp-factor 8 --batch-size 2048 --n-steps 8 --n-saes 2 --no-bmm --no-overhead \
      --json-fpath "$OUT/train-$who-$round.json" > /dev/null 2>&1
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics as st, sys
out, n = sys.argv[1], int(sys.argv[2])
for kind, key in [('loader', 'shuffled_ratio'), ('loader', 'shuffled_gbs'), ('loader', 'ordered_ratio'),
                  ('train', 'fraction_of_matmul'), ('train', 'tokens_per_s')]:
    med = {w: st.median(json.load(open(f'{out}/{kind}-{w}-{r}.json'))[key] for r in range(1, n + 1)) for w in ('before', 'after')}
    print(f"{kind} {key}: before {med['before']:.4g}, after {med['after']:.4g}, after/before {med['after'] / med['before']:.3f}")
PY
