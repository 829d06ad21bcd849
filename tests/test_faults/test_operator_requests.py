"""Scenario 10: operator requests while the worker is SIGKILLed.

An operator sets a run's entropy, halts it, resumes it, rolls it back and sets its entropy
again; while each request waits for its answer, the worker is SIGKILLed and restarted.
Every request is answered as the rules answer it, the commands it causes equal the rules'
(derived from the request id, so a request read again after a crash acts once), and the
trainer applies each command once.

Each request is sent once the worker has committed every record before it. A request is
answered against what the worker applied when it read it: after a crash, one read in the
same replay as the run's metrics (another topic) may come before them, and would then name
an older step than the oracle, which applies everything in the order it was produced
(docs/guarantees.md).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from schemas import OperatorRequest, Topic, encode, topic_name
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    TRAINING_OVERRIDES,
    Seen,
    SimTrainer,
    TopicRecorder,
    TrainerPlan,
    check_training,
    configured,
    missing_training_outputs,
    stall_restarts,
    training_oracle,
    wait_until_applied,
    wait_until_committed,
    worker_settings_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "10 operator requests under SIGKILL"
RUN = "operated-run"
STEPS = 230  # at least: checkpoints every 50 steps, all healthy
#: (action, value, accepted) in the order an operator sends them. The rollback goes to the
#: checkpoint two before the newest (``rollback_step``); the second entropy is refused (set
#: at this step already: the run stopped stepping).
PLAN: list[tuple[str, float | None, bool]] = [
    ("set_entropy", 0.005, True),
    ("halt", None, True),
    ("resume", None, True),
    ("rollback", None, True),
    ("set_entropy", 0.002, False),
]


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_operator_requests_through_sigkills_are_answered_and_act_once(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(PROFILE.seed)
    settings = configured(ops_settings, TRAINING_OVERRIDES)
    prefix = settings.kafka.topic_prefix
    worker = fault_worker(**worker_settings_env(TRAINING_OVERRIDES))
    worker.start()
    worker.supervise()  # restarts it if the stall watchdog crashes it (as a deployment would)
    replies_topic = topic_name(Topic.OPERATOR_REPLIES, prefix)
    recorded = (Topic.COMMANDS, Topic.REWARD_STATS, Topic.OPERATOR_REPLIES)
    recorder = TopicRecorder(kafka_bootstrap, [topic_name(t, prefix) for t in recorded]).__enter__()
    trainer = SimTrainer(TrainerPlan(RUN, []), settings, pause_s=0.0).start()
    try:
        while trainer.step < STEPS:
            time.sleep(0.05)
        trainer.finish()
        assert trainer.stepped.wait(30)

        def restart() -> None:
            worker.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            worker.start()

        assert trainer.last_checkpoint is not None
        rollback_step = trainer.last_checkpoint - 2 * settings.checkpoints.interval_steps
        request_ids = []
        group = f"app-{prefix.rstrip('.')}"  # make_worker's
        before_requests = [
            topic_name(topic, prefix)
            for topic in (
                Topic.RUNS,
                Topic.METRICS,
                Topic.CHECKPOINTS,
                Topic.ACKS,
                Topic.OPERATOR_REQUESTS,
            )
        ]
        for action, value, _accepted in PLAN:
            trainer.transport.flush(10)  # the acks of a rollback included
            wait_until_committed(kafka_bootstrap, group, before_requests, 60)
            # Sent through the trainer's recording transport: the oracle reads the run's
            # records and the requests in the order they were produced.
            request = OperatorRequest(
                request_id=str(uuid.uuid4()),
                run_id=RUN,
                action=action,  # type: ignore[arg-type]
                step=rollback_step if action == "rollback" else None,
                value=value,
                reason=f"scenario {action}",
                requested_by="fault-suite",
                ts=time.time(),
            )
            killer = threading.Timer(rng.uniform(0.0, 0.4), restart)
            killer.start()
            trainer.transport.produce(
                topic_name(Topic.OPERATOR_REQUESTS, prefix), RUN.encode(), encode(request)
            )
            trainer.transport.flush(10)
            killer.join()

            def answered(records: list[Seen], request_id: str = request.request_id) -> bool:
                return any(r.json()["request_id"] == request_id for r in records)

            recorder.wait(
                lambda records, answered=answered: answered(
                    [r for r in records if r.topic == replies_topic]
                ),
                120,
                f"the answer to {action}",
            )
            request_ids.append(request.request_id)
            if action == "rollback":  # the trainer acknowledges it before the next request
                wait_for_applied_rollback(trainer)

        oracle = training_oracle(settings, [trainer])
        recorder.wait(
            lambda records: not any(missing_training_outputs(oracle, records, prefix)),
            120,
            "every statistic and command the rules decided",
        )
        wait_until_applied([trainer], oracle.commands)
        records = recorder.records()
    finally:
        trainer.close()
        recorder.close()
        worker.stop()

    replies: dict[str, set[tuple[bool, str, str | None]]] = {}
    for record in records:
        if record.topic == replies_topic:
            reply = record.json()
            answer = (reply["accepted"], reply["detail"], reply.get("command_id"))
            replies.setdefault(reply["request_id"], set()).add(answer)
    # Each request answered as the rules answer it; a request read again after a crash is
    # answered the same way again.
    assert replies == {request_id: {oracle.answers[request_id]} for request_id in request_ids}
    assert [oracle.answers[i][0] for i in request_ids] == [accepted for *_, accepted in PLAN]
    figures = check_training(oracle, records, prefix, [trainer])
    assert worker.starts == len(PLAN) + 1 + stall_restarts(worker)
    FIGURES.record(
        SCENARIO,
        requests=len(PLAN),
        kills=len(PLAN),
        **figures,
    )


def wait_for_applied_rollback(trainer: SimTrainer, timeout_s: float = 60.0) -> None:
    """The trainer applied the operator's rollback (and so sent its ack)."""
    deadline = time.monotonic() + timeout_s
    while trainer.rollbacks == 0:
        assert time.monotonic() < deadline, "the operator's rollback never reached the trainer"
        time.sleep(0.05)
    trainer.transport.flush(10)
