"""Drives a running tuneshop server with the official `openai` Python client, unchanged.

Reads OPENAI_BASE_URL and OPENAI_API_KEY (as the client itself does), and BASE_MODEL and
ADAPTER (an adapter name of the caller). Prints one JSON object with what it saw; the Rust
test that runs it makes the assertions.
"""
import json
import os

import openai
from openai import OpenAI

client = OpenAI()
base, adapter = os.environ["BASE_MODEL"], os.environ["ADAPTER"]
out = {"client_version": openai.__version__}

out["models"] = sorted(m.id for m in client.models.list())

prompt = "the quick brown fox"
for name in (base, adapter):
    c = client.completions.create(model=name, prompt=prompt, max_tokens=20, temperature=0)
    chunks = client.completions.create(model=name, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    out[f"completion:{name}"] = {
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens],
        "streamed": "".join(ch.choices[0].text for ch in chunks if ch.choices),
    }

messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of france?"}]
for name in (base, adapter):
    c = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=name, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            usage = ch.usage.completion_tokens
    out[f"chat:{name}"] = {
        "role": c.choices[0].message.role,
        "text": c.choices[0].message.content,
        "streamed": "".join(pieces),
        "completion_tokens": c.usage.completion_tokens,
        "streamed_usage": usage,
    }

try:
    client.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=4)
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
