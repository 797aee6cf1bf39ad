#!/usr/bin/env bash
# Serving benchmark: concurrent streams on the base model and on many adapters, adapter cold
# loads, latency while a job trains (benches/serving.rs), and llama.cpp's single-stream decode on
# the same GGUF in the same run for the ratio.
#
#   bench/serving.sh            # STREAMS=1,4,16 MAX_TOKENS=64 ROUNDS=3 LATENCY_REQUESTS=12 THREADS=2
#
# llama.cpp comes from llama-cpp-python in $TUNESHOP_BENCH_VENV (see bench/inference.sh, which
# installs it); without it the ratio line is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
VENV=${TUNESHOP_BENCH_VENV:-$HOME/.cache/tuneshop/bench-venv}
export TUNESHOP_DATA_DIR=${TUNESHOP_DATA_DIR:-./data}
export RAYON_NUM_THREADS=$THREADS
cargo build --release --quiet
MODEL=$(./target/release/tuneshop bench --data-dir "$TUNESHOP_DATA_DIR" --prompt-tokens 1 --decode-tokens 1 --runs 1 --json >/dev/null \
    && ls "$TUNESHOP_DATA_DIR"/models/SmolLM2-135M-Instruct.Q4_1.gguf)
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    LLAMA_CPP_DECODE=$("$VENV/bin/python" bench/llama_cpp_bench.py --model "$MODEL" --threads "$THREADS" \
        --prompt-tokens 48 --decode-tokens "${MAX_TOKENS:-64}" --runs 3 \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_second"])')
    export LLAMA_CPP_DECODE
    echo "llama.cpp single-stream decode: $LLAMA_CPP_DECODE tok/s"
fi
cargo bench --quiet --bench serving
