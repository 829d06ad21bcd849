"""Scenario 5: poison inputs on every input topic.

Hypothesis generates malformed payloads of every kind (malformed JSON, wrong types, huge
values, non-finite numbers, invalid UTF-8, messages beyond ``worker.max_event_bytes``,
missing keys) for the six input topics; they are interleaved with good events on the same
partitions. Every poison lands in ``ops.dead-letter`` with the reason the contract's
decoder gives for it; every good event around them is processed as the rules say; the
worker's memory stays bounded.
"""

from __future__ import annotations

import base64
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st

from config.settings import Settings, run_overrides
from fragrance_ops.worker_process import WorkerProcess
from rules.breaker import BreakerPolicy
from rules.commands import retuned_entropy_command_id
from schemas import (
    DEFAULT_MAX_EVENT_BYTES,
    CheckpointSaved,
    CommandAck,
    Event,
    InvalidEvent,
    LlmOutcome,
    Rating,
    RunAnnounced,
    StepMetric,
    Topic,
    decode,
    topic_name,
)
from tests.helpers.kafka import produce_records
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    BreakerOracle,
    RetuneOracle,
    Seen,
    Sent,
    TopicRecorder,
    TrainingOracle,
    control_view,
    decision_view,
    rating_values,
    stats_view,
    vm_rss_kib,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "5 poison inputs"
RUN, MODEL, TARGET = "good-run", "good-model", "good-target"
MODELS: dict[Topic, type[Event]] = {
    Topic.RUNS: RunAnnounced,
    Topic.METRICS: StepMetric,
    Topic.CHECKPOINTS: CheckpointSaved,
    Topic.ACKS: CommandAck,
    Topic.LLM_OUTCOMES: LlmOutcome,
    Topic.RATINGS: Rating,
}
KEYS = {
    Topic.RUNS: RUN,
    Topic.METRICS: RUN,
    Topic.CHECKPOINTS: RUN,
    Topic.ACKS: RUN,
    Topic.LLM_OUTCOMES: MODEL,
    Topic.RATINGS: TARGET,
}
VALID: dict[Topic, dict[str, Any]] = {
    Topic.RUNS: {"run_id": RUN, "ts": 1.0, "settings": {"reward.window_size": 50}},
    Topic.METRICS: {"run_id": RUN, "step": 7, "loss": 1.0, "reward": 1.0, "ts": 1.0},
    Topic.CHECKPOINTS: {"run_id": RUN, "step": 50, "uri": "file:///ckpt/step-50.pt", "ts": 1.0},
    Topic.ACKS: {
        "command_id": "c-1",
        "run_id": RUN,
        "status": "applied",
        "detail": "ok",
        "ts": 1.0,
    },
    Topic.LLM_OUTCOMES: {
        "model": MODEL,
        "ok": True,
        "mode": "creative",
        "latency_ms": 3.0,
        "ts": 1.0,
    },
    Topic.RATINGS: {"rating": 3.0, "user_id": "u", "formula_id": "f", "ts": 1.0, "run_id": TARGET},
}
REQUIRED = {
    topic: [name for name, field in model.model_fields.items() if field.is_required()]
    for topic, model in MODELS.items()
}


def rejection(topic: Topic, payload: bytes) -> str | None:
    """The reason the worker must give for ``payload``, or None if it is a good event."""
    try:
        event = decode(MODELS[topic], payload, max_bytes=DEFAULT_MAX_EVENT_BYTES)
        if isinstance(event, RunAnnounced):
            try:
                run_overrides(Settings(), dict(event.settings))
            except ValueError as exc:
                return str(exc).splitlines()[0]
    except InvalidEvent as exc:
        return exc.reason
    return None


# --- what can be wrong with a payload -------------------------------------------------------

