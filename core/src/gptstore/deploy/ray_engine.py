"""Ray Serve as the replicas' engine (``gptstore serve --engine ray``): scale-out on a Ray cluster.

With the local engine a deployment version is a set of replica processes on the server's host
(:mod:`gptstore.deploy.replicas`). With this engine it is a **Ray Serve application** named
``gptstore.<name>.v<version>.<server>``, one Serve deployment whose replicas are Ray actors
anywhere in the cluster, each loading the model through the same serving-backend plugins and the
same in-process :class:`~gptstore.serving.deployments.Deployment` (batcher included) as a local
replica (:func:`gptstore.deploy.replica.load`). What Ray brings:

- **Placement and scale**: ``replicas = N`` is Serve's ``num_replicas``; ``[deployments.NAME.
  autoscaling]`` is Serve's ``autoscaling_config`` (min and max replicas, target calls in flight
  per replica). Each replica reserves ``[server.ray] replica_cpus`` CPUs of the cluster.
- **Ray's router**: the server holds one ``DeploymentHandle`` per version; Serve picks the
  replica (power of two choices on queue lengths), queues calls up to ``max_queue`` in the
  caller and refuses more (429, as the local engine does).
- **Restarts and health**: Serve restarts a replica whose actor dies or whose ``check_health``
  (the runner's health) fails.

What stays gptstore's: the HTTP front door (Serve's own HTTP proxy is off:
``proxy_location="Disabled"``), the API keys, the metrics, and **versions**. A swap deploys the
new version as a new application beside the live one, probes it (and gates it) through its handle
while the live one serves every call, then moves traffic and deletes the old application once its
calls have finished: a blue/green swap whose failure at any point leaves the live version as it
was. Serve's in-place rolling update replaces replicas before the new ones have proved anything,
so a broken version would take capacity away from the good one; see docs/scale-out.md.

A call that dies with its replica (an ``ActorDiedError`` before the client got a byte) is sent once
more, and Ray's router picks a live replica. Calls and answers are the same JSON-shaped messages as
the local engine's (:mod:`gptstore.deploy.wire`); errors travel as their fields, never as raised
exceptions, and are raised again here as the same :class:`~gptstore.errors.GptstoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

from gptstore.converter import in_range
from gptstore.deploy.replica import answer, ready_message, stream
from gptstore.deploy.replicas import Endpoint, ReplicaLost, ReplicaState
from gptstore.deploy.wire import error_fields, error_from
from gptstore.errors import GptstoreError, InvalidInput, PluginError, Unavailable
from gptstore.serving.batching import Overloaded
from gptstore.serving.deployments import DeploymentSpec, Plan, ReplicaStatus
from gptstore.types import RunnerInfo

if TYPE_CHECKING:
    from gptstore.serving.deployments import Deployment

log = logging.getLogger("gptstore.server")

#: Seconds between two looks at the replicas' states (for status, /ready and the metrics).
REFRESH = 2.0
#: Serve's replica states, as the local engine names them.
STATES: dict[str, ReplicaState] = {
    "STARTING": "starting",
    "UPDATING": "starting",
    "RECOVERING": "starting",
    "RUNNING": "ready",
    "PENDING_MIGRATION": "ready",
    "STOPPING": "draining",
}


@frozen(kw_only=True)
class RaySettings:
    """``[server.ray]``: where the cluster is and what each replica takes of it.

    ``address``: the cluster (``ray://host:10001`` through Ray Client, ``host:6379`` on a node
    of the cluster, ``auto`` for the one this node belongs to; empty: ``$RAY_ADDRESS``, else a
    Ray started inside the server for this host alone, ``local``, without its dashboard).
    ``replica_cpus``: CPUs each replica reserves (Ray also sets its threads to that number, at
    least one). ``artifacts``: the store's
    artifacts folder as the replicas' nodes see it (a shared filesystem; empty: the server's own
    path, right on one host or where every node mounts the store at the same path).
    """

    address: str = ""
    namespace: str = "gptstore"
    replica_cpus: float = field(default=1.0, validator=in_range(0.01, 1024))
    artifacts: str = ""


class RayReplica:
    """What each Serve replica (a Ray actor) runs: one loaded deployment version. Its methods
    answer with messages, errors included, and never raise across Ray."""

    def __init__(self, message: dict[str, Any]) -> None:
        from gptstore.deploy.replica import load

        logging.basicConfig(level=logging.WARNING, format="ray replica: %(message)s")
        self.deployment: Deployment | None = None
        #: Why the model did not load (said by ready(), so the server raises the same error as
        #: with local replicas, instead of Serve retrying a constructor that cannot succeed).
        self.failure: dict[str, Any] | None = None
        try:
            self.deployment = load(message)
        except Exception as exc:
            if not isinstance(exc, GptstoreError):
                log.exception("the model did not load")
            self.failure = error_fields(exc)

    async def ready(self) -> dict[str, Any]:
        if self.deployment is None:
            return {"op": "failed", "error": self.failure}
        return ready_message(self.deployment)

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.deployment is None:
            return {"op": "error", "error": self.failure}
        try:
            done = await answer(self.deployment, message)
        except Exception as exc:
            if not isinstance(exc, GptstoreError):
                log.exception("call %s failed", message.get("op"))
            return {"op": "error", "error": error_fields(exc)}
        return {**done, "replica_id": _replica_id()}

    async def stream(self, requests: Any) -> AsyncGenerator[dict[str, Any], None]:
        if self.deployment is None:
            yield {"op": "error", "error": self.failure}
            return
        try:
            async with contextlib.aclosing(stream(self.deployment, requests)) as messages:
                async for message in messages:
                    done = message["op"] == "done"
                    yield {**message, "replica_id": _replica_id()} if done else message
        except Exception as exc:
            if not isinstance(exc, GptstoreError):
                log.exception("stream failed")
            yield {"op": "error", "error": error_fields(exc)}

    def check_health(self) -> None:
        """Serve's health check: the runner's own (a replica that fails it is restarted)."""
        if self.deployment is None:
            return  # ready() reports the failure; the server then deletes the application
        health = self.deployment.runner.health()
        if not health.ok:
            raise RuntimeError(health.message or "the runner reports it is unhealthy")

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        deployment = getattr(self, "deployment", None)
        if deployment is not None:
            self.deployment = None
            deployment.close()


class RayEngine:
    """The server's link to the Ray cluster: it connects once, makes each version's
    :class:`RaySet`, and runs every call to Ray's client API on threads of its own (``pool``),
    so that none of them holds the server's default thread pool, and close() can wait for them
    before it shuts Ray down (Ray aborts a process that shuts down under a call in flight)."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        #: Tells this server's applications from another's on a shared cluster.
        self.token = secrets.token_hex(3)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="gptstore-ray")
        #: Set by close(): deploys that wait for their replicas stop waiting.
        self.closed = threading.Event()
        self._connected = False
        self._lock = threading.Lock()
        #: Serve's replicas per application, and when they were read (one read serves all).
        self._seen: dict[str, list[dict[str, Any]]] | None = None
        self._seen_at = 0.0

    async def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` on one of the engine's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)

    def connect(self) -> None:
        """Join (or start) the cluster and start Serve without its HTTP proxy. Called from a
        worker thread: Ray then leaves the server's signal handlers alone."""
        # Ray's native handler would print a stack trace on the server's SIGTERM (a drain).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        address = self.settings.address or os.environ.get("RAY_ADDRESS") or "local"
        if address != "local" and "RAY_AUTH_MODE" not in os.environ and _auth_token():
            # A cluster started where Ray's token exists requires it (Ray 2.52+), and a client
            # presents it only when told, before Ray is imported: else ray.init waits forever.
            os.environ["RAY_AUTH_MODE"] = "token"
        try:
            import ray
            from ray import serve
        except ImportError:
            raise Unavailable(
                "the ray engine needs Ray Serve: pip install 'gptstore[ray]' (or "
                "'ray[serve]'), on the server and on every node of the cluster"
            ) from None
        options: dict[str, Any] = {}
        if address == "local":  # a Ray of the server's own, never a cluster found on the host
            options["include_dashboard"] = False
        elif address != "auto":
            reachable(address)
        try:
            ray.init(
                address=address,
                namespace=self.settings.namespace,
                log_to_driver=False,
                ignore_reinit_error=True,
                **options,
            )
            serve.start(proxy_location="Disabled")
        except Exception as exc:
            raise Unavailable(
                f"cannot reach the Ray cluster at {address} ({type(exc).__name__}: {exc}); "
                "start one with `ray start --head`, or set [server.ray] address"
            ) from None
        self._connected = True
        log.info("ray engine: connected to %s", ray.get_runtime_context().gcs_address)

    def replica_set(
        self, label: str, version: int, spec: DeploymentSpec, plan: Plan, load: dict[str, Any]
    ) -> RaySet:
        if self.settings.artifacts:
            load = {**load, "artifacts": self.settings.artifacts}
        return RaySet(self, label, version, spec, plan, load)

    def app_name(self, label: str, version: int) -> str:
        return f"gptstore.{label}.v{version}.{self.token}"

    def deploy(
        self, app: str, spec: DeploymentSpec, load: dict[str, Any], stop: Callable[[], bool]
    ) -> Any:
        """Start ``app`` and wait until it runs (``stop()`` true, or the engine closed: stop
        waiting); its handle. A failure deletes it and raises the replicas' error."""
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        from gptstore.deploy.router import LOAD_TIMEOUT

        options: dict[str, Any] = {
            "name": "replica",
            # The replica's own batcher admits max_batch running and max_queue waiting; Ray's
            # router queues up to max_queue more in the server, then refuses (429).
            "max_ongoing_requests": spec.max_batch + spec.max_queue,
            "max_queued_requests": spec.max_queue,
            "ray_actor_options": {"num_cpus": self.settings.replica_cpus},
            "graceful_shutdown_timeout_s": 120.0,
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
        }
        scaling = spec.autoscaling
        if scaling is not None:
            options["autoscaling_config"] = {
                "min_replicas": scaling.min_replicas,
                "initial_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            }
        else:
            options["num_replicas"] = spec.replicas
        deployment = serve.deployment(RayReplica, **options)
        target = serve.RunTarget(target=deployment.bind(load), name=app, route_prefix=None)
        deadline = time.monotonic() + LOAD_TIMEOUT
        try:
            serve.run_many([target], wait_for_applications_running=False)
            while True:
                if stop() or self.closed.is_set():
                    raise Unavailable(f"Ray Serve application {app} was stopped while it loaded")
                if time.monotonic() > deadline:
                    raise PluginError(
                        f"Ray Serve application {app} did not start within {LOAD_TIMEOUT:g} s "
                        "(does the cluster have the CPUs its replicas ask for? [server.ray] "
                        "replica_cpus)"
                    )
                status = serve.status().applications.get(app)
                if status is not None and status.status == ApplicationStatus.RUNNING:
                    return serve.get_app_handle(app)
                if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
                    why = self._failure(status) or status.message
                    raise PluginError(f"Ray Serve application {app} failed to start: {why}")
                time.sleep(0.25)
        except BaseException:
            self.delete(app)
            raise

    @staticmethod
    def _failure(status: Any) -> str | None:
        """The replicas' error as Serve recorded it: the last line of its traceback."""
        for deployment in status.deployments.values():
            # A traceback: its last line that is not indented names the exception.
            lines = [line for line in deployment.message.splitlines() if line.strip()]
            unindented = [line for line in lines if not line[0].isspace()]
            if unindented:
                last: str = unindented[-1]
                kind, colon, why = last.partition(": ")
                return f"{kind.rpartition('.')[2]}: {why}" if colon else last
        return None

    def delete(self, app: str) -> None:
        """Delete ``app`` (and wait until its replicas have stopped); nothing when it is gone."""
        if not self._connected:
            return
        from ray import serve

        try:
            serve.delete(app)
        except Exception as exc:
            log.warning("ray engine: could not delete application %s: %s", app, exc)

    def details(self, app: str) -> list[dict[str, Any]] | None:
        """The replicas of ``app`` (id, state, pid, node) as Serve's controller knows them,
        what Ray's dashboard shows; [] when the application is gone, None when the controller
        cannot say. One read every REFRESH / 2 seconds serves every set."""
        with self._lock:
            if not self._connected:
                return None
            if self._seen is None or time.monotonic() - self._seen_at >= REFRESH / 2:
                self._seen, self._seen_at = self._read(), time.monotonic()
            seen = self._seen
        return None if seen is None else list(seen.get(app, []))

    def _read(self) -> dict[str, list[dict[str, Any]]] | None:
        import ray
        from ray.serve.context import _get_global_client

        try:  # a private API (the dashboard's): without it, sets show their own counts
            controller = _get_global_client()._controller
            instance = ray.get(controller.get_serve_instance_details.remote(), timeout=10)
            return {
                name: list(
                    (application.get("deployments", {}).get("replica") or {}).get("replicas", [])
                )
                for name, application in instance["applications"].items()
            }
        except Exception as exc:
            log.debug("ray engine: no replica details: %s", exc)
            return None

    def close(self) -> None:
        """Stop the deploys that wait, delete what this server still runs on the cluster (a
        deploy cut short by the shutdown included), wait for the engine's threads, and
        disconnect."""
        self.closed.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            if not self._connected:
                return
            try:
                from ray import serve

                for app in serve.status().applications:
                    if app.startswith("gptstore.") and app.endswith(f".{self.token}"):
                        self.delete(app)
            except Exception as exc:
                log.warning("ray engine: could not list its applications: %s", exc)
            self._connected = False
        import ray

        ray.shutdown()


class RayEndpoint(Endpoint):
    """A version's Serve application as the router sees a replica: one endpoint whose calls Ray
    spreads over its replicas. ``outstanding``, ``served`` and ``lost`` count the calls this
    server sent it."""

    def __init__(self, label: str, version: int, deployment: str, max_queue: int) -> None:
        super().__init__(label, version)
        self.deployment = deployment
        self.max_queue = max_queue
        #: Each replica's batch counts (by Serve's replica id), as of its last answer.
        self.batch_stats: dict[str, dict[str, int]] = {}
        self.handle: Any = None

    @property
    def stats(self) -> dict[str, int]:
        counts = {"batches": 0, "rows": 0, "largest": 0, "streams": 0}
        for stats in list(self.batch_stats.values()):
            for key, value in stats.items():
                if key == "largest":
                    counts[key] = max(counts[key], value)
                elif key in counts:
                    counts[key] += value
        return counts

    async def call(self, op: str, **payload: Any) -> AsyncGenerator[dict[str, Any], None]:
        """The messages answering one call, as :meth:`Replica.call
        <gptstore.deploy.replicas.Replica.call>` gives them: a replica that dies before it
        answered anything is :class:`ReplicaLost` after one more try (Ray's router picks a live
        replica); Serve's queue full is :class:`Overloaded`; Ray failing the call otherwise is
        Unavailable."""
        if self.state != "ready" or self.handle is None:
            raise ReplicaLost(f"{self.label} is {self.state}")
        from ray.exceptions import RayActorError, RayError
        from ray.serve.exceptions import BackPressureError

        self.outstanding += 1
        try:
            for attempt in (1, 2):
                sent = False
                try:
                    async for message in self._call(op, payload):
                        if message.get("op") == "error":
                            raise error_from(message.get("error", {}))
                        sent = True
                        if message.get("op") == "done":
                            self.served += 1
                            if "stats" in message and "replica_id" in message:
                                self.batch_stats[str(message["replica_id"])] = message["stats"]
                        yield message
                    return
                except RayActorError as exc:
                    self.lost += 1
                    if sent or attempt == 2:
                        raise ReplicaLost(f"a replica of {self.label} died: {exc}") from None
                except BackPressureError:
                    raise Overloaded(self.deployment, self.max_queue) from None
                except RayError as exc:
                    raise Unavailable(
                        f"Ray Serve could not run the call on {self.label} "
                        f"({type(exc).__name__}); retry shortly"
                    ) from None
        finally:
            self.outstanding -= 1

    async def _call(self, op: str, payload: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        if op == "stream":
            response = self.handle.options(stream=True).stream.remote(payload["requests"])
        else:
            response = self.handle.call.remote({"op": op, **payload})
        finished = False
        try:
            if op == "stream":
                async for message in response:
                    yield message
            else:
                yield await response
            finished = True
        finally:
            if not finished:  # the client left (or the call failed): the replica stops
                response.cancel()


class RaySet:
    """One deployment version as a Ray Serve application, with the interface of
    :class:`~gptstore.deploy.router.ReplicaSet`: the router picks its one endpoint, Ray picks the
    replica."""

    def __init__(
        self,
        engine: RayEngine,
        label: str,
        version: int,
        spec: DeploymentSpec,
        plan: Plan,
        load: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.version = version
        self.spec = spec
        self.plan = plan
        self.load = load
        self.app = engine.app_name(label, version)
        self.endpoint = RayEndpoint(self.app, version, label, spec.max_queue)
        self.replicas = [self.endpoint]
        self.info = RunnerInfo(context_length=None, logprobs=False)
        #: Serve's replicas as last seen (see :meth:`RayEngine.details`).
        self.seen: list[dict[str, Any]] = []
        self._closing = False
        self._deployed = False
        self._refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Deploy the application and wait until it runs and its model answers ``ready``;
        anything else (an error, a timeout, the deployment deleted or the server stopping
        meanwhile) deletes it."""
        from gptstore.deploy.router import PROBE_TIMEOUT

        engine, endpoint = self.engine, self.endpoint
        self._deployed = True
        try:
            endpoint.handle = await engine.run(
                lambda: engine.deploy(self.app, self.spec, self.load, self.closing)
            )
            ready = await asyncio.wait_for(endpoint.handle.ready.remote(), PROBE_TIMEOUT)
            if ready.get("op") != "ready":
                raise error_from(ready.get("error") or {})
            if self._closing:
                raise Unavailable(f"{self.app} was stopped while it loaded")
        except BaseException as exc:
            endpoint.state, endpoint.error = "dead", str(exc) or type(exc).__name__
            await asyncio.shield(self._delete())
            raise
        endpoint.ready = ready
        endpoint.state = "ready"
        self.info = RunnerInfo(
            context_length=ready.get("context_length"), logprobs=bool(ready.get("logprobs"))
        )
        await self._look()
        self._refresh = asyncio.create_task(self._refreshing())

    async def _delete(self) -> None:
        with contextlib.suppress(RuntimeError):  # the engine's threads are gone: it deleted all
            await self.engine.run(lambda: self.engine.delete(self.app))

    async def _look(self) -> None:
        seen = await self.engine.run(lambda: self.engine.details(self.app))
        if seen is None:
            return  # the controller did not answer: keep what was seen
        endpoint = self.endpoint
        if not seen and endpoint.state == "ready":  # deleted behind the server's back
            endpoint.state, endpoint.error = "dead", "its Serve application is gone"
        ids = {str(r.get("replica_id")) for r in seen}
        before = {str(r.get("replica_id")) for r in self.seen}
        # Replicas Serve replaced (died, failed their health check): gone since the last look
        # beyond those that scaling down removed.
        gone = len(before - ids)
        endpoint.restarts += max(gone - max(len(before) - len(ids), 0), 0)
        self.seen = seen

    async def _refreshing(self) -> None:
        while not self._closing:
            await asyncio.sleep(REFRESH)
            with contextlib.suppress(Exception):
                await self._look()

    def size(self) -> int:
        """The replicas it may run: what counts against the server's max_replicas."""
        return self.spec.most_replicas()

    def _initial(self) -> int:
        scaling = self.spec.autoscaling
        return scaling.min_replicas if scaling is not None else self.spec.replicas

    def ready(self) -> int:
        return self.states().get("ready", 0)

    def states(self) -> Counter[str]:
        if self.endpoint.state != "ready" or not self.seen:
            return Counter({self.endpoint.state: self._initial()})
        return Counter(STATES.get(_state(r), "starting") for r in self.seen)

    def split(self, most: int) -> tuple[int, int]:
        """Its calls in flight as (running, waiting): up to ``most`` running per ready replica."""
        capacity = most * max(self.ready(), 1)
        outstanding = self.endpoint.outstanding
        return min(outstanding, capacity), max(outstanding - capacity, 0)

    def describe(self) -> list[ReplicaStatus]:
        """One entry per Serve replica (its actor's pid and node); the calls this server has
        in flight are the application's, shown on its first replica."""
        endpoint = self.endpoint
        if endpoint.state != "ready" or not self.seen:
            return [endpoint.describe()]
        described: list[ReplicaStatus] = []
        for index, replica in enumerate(self.seen):
            node = replica.get("node_ip") or "?"
            described.append(
                {
                    "replica": f"{self.app}/{replica.get('replica_id')}@{node}",
                    "state": STATES.get(_state(replica), "starting"),
                    "pid": replica.get("pid"),
                    "outstanding": endpoint.outstanding if index == 0 else 0,
                    "served": endpoint.served if index == 0 else 0,
                    "restarts": endpoint.restarts if index == 0 else 0,
                    "lost": endpoint.lost if index == 0 else 0,
                    "error": None,
                }
            )
        return described

    def closing(self) -> bool:
        return self._closing

    async def aclose(self) -> None:
        """No new call; wait for this server's calls in flight (up to the drain timeout), then
        delete the application (Serve stops its replicas). A deploy still under way stops."""
        from gptstore.deploy.router import DRAIN_TIMEOUT

        self._closing = True
        if self._refresh is not None:
            self._refresh.cancel()
        endpoint = self.endpoint
        if endpoint.state == "ready":
            endpoint.state = "draining"
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while endpoint.outstanding and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if self._deployed:
            await self._delete()
        if endpoint.state != "dead":
            endpoint.state = "stopped"


def reachable(address: str, timeout: float = 5.0) -> None:
    """Unavailable at once when nothing listens at ``address`` (``host:port`` or
    ``ray://host:port``): ray.init would wait minutes for it."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isascii() or not port.isdigit():
        raise InvalidInput(
            "[server.ray] address",
            [f"{address!r} is not host:port, ray://host:port or auto @ $.server.ray.address"],
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise Unavailable(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there "
            "(`ray start --head`), or set [server.ray] address / --ray-address"
        ) from None


def _auth_token() -> bool:
    """Whether Ray's authentication token is here (where Ray looks for it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def _replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


def _state(replica: dict[str, Any]) -> str:
    state = replica.get("state")
    return str(getattr(state, "value", state))
