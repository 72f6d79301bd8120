#!/usr/bin/env bash
# The README walkthrough (make-data .. suppress) in WORK_DIR, then the sha256 of every output that the redesign must
# leave byte-identical: shard files, SAE weights, inference results, probe checkpoints, features.csv and the
# suppression tables. Usage: bash tools/pipeline_digest.sh WORK_DIR > digests.txt (uses `saev_nb` from PATH).
set -euo pipefail
W=$1; mkdir -p "$W"; cd "$W"
{
saev_nb make-data --root data/ADEChallengeData2016 --n-train 64 --n-val 16 --n-classes 4
for SPLIT in training validation; do
  saev_nb shards --shards-root shards --layers 2 3 --batch-size 32 data:img-seg-folder \
    --data.root data/ADEChallengeData2016 --data.split "$SPLIT" | tail -n 1 > "$SPLIT".path
done
TRAIN=$(cat training.path); VAL=$(cat validation.path)
saev_nb train --runs-root runs --train-data.shards "$TRAIN" --train-data.layer 2 --val-data.shards "$VAL" \
  --val-data.layer 2 --train-data.batch-size 1024 --val-data.batch-size 1024 --sae.d-model 128 --sae.exp-factor 8 \
  --n-train 100_000 --n-val 1024 --n-lr-warmup 20 --lr 1e-3 sae.activation:relu objective:vanilla \
  --objective.sparsity-coeff 1e-3 | tail -n 1 > run.path
RUN=$(cat run.path)
saev_nb inference --run "$RUN" --data.shards "$VAL"
saev_nb semseg train --train-acts.shard-root "$TRAIN" --val-acts.shard-root "$VAL" \
  --imgs.root data/ADEChallengeData2016 --batch-size 1024 --out semseg
saev_nb semseg features --sae-ckpt "$RUN"/sae.safetensors --acts.shard-root "$TRAIN" \
  --imgs.root data/ADEChallengeData2016 --out semseg | tee features.txt
saev_nb semseg suppress --sae-ckpt "$RUN"/sae.safetensors --acts.shard-root "$VAL" --batch-size 1024 --out semseg
} > log.txt 2>&1
# safetensors writes its metadata keys in a random order: those files are hashed as their tensors (sorted by name)
# and their metadata (sorted JSON); every other file byte for byte.
find shards runs semseg -type f \( -name 'acts*.bin' -o -name labels.bin -o -name metadata.json -o -name '*.safetensors' \
  -o -name '*.csv' -o -name token_acts.npz -o -name metrics.json -o -name '*.pt' \) ! -name 'checkpoint.pt' \
  | LC_ALL=C sort | python3 -c '
import hashlib, json, struct, sys
for fpath in sys.stdin.read().split():
    b = open(fpath, "rb").read()
    if fpath.endswith(".safetensors"):
        n = struct.unpack("<Q", b[:8])[0]; head = json.loads(b[8:8 + n]); data = b[8 + n:]
        h = hashlib.sha256(json.dumps(head.pop("__metadata__", {}), sort_keys=True).encode())
        for k in sorted(head): s, e = head[k]["data_offsets"]; h.update(k.encode() + head[k]["dtype"].encode()
                                                                          + str(head[k]["shape"]).encode() + data[s:e])
        print(h.hexdigest() + "  " + fpath + " (tensors+metadata)")
    else: print(hashlib.sha256(b).hexdigest() + "  " + fpath)'