JUNK_VALUES = st.one_of(
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


@st.composite
def poison(draw: st.DrawFn, topic: Topic) -> tuple[str, bytes]:
    valid = dict(VALID[topic])
    kind = draw(
        st.sampled_from(
            [
                "malformed JSON",
                "wrong type",
                "huge value",
                "non-finite number",
                "invalid UTF-8",
                "oversized",
                "missing key",
            ]
        )
    )
    if kind == "malformed JSON":
        text = orjson.dumps(valid)
        payload = draw(
            st.one_of(
                st.integers(1, len(text) - 1).map(lambda n: text[:n]),  # truncated
                st.binary(max_size=64),  # noise
                st.just(text.replace(b":", b"=", 1)),
                st.just(b"[" + text + b"]"),  # not an object
            )
        )
    elif kind == "wrong type":
        name = draw(st.sampled_from(sorted(valid)))
        valid[name] = draw(JUNK_VALUES)
        # The standard library: orjson refuses integers beyond 64 bits, which are junk too.
        payload = json.dumps(valid, separators=(",", ":")).encode()
    elif kind == "huge value":
        name = draw(st.sampled_from(sorted(valid)))
        if isinstance(valid[name], str):
            valid[name] = "x" * draw(st.integers(4097, 20_000))  # beyond every length limit
            payload = orjson.dumps(valid)
        else:
            number = draw(
                st.sampled_from([b"1e400", b"-1e400", b"18446744073709551616", b"1" + b"0" * 400])
            )
            payload = orjson.dumps(valid).replace(
                b'"%s":' % name.encode() + orjson.dumps(valid[name]),
                b'"%s":' % name.encode() + number,
            )
    elif kind == "non-finite number":
        name = draw(st.sampled_from([n for n, v in valid.items() if isinstance(v, float)]))
        literal = draw(
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b'"NaN"', b'"Infinity"'])
        )
        payload = orjson.dumps(valid).replace(
            b'"%s":' % name.encode() + orjson.dumps(valid[name]), b'"%s":' % name.encode() + literal
        )
    elif kind == "invalid UTF-8":
        text = orjson.dumps(valid)
        at = text.index(b'"', 2)  # inside the first string value or key
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]))
        payload = text[:at] + junk + text[at:]
    elif kind == "oversized":
        pad = draw(st.integers(1, 200_000))
        valid["padding"] = "p" * (DEFAULT_MAX_EVENT_BYTES + pad)
        payload = orjson.dumps(valid)
    else:
        valid.pop(draw(st.sampled_from(REQUIRED[topic])))
        payload = orjson.dumps(valid)
    assume(rejection(topic, payload) is not None)  # a junk value can happen to be valid
    return kind, payload


def generate(topic: Topic, count: int, salt: int) -> list[tuple[str, bytes]]:
    """``count`` poison payloads for ``topic`` from Hypothesis, seeded by the profile."""
    found: list[tuple[str, bytes]] = []

    @seed(PROFILE.seed + salt)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(poison(topic))
    def collect(example: tuple[str, bytes]) -> None:
        found.append(example)

    collect()
    return found


# --- the scenario ---------------------------------------------------------------------------


