"""The worker's metrics, scraped by a real Prometheus server and queried with PromQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from config.settings import Settings
from fragrance_ops.brokers import free_port
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.llm import LlmClient
from schemas import Topic, topic_name
from tests.helpers.kafka import produce_records
from tests.helpers.prometheus import PrometheusServer, prometheus_executable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(prometheus_executable() is None, reason="prometheus is not installed"),
]


@pytest.fixture
def metrics_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture
def prometheus(metrics_port: int) -> Iterator[PrometheusServer]:
    server = PrometheusServer([f"127.0.0.1:{metrics_port}"])
    server.start()
    yield server
    server.stop()


def eventually(
    prometheus: PrometheusServer, promql: str, expected: float, timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = prometheus.value(promql)
        if value == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} = {value}, expected {expected}")


def test_prometheus_scrapes_training_breaker_and_dead_letter_metrics(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    metrics_port: int,
    prometheus: PrometheusServer,
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    metrics_topic = topic_name(Topic.METRICS, prefix)
    with make_worker(METRICS__PORT=str(metrics_port), METRICS__LAG_INTERVAL_S="1"):
        with TrainerClient("prom-run", settings=ops_settings, receive_commands=False) as trainer:
            for step in range(50):
                trainer.log_step(step, loss=1.0 + step / 100, reward=2.0, entropy=0.5)
        produce_records(kafka_bootstrap, metrics_topic, [(b"prom-run", b"{}"), (b"x", b"[")])
        with LlmClient("qwen", settings=ops_settings) as llm:
            for _ in range(3):
                llm.record(ok=False, mode="creative", latency_ms=50.0, error="timeout")
        eventually(prometheus, f'fragrance_ops_events_total{{topic="{metrics_topic}"}}', 52)
        eventually(prometheus, f'fragrance_ops_dead_letters_total{{topic="{metrics_topic}"}}', 2)
        eventually(
            prometheus,
            'fragrance_ops_breaker_downgrades_total{model="qwen",from_mode="creative",'
            'to_mode="balanced"}',
            1,
        )
        eventually(prometheus, 'fragrance_ops_breaker_state{model="qwen"}', 2)
        eventually(prometheus, 'fragrance_ops_cache_ttl_seconds{model="qwen"}', 300)
        eventually(prometheus, 'fragrance_ops_rl_value{run_id="prom-run",name="loss"}', 1.49)
        eventually(prometheus, 'fragrance_ops_rl_updates_total{algorithm="ppo"}', 50)
        # Run health: not halted; its reward window of 50 rewards of 2.0.
        eventually(prometheus, 'fragrance_ops_run_halted{run_id="prom-run"}', 0)
        eventually(prometheus, 'fragrance_ops_reward_window{run_id="prom-run",stat="mean"}', 2)
        eventually(prometheus, 'fragrance_ops_reward_window{run_id="prom-run",stat="count"}', 50)
        # When the worker last read the run's metrics: within the last minute, on its clock.
        eventually(
            prometheus,
            'time() - fragrance_ops_run_last_metric_timestamp_seconds{run_id="prom-run"} < bool 60',
            1,
        )
        eventually(prometheus, 'fragrance_ops_commands_total{type="set_entropy_coef"}', 1)
        # A run names its algorithm when it announces itself (unannounced runs count as PPO).
        with TrainerClient("grpo-run", settings=ops_settings, receive_commands=False) as grpo:
            grpo.announce(algorithm="grpo")
            grpo.flush()
            runs_topic = topic_name(Topic.RUNS, prefix)
            eventually(prometheus, f'fragrance_ops_events_total{{topic="{runs_topic}"}}', 1)
            for step in range(20):
                grpo.log_step(step, loss=1.0, reward=1.0)
        eventually(prometheus, 'fragrance_ops_rl_updates_total{algorithm="grpo"}', 20)
        eventually(prometheus, 'fragrance_ops_rl_updates_total{algorithm="ppo"}', 50)
        eventually(prometheus, f'sum(fragrance_ops_consumer_lag{{topic="{metrics_topic}"}})', 0)
        eventually(
            prometheus,
            'sum(fragrance_ops_batch_processing_seconds_count{agent="training"}) > bool 0',
            1,
        )
