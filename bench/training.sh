#!/usr/bin/env bash
# LoRA training throughput and peak memory: tuneshop vs PyTorch + PEFT, side by side, on the
# same GGUF and the same token windows (batch 4 x 256 tokens, loss on the last 128 of each), each
# side in f32 and in bf16 compute (PyTorch: CPU autocast), each plain and with gradient
# checkpointing.
#
#   bench/training.sh [MODEL.gguf] [ALPACA.json]
#
# Needs a Python with torch, transformers, peft and gguf: VENV (default ~/.cache/tuneshop/torch-venv)
# is used if it exists, otherwise it is created there (about 4 GB). STEPS (default 6; the first
# is a warm-up), CONFIGS ("r:targets" list) and COMPUTE ("f32 bf16") can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ALPACA=${2:-../shared/data/alpaca_sample_1000.json}
VENV=${VENV:-$HOME/.cache/tuneshop/torch-venv}
STEPS=${STEPS:-6}
CONFIGS=${CONFIGS:-"8:q_proj,v_proj 64:q_proj,v_proj 8:all-linear"}
COMPUTE=${COMPUTE:-"f32 bf16"}
OUT=${OUT:-target/bench-training}
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch transformers peft gguf
fi
# TUNESHOP_BIN: a tuneshop binary to measure instead of building this checkout.
TS=${TUNESHOP_BIN:-./target/release/tuneshop}
[ -n "${TUNESHOP_BIN:-}" ] || cargo build --release --quiet
[ -f "$MODEL" ] || $TS generate --prompt hi --max-tokens 1 >/dev/null
export OMP_NUM_THREADS=${THREADS:-$(nproc)} RAYON_NUM_THREADS=${THREADS:-$(nproc)}
rm -f "$OUT/results.jsonl"
for cfg in $CONFIGS; do
    r=${cfg%%:*}; targets=${cfg#*:}
    for dtype in $COMPUTE; do
        # Each side plain, then with gradient checkpointing (activations recomputed in the backward pass).
        for gc in "" "--gradient-checkpointing"; do
            "$VENV/bin/python" bench/peft_train.py --gguf "$MODEL" --alpaca "$ALPACA" --windows-out "$OUT/windows.json" \
                --lora-r "$r" --target-modules "$targets" --steps "$STEPS" --compute-dtype "$dtype" $gc \
                | tee -a "$OUT/results.jsonl"
            $TS bench-train --model "$MODEL" --windows "$OUT/windows.json" \
                --lora-r "$r" --target-modules "$targets" --steps "$STEPS" --compute-dtype "$dtype" $gc \
                | tee -a "$OUT/results.jsonl"
        done
    done
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'config':42} {'PEFT tok/s':>10} {'ours tok/s':>10} {'speed':>6} {'PEFT MiB':>9} {'ours MiB':>9} {'memory':>7}")
for p, t in zip(rows[0::2], rows[1::2]):
    cfg = f"r={p['lora_r']} {p['target_modules']} {p['compute_dtype']}" + (" + grad. ckpt" if p.get("gradient_checkpointing") else "")
    print(f"{cfg:42} {p['tokens_per_second']:10.1f} {t['tokens_per_second']:10.1f} "
          f"{t['tokens_per_second'] / p['tokens_per_second']:5.2f}x {p['peak_rss_mib']:9.0f} "
          f"{t['peak_rss_mib']:9.0f} {t['peak_rss_mib'] / p['peak_rss_mib']:6.2f}x")
PY
