"""llama.cpp (llama-cpp-python) prefill and decode tokens/s on a GGUF, measured like
`tuneshop bench`: prefill of N prompt tokens, then greedy single-stream decode of M tokens;
one warm-up run, median of the measured runs. Prints one JSON object."""
import argparse
import json
import statistics
import time

import numpy as np
from llama_cpp import Llama

FILLER = ("The history of the city begins with a small fishing village on the river. "
          "Merchants arrived in the twelfth century, built a bridge and a market, and the village grew "
          "into a town of craftsmen, scholars and sailors. ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=a.prompt_tokens + a.decode_tokens + 8, n_batch=512, verbose=False)
    prompt = []
    while len(prompt) < a.prompt_tokens:
        prompt += llm.tokenize(FILLER.encode(), add_bos=False, special=False)
    prompt = prompt[:a.prompt_tokens]
    prefill, decode = [], []
    for run in range(a.runs + 1):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t0 = time.perf_counter()
        llm.eval(prompt)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(a.decode_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if run > 0:
            prefill.append(a.prompt_tokens / (t1 - t0))
            decode.append(a.decode_tokens / (t2 - t1))
    print(json.dumps({
        "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens, "runs": a.runs,
        "prefill_tokens_per_second": statistics.median(prefill),
        "decode_tokens_per_second": statistics.median(decode), "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
