"""The worker's HTTP server: state answered on the event loop, a key on another worker asked
of its owner, /metrics as before; real servers on loopback, the agents faked."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from wsgiref.simple_server import WSGIServer

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from streams.http import OWNER_HEADER, ROUTED_HEADER, StateRoutes, start_server
from streams.queries import StateQueries


@dataclass
class FakeQueries:
    """What ``StateRoutes`` reads of ``StateQueries``: held runs and models, owners."""

    url: str = ""
    runs_held: dict[str, dict[str, Any]] = field(default_factory=dict)
    models_held: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # key -> owner URL
    rebalancing: bool = False
    asked_on: list[threading.Thread] = field(default_factory=list)

    def run(self, run_id: str) -> dict[str, Any] | None:
        self.asked_on.append(threading.current_thread())
        return self.runs_held.get(run_id)

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.runs_held

    def model(self, model: str) -> dict[str, Any] | None:
        return self.models_held.get(model)

    def models(self) -> dict[str, dict[str, Any]]:
        return self.models_held

    def own_url(self) -> str:
        return self.url

    def is_self(self, url: str) -> bool:
        return url == self.url

    def workers(self) -> list[str]:
        return sorted({self.url, *self.owners.values()})

    def run_owner(self, run_id: str) -> str | None:
        return self.owners.get(run_id)

    def model_owner(self, model: str) -> str | None:
        return self.owners.get(model)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The worker's event loop, running in its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="worker-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    servers: list[WSGIServer] = []

    def serve(queries: FakeQueries, registry: CollectorRegistry | None = None) -> str:
        async def start() -> WSGIServer:
            return start_server(
                "127.0.0.1",
                0,
                registry or CollectorRegistry(),
                StateRoutes(cast(StateQueries, queries)),
                queries.own_url,
            )

        server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        servers.append(server)
        queries.url = f"http://127.0.0.1:{server.server_address[1]}"
        return queries.url

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), orjson.loads(error.read())


RUN = {"run_id": "run-1", "halted": False}


def test_a_held_run_is_answered_from_the_event_loop(serve: Any) -> None:
    queries = FakeQueries(runs_held={"run-1": RUN})
    url = serve(queries)
    assert get(f"{url}/runs/run-1")[::2] == (200, RUN)
    assert [thread.name for thread in queries.asked_on] == ["worker-loop"]
    status, _, listed = get(f"{url}/runs")
    assert status == 200
    assert listed == {"worker": url, "workers": [url], "rebalancing": False, "runs": {"run-1": RUN}}


def test_an_unknown_key_is_a_404_with_the_reason(serve: Any) -> None:
    queries = FakeQueries()
    url = serve(queries)
    queries.owners = {"nobody": url, "qwen": url}  # this worker owns their partitions
    status, _, body = get(f"{url}/runs/nobody")
    assert status == 404
    assert (body["error"], body["run"]) == ("unknown run", "nobody")
    assert "no metrics, checkpoints" in body["reason"]
    status, _, body = get(f"{url}/models/qwen")
    assert (status, body["error"]) == (404, "unknown model")
    assert get(f"{url}/runs/x", method="POST")[0] == 405


def test_a_key_on_another_worker_is_asked_of_its_owner(serve: Any) -> None:
    owner = FakeQueries(runs_held={"run 2/b": RUN}, models_held={"qwen": {"model": "qwen"}})
    owner_url = serve(owner)
    asked = FakeQueries(owners={"run 2/b": owner_url, "qwen": owner_url, "gone": owner_url})
    url = serve(asked)
    status, headers, body = get(f"{url}/runs/run%202%2Fb")
    assert (status, body) == (200, RUN)
    assert headers[OWNER_HEADER] == owner_url
    assert get(f"{url}/models/qwen")[::2] == (200, {"model": "qwen"})
    # The owner holds nothing of it: its 404, passed on, never routed back.
    status, headers, body = get(f"{url}/runs/gone")
    assert (status, body["error"], headers[OWNER_HEADER]) == (404, "unknown run", owner_url)


def test_a_routed_request_is_never_routed_again(serve: Any) -> None:
    queries = FakeQueries(owners={"x": "http://127.0.0.1:9"})
    url = serve(queries)
    request = urllib.request.Request(f"{url}/runs/x", headers={ROUTED_HEADER: "http://a"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    with raised.value as error:
        assert error.code == 404


def test_no_owner_or_a_silent_owner_are_said(serve: Any) -> None:
    queries = FakeQueries(owners={"silent": "http://127.0.0.1:9"})
    url = serve(queries)
    status, _, body = get(f"{url}/runs/orphan")  # no worker owns its partition
    assert (status, body["error"]) == (503, "no owner")
    status, _, body = get(f"{url}/runs/silent")
    assert (status, body["error"], body["worker"]) == (
        502,
        "owner unreachable",
        "http://127.0.0.1:9",
    )
    queries.owners["held-elsewhere"] = "http://127.0.0.1:9"
    queries.rebalancing = True
    assert get(f"{url}/runs/held-elsewhere")[0] == 503


def test_metrics_are_still_served(serve: Any) -> None:
    registry = CollectorRegistry()
    Counter("fragrance_ops_test_total", "a test counter", registry=registry).inc()
    url = serve(FakeQueries(), registry)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/metrics", timeout=10) as response:
        assert b"fragrance_ops_test_total 1.0" in response.read()


def test_a_query_that_fails_is_a_500_and_the_server_goes_on(serve: Any) -> None:
    queries = FakeQueries(runs_held={"ok": RUN})

    def broken(run_id: str) -> dict[str, Any] | None:
        if run_id == "corrupt":
            raise ValueError("unknown run operations state version 9")
        return queries.runs_held.get(run_id)

    queries.run = broken  # type: ignore[method-assign]
    url = serve(queries)
    status, _, body = get(f"{url}/runs/corrupt")
    assert (status, body["error"]) == (500, "failed")
    assert "state version 9" in body["reason"]
    assert get(f"{url}/runs/ok")[::2] == (200, RUN)
