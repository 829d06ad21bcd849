"""Deadlines: a call still running at its deadline counts as a failure then, once."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest

from config.settings import Settings
from producers import InMemoryTransport, llm_deadlines
from producers.llm import LlmClient
from producers.llm_deadlines import DeadlineExceeded, DeadlineWatcher
from tests.helpers.llm import MODEL, outcomes


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Polls ``condition``; the timeout only bounds a broken test, it is never the check."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def watcher_threads(model: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"llm-deadlines-{model}"]


def test_a_hung_sync_call_is_recorded_at_its_deadline_while_it_still_runs() -> None:
    transport = InMemoryTransport()
    llm = LlmClient("hung-model", transport=transport)
    seen_during_the_call: list[list[dict[str, object]]] = []

    def hanging(prompt: str, *, mode: str) -> str:
        wait_until(lambda: bool(outcomes(transport)))  # hangs until the watcher recorded it
        seen_during_the_call.append(outcomes(transport))
        return f"{mode}: {prompt}"

    generate = llm.wrap(hanging, deadline_s=0.1)
    assert generate("citrus") == "creative: citrus"  # the late answer reaches the caller
    ((failure,),) = seen_during_the_call  # recorded before the call returned
    assert failure["ok"] is False
    assert failure["error"] == "DeadlineExceeded: no answer within the 0.1 s deadline"
    assert float(failure["latency_ms"]) >= 100.0  # type: ignore[arg-type]
    assert outcomes(transport) == [failure]  # the late return is not counted again
    assert (llm.stats.calls, llm.stats.failures, llm.stats.deadlines) == (1, 1, 1)
    assert len(watcher_threads("hung-model")) == 1
    llm.close()
    assert watcher_threads("hung-model") == []  # closing the client ends its watcher


def test_three_hung_calls_downshift_before_any_of_them_returns() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 0.05}))
    release = threading.Event()

    def hanging(prompt: str, *, mode: str) -> str:
        release.wait(10)
        return mode

    generate = llm.wrap(hanging)  # the deadline comes from the settings
    threads = [threading.Thread(target=generate, args=("x",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while llm.mode == "creative" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (llm.mode, llm.stats.local_trips) == ("balanced", 1)  # the calls still hang
    assert all(thread.is_alive() for thread in threads)
    release.set()
    for thread in threads:
        thread.join(5)
    assert [outcome["ok"] for outcome in outcomes(transport)] == [False] * 3
    llm.close()


def test_a_sync_call_that_beats_its_deadline_is_recorded_once_as_it_ended() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 0.2}))

    def failing(prompt: str, *, mode: str) -> str:
        raise ConnectionError("refused")

    def hanging(prompt: str, *, mode: str) -> str:
        wait_until(lambda: len(outcomes(transport)) == 3)
        return mode

    assert llm.wrap(lambda prompt, *, mode: mode)("x") == "creative"
    with pytest.raises(ConnectionError):
        llm.wrap(failing)("x")
    # The watcher fires in deadline order: once this later call is recorded at its
    # deadline, the two settled calls' deadlines have passed without firing.
    llm.wrap(hanging, deadline_s=0.3)("x")
    assert [(o["ok"], o.get("error")) for o in outcomes(transport)] == [
        (True, None),
        (False, "ConnectionError: refused"),
        (False, "DeadlineExceeded: no answer within the 0.3 s deadline"),
    ]
    assert llm.stats.deadlines == 1
    llm.close()


class Interrupted(BaseException):
    """Like KeyboardInterrupt or SystemExit: the process stops the call, not the model."""


def test_an_interrupted_sync_call_is_neither_recorded_nor_failed_at_its_deadline() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 0.05}))

    def interrupted(prompt: str, *, mode: str) -> str:
        raise Interrupted

    def hanging(prompt: str, *, mode: str) -> str:
        wait_until(lambda: bool(outcomes(transport)))
        return mode

    def stream(prompt: str, *, mode: str) -> Iterator[str]:
        yield "a"
        raise Interrupted

    with pytest.raises(Interrupted):
        llm.wrap(interrupted)("x")
    with pytest.raises(Interrupted):
        list(llm.wrap_stream(stream)("x"))
    llm.wrap(hanging, deadline_s=0.2)("x")  # later than both deadlines: fires after them
    assert [o.get("error") for o in outcomes(transport)] == [
        "DeadlineExceeded: no answer within the 0.2 s deadline"
    ]
    llm.close()


def test_an_async_call_is_cancelled_at_its_deadline() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    cancelled = []

    async def hanging(prompt: str, *, mode: str) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(prompt)
            raise
        return mode

    async def main() -> None:
        with pytest.raises(DeadlineExceeded, match=r"0\.1 s deadline"):
            await llm.wrap(hanging, deadline_s=0.1)("musk")

    asyncio.run(main())
    assert cancelled == ["musk"]
    (failure,) = outcomes(transport)
    assert (failure["ok"], failure["error"]) == (
        False,
        "DeadlineExceeded: no answer within the 0.1 s deadline",
    )
    llm.close()


def test_an_async_call_s_own_timeout_error_is_judged_as_any_error() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 5.0}))

    async def timing_out(prompt: str, *, mode: str) -> str:
        raise TimeoutError("the server's own timeout")

    async def main() -> None:
        with pytest.raises(TimeoutError, match="server's own") as raised:
            await llm.wrap(timing_out)("x")
        assert not isinstance(raised.value, DeadlineExceeded)

    asyncio.run(main())
    (failure,) = outcomes(transport)
    assert failure["error"] == "TimeoutError: the server's own timeout"
    assert llm.stats.deadlines == 0


def test_a_per_call_deadline_wins_over_the_function_s_and_none_removes_it() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 0.05}))

    async def slow(prompt: str, *, mode: str) -> str:
        await asyncio.sleep(0.2)
        return mode

    generate = llm.wrap(slow, deadline_s=0.1)

    async def main() -> None:
        with llm.deadline(5.0):
            assert await generate("x") == "creative"
        with llm.deadline(None):
            assert await generate("x") == "creative"
        with pytest.raises(DeadlineExceeded, match=r"0\.1 s"):
            await generate("x")  # the function's deadline again

    asyncio.run(main())
    assert [o["ok"] for o in outcomes(transport)] == [True, True, False]
    with pytest.raises(ValueError, match="positive"), llm.deadline(0):
        pass
    with pytest.raises(ValueError, match="positive"):
        llm.wrap(slow, deadline_s=-1)


def test_the_watcher_fires_in_deadline_order_and_only_for_unsettled_calls() -> None:
    watcher = DeadlineWatcher("order-test")
    fired: list[str] = []
    last = threading.Event()

    def fire_late() -> None:
        fired.append("late")
        last.set()

    late = watcher.watch(0.15, fire_late)
    early = watcher.watch(0.05, lambda: fired.append("early"))
    settled = watcher.watch(0.05, lambda: fired.append("settled"))
    assert settled.settle() is True
    assert settled.settle() is False  # once
    assert last.wait(10)  # the latest deadline fired: the earlier ones had their turn
    assert fired == ["early", "late"]
    assert (early.settle(), late.settle(), early.expired) == (False, False, True)
    assert len(watcher_threads("order-test")) == 1
    watcher.close()
    assert watcher_threads("order-test") == []  # no thread outlives close()
    after_close = watcher.watch(0.01, lambda: fired.append("after close"))
    assert after_close.settle() is True  # unwatched: the call records itself


def test_a_watcher_thread_that_cannot_start_costs_one_deadline_not_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = InMemoryTransport()
    llm = LlmClient("no-thread-model", transport=transport)

    class Refused(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    # Only the watcher's module sees threads refused; the rest of the process is unaffected.
    with monkeypatch.context() as patch:
        patch.setattr(llm_deadlines, "threading", types.SimpleNamespace(Thread=Refused))
        assert llm.wrap(lambda prompt, *, mode: mode, deadline_s=0.05)("x") == "creative"
    assert llm.stats.sdk_errors == 1  # the call went on unwatched

    def hanging(prompt: str, *, mode: str) -> str:
        wait_until(lambda: len(outcomes(transport)) == 2)
        return mode

    llm.wrap(hanging, deadline_s=0.05)("x")  # the next call starts the thread and is watched
    assert [o.get("error") for o in outcomes(transport)] == [
        None,
        "DeadlineExceeded: no answer within the 0.05 s deadline",
    ]
    llm.close()
