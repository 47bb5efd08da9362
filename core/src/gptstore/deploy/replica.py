"""The replica side: one process that loads a deployment version's model and serves the router.

``python -m gptstore.deploy.replica FD`` runs in a process of its own, started by
:class:`gptstore.deploy.replicas.Replica`, and talks over the socket it inherits as file
descriptor ``FD`` (:mod:`gptstore.deploy.wire` frames). The first message says what to load; the
replica answers ``ready`` (or ``failed`` with the error) and then serves ``generate``,
``stream``, ``chat_prompt``, ``logprobs`` and ``status`` calls concurrently through the same
in-process :class:`~gptstore.serving.deployments.Deployment` that ``isolation = "none"`` uses (its
batcher decides what runs together). ``cancel`` stops a call (a client that left);
``drain`` finishes every call in flight and exits 0. When the router's side of the socket closes
(the server exited, or was killed), the replica stops at once: no orphan keeps a model loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from gptstore.artifacts import ArtifactStore
from gptstore.converter import structure, unstructure
from gptstore.deploy.wire import error_fields, frame, read
from gptstore.errors import GptstoreError, Unavailable
from gptstore.manager import plugins_of
from gptstore.serving.deployments import Deployment, DeploymentSpec, load_runner, plan
from gptstore.types import ChatMessage, GenerationRequest

log = logging.getLogger("gptstore.replica")


def load(message: dict[str, Any]) -> Deployment:
    """The deployment a ``load`` message describes, loaded in this process."""
    plugin = message.get("plugin")
    manager = plugins_of([plugin] if plugin is not None else [])
    spec = structure(message["spec"], DeploymentSpec, what="replica spec", path="$")
    checked = plan(
        manager,
        ArtifactStore(Path(message["artifacts"])),
        spec.artifact,
        spec.backend,
        spec.options,
        adapters=spec.adapters,
    )
    runner = load_runner(checked)
    try:
        return Deployment(message["name"], spec, checked, runner)
    except BaseException:
        runner.close()
        raise


async def answer(deployment: Deployment, message: dict[str, Any]) -> dict[str, Any]:
    """The ``done`` message answering one call but ``stream`` (``generate``, ``chat_prompt``,
    ``logprobs``, ``status``); errors are raised. Ray Serve replicas answer through it too."""
    op = message["op"]
    if op == "generate":
        requests = structure(
            message["requests"], list[GenerationRequest], what="requests", path="$.requests"
        )
        generations = await deployment.generate(requests)
        return {
            "op": "done",
            "generations": unstructure(generations),
            "stats": deployment.status()["batches"],
        }
    if op == "chat_prompt":
        messages = structure(
            message["messages"], list[ChatMessage], what="messages", path="$.messages"
        )
        return {"op": "done", "prompt": await deployment.chat_prompt(messages)}
    if op == "logprobs":
        scored = await asyncio.to_thread(deployment.runner.logprobs, message["texts"])
        return {"op": "done", "logprobs": unstructure(scored)}
    if op == "status":
        return {"op": "done", "status": deployment.status()}
    raise ValueError(f"unknown call {op!r}")


async def stream(deployment: Deployment, raw: Any) -> AsyncGenerator[dict[str, Any], None]:
    """The messages answering a ``stream`` call of ``raw`` requests: a ``chunk`` per token, then
    ``done`` with the prompt tokens; errors are raised."""
    requests = structure(raw, list[GenerationRequest], what="requests", path="$.requests")
    async with contextlib.aclosing(deployment.stream(requests)) as chunks:
        async for index, chunk in chunks:
            yield {"op": "chunk", "index": index, "chunk": unstructure(chunk)}
    prompt_tokens = sum(deployment.runner.count_tokens(r.prompt) for r in requests)
    yield {"op": "done", "stats": deployment.status()["batches"], "prompt_tokens": prompt_tokens}


def ready_message(deployment: Deployment) -> dict[str, Any]:
    """What a replica says once its model is loaded."""
    info = deployment.info
    return {
        "op": "ready",
        "pid": os.getpid(),
        "context_length": info.context_length,
        "logprobs": info.logprobs,
        "health": deployment.runner.health().message,
        "batching": type(deployment.batcher).__name__,
    }


class Server:
    """Serves one router connection until it drains or goes away."""

    def __init__(self, deployment: Deployment, writer: asyncio.StreamWriter) -> None:
        self.deployment = deployment
        self.writer = writer
        self.calls: dict[int, asyncio.Task[None]] = {}

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(message))

    async def handle(self, message: dict[str, Any]) -> None:
        call = message["id"]
        try:
            await self._handle(call, message)
        except asyncio.CancelledError:
            pass  # the router cancelled it: it waits for nothing more
        except Exception as exc:
            if not isinstance(exc, GptstoreError):
                log.exception("call %s (%s) failed", call, message.get("op"))
            self.send({"id": call, "op": "error", "error": error_fields(exc)})
        finally:
            self.calls.pop(call, None)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def _handle(self, call: int, message: dict[str, Any]) -> None:
        if message["op"] == "stream":
            async with contextlib.aclosing(stream(self.deployment, message["requests"])) as answers:
                async for message_ in answers:
                    self.send({"id": call, **message_})
                    await self.writer.drain()
        else:
            self.send({"id": call, **(await answer(self.deployment, message))})

    async def serve(self, reader: asyncio.StreamReader) -> int:
        """Answer calls until the router says ``drain`` (then finish those in flight, still
        taking ``cancel`` for them) or goes away (then cancel them all)."""
        draining = asyncio.Event()
        reading = asyncio.create_task(self._read(reader, draining))
        await draining.wait()
        if self.calls:
            await asyncio.gather(*self.calls.values(), return_exceptions=True)
        reading.cancel()
        await asyncio.to_thread(self.deployment.close)
        self.send({"op": "drained"})
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        return 0

    async def _read(self, reader: asyncio.StreamReader, draining: asyncio.Event) -> None:
        while True:
            message = await read(reader)
            if message is None:  # the router went away: nobody waits for any answer
                for task in self.calls.values():
                    task.cancel()
                draining.set()
                return
            op = message.get("op")
            if op == "cancel":
                cancelled = self.calls.get(message.get("id", -1))
                if cancelled is not None:
                    cancelled.cancel()
            elif op == "drain":
                draining.set()
            elif draining.is_set():  # the router sends none once it drains us; refuse it
                self.send(
                    {
                        "id": message.get("id"),
                        "op": "error",
                        "error": error_fields(Unavailable("this replica is draining")),
                    }
                )
            else:
                self.calls[message["id"]] = asyncio.create_task(self.handle(message))


async def run(sock: socket.socket) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    message = await read(reader)
    if message is None:
        return 1
    try:
        deployment = await asyncio.to_thread(load, message)
    except BaseException as exc:
        writer.write(frame({"op": "failed", "error": error_fields(exc)}))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return 1
    writer.write(frame(ready_message(deployment)))
    return await Server(deployment, writer).serve(reader)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The server handles SIGINT and SIGTERM for the whole group: a replica drains when the
    # router tells it to, not when the terminal's Ctrl-C reaches every process of the group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="replica %(process)d: %(message)s")
    sock = socket.socket(fileno=int(args[0]))
    return asyncio.run(run(sock))


if __name__ == "__main__":
    sys.exit(main())
