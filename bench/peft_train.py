"""Baseline for bench/training.sh: LoRA training with PyTorch + Hugging Face PEFT.

Loads the same GGUF that tuneshop trains on (transformers dequantizes it to f32), cuts
fixed token windows from the shared Alpaca sample (rendered with the model's chat template),
and trains LoRA on them with AdamW. The windows are written to --windows-out so that
`tuneshop bench-train` trains on exactly the same tokens. Prints one JSON line.

    python bench/peft_train.py --gguf MODEL.gguf --alpaca alpaca_sample_1000.json \
        [--windows-out W.json] [--lora-r 8] [--target-modules q_proj,v_proj] [--steps 6] \
        [--gradient-checkpointing] [--compute-dtype f32|bf16]
"""
import argparse
import json
import os
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def windows_from_alpaca(tok, path, n, seq_len):
    rows = json.load(open(path))
    stream = []
    for r in rows:
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= n * seq_len:
            break
    assert len(stream) >= n * seq_len, "not enough text for the windows"
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--alpaca", required=True)
    ap.add_argument("--windows-out")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--target-modules", default="q_proj,v_proj")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    # bf16: PyTorch's CPU autocast (matmul inputs in bf16), the counterpart of tuneshop's
    # --compute-dtype bf16.
    ap.add_argument("--compute-dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()

    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.lm_head.weight = model.model.embed_tokens.weight
    windows = windows_from_alpaca(tok, a.alpaca, a.steps * a.batch_size, a.seq_len)
    if a.windows_out:
        with open(a.windows_out, "w") as out:
            json.dump({"prompt_tokens": a.prompt_tokens, "windows": windows}, out)

    targets = a.target_modules.split(",")
    if targets == ["all-linear"]:
        targets = "all-linear"
    cfg = LoraConfig(r=a.lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                     task_type="CAUSAL_LM", bias="none")
    if a.gradient_checkpointing:
        # Recompute activations in the backward pass (the frozen embeddings need inputs that
        # require grad for the checkpointed segments to be differentiated).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            weight_decay=0.0)
    ids = torch.tensor(windows)
    times = []
    for step in range(a.steps):
        batch = ids[step * a.batch_size:(step + 1) * a.batch_size]
        labels = batch.clone()
        labels[:, :a.prompt_tokens] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.compute_dtype == "bf16"):
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    timed_tokens = (a.steps - 1) * a.batch_size * a.seq_len
    print(json.dumps({
        "system": "peft",
        "lora_r": a.lora_r,
        "target_modules": a.target_modules,
        "gradient_checkpointing": a.gradient_checkpointing,
        "compute_dtype": a.compute_dtype,
        "trainable_parameters": trainable,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "timed_steps": a.steps - 1,
        "tokens_per_second": timed_tokens / (times[-1] - times[0]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
