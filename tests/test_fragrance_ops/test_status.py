"""``fragrance-ops status`` asks the workers first: every worker of the group, found from the
ones configured; the topics only when none answers. Workers faked by small HTTP servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from config.settings import KafkaSettings, MetricsSettings, Settings
from fragrance_ops import cli as cli_module
from fragrance_ops.brokers import free_port
from fragrance_ops.status import NoSource, ask_workers, collect, render


def held_run(run_id: str, *, halted: bool) -> dict[str, Any]:
    """A run as a worker answers for it (``streams.queries.RunState``)."""
    return {
        "run_id": run_id,
        "partition": 0,
        "algorithm": "ppo",
        "halted": halted,
        "finished": False,
        "last_metric_at": 100.0,
        "silent_s": 5.0,
        "stale": False,
        "attempt": 1,
        "step": 1200,
        "rollbacks": {"used": 1, "budget": 3, "within_steps": 2000, "history": []},
        "pending_rollback": {"command_id": "c", "step": 1000, "attempt": 1},
        "awaiting_target": None,
        "checkpoints": {
            "kept": [{"step": 1000, "uri": "u", "attempt": 0, "health": "healthy"}],
            "protected": 1000,
        },
        "reward_window": {"count": 3, "capacity": 1000, "mean": 0.5, "std": 0.25},
        "entropy_coef": 0.009,
        "rating_window": None,
    }


BREAKER = {
    "model": "qwen",
    "partition": 1,
    "state": "open",
    "mode": "balanced",
    "cache_ttl_s": 300.0,
    "until": 1.0,
    "recovers_in_s": 42.0,
    "probe_mode": None,
    "probe_calls": None,
    "recovery": "probe",
    "epoch": 1,
    "reason": "3 consecutive failures in creative: downshift to balanced",
}


class FakeWorker:
    """Answers /runs and /models as a worker of a group does."""

    def __init__(self, runs: dict[str, Any], models: dict[str, Any]) -> None:
        self.runs, self.models = runs, models
        self.group: list[str] = []  # every worker's URL, this one's included
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kind = self.path.strip("/")
                if kind not in ("runs", "models"):
                    self.send_error(404)
                    return
                body = orjson.dumps(
                    {
                        "worker": worker.url,
                        "workers": worker.group,
                        "rebalancing": False,
                        kind: worker.runs if kind == "runs" else worker.models,
                    }
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def group() -> Iterator[tuple[FakeWorker, FakeWorker]]:
    """Two workers: one holds a halted run, the other a running run and a model."""
    a = FakeWorker({"run-h": held_run("run-h", halted=True)}, {})
    b = FakeWorker({"run-r": held_run("run-r", halted=False)}, {"qwen": BREAKER})
    a.group = b.group = [a.url, b.url]
    yield a, b
    a.close()
    b.close()


def nobody() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_every_worker_of_the_group_is_asked_from_one(group: tuple[FakeWorker, FakeWorker]) -> None:
    a, b = group
    silent = nobody()
    status = ask_workers([silent, a.url])
    assert status is not None
    assert status["source"] == "workers"
    assert status["workers"] == [a.url, b.url]
    assert status["unreachable"] == [silent]
    assert {run_id: run["halted"] for run_id, run in status["runs"].items()} == {
        "run-h": True,
        "run-r": False,
    }
    assert status["models"] == {"qwen": BREAKER}


def test_no_worker_answering_is_none() -> None:
    assert ask_workers([nobody(), nobody()]) is None


def test_without_a_worker_or_a_broker_there_is_nothing_to_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    settings = Settings(metrics=MetricsSettings(status_urls=[nobody()]))
    with pytest.raises(NoSource, match="KAFKA_BOOTSTRAP_SERVERS"):
        collect(settings)


def test_the_topics_are_read_when_no_worker_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from fragrance_ops import status as status_module

    read: list[Settings] = []

    def from_topics(settings: Settings, **_options: Any) -> dict[str, Any]:
        read.append(settings)
        return {"source": "topics", "models": {}, "runs": {}, "at": 0.0}

    monkeypatch.setattr(status_module, "collect_status", from_topics)
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        metrics=MetricsSettings(status_urls=[nobody()]),
    )
    status = collect(settings)
    assert (status["source"], status["unanswered"]) == ("topics", settings.metrics.status_urls)
    assert collect(settings, topics=True)["unanswered"] == []  # no worker asked
    assert len(read) == 2


def test_status_json_shows_each_runs_halted_flag(
    group: tuple[FakeWorker, FakeWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = group
    monkeypatch.setenv("FRAGRANCE_OPS_METRICS__STATUS_URLS", orjson.dumps([a.url]).decode())
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    result = CliRunner().invoke(cli_module.cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    status = orjson.loads(result.stdout)
    assert status["source"] == "workers"
    assert {run_id: run["halted"] for run_id, run in status["runs"].items()} == {
        "run-h": True,
        "run-r": False,
    }
    text = CliRunner().invoke(cli_module.cli, ["status", "--worker", a.url]).stdout
    assert "qwen: open, mode balanced, cache TTL 300s, next step in 42s" in text
    assert (
        "run-h: step 1200 (attempt 1), entropy_coef 0.009, rollbacks 1/3, rollback to step "
        "1000 pending, reward mean 0.5 std 0.25 (n=3), checkpoints 1000 (protected 1000) "
        "[halted]"
    ) in text


def test_the_rendering_says_where_it_read() -> None:
    from_topics = {"source": "topics", "models": {}, "runs": {}, "at": 0.0}
    assert render(from_topics).splitlines()[0] == "From the topics:"
    unanswered = render(from_topics | {"unanswered": ["http://a", "http://b"]})
    assert unanswered.splitlines()[0] == "From the topics (no worker answered: http://a, http://b):"
    status = {
        "source": "workers",
        "workers": ["http://a"],
        "unreachable": ["http://b"],
        "rebalancing": True,
        "models": {},
        "runs": {"r": held_run("r", halted=False) | {"pending_rollback": None}},
    }
    lines = render(status).splitlines()
    assert lines[:3] == [
        "From the workers: http://a",
        "  not answering: http://b",
        "  (the group is rebalancing: some runs or models may be missing)",
    ]
    assert "rollback to step" not in lines[-1]
    assert "[halted]" not in lines[-1]
    silent = held_run("r", halted=True) | {"silent_s": 412.0, "stale": True}
    line = render(status | {"runs": {"r": silent}}).splitlines()[-1]
    assert line.endswith("[halted, stale: silent for 412s]")
