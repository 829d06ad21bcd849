"""The worker's HTTP server, on ``metrics.port``: Prometheus metrics and state on request.

- ``GET /metrics``: the Prometheus exposition (``streams.metrics``).
- ``GET /runs/<run id>``: the run's state (``streams.queries.RunState``).
- ``GET /models/<model>``: the model's breaker (``streams.queries.ModelState``).
- ``GET /runs`` and ``GET /models``: the runs (models) whose partitions this worker owns,
  as ``{"worker": <its URL>, "workers": [<every worker's URL>], "rebalancing": bool,
  "runs": {<run id>: RunState}}`` (``"models"`` for models): a client asks each worker
  in ``workers`` for the whole picture.

Every answer is JSON. A key this worker does not hold is asked of its owner: the worker
that owns the key's partition in the group's last assignment (Faust's assignor tells each
worker every worker's URL, ``metrics.url``, and partitions), with the request proxied and
its answer passed on, marked ``X-Fragrance-Ops-Worker: <owner URL>``. A key nobody holds is
``404`` with ``{"error", "reason"}``; a routed request is never routed again (the owner
answers what it holds, or 404). ``503`` while no worker owns the key's partition (the
group is rebalancing) or when the worker's event loop does not answer within
``ANSWER_TIMEOUT_S``; ``502`` when the owner does not answer.

Threads: the server runs in its own threads, as ``prometheus_client``'s does; a state
request is answered on the worker's event loop (``asyncio.run_coroutine_threadsafe``),
where the agents change their objects, so it never reads one mid-change; the proxying
(blocking) happens in the server's thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from streams.queries import StateQueries

log = logging.getLogger(__name__)

ROUTED_HEADER = "X-Fragrance-Ops-Routed"  # on a proxied request: the worker that sent it
OWNER_HEADER = "X-Fragrance-Ops-Worker"  # on a proxied answer: the worker that made it
ANSWER_TIMEOUT_S = 5.0
PROXY_TIMEOUT_S = 5.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Answer:
    """A state request's answer: a status and a JSON body, or the owner to ask instead."""

    status: int
    body: Any = None
    route_to: str | None = None


def unknown(kind: str, name: str, reason: str) -> Answer:
    return Answer(404, {"error": f"unknown {kind}", kind: name, "reason": reason})


UNKNOWN_RUN = (
    "no metrics, checkpoints, acks, requests or announcement of it were read (or it finished "
    "and its state was dropped)"
)
UNKNOWN_MODEL = "no outcome of it was read"


class StateRoutes:
    """Answers ``/runs`` and ``/models`` requests from ``StateQueries``; on the event loop."""

    def __init__(self, queries: StateQueries) -> None:
        self.queries = queries

    def answer(self, path: str, routed: bool) -> Answer | None:
        """The answer to ``GET path`` (decoded); None: not a state path."""
        queries = self.queries
        for kind, plural in (("run", "runs"), ("model", "models")):
            if path in (f"/{plural}", f"/{plural}/"):
                listed = queries.runs() if kind == "run" else queries.models()
                return Answer(
                    200,
                    {
                        "worker": queries.own_url(),
                        "workers": queries.workers(),
                        "rebalancing": queries.rebalancing,
                        plural: listed,
                    },
                )
            prefix = f"/{plural}/"
            if path.startswith(prefix):
                name = path.removeprefix(prefix)
                return self._one(kind, name, routed)
        return None

    def _one(self, kind: str, name: str, routed: bool) -> Answer:
        queries = self.queries
        state = queries.run(name) if kind == "run" else queries.model(name)
        if state is not None:
            return Answer(200, state)
        reason = UNKNOWN_RUN if kind == "run" else UNKNOWN_MODEL
        if routed:  # its owner asked us: we are the owner by the assignment we know
            return unknown(kind, name, reason)
        owner = queries.run_owner(name) if kind == "run" else queries.model_owner(name)
        if owner is None or queries.rebalancing:
            return Answer(
                503,
                {
                    "error": "no owner",
                    kind: name,
                    "reason": "no worker owns its partition now (the group is rebalancing); retry",
                },
            )
        if queries.is_self(owner):
            return unknown(kind, name, reason)
        return Answer(200, route_to=owner)


def _json(status: int, body: Any, start_response: StartResponse) -> list[bytes]:
    return _respond(status, orjson.dumps(body), start_response)


def _respond(
    status: int, data: bytes, start_response: StartResponse, *headers: tuple[str, str]
) -> list[bytes]:
    """A JSON answer, already encoded (this worker's, or an owner's passed on)."""
    start_response(
        f"{status} {_REASONS.get(status, '')}".rstrip(),
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers],
    )
    return [data]


def state_app(
    routes: StateRoutes,
    loop: asyncio.AbstractEventLoop,
    metrics: WsgiApp,
    own_url: Callable[[], str],
) -> WsgiApp:
    """The WSGI app: state paths answered on ``loop``, anything else by ``metrics``."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        raw = str(environ.get("PATH_INFO", ""))
        if not raw.startswith(("/runs", "/models")):
            return metrics(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(405, {"error": "method not allowed", "allowed": "GET"}, start_response)
        path = raw.encode("latin-1").decode("utf-8", "replace")  # WSGI's PATH_INFO is latin-1
        routed = bool(environ.get("HTTP_" + ROUTED_HEADER.upper().replace("-", "_")))

        async def on_loop() -> Answer | None:
            return routes.answer(path, routed)

        try:
            answer = asyncio.run_coroutine_threadsafe(on_loop(), loop).result(ANSWER_TIMEOUT_S)
        except TimeoutError:
            busy = {"error": "busy", "reason": "the worker's event loop did not answer in time"}
            return _json(503, busy, start_response)
        except Exception as exc:  # a state no query could read, or the loop is gone
            log.exception("state request %s failed", path)
            failed = {"error": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            return _json(500, failed, start_response)
        if answer is None:
            return _json(404, {"error": "no such path", "path": path}, start_response)
        if answer.route_to is None:
            return _json(answer.status, answer.body, start_response)
        return _proxy(answer.route_to, path, own_url(), start_response)

    return app


# The owner is asked directly, never through an HTTP proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _proxy(owner: str, path: str, own_url: str, start_response: StartResponse) -> list[bytes]:
    """Ask ``owner`` the same request; pass its answer on."""
    url = owner.rstrip("/") + urllib.parse.quote(path)
    request = urllib.request.Request(url, headers={ROUTED_HEADER: own_url})
    try:
        with _DIRECT.open(request, timeout=PROXY_TIMEOUT_S) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as error:  # the owner's answer: a 404 is one
        with error:
            status, data = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        body = {"error": "owner unreachable", "worker": owner, "reason": str(error)}
        return _json(502, body, start_response)
    return _respond(status, data, start_response, (OWNER_HEADER, owner))


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing per request."""


def start_server(
    bind: str,
    port: int,
    registry: CollectorRegistry,
    routes: StateRoutes | None,
    own_url: Callable[[], str],
) -> WSGIServer:
    """Serve ``/metrics`` (and the state paths, with ``routes``) from a daemon thread;
    call on the worker's event loop."""
    family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family[0]

    metrics = make_wsgi_app(registry)
    app = (
        state_app(routes, asyncio.get_running_loop(), metrics, own_url)
        if routes is not None
        else metrics
    )
    server: WSGIServer = make_server(
        str(family[4][0]), port, app, Server, handler_class=_SilentHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    thread.start()
    return server
