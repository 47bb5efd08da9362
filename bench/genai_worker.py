"""ONNX Runtime GenAI's side of bench/engines_bench.py, run by the Python of its own environment
(onnxruntime-genai brings the CPU onnxruntime, which must never meet onnxruntime-gpu, and its
model builder needs transformers 5): one JSON command per line on stdin, one JSON answer per line
on stdout, the model loaded once.

    {"op": "decode", "ids": [...], "new": 128, "batch": 1}  -> {"ttft_s", "decode_tok_s", "tokens"}
    {"op": "nll", "ids": [...]}                              -> {"nll", "tokens"}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def decode(model: og.Model, ids: list[int], new: int, batch: int) -> dict[str, float]:
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False, batch_size=batch
    )
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray([ids] * batch, dtype=np.int32))
    generator.generate_next_token()
    first = time.perf_counter()
    made = 1
    while not generator.is_done():
        generator.generate_next_token()
        made += 1
    end = time.perf_counter()
    return {
        "ttft_s": first - started,
        "decode_tok_s": batch * (made - 1) / (end - first),
        "tokens": made,
    }


def nll(model: og.Model, ids: list[int]) -> dict[str, float]:
    """Mean negative log-likelihood of ids[1:], from one prefill's logits of every position."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0]  # [tokens, vocab]
    if logits.shape[0] != len(ids):
        raise SystemExit(f"genai gave logits of {logits.shape[0]} positions for {len(ids)}")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = logprobs[np.arange(len(ids) - 1), ids[1:]]
    return {"nll": float(-picked.sum()), "tokens": len(ids) - 1}


def main() -> None:
    model = og.Model(sys.argv[1])
    print(json.dumps({"ready": og.__version__}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "decode":
            answer = decode(model, command["ids"], command["new"], command["batch"])
        else:
            answer = nll(model, command["ids"])
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
