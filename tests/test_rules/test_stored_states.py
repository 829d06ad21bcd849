"""Rule states the worker stored read back and go on exactly as they would have.

``stored_states.json`` holds states as the worker's changelogs hold them, encoded by the
code of commit 23201c6: run operations (version 1, with its entropy schedule 1, anomaly
detector 1, checkpoint ledger 2 and rollback budget 2), LLM breaker (1), ratings retuner
(1), run lifecycle (1) and reward window (binary format 1). Each comes with the inputs that
followed it and what that code answered: every output (commands with their ids, notices,
transitions, verdicts, statistics) and the state after them. Decoded by today's code, each
state must give the same answers to the same inputs and end in the same state, byte for
byte as the worker writes it. The file is the stored format's witness: never regenerate it.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from config.settings import RetuneSettings, Settings, run_overrides
from rules.breaker import BreakerPolicy, ModelBreaker
from rules.retune import Retuner, WindowVerdict
from rules.reward_window import RewardWindow
from rules.run_lifecycle import RunLifecycle
from rules.training import HeldCheckpoint, HeldRestore, RunOperations
from schemas import (
    CheckpointSaved,
    CommandAck,
    CommandBase,
    OperatorRequest,
    StepMetric,
    encode,
)

STORED = orjson.loads((Path(__file__).parent / "stored_states.json").read_bytes())
Answer = Any  # an input's outputs, as JSON


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)


def stored_form(state: object) -> bytes:
    """A JSON state as the worker writes it to its changelog."""
    return orjson.dumps(state)


def wire(command: CommandBase | None) -> Answer:
    return None if command is None else orjson.loads(encode(command))


# --- the drivers: the same calls the agents make -----------------------------------------


def run_operations_answers(ops: RunOperations, inputs: list[dict[str, Any]]) -> list[Answer]:
    """Feed a run's inputs as the training agent does: ``[index, outputs]`` of each input
    that had outputs (commands, an operator's answer, notices) or was a replay. A metric is
    ``[attempt, step, loss, reward, checkpoint_step]`` (``ts`` is the step), a checkpoint
    ``[attempt, step, uri]`` (``ts`` half a step later); acks and requests are events."""
    answers: list[Answer] = []
    run_id = ops.run_id
    for index, item in enumerate(inputs):
        now = item.get("now", 1.0)
        answer: Answer
        if "metric" in item:
            attempt, step, loss, reward, checkpoint_step = item["metric"]
            metric = StepMetric.model_validate(
                {
                    "run_id": run_id,
                    "step": step,
                    "loss": loss,
                    "reward": reward,
                    "ts": float(step),
                    "attempt": attempt,
                    "checkpoint_step": checkpoint_step,
                }
            )
            answer = [wire(command) for command in ops.on_metric(metric, now)]
        elif "checkpoint" in item:
            attempt, step, uri = item["checkpoint"]
            saved = CheckpointSaved(
                run_id=run_id, step=step, uri=uri, ts=step + 0.5, attempt=attempt
            )
            answer = [wire(command) for command in ops.on_checkpoint(saved, now)]
        elif ops.is_replayed_input(item["origin"], item["offset"]):
            answer = "replayed"
        elif "ack" in item:
            commands = ops.on_ack(CommandAck.model_validate(item["ack"]), now)
            answer = [wire(command) for command in commands]
        else:
            reply = ops.on_request(OperatorRequest.model_validate(item["request"]), now)
            answer = {
                "accepted": reply.accepted,
                "detail": reply.detail,
                "command": wire(reply.command),
            }
        notices = ops.take_notices()
        if answer or notices:
            answers.append([index, answer, notices])
    return answers


def breaker_answers(breaker: ModelBreaker, inputs: list[dict[str, Any]]) -> list[Answer]:
    answers: list[Answer] = []
    for item in inputs:
        if "tick" in item:
            transition = breaker.on_tick(item["tick"])
        else:
            transition = breaker.on_outcome(
                item["ok"], item["mode"], item["latency_ms"], item["now"], item["call_id"]
            )
        answers.append(None if transition is None else dataclasses.asdict(transition))
    return answers


def verdict_answer(verdict: WindowVerdict | None) -> Answer:
    if verdict is None:
        return None
    return {
        "window": verdict.window(),
        "changes": verdict.changes,
        "rationale": verdict.rationale,
        "command": wire(verdict.command(issued_at=1.0)),
    }


def retuner_answers(retuner: Retuner, inputs: list[dict[str, Any]]) -> list[Answer]:
    answers: list[Answer] = []
    for item in inputs:
        if "tick" in item:
            answers.append({"verdict": verdict_answer(retuner.on_tick(item["tick"]))})
            continue
        retuner.observe_current(**item["current"])
        outcome = retuner.add(
            item["rating"],
            user_id=item["user_id"],
            formula_id=item["formula_id"],
            ts=item["ts"],
            now=item["now"],
            rating_id=item["rating_id"],
        )
        answers.append({"status": outcome.status, "verdict": verdict_answer(outcome.verdict)})
    return answers


def reward_window_answers(window: RewardWindow, inputs: list[dict[str, Any]]) -> list[Answer]:
    answers: list[Answer] = []
    for item in inputs:
        stats = window.add(item["reward"], step=item["step"], attempt=item["attempt"])
        answers.append(None if stats is None else dataclasses.asdict(stats))
    return answers


# --- the stored states ---------------------------------------------------------------------


def by_name(kind: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in STORED[kind]]


@pytest.mark.parametrize("case", by_name("run_operations"))
def test_stored_run_operations_go_on_identically(case: dict[str, Any]) -> None:
    settings = run_overrides(Settings(), case["overrides"])
    ops = RunOperations.from_state(case["run_id"], case["state"], settings)
    if case.get("current_shape", True):
        assert stored_form(ops.to_state()) == stored_form(case["state"])
    assert run_operations_answers(ops, case["inputs"]) == case["answers"]
    assert stored_form(ops.to_state()) == stored_form(case["state_after"])


def test_held_inputs_read_as_checkpoints_and_restores() -> None:
    (case,) = [c for c in STORED["run_operations"] if c["name"] == "held_checkpoints_and_restore"]
    ops = RunOperations.from_state(case["run_id"], case["state"], Settings())
    read = [type(held) for held in ops.held_back]
    stored = [
        HeldCheckpoint if "uri" in held else HeldRestore for held in case["state"]["held_back"]
    ]
    assert read == stored
    assert {HeldCheckpoint, HeldRestore} <= set(read)


def test_a_run_operations_state_of_another_version_is_refused() -> None:
    state = STORED["run_operations"][0]["state"]
    for version in (None, 0, 2):
        with pytest.raises(ValueError, match="unknown run operations state version"):
            RunOperations.from_state("run-1", state | {"version": version}, Settings())


@pytest.mark.parametrize("case", by_name("breakers"))
def test_stored_breakers_go_on_identically(case: dict[str, Any]) -> None:
    policy = BreakerPolicy(**case["policy"])
    breaker = ModelBreaker.from_state(case["model"], policy, case["state"])
    assert stored_form(breaker.to_state()) == stored_form(case["state"])
    assert breaker_answers(breaker, case["inputs"]) == case["answers"]
    assert stored_form(breaker.to_state()) == stored_form(case["state_after"])


@pytest.mark.parametrize("case", by_name("retuners"))
def test_stored_retuners_go_on_identically(case: dict[str, Any]) -> None:
    settings = RetuneSettings(**case["settings"])
    retuner = Retuner.from_state(case["state"], settings)
    assert stored_form(retuner.to_state()) == stored_form(case["state"])
    assert retuner_answers(retuner, case["inputs"]) == case["answers"]
    assert stored_form(retuner.to_state()) == stored_form(case["state_after"])


@pytest.mark.parametrize("case", by_name("reward_windows"))
def test_stored_reward_windows_go_on_identically(case: dict[str, Any]) -> None:
    window = RewardWindow.from_bytes(base64.b64decode(case["state"]))
    assert base64.b64encode(window.to_bytes()).decode() == case["state"]
    assert reward_window_answers(window, case["inputs"]) == case["answers"]
    assert base64.b64encode(window.to_bytes()).decode() == case["state_after"]


@pytest.mark.parametrize("case", by_name("lifecycles"))
def test_stored_lifecycles_read_back(case: dict[str, Any]) -> None:
    lifecycle = RunLifecycle.from_state(case["state"])
    assert stored_form(lifecycle.to_state()) == stored_form(case["state"])
    answers = [
        lifecycle.expired(now, case["retention_s"], held_since=case["held_since"])
        for now in case["times"]
    ]
    assert answers == case["answers"]
