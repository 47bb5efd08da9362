"""HTTP load for tests of a live `gptstore serve`: one request, a deployment's status, one
completion (streamed or not, and whether a stream ended whole), and many completions from many
clients at once with something done in the middle (a swap, a kill). Plain ``http.client``: each
request its own connection, as independent clients are."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def call(
    base: str, method: str, path: str, body: Any = None, *, key: str, timeout: float = 120
) -> tuple[int, dict[str, str], str]:
    """(status, headers, text) of one request made with API key ``key``."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        answered = {k.lower(): v for k, v in response.getheaders()}
        return response.status, answered, response.read().decode()
    finally:
        connection.close()


def status(base: str, name: str, *, key: str) -> dict[str, Any]:
    """``GET /store/deployments/NAME``, which must answer 200."""
    code, _, text = call(base, "GET", f"/store/deployments/{name}", key=key)
    assert code == 200, text
    answer: dict[str, Any] = json.loads(text)
    return answer


def completion(
    base: str, stream: bool, prompt: str, *, key: str, model: str = "echo", max_tokens: int = 8
) -> tuple[int, str, bool]:
    """(status, text, whole) of one completion: a stream is whole when it ended with [DONE];
    status -1 when the connection was cut."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    try:
        code, _, text = call(base, "POST", "/v1/completions", body, key=key)
    except (OSError, http.client.HTTPException) as error:  # a connection cut mid-stream
        return -1, str(error), False
    if code != 200:
        return code, text, False
    if not stream:
        return code, json.loads(text)["choices"][0]["text"], True
    pieces = [
        json.loads(line[6:])["choices"][0]["text"]
        for line in text.splitlines()
        if line.startswith("data: {")
    ]
    return code, "".join(pieces), text.rstrip().endswith("data: [DONE]")


def run_load(
    base: str,
    total: int,
    during: Callable[[], Any] | None = None,
    *,
    key: str,
    prompt: str,
    clients: int = 16,
    model: str = "echo",
) -> tuple[list[tuple[bool, int, str, bool]], Any]:
    """``total`` completions from ``clients`` clients, every other one a stream; ``during()``
    runs once a quarter of them are answered. ([(stream, status, text, whole)] in order of
    answer, what ``during()`` returned)."""
    answers: list[tuple[bool, int, str, bool]] = []
    lock = threading.Lock()
    counter = iter(range(total))
    started = threading.Event()

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            stream = index % 2 == 1
            result = completion(base, stream, prompt, key=key, model=model)
            with lock:
                answers.append((stream, *result))
                if len(answers) >= total // 4:
                    started.set()

    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(client) for _ in range(clients)]
        outcome = None
        if during is not None:
            started.wait(300)
            outcome = during()
        for future in running:
            future.result()
    return answers, outcome
