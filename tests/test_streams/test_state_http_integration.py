"""State on request end to end: a real worker answers over HTTP for a run after a NaN loss
and for a model's breaker, a 404 for what it never saw, ``status --json`` reads it; with two
workers, either answers for every key (asking the owner)."""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from config.settings import Settings
from fragrance_ops import cli as cli_module
from fragrance_ops.brokers import free_port
from fragrance_ops.operator import OperatorClient
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from schemas import CheckpointSaved, LlmOutcome, StepMetric, encode, topic_name
from streams.http import OWNER_HEADER
from streams.state import key_partition
from tests.helpers.kafka import produce_records
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = pytest.mark.integration

RUN = "state-run"
MODEL = "qwen-state"
FAST_CHECKPOINTS = {
    "CHECKPOINTS__INTERVAL_STEPS": "50",
    "CHECKPOINTS__HEALTH_LOOKBACK_STEPS": "20",
}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, dict[str, str], Any]:
    try:
        with _DIRECT.open(url, timeout=15) as response:
            return response.status, dict(response.headers), orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), orjson.loads(error.read())


def wait_for(
    url: str, done: Callable[[int, Any], bool], timeout_s: float = 60.0
) -> tuple[int, dict[str, str], Any]:
    """GET ``url`` until ``done(status, body)``; the last answer."""
    deadline = time.monotonic() + timeout_s
    answer: tuple[int, dict[str, str], Any] = (0, {}, None)
    while time.monotonic() < deadline:
        try:
            answer = get(url)
        except (urllib.error.URLError, OSError):  # not serving yet
            time.sleep(0.3)
            continue
        if done(answer[0], answer[2]):
            return answer
        time.sleep(0.3)
    raise AssertionError(f"{url}: still {answer[0]} {answer[2]} after {timeout_s} s")


def train(client: TrainerClient, steps: range) -> None:
    for step in steps:
        client.log_step(step, loss=1.0, reward=float(step % 7))
    client.flush(10)


def produce(settings: Settings, events: list[Any]) -> None:
    """Events straight onto their topic: no trainer to acknowledge the worker's commands."""
    produce_records(
        settings.kafka.bootstrap_servers or "",
        topic_name(events[0].TOPIC, settings.kafka.topic_prefix),
        [(event.key().encode(), encode(event)) for event in events],
    )


def run_with_a_nan_loss(settings: Settings) -> None:
    """Steps 0..129 with checkpoints at 50 and 100, then a NaN loss at step 130."""
    now = time.time()
    checkpoints = [
        CheckpointSaved(run_id=RUN, step=step, uri=f"ckpt/{step}.pt", ts=now) for step in (50, 100)
    ]
    produce(settings, checkpoints)
    metrics = [
        StepMetric(
            run_id=RUN,
            step=step,
            loss=math.nan if step == 130 else 1.0,
            reward=float(step % 7),
            ts=now,
            checkpoint_step=step - step % 50 or None,
        )
        for step in range(131)
    ]
    produce(settings, metrics)


def fail_calls(settings: Settings, model: str, calls: int) -> None:
    outcomes = [
        LlmOutcome(
            model=model,
            ok=False,
            mode="creative",
            latency_ms=5.0,
            error="timeout",
            ts=time.time(),
            call_id=f"{model}-{i}",
        )
        for i in range(calls)
    ]
    produce(settings, outcomes)


