"""``GET /metrics``: the Prometheus exposition of ``app.state.metrics`` (a
:class:`~gptstore.deploy.metrics.Metrics`; 404 when the app keeps none).

Open, like ``/health``: a key is for changing state or spending compute, and a scrape does
neither; Prometheus scrapes without credentials by default. Where the counts (deployment names,
traffic) are not for everyone, keep the port private or filter ``/metrics`` at the proxy. Left
out of the OpenAPI schema: the body is Prometheus's text format, not JSON."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.exceptions import NotFoundException

from gptstore.deploy.metrics import Metrics


@get("/metrics", sync_to_thread=False, include_in_schema=False, opt={"role": None})
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """(On the event loop: the snapshot reads the router's state, which lives there.)"""
    found: Metrics | None = getattr(request.app.state, "metrics", None)
    if found is None:
        raise NotFoundException("this server keeps no metrics")
    body, content_type = found.render()
    # as a header: Litestar would add a second charset to a text/* media_type
    return Response(body, headers={"content-type": content_type})


ROUTES = [metrics]
