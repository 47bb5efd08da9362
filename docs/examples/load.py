"""Load a running `gptstore serve` while you change it, and count what failed.

    python docs/examples/load.py --model smollm2 --seconds 60 [--clients 8] [--key sk-demo]

Each client sends chat completions one after another (every other one streamed) until the time
is up; a request fails when its status is not 200 or its stream does not end with [DONE]. The
deployment's live version is polled meanwhile, so the summary says which versions answered:

    1436 requests in 60.0 s from 8 clients (718 streamed): 0 failed; versions live: 1 -> 2
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


def request(url: str, key: str, body: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers), timeout=timeout
        ) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return -1, str(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default="sk-demo")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    results: Counter[str] = Counter()
    failures: list[str] = []
    versions: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client(index: int) -> None:
        count = 0
        while time.monotonic() < deadline:
            stream = (index + count) % 2 == 1
            count += 1
            body = {
                "model": args.model,
                "messages": [
                    {"role": "user", "content": f"Say something about the number {count}."}
                ],
                "max_tokens": args.max_tokens,
                "stream": stream,
            }
            status, text = request(f"{args.server}/v1/chat/completions", args.key, body)
            ok = status == 200 and (not stream or text.rstrip().endswith("data: [DONE]"))
            with lock:
                results["streamed" if stream else "plain"] += 1
                if not ok:
                    failures.append(f"{status}: {text[:200]}")

    def watch() -> None:
        while time.monotonic() < deadline:
            status, text = request(f"{args.server}/store/deployments/{args.model}", args.key)
            if status == 200:
                version = json.loads(text)["version"]
                if not versions or versions[-1] != version:
                    versions.append(version)
            time.sleep(0.5)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=watch, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join()
    total = results["plain"] + results["streamed"]
    print(
        f"{total} requests in {time.monotonic() - started:.1f} s from {args.clients} clients "
        f"({results['streamed']} streamed): {len(failures)} failed; versions live: "
        + " -> ".join(map(str, versions))
    )
    for failure in failures[:10]:
        print("  failed:", failure)


if __name__ == "__main__":
    main()
