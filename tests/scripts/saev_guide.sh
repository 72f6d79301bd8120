#!/usr/bin/env bash
# saev's guide and its ADE20K instructions, command for command, through the installed `saev_nb`; only paths and sizes
# are changed (a random-init ViT-B/16 and a handful of generated ADE20K-layout scenes stand in for the real ones).
# Usage: bash tests/scripts/saev_guide.sh WORK_DIR. With SLURM_ACCT and SLURM_PARTITION set (a Slurm cluster), the
# guide's --slurm-acct/--slurm-partition flags are passed too, plus --wait where a later command needs the result.
set -euo pipefail
W=$1; REPO=$(cd "$(dirname "$0")/../.." && pwd)
SLURM=(); WAIT=()
if [ -n "${SLURM_ACCT:-}" ]; then SLURM=(--slurm-acct "$SLURM_ACCT" --slurm-partition "$SLURM_PARTITION"); WAIT=(--wait); fi
ROOT=$W/ADEChallengeData2016
saev_nb make-data --root "$ROOT" --n-train 8 --n-val 4 --size 64 --n-classes 4

# 1. Record activations: ViT-B/16, the last six blocks, 196 patches of width 768.
for SPLIT in training validation; do
  saev_nb shards --shards-root "$W/shards" --family clip --ckpt ViT-B-16/random --d-model 768 --layers 6 7 8 9 10 11 \
    --content-tokens-per-example 196 --batch-size 8 "${SLURM[@]}" data:img-seg-folder --data.root "$ROOT" \
    --data.split "$SPLIT" | tail -n 1 > "$W/$SPLIT.path"
done
TRAIN=$(cat "$W/training.path"); VAL=$(cat "$W/validation.path")
saev_nb shards validate "$TRAIN"

# 2. Train an SAE with the guide's flags (the subcommands' flags follow them).
saev_nb train --runs-root "$W/runs" --lr 4e-4 --sae.exp-factor 2 --sae.d-model 768 --tag ade20k-v0.1 --n-train 3136 \
  "${SLURM[@]}" "${WAIT[@]}" --train-data.shards "$TRAIN" --train-data.layer 10 --val-data.shards "$VAL" \
  --val-data.layer 10 --train-data.batch-size 392 --val-data.batch-size 392 --n-val 784 --n-lr-warmup 4 \
  sae.activation:relu objective:matryoshka --objective.sparsity-coeff 1e-3 | tail -n 1 > "$W/run.path"
RUN=$(cat "$W/run.path")

# 3. The guide's sweep file, verbatim: 3 sparsity coefficients x 2 widths, six SAEs in one data pass.
saev_nb train --runs-root "$W/sweep-runs" --n-train 784 --n-val 392 --n-lr-warmup 1 --train-data.shards "$TRAIN" \
  --train-data.layer 10 --val-data.shards "$VAL" --val-data.layer 10 --train-data.batch-size 392 \
  --val-data.batch-size 392 "${SLURM[@]}" "${WAIT[@]}" sae.activation:relu --sweep "$REPO/sweeps/guide.toml"

# 4. Inference as in the guide (the layer defaults to the run's).
saev_nb inference --run "$RUN" --data.shards "$VAL" --data.layer 10
saev_nb inference --run "$RUN" --data.shards "$VAL"

# 5. ADE20K: the probe on the last layer, then the class-feature step under saev's name; it prints the commands to
#    run next, with every value filled in, and we run them as printed.
saev_nb semseg train --train-acts.shard-root "$TRAIN" --val-acts.shard-root "$VAL" --imgs.root "$ROOT" --out "$W/semseg" \
  --n-epochs 2 --batch-size 392
saev_nb semseg visuals --sae-ckpt "$RUN/sae.safetensors" --acts.shard-root "$VAL" --imgs.root "$ROOT" \
  --out "$W/features" > "$W/next.txt"
grep '^saev_nb ' "$W/next.txt" > "$W/next.sh" || true
test -s "$W/next.sh"
bash -euo pipefail "$W/next.sh"

# 6. Suppress each class's latents: class-by-class changes against frequency-matched and random-direction controls.
PROBE=$(ls "$W"/semseg/checkpoints/*/probe.safetensors | head -n 1)
saev_nb semseg suppress --sae-ckpt "$RUN/sae.safetensors" --acts.shard-root "$VAL" --probe "$PROBE" \
  --features "$(grep -o '[^ ]*features.csv' "$W/next.sh" | head -n 1)" --n-boot 50 --batch-size 392 --out "$W/suppress"
echo "guide: ok"