def test_a_worker_answers_for_a_run_and_a_model_and_status_reads_it(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with make_worker(METRICS__PORT=str(port), **FAST_CHECKPOINTS):
        run_with_a_nan_loss(ops_settings)
        _, _, state = wait_for(f"{url}/runs/{RUN}", lambda _s, body: body.get("step") == 130)
        assert (state["run_id"], state["halted"], state["finished"]) == (RUN, False, False)
        assert (state["attempt"], state["step"]) == (0, 130)
        assert state["rollbacks"]["used"] == 1
        assert state["rollbacks"]["budget"] == Settings().checkpoints.max_rollbacks
        (rolled_back,) = state["rollbacks"]["history"]
        assert (rolled_back["step"], rolled_back["checkpoint_step"]) == (130, 100)
        # Sent and not acknowledged: no trainer reads the commands here.
        assert state["pending_rollback"] is not None
        assert state["pending_rollback"]["step"] == 100
        assert [cp["step"] for cp in state["checkpoints"]["kept"]] == [50, 100]
        assert state["checkpoints"]["protected"] == 100
        assert state["reward_window"]["count"] == 131
        assert state["reward_window"]["mean"] == pytest.approx(
            sum(step % 7 for step in range(131)) / 131
        )
        assert state["entropy_coef"] == pytest.approx(0.01, rel=1e-3)

        fail_calls(ops_settings, MODEL, 3)
        _, _, model = wait_for(f"{url}/models/{MODEL}", lambda status, _b: status == 200)
        assert (model["state"], model["mode"], model["cache_ttl_s"]) == ("open", "balanced", 300)
        assert 0 < model["recovers_in_s"] <= 300

        status, _, body = get(f"{url}/runs/never-seen")
        assert (status, body["error"], body["run"]) == (404, "unknown run", "never-seen")
        assert get(f"{url}/models/never-seen")[0] == 404
        status, _, listed = get(f"{url}/runs")
        assert (status, list(listed["runs"]), listed["worker"]) == (200, [RUN], url)

        monkeypatch.setenv("FRAGRANCE_OPS_METRICS__STATUS_URLS", orjson.dumps([url]).decode())
        result = CliRunner().invoke(cli_module.cli, ["status", "--json"])
        assert result.exit_code == 0, result.output
        shown = orjson.loads(result.stdout)
        assert shown["source"] == "workers"
        assert shown["runs"][RUN]["halted"] is False
        assert shown["models"][MODEL]["state"] == "open"

        with OperatorClient(ops_settings, requested_by="test") as operator:
            assert operator.request("halt", RUN, reason="state on request").accepted
        result = CliRunner().invoke(cli_module.cli, ["status", "--json"])
        assert orjson.loads(result.stdout)["runs"][RUN]["halted"] is True


def one_run_per_partition() -> list[str]:
    """Run ids whose (murmur2) partitions are every partition: each worker owns some."""
    runs: dict[int, str] = {}
    candidate = 0
    while len(runs) < TEST_PARTITIONS:
        run = f"state-run-{candidate}"
        runs.setdefault(key_partition(run.encode(), TEST_PARTITIONS), run)
        candidate += 1
    return sorted(runs.values())


def at_step_2(status: int, body: Any) -> bool:
    return status == 200 and body.get("step") == 2


def test_either_of_two_workers_answers_for_every_key(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings
) -> None:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    runs = one_run_per_partition()
    with make_worker(METRICS__PORT=str(ports[0])), make_worker(METRICS__PORT=str(ports[1])):
        # Both in the group (each names the other), every partition owned by one of them.
        for url in urls:
            wait_for(
                f"{url}/runs",
                lambda status, body: (
                    status == 200
                    and sorted(body["workers"]) == sorted(urls)
                    and not body["rebalancing"]
                ),
                timeout_s=90,
            )
        for run in runs:
            with TrainerClient(run, settings=ops_settings) as client:
                train(client, range(3))
        for url in urls:  # each holds some: the test routes both ways
            wait_for(f"{url}/runs", lambda _s, body: len(body["runs"]) > 0)
        held = {url: sorted(get(f"{url}/runs")[2]["runs"]) for url in urls}
        for url in urls:
            for run in runs:
                _, headers, state = wait_for(f"{url}/runs/{run}", at_step_2)
                held_here = run in get(f"{url}/runs")[2]["runs"]
                assert (OWNER_HEADER in headers) is not held_here, (url, run, held)
                assert state["run_id"] == run
