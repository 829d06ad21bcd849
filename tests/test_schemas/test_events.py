"""The event contract: strict decoding, clear errors, tolerant of extra fields."""

from __future__ import annotations

import math
from typing import get_args

import orjson
import pytest

import schemas
from schemas import (
    CheckpointSaved,
    CommandAck,
    DeadLetter,
    Halt,
    InvalidEvent,
    LlmControl,
    LlmOutcome,
    Rating,
    Retune,
    RewardStats,
    Rollback,
    RunAnnounced,
    RunFinished,
    SetEntropyCoef,
    StepMetric,
    decode,
    decode_command,
    decode_run_event,
    encode,
)
from schemas.events import COMMAND_TYPES, CommandType

SAMPLES: list[schemas.Event] = [
    RunAnnounced(run_id="r1", ts=1.0, settings={"reward.window_size": 500}),
    RunFinished(type="finished", run_id="r1", ts=9.0, attempt=1, step=4999),
    StepMetric(run_id="r1", step=3, loss=0.5, reward=1.25, ts=2.0, entropy=0.3),
    CheckpointSaved(run_id="r1", step=500, uri="file:///ckpt/500.pt", ts=3.0),
    RewardStats(
        run_id="r1", step=3, reward=1.0, normalized_reward=0.1, mean=0.9, std=1.0, count=4, ts=4.0
    ),
    SetEntropyCoef(command_id="c1", run_id="r1", issued_at=5.0, entropy_coef=0.009, step=10),
    Rollback(
        command_id="c2",
        run_id="r1",
        issued_at=5.0,
        checkpoint_step=500,
        checkpoint_uri="500.pt",
        anomaly_step=612,
        reason="loss spike",
        values={"loss": math.inf},
    ),
    Retune(
        command_id="c3",
        run_id="r1",
        issued_at=5.0,
        changes={"entropy_coef": 0.02},
        rationale="mean 2.5 < 3.0",
        window={"size": 100},
    ),
    Halt(command_id="c4", run_id="r1", issued_at=5.0, reason="rollback budget", history=[]),
    CommandAck(command_id="c1", run_id="r1", status="applied", detail="ok", ts=6.0),
    LlmOutcome(model="qwen", ok=False, mode="creative", latency_ms=12.5, error="timeout", ts=7.0),
    LlmControl(
        model="qwen",
        state="open",
        mode="balanced",
        cache_ttl_s=300,
        until=8.0,
        reason="3 failures",
        ts=7.5,
    ),
    Rating(rating=4, user_id="u1", formula_id="f1", ts=9.0, run_id="r1"),
    DeadLetter(source_topic="t", partition=0, offset=1, error="bad", payload="AA==", ts=1.0),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: schemas.Event) -> None:
    if isinstance(event, SetEntropyCoef | Rollback | Retune | Halt):
        assert decode_command(encode(event)) == event
    else:
        assert decode(type(event), encode(event)) == event


def test_non_finite_metric_values_travel_as_string_markers() -> None:
    metric = StepMetric(run_id="r", step=1, loss=math.nan, reward=-math.inf, ts=1.0)
    wire = orjson.loads(encode(metric))
    assert wire["loss"] == "NaN"
    assert wire["reward"] == "-Infinity"
    decoded = decode(StepMetric, encode(metric))
    assert math.isnan(decoded.loss)
    assert decoded.reward == -math.inf


def test_unknown_extra_fields_are_tolerated() -> None:
    payload = b'{"run_id":"r","step":1,"loss":1,"reward":2,"ts":3,"gpu":"a100","v2_field":[1]}'
    assert decode(StepMetric, payload).step == 1


