"""The router's handle on one replica process: start it, call it, notice when it dies, stop it.

A replica is ``python -m gptstore.deploy.replica`` (see :mod:`gptstore.deploy.replica`), joined
to the server by a socket pair: one socket per replica, no broker. TorchServe's frontend talks to
its worker processes the same way. The socket's end of file tells the router that the replica died
(a crash, an OOM kill, a native fault, ``kill -9``) the moment it happens, with no heartbeat to
wait for; every call in flight on it then fails with :class:`ReplicaLost`, which the router retries
on another replica when the client has not yet received a byte.

``outstanding`` counts the calls this replica has not finished: it goes up when a call is sent and
down in a ``finally`` when it ends, however it ends (an answer, an error, the replica's death, a
cancelled call, a client that left), so least-outstanding routing never drifts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

from gptstore.deploy.wire import error_from, frame, read
from gptstore.errors import PluginError, Unavailable
from gptstore.serving.deployments import ReplicaStatus

log = logging.getLogger("gptstore.server")

ReplicaState = Literal["starting", "ready", "dead", "draining", "stopped"]


class ReplicaLost(Unavailable):
    """The replica died before it answered."""


class Endpoint:
    """What the router calls: a replica process (:class:`Replica`), or a Ray Serve application
    (:class:`~gptstore.deploy.ray_engine.RayEndpoint`), with the counts its status shows.
    Subclasses give :meth:`call`."""

    def __init__(self, label: str, version: int) -> None:
        self.label = label
        self.version = version
        self.state: ReplicaState = "starting"
        #: Calls sent and not finished; calls answered.
        self.outstanding = 0
        self.served = 0
        self.restarts = 0
        #: Calls in flight when a replica died (all its deaths): retried, or failed.
        self.lost = 0
        self.pid: int | None = None
        self.error: str | None = None  # why it last failed
        self.ready: dict[str, Any] = {}

    def call(self, op: str, **payload: Any) -> AsyncGenerator[dict[str, Any], None]:
        raise NotImplementedError

    async def ask(self, op: str, **payload: Any) -> dict[str, Any]:
        """A call answered by one message."""
        async with contextlib.aclosing(self.call(op, **payload)) as answers:
            async for message in answers:
                return message
        raise ReplicaLost(f"{self.label} did not answer")

    def describe(self) -> ReplicaStatus:
        return {
            "replica": self.label,
            "state": self.state,
            "pid": self.pid,
            "outstanding": self.outstanding,
            "served": self.served,
            "restarts": self.restarts,
            "lost": self.lost,
            "error": self.error,
        }


class Replica(Endpoint):
    """One replica process of a deployment version. ``load``: the message that tells it what to
    load (see :func:`gptstore.deploy.replica.load`)."""

    def __init__(self, label: str, load: dict[str, Any]) -> None:
        super().__init__(label, 1)  # its version: set by its ReplicaSet
        self.load_message = load
        #: The replica's batch counts, as of its last answer.
        self.stats: dict[str, int] = {}
        self.started_at = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        #: Called (on the event loop) when the replica dies unexpectedly.
        self.on_death: Any = None

    # -- life --------------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Start the process and wait until its model is loaded; the replica's error (or a
        timeout) otherwise, with the process gone. Cancelled (its deployment was deleted while
        it loaded), it kills the process before it lets the cancellation through."""
        self.state, self.error = "starting", None
        self._exited = asyncio.Event()
        self._reader_task = None
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gptstore.deploy.replica", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._process.pid
        self.started_at = time.monotonic()
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=ours)
            self._writer.write(frame(self.load_message))
            answer = await asyncio.wait_for(read(reader), timeout)
        except TimeoutError:
            await self.kill()
            raise self._failed(f"it did not load within {timeout:g} s") from None
        except BaseException as exc:  # cancelled, or a frame it should never have sent
            self._abandon(f"stopped while loading ({type(exc).__name__}: {exc})")
            raise
        if answer is None or answer.get("op") != "ready":
            await self.kill()
            if answer is None:
                code = await asyncio.to_thread(self._reap)
                raise self._failed(f"its process exited with {_exit(code)} while loading")
            error = error_from(answer.get("error", {}))
            self.error = str(error)
            self.state = "dead"
            raise error
        self.ready = answer
        self.state = "ready"
        self._reader_task = asyncio.create_task(self._read(reader))

    def _abandon(self, why: str) -> None:
        """Kill the process at once, without awaiting anything (a start that was cancelled)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        if self._writer is not None:
            self._writer.close()
        self.state, self.error = "dead", why
        self._exited.set()

    def _failed(self, why: str) -> PluginError:
        self.state, self.error = "dead", why
        return PluginError(f"replica {self.label}: {why}")

    def _reap(self) -> int | None:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await read(reader)
            except Exception as exc:  # a frame too large, or not JSON: the replica is broken
                log.warning("replica %s sent a bad frame (%s); killed", self.label, exc)
                if self._process is not None and self._process.poll() is None:
                    self._process.kill()
                break
            if message is None:
                break
            if message.get("op") == "drained":
                continue
            if "stats" in message:
                self.stats = message["stats"]
            waiting = self._calls.get(message.get("id", -1))
            if waiting is not None:
                waiting.put_nowait(message)
        # Refuse new calls before anything awaits, then fail the calls in flight.
        died = self.state in ("ready", "starting")
        self.state = "dead" if died else "stopped"
        self.lost += len(self._calls)
        for waiting in self._calls.values():
            waiting.put_nowait({"op": "lost"})
        code = await asyncio.to_thread(self._reap)
        self._exited.set()
        if died:
            self.error = f"its process exited with {_exit(code)}"
            log.warning("replica %s (pid %s) died: %s", self.label, self.pid, self.error)
            if self.on_death is not None:
                self.on_death(self)

    async def drain(self, timeout: float) -> None:
        """Let every call in flight finish, then stop the process (killed after ``timeout``)."""
        if self.state in ("dead", "stopped") or self._writer is None:
            self.state = "stopped" if self.state != "dead" else "dead"
            return
        if self.state == "starting":  # no call in flight: its start() fails and cleans up
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
            self.state = "stopped"
            return
        self.state = "draining"
        with contextlib.suppress(ConnectionError):
            self._writer.write(frame({"op": "drain"}))
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            log.warning("replica %s did not drain within %g s; killed", self.label, timeout)
            await self.kill()
        self.state = "stopped"

    async def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._exited.wait(), 30)

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, op: str, **payload: Any) -> AsyncGenerator[dict[str, Any], None]:
        """The messages answering one call, up to its ``done``: errors are raised as the
        replica raised them, and :class:`ReplicaLost` when it dies first. Closing the iterator
        early cancels the call in the replica."""
        if self.state != "ready" or self._writer is None:
            raise ReplicaLost(f"replica {self.label} is {self.state}")
        call = next(self._ids)
        answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._calls[call] = answers
        self.outstanding += 1
        finished = False
        try:
            self._writer.write(frame({"op": op, "id": call, **payload}))
            while True:
                message = await answers.get()
                kind = message.get("op")
                if kind == "lost":
                    finished = True
                    raise ReplicaLost(f"replica {self.label} died while answering")
                if kind == "error":
                    finished = True
                    raise error_from(message.get("error", {}))
                if kind == "done":
                    finished = True
                    self.served += 1
                yield message
                if finished:
                    return
        finally:
            self.outstanding -= 1
            self._calls.pop(call, None)
            if not finished and self.state in ("ready", "draining"):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self._writer.write(frame({"op": "cancel", "id": call}))


def _exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        return f"signal {-code}"
    return f"status {code}"
