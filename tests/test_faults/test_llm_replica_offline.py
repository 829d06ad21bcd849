"""Scenario 8 (LLM side): a replica that loses its broker keeps serving on its own breaker.

A real LLM client follows a real broker (this suite's own, which it may stop); the broker
is SIGKILLed mid-traffic. Calls go on, never raise anything but the model's own errors,
the local breaker downshifts on three local failures, and the client says it is no longer
following the stream.
"""

from __future__ import annotations

import time

import pytest

from config.settings import KafkaSettings, SdkSettings, Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import ApacheKafkaBroker
from producers.llm import LlmClient
from tests.test_faults.support import FIGURES

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_an_llm_replica_that_loses_its_broker_keeps_serving(own_broker: ApacheKafkaBroker) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=own_broker.bootstrap_servers, topic_prefix="off."),
        sdk=SdkSettings(control_wait_s=5.0, close_timeout_s=0.5),
    )
    create_contract_topics(settings.kafka)
    failing = False

    def qwen(prompt: str, *, mode: str) -> str:
        if failing:
            raise TimeoutError("model timed out")
        return f"{mode}:{prompt}"

    llm = LlmClient("qwen-offline", settings=settings)
    generate = llm.wrap(qwen)
    try:
        assert generate("before") == "creative:before"
        own_broker.kill()
        started = time.perf_counter()
        served = [generate(f"call-{index}") for index in range(200)]
        failing = True
        for _ in range(3):
            with pytest.raises(TimeoutError):  # the model's own error, nothing else
                generate("x")
        failing = False
        after = generate("after")
        elapsed = time.perf_counter() - started
    finally:
        llm.close()
        own_broker.start()  # the suite's broker stays up for the next scenario
    assert served == [f"creative:call-{index}" for index in range(200)]
    assert after == "balanced:after"  # downshifted locally, no stream needed
    assert llm.status()["following_stream"] is False
    assert llm.stats.local_trips == 1
    FIGURES.record(
        "8. LLM replica without its broker",
        calls_served=204,
        ms_per_call=elapsed / 204 * 1e3,
        local_downshifts=llm.stats.local_trips,
    )