def metric(**overrides: object) -> bytes:
    valid = {"run_id": "r", "step": 1, "loss": 1.0, "reward": 1.0, "ts": 1.0}
    return orjson.dumps(valid | overrides)


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "expected a JSON object"),
        (b"", None, "not valid JSON"),
        (None, None, "payload is empty"),
        (b'{"run_id":"\xff"}', None, "not valid JSON"),
        (b'{"run_id":"r","step":1,"loss":NaN,"reward":1,"ts":1}', None, "not valid JSON"),
        (b'{"run_id":"r","step":1,"loss":1e999,"reward":1,"ts":1}', None, "infinity"),
        (metric(step=-1), "step", "greater than or equal to 0"),
        (metric(step="1"), "step", "valid integer"),
        (metric(step=1.0), "step", "valid integer"),
        (metric(step=True), "step", "valid integer"),
        (metric(reward="high"), "reward", "valid number"),
        (metric(reward="nan"), "reward", "valid number"),
        (metric(ts=-5.0), "ts", "greater than or equal to 0"),
        (metric(run_id=""), "run_id", "at least 1 character"),
        (metric(learning_rate="Infinity"), "learning_rate", "valid number"),
        (orjson.dumps({"run_id": "r", "loss": 1, "reward": 1, "ts": 1}), "step", "Field required"),
    ],
)
def test_bad_metrics_name_the_field_and_the_reason(
    payload: bytes | None, field: str | None, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(StepMetric, payload)
    assert caught.value.field == field
    assert reason.lower() in caught.value.reason.lower()


def test_oversized_payloads_are_rejected_before_parsing() -> None:
    with pytest.raises(InvalidEvent, match="exceeds the limit"):
        decode(StepMetric, metric(pad="x" * 5000), max_bytes=4096)


def test_llm_outcome_error_is_null_exactly_when_ok() -> None:
    good = {"model": "q", "mode": "fast", "latency_ms": 1.0, "ts": 1.0}
    assert decode(LlmOutcome, orjson.dumps(good | {"ok": True, "error": None})).ok
    with pytest.raises(InvalidEvent, match="error must be null"):
        decode(LlmOutcome, orjson.dumps(good | {"ok": True, "error": "boom"}))
    with pytest.raises(InvalidEvent, match="non-empty string"):
        decode(LlmOutcome, orjson.dumps(good | {"ok": False, "error": None}))


def test_a_streamed_outcome_is_judged_by_its_first_chunk_and_older_ones_by_their_total() -> None:
    base = {"model": "q", "ok": True, "mode": "fast", "latency_ms": 900.0, "ts": 1.0}
    streamed = decode(LlmOutcome, orjson.dumps(base | {"first_token_ms": 40.0}))
    assert (streamed.latency_ms, streamed.response_ms()) == (900.0, 40.0)
    assert decode(LlmOutcome, orjson.dumps(base)).response_ms() == 900.0  # absent: the total
    with pytest.raises(InvalidEvent):
        decode(LlmOutcome, orjson.dumps(base | {"first_token_ms": -1.0}))


@pytest.mark.parametrize("rating", [0, 5.5, "4", None])
def test_ratings_must_be_numbers_from_1_to_5(rating: object) -> None:
    payload = orjson.dumps({"rating": rating, "user_id": "u", "formula_id": "f", "ts": 1.0})
    with pytest.raises(InvalidEvent) as caught:
        decode(Rating, payload)
    assert caught.value.field == "rating"


def test_the_command_type_names_are_the_command_models_types() -> None:
    types = [model.model_fields["type"].default for model in COMMAND_TYPES]
    assert types == list(get_args(CommandType))


def test_commands_are_discriminated_by_type() -> None:
    payload = orjson.dumps({"command_id": "c", "run_id": "r", "issued_at": 1.0, "type": "explode"})
    with pytest.raises(InvalidEvent):
        decode_command(payload)


def test_events_are_keyed_as_the_contract_says() -> None:
    assert Rating(rating=3, user_id="u", formula_id="f", ts=1.0).key() == "f"
    assert Rating(rating=3, user_id="u", formula_id="f", ts=1.0, run_id="r").key() == "r"
    assert LlmOutcome(model="m", ok=True, mode="fast", latency_ms=1, error=None, ts=1).key() == "m"


def test_a_run_announced_without_an_algorithm_is_ppo_and_a_malformed_one_is_refused() -> None:
    old = b'{"run_id": "r1", "ts": 1.0, "settings": {}}'
    assert decode(RunAnnounced, old).algorithm == "ppo"
    named = b'{"run_id": "r1", "ts": 1.0, "settings": {}, "algorithm": "grpo"}'
    assert decode(RunAnnounced, named).algorithm == "grpo"
    for bad in ("PPO", "", "a" * 33, "ppo v2"):
        payload = orjson.dumps({"run_id": "r1", "ts": 1.0, "settings": {}, "algorithm": bad})
        with pytest.raises(InvalidEvent) as refused:
            decode(RunAnnounced, payload)
        assert refused.value.field == "algorithm"


def test_trainer_runs_carries_announcements_and_finishes_told_apart_by_type() -> None:
    announced = RunAnnounced(run_id="r1", ts=1.0, settings={"anomaly.patience": 2})
    finished = RunFinished(type="finished", run_id="r1", ts=2.0, attempt=1, step=40)
    assert decode_run_event(encode(announced)) == announced
    assert decode_run_event(encode(finished)) == finished
    assert orjson.loads(encode(finished))["type"] == "finished"
    # A run that logged no metric finishes without a step; the attempt defaults to 0.
    bare = decode_run_event(b'{"type": "finished", "run_id": "r2", "ts": 3.0}')
    assert isinstance(bare, RunFinished)
    assert (bare.attempt, bare.step) == (0, None)
    assert finished.key() == "r1"


def test_an_announcement_is_decoded_as_before_finishes_existed() -> None:
    """No ``type``: an announcement, refused for exactly what refused it before."""
    payload = b'{"run_id": "r1", "ts": 1.0, "algorithm": "PPO"}'
    with pytest.raises(InvalidEvent) as before:
        decode(RunAnnounced, payload)
    with pytest.raises(InvalidEvent) as now:
        decode_run_event(payload)
    assert (now.value.field, now.value.reason) == (before.value.field, before.value.reason)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "paused", "run_id": "r", "ts": 1.0, "settings": {}}, "type"),
        ({"type": "finished", "run_id": "r", "ts": 1.0, "step": -1}, "step"),
        ({"type": "finished", "ts": 1.0}, "run_id"),
        ({"type": None, "run_id": "r", "ts": 1.0}, "settings"),  # null: no type, announced
    ],
)
def test_bad_run_events_name_the_field(payload: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        decode_run_event(orjson.dumps(payload))
    assert refused.value.field == field
