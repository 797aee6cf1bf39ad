#!/usr/bin/env bash
# The real task: sentiment of movie reviews (rt_polarity, Pang & Lee) with the default model.
# Converts the data to chat rows, measures base accuracy, trains a LoRA adapter, measures again.
#
#   bench/sentiment.sh [DATA_DIR]    # DATA_DIR holds rt_polarity/{train,test}.jsonl
#                                    # (default ../shared/data); TRAIN_ROWS=160 TEST_ROWS=1000
#                                    # COMPUTE_DTYPE=f32|bf16; BASE_EVAL=0 skips the base model's pass
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data}
TRAIN_ROWS=${TRAIN_ROWS:-160}
TEST_ROWS=${TEST_ROWS:-1000}
COMPUTE_DTYPE=${COMPUTE_DTYPE:-f32}
BASE_EVAL=${BASE_EVAL:-1}
WORK=${WORK:-target/sentiment}
mkdir -p "$WORK"
python3 - "$SRC" "$WORK" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
q = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {}"
for split in ["train", "test"]:
    with open(f"{src}/rt_polarity/{split}.jsonl") as f, open(f"{out}/{split}.jsonl", "w") as o:
        for line in f:
            r = json.loads(line)
            msgs = [{"role": "user", "content": q.format(r["text"])}, {"role": "assistant", "content": r["label"]}]
            o.write(json.dumps({"messages": msgs}) + "\n")
PY
head -n "$TRAIN_ROWS" "$WORK/train.jsonl" > "$WORK/train_subset.jsonl"
# TUNESHOP_BIN: a tuneshop binary to measure instead of building this checkout.
TS=${TUNESHOP_BIN:-./target/release/tuneshop}
[ -n "${TUNESHOP_BIN:-}" ] || cargo build --release --quiet
if [ "$BASE_EVAL" != 0 ]; then
    echo "== base model, first $TEST_ROWS test rows"
    /usr/bin/time -f "wall %es" $TS eval --data "$WORK/test.jsonl" --limit "$TEST_ROWS" --choices positive,negative
fi
echo "== LoRA r=8 alpha=16 on q,k,v,o,gate,up,down; lr 1e-3, batch 8, 1 epoch of $TRAIN_ROWS rows, $COMPUTE_DTYPE compute"
/usr/bin/time -f "wall %es" $TS train --data "$WORK/train_subset.jsonl" --out "$WORK/adapter" \
    --target-modules all-linear --learning-rate 1e-3 --batch-size 8 --epochs 1 --seed 0 \
    --compute-dtype "$COMPUTE_DTYPE"
echo "== with the adapter"
/usr/bin/time -f "wall %es" $TS eval --data "$WORK/test.jsonl" --limit "$TEST_ROWS" --choices positive,negative \
    --adapter "$WORK/adapter"