def mixed(
    good: list[bytes], bad: list[tuple[str, bytes]], rng: random.Random
) -> list[tuple[bool, bytes]]:
    """Good events in order with the poison spread between them."""
    items = [(True, value) for value in good]
    for _kind, value in bad:
        items.insert(rng.randint(0, len(items)), (False, value))
    return items


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_poison_on_every_input_is_dead_lettered_and_good_events_around_it_processed(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(PROFILE.seed)
    prefix = ops_settings.kafka.topic_prefix
    poisons = {
        topic: generate(topic, PROFILE.poison_per_topic, salt) for salt, topic in enumerate(MODELS)
    }
    now = time.time()
    good: dict[Topic, list[bytes]] = {
        Topic.RUNS: [orjson.dumps(VALID[Topic.RUNS] | {"ts": now})],
        Topic.METRICS: [
            orjson.dumps(
                {"run_id": RUN, "step": s, "loss": 1.0, "reward": rng.uniform(0, 3), "ts": now}
            )
            for s in range(200)
        ],
        Topic.CHECKPOINTS: [
            orjson.dumps({"run_id": RUN, "step": s, "uri": f"file:///c/{s}.pt", "ts": now + s})
            for s in range(20, 200, 20)
        ],
        Topic.LLM_OUTCOMES: [
            orjson.dumps(
                {"model": MODEL, "ok": False, "mode": mode, "latency_ms": 5.0, "error": "x"}
                | {"ts": now, "call_id": f"call-{i}"}
            )
            for i, mode in enumerate(["creative"] * 3 + ["balanced"] * 3 + ["fast"] * 3)
        ],
        Topic.RATINGS: [
            orjson.dumps(
                {"rating": value, "user_id": f"u{i}", "formula_id": "f", "ts": now}
                | {"run_id": TARGET, "rating_id": f"r{i}"}
            )
            for i, value in zip(range(100), rating_values(PROFILE.seed, "low"), strict=False)
        ],
        Topic.ACKS: [
            orjson.dumps(
                {"command_id": "retune-1", "run_id": RUN, "status": "applied", "detail": "ok"}
                | {"ts": now, "command_type": "retune", "after": {"entropy_coef": 0.03}}
            )
        ],
    }
    dead_topic = topic_name(Topic.DEAD_LETTER, prefix)
    outputs = [
        topic_name(t, prefix) for t in (Topic.REWARD_STATS, Topic.COMMANDS, Topic.LLM_CONTROL)
    ]
    worker = fault_worker()
    worker.start()
    assert worker.pid is not None
    rss_before = vm_rss_kib(worker.pid)
    sent_good: list[Sent] = []
    sent_bad: list[tuple[Topic, str, bytes]] = []

    def send(
        topics: list[Topic], recorder: TopicRecorder, wait_for_good: Callable[[], Any]
    ) -> None:
        for topic in topics:
            name = topic_name(topic, prefix)
            items = mixed(good[topic], poisons[topic], rng)
            produce_records(
                kafka_bootstrap, name, [(KEYS[topic].encode(), value) for _, value in items]
            )
            sent_good.extend(Sent(name, KEYS[topic].encode(), v, 0.0) for ok, v in items if ok)
            sent_bad.extend((topic, kind, value) for kind, value in poisons[topic])
        expected = len(sent_bad)
        recorder.wait(
            lambda records: sum(r.topic == dead_topic for r in records) >= expected,
            120,
            f"{expected} dead letters",
        )
        wait_for_good()

    with TopicRecorder(kafka_bootstrap, [dead_topic, *outputs]) as recorder:
        # Announcement first, then what depends on it, then the checkpoints (their health is
        # known by then) and the ack (the retune it acknowledges rescales the schedule).
        send([Topic.RUNS], recorder, lambda: None)
        send([Topic.METRICS, Topic.LLM_OUTCOMES, Topic.RATINGS], recorder, lambda: None)
        send([Topic.CHECKPOINTS, Topic.ACKS], recorder, lambda: None)
        training = TrainingOracle(ops_settings).feed_all(sent_good, prefix)
        breakers = BreakerOracle(BreakerPolicy.from_settings(ops_settings.breaker))
        windows = RetuneOracle(ops_settings)
        for sent in sent_good:
            if sent.topic == topic_name(Topic.LLM_OUTCOMES, prefix):
                breakers.feed(sent.value)
            elif sent.topic == topic_name(Topic.RATINGS, prefix):
                windows.feed(sent.value)
        expected_commands = training.commands | windows.proposals
        retuned = retuned_entropy_command_id(RUN, retune_command_id="retune-1")
        assert retuned in expected_commands, "the good ack must have an effect to observe"

        def all_good_out(records: list[Seen]) -> bool:
            stats = {stats_view(r.json()) for r in records if r.topic == outputs[0]}
            ids = {r.json()["command_id"] for r in records if r.topic == outputs[1]}
            epochs = {r.json()["epoch"] for r in records if r.topic == outputs[2]}
            return (
                training.distinct_stats() <= stats
                and set(expected_commands) <= ids
                and len(epochs) >= len(breakers.transitions[MODEL])
            )

        records = recorder.wait(all_good_out, 120, "every output of the good events")
        time.sleep(2.0)  # anything else the poison might have caused
        records = recorder.records()
        rss_after = vm_rss_kib(worker.pid)
        alive = worker.running
        worker.stop()

    assert alive
    assert worker.starts == 1
    letters = [r for r in records if r.topic == dead_topic]
    assert len(letters) == len(sent_bad)
    expected_letters = Counter(
        (topic_name(topic, prefix), payload, rejection(topic, payload))
        for topic, _kind, payload in sent_bad
    )
    observed_letters = Counter(
        (
            letter.json()["source_topic"],
            base64.b64decode(letter.json()["payload"]),
            letter.json()["error"],
        )
        for letter in letters
    )
    assert observed_letters == expected_letters
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["error.class"] == b"InvalidEvent"
        assert headers["source.topic"] == letter.json()["source_topic"].encode()

    stats = [r for r in records if r.topic == outputs[0]]
    assert {stats_view(r.json()) for r in stats} == training.distinct_stats()
    assert max(r.json()["count"] for r in stats) == 50  # the announced window size
    observed = {}
    for record in records:
        if record.topic == outputs[1]:
            view = decision_view(record.json())
            assert observed.setdefault(view["command_id"], view) == view
    assert observed == {i: decision_view(v) for i, v in expected_commands.items()}
    controls = {r.json()["epoch"]: control_view(r.json()) for r in records if r.topic == outputs[2]}
    assert [controls[e] for e in sorted(controls)] == breakers.transitions[MODEL]
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 150, f"worker memory grew by {growth_mib:.0f} MiB"

    by_kind = Counter(kind for _topic, kind, _payload in sent_bad)
    by_reason = Counter(_reason_family(letter.json()["error"]) for letter in letters)
    FIGURES.record(
        SCENARIO,
        dead_lettered=len(letters),
        by_kind=dict(by_kind.most_common()),
        by_reason=dict(by_reason.most_common()),
        by_topic=dict(Counter(t.value for t, _k, _p in sent_bad)),
        good_events_checked=len(sent_good),
        outputs_checked=len(training.distinct_stats()) + len(expected_commands) + len(controls),
        worker_rss_mib_before_after=[rss_before / 1024, rss_after / 1024],
    )


def _reason_family(reason: str) -> str:
    """A reason without its specifics (positions, sizes), for counting."""
    for family in (
        "not valid JSON",
        "exceeds the limit",
        "expected a JSON object",
        "unknown per-run setting",
        "payload is empty",
    ):
        if family in reason:
            return family
    return reason.split(":")[0].split(" (and")[0]


def _metric(run: str, step: int, loss: float, reward: float) -> tuple[bytes, bytes]:
    value = {"run_id": run, "step": step, "loss": loss, "reward": reward, "ts": time.time()}
    return run.encode(), orjson.dumps(value)


def _steps_out(records: list[Seen], stats_topic: str, run: str) -> set[int]:
    return {
        r.json()["step"] for r in records if r.topic == stats_topic and r.json()["run_id"] == run
    }


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_step_beyond_64_bits_is_refused_not_a_crash_loop(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    """Well-formed JSON with a step of 2**63 or more: the worker's state keeps steps as
    signed 64-bit integers, so the contract refuses larger ones at decoding. (Before, such
    a metric was valid, failed its batch when the state was written, and the worker crashed
    on it again after every restart: one poison pill stopped every run on its partition.)"""
    prefix = ops_settings.kafka.topic_prefix
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    dead_topic = topic_name(Topic.DEAD_LETTER, prefix)
    huge = [_metric("huge-step", step, 1.0, 1.0) for step in (0, 2**63, 2**64 - 1)]
    huge.append(
        (
            b"huge-step",
            orjson.dumps(orjson.loads(_metric("huge-step", 1, 1, 1)[1]) | {"attempt": 2**63}),
        )
    )
    after = [_metric("huge-step", step, 1.0, float(step)) for step in range(2, 50)]
    worker = fault_worker()
    worker.start()
    with TopicRecorder(kafka_bootstrap, [stats_topic, dead_topic]) as recorder:
        produce_records(kafka_bootstrap, topic_name(Topic.METRICS, prefix), [*huge, *after])
        records = recorder.wait(
            lambda records: _steps_out(records, stats_topic, "huge-step") >= set(range(2, 50)),
            60,
            "the run's later metrics processed",
        )
        alive = worker.running
        worker.stop()
    assert alive
    assert worker.starts == 1
    letters = [r.json() for r in records if r.topic == dead_topic]
    assert [(letter["field"], letter["error"]) for letter in letters] == [
        ("step", "Input should be less than or equal to 9223372036854775807"),
        ("step", "Input should be less than or equal to 9223372036854775807"),
        ("attempt", "Input should be less than or equal to 9223372036854775807"),
    ]
    FIGURES.add(SCENARIO, "refused_64_bit_overflows", len(letters))


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_an_exploded_reward_does_not_blind_the_anomaly_rules(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    """A diverging run reports a finite but enormous reward (1e160: its square overflows a
    float), then 1.0 again: every metric is a valid event, so none is dead-lettered, each
    gets its reward statistics (finite, exact), and the anomaly rules see the collapse
    (a reward drop to 0% of its baseline) and roll back to the checkpoint before it."""
    prefix = ops_settings.kafka.topic_prefix
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    dead_topic = topic_name(Topic.DEAD_LETTER, prefix)
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    steps = range(40)
    metrics = [_metric("exploded", s, 1.0, 1e160 if s == 20 else 1.0) for s in steps]
    checkpoint = {"run_id": "exploded", "step": 10, "uri": "file:///c/10.pt", "ts": time.time()}
    worker = fault_worker(CHECKPOINTS__HEALTH_LOOKBACK_STEPS="5")
    worker.start()
    with TopicRecorder(kafka_bootstrap, [commands_topic, dead_topic, stats_topic]) as recorder:
        produce_records(kafka_bootstrap, topic_name(Topic.METRICS, prefix), metrics[:12])
        recorder.wait(
            lambda records: _steps_out(records, stats_topic, "exploded") >= set(range(12)),
            30,
            "the metrics before the checkpoint processed (its health needs them)",
        )
        produce_records(
            kafka_bootstrap,
            topic_name(Topic.CHECKPOINTS, prefix),
            [(b"exploded", orjson.dumps(checkpoint))],
        )
        produce_records(kafka_bootstrap, topic_name(Topic.METRICS, prefix), metrics[12:])
        try:
            records = recorder.wait(
                lambda records: (
                    _steps_out(records, stats_topic, "exploded") >= set(steps)
                    and any(
                        r.topic == commands_topic and r.json()["type"] == "rollback"
                        for r in records
                    )
                ),
                30,
                "every metric's statistics and the rollback",
            )
        finally:
            letters = [r for r in recorder.records() if r.topic == dead_topic]
            worker.stop()
    assert letters == [], f"{len(letters)} valid metrics dead-lettered"
    [rollback] = [
        r.json() for r in records if r.topic == commands_topic and r.json()["type"] == "rollback"
    ]
    assert (rollback["checkpoint_step"], rollback["anomaly_step"]) == (10, 21)
    assert rollback["reason"].startswith("reward drop")
    [exploded] = [r.json() for r in records if r.topic == stats_topic and r.json()["step"] == 20]
    assert exploded["std"] == pytest.approx(1e160 * math.sqrt(20) / 21, rel=1e-12)
