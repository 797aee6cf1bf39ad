#!/usr/bin/env bash
# Inference throughput, tuneshop vs llama.cpp on the default model's GGUF, side by side.
#
#   bench/inference.sh            # THREADS=2 ROUNDS=5 by default
#
# llama.cpp comes from the PyPI package llama-cpp-python, which compiles llama.cpp from source
# (15-40 minutes on 2 cores the first time). It is installed once into a virtual environment
# outside the repository ($TUNESHOP_BENCH_VENV, default ~/.cache/tuneshop/bench-venv) and
# reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-5}
VENV=${TUNESHOP_BENCH_VENV:-$HOME/.cache/tuneshop/bench-venv}
DATA=${TUNESHOP_DATA_DIR:-./data}

if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
    echo "installing llama-cpp-python into $VENV (compiles llama.cpp; this takes a while)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "llama-cpp-python==0.3.36" numpy
fi
cargo build --release --quiet
# Fetches the default model into the data directory if needed, and prints its path.
MODEL=$(./target/release/tuneshop bench --data-dir "$DATA" --prompt-tokens 1 --decode-tokens 1 --runs 1 --json >/dev/null && ls "$DATA"/models/SmolLM2-135M-Instruct.Q4_1.gguf)
"$VENV/bin/python" bench/compare_inference.py --model "$MODEL" --threads "$THREADS" --rounds "$ROUNDS"
