"""Side-by-side inference benchmark: tuneshop vs llama.cpp (llama-cpp-python) on the same GGUF.

Both measure the same thing (prefill of N prompt tokens, then greedy single-stream decode of M
tokens, same thread count); rounds alternate between the two so machine noise hits both alike,
and the table reports the median of the rounds' medians with the ratio tuneshop / llama.cpp.
Run through bench/inference.sh, which prepares the environment.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    a = ap.parse_args()
    common = ["--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens), "--runs", "3"]
    ours_cmd = [str(ROOT / "target/release/tuneshop"), "bench", "--json", "--threads", str(a.threads),
                "--model", a.model] + common
    theirs_cmd = [sys.executable, str(ROOT / "bench/llama_cpp_bench.py"), "--threads", str(a.threads),
                  "--model", a.model] + common
    ours, theirs = [], []
    for r in range(a.rounds):
        ours.append(run(ours_cmd))
        theirs.append(run(theirs_cmd))
        print(f"round {r + 1}: tuneshop decode {ours[-1]['decode_tokens_per_second']:.1f} tok/s, "
              f"llama.cpp {theirs[-1]['decode_tokens_per_second']:.1f} tok/s", file=sys.stderr)
    print(f"\nSmolLM2-135M-Instruct Q4_1, {a.threads} threads, prompt {a.prompt_tokens} tokens, "
          f"decode {a.decode_tokens} tokens, median of {a.rounds} alternating rounds\n")
    print("| metric | tuneshop | llama.cpp | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in [("prefill_tokens_per_second", "prefill tok/s"), ("decode_tokens_per_second", "decode tok/s")]:
        o = statistics.median(x[key] for x in ours)
        t = statistics.median(x[key] for x in theirs)
        print(f"| {label} | {o:.1f} | {t:.1f} | {o / t:.2f}x |")


if __name__ == "__main__":
    main()
