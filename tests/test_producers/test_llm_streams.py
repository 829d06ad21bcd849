"""Streamed answers: one outcome per stream, time to first chunk and total, failures mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from config.settings import Settings
from producers import InMemoryTransport
from producers.llm import LlmClient
from producers.llm_deadlines import DeadlineExceeded
from tests.helpers.llm import MODEL, outcomes


def ms(outcome: dict[str, object], name: str) -> float:
    value = outcome[name]
    assert isinstance(value, float)
    return value


async def collect(stream: AsyncIterator[str], into: list[str]) -> None:
    async for chunk in stream:
        into.append(chunk)


def chunks(prompt: str, *, mode: str) -> Iterator[str]:
    time.sleep(0.1)  # time to first token
    yield f"{mode}:"
    for word in prompt.split():
        time.sleep(0.05)
        yield word


def test_a_sync_stream_reports_time_to_first_chunk_and_total() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    stream = llm.wrap_stream(chunks)("fresh citrus accord")
    assert outcomes(transport) == []  # the call is made when the first chunk is asked for
    assert list(stream) == ["creative:", "fresh", "citrus", "accord"]
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is True
    # Lower bounds only (the sleeps'): the first chunk took 0.1 s, the rest 3 x 0.05 s more.
    assert ms(outcome, "first_token_ms") >= 100.0
    assert ms(outcome, "latency_ms") - ms(outcome, "first_token_ms") >= 150.0


def test_a_failure_mid_stream_counts_and_reaches_the_reader() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    def breaking(prompt: str, *, mode: str) -> Iterator[str]:
        yield "first"
        raise ConnectionError("the server went away")

    generate = llm.wrap_stream(breaking)
    for _ in range(3):
        got: list[str] = []
        with pytest.raises(ConnectionError, match="went away"):
            got.extend(generate("x"))  # keeps the chunks read before the error
        assert got == ["first"]
    assert [(o["ok"], o["error"]) for o in outcomes(transport)] == [
        (False, "ConnectionError: the server went away")
    ] * 3
    assert all("first_token_ms" in o for o in outcomes(transport))
    assert (llm.mode, llm.stats.local_trips) == ("balanced", 1)


def test_a_stream_that_fails_before_its_first_chunk_has_no_first_token_time() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    def refused(prompt: str, *, mode: str) -> Iterator[str]:
        raise TimeoutError("connect timeout")

    with pytest.raises(TimeoutError):
        list(llm.wrap_stream(refused)("x"))
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is False
    assert "first_token_ms" not in outcome


def test_a_reader_that_stops_early_records_a_success_and_closes_the_source() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    closed = []

    def endless(prompt: str, *, mode: str) -> Iterator[str]:
        try:
            while True:
                yield "token"
        finally:
            closed.append(True)

    stream = llm.wrap_stream(endless)("x")
    assert [next(stream) for _ in range(3)] == ["token"] * 3
    stream.close()
    assert closed == [True]
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is True


class Opened:
    """``openai.Stream``'s shape: ``iter()`` makes a new generator, ``close()`` frees the
    connection; closing the generator alone would not."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        while True:
            yield "token"

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            await asyncio.sleep(0)
            yield "token"

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_a_reader_that_stops_early_closes_the_stream_object_the_call_returned() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    sync_opened, async_opened = Opened(), Opened()

    async def open_async(prompt: str, *, mode: str) -> Opened:  # AsyncOpenAI's shape
        return async_opened

    stream = llm.wrap_stream(lambda prompt, *, mode: sync_opened)("x")
    assert next(stream) == "token"
    stream.close()

    async def main() -> None:
        async with contextlib.aclosing(llm.wrap_stream(open_async)("x")) as stream:
            async for _ in stream:
                break

    asyncio.run(main())
    assert (sync_opened.closed, async_opened.closed) == (True, True)
    assert [o["ok"] for o in outcomes(transport)] == [True, True]


def test_the_caller_s_errors_mid_stream_are_ignored_as_wrap_s() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    def invalid(prompt: str, *, mode: str) -> Iterator[str]:
        yield "a"
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        list(llm.wrap_stream(invalid)("x"))
    assert outcomes(transport) == []
    assert llm.stats.ignored == 1


def test_an_async_stream_is_wrapped_from_an_async_generator_or_a_coroutine() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    async def tokens(prompt: str, *, mode: str) -> AsyncIterator[str]:
        await asyncio.sleep(0.1)
        yield mode
        await asyncio.sleep(0.05)
        yield prompt

    async def opened(prompt: str, *, mode: str) -> AsyncIterator[str]:  # openai's shape
        await asyncio.sleep(0)
        return tokens(prompt, mode=mode)

    async def main() -> list[list[str]]:
        return [[chunk async for chunk in llm.wrap_stream(fn)("musk")] for fn in (tokens, opened)]

    assert asyncio.run(main()) == [["creative", "musk"], ["creative", "musk"]]
    for outcome in outcomes(transport):
        assert outcome["ok"] is True
        assert ms(outcome, "first_token_ms") >= 100.0
        assert ms(outcome, "latency_ms") - ms(outcome, "first_token_ms") >= 50.0


def test_an_async_stream_is_cancelled_at_its_deadline_and_its_source_closed() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=Settings(sdk={"llm_deadline_s": 0.2}))
    closed = []

    async def stalling(prompt: str, *, mode: str) -> AsyncIterator[str]:
        try:
            yield "first"
            await asyncio.sleep(10)  # the server stalls mid-answer
            yield "never"
        finally:
            closed.append(True)

    async def main() -> list[str]:
        got: list[str] = []
        with pytest.raises(DeadlineExceeded, match=r"stream did not end within the 0\.2 s"):
            await collect(llm.wrap_stream(stalling)("x"), got)
        return got

    assert asyncio.run(main()) == ["first"]  # not the 10 s stall: it was cancelled
    assert closed == [True]
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is False
    assert "first_token_ms" in outcome
    assert llm.stats.deadlines == 1


def test_a_cancelled_reader_closes_the_source_and_records_nothing() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    closed = []

    async def main() -> list[str]:
        answering = asyncio.Event()

        async def stalling(prompt: str, *, mode: str) -> AsyncIterator[str]:
            try:
                yield "first"
                answering.set()
                await asyncio.sleep(10)
                yield "never"
            finally:
                closed.append(True)

        got: list[str] = []
        reader = asyncio.create_task(collect(llm.wrap_stream(stalling)("x"), got))
        await answering.wait()
        reader.cancel()  # e.g. the user went away: neither the model's failure nor a success
        with pytest.raises(asyncio.CancelledError):
            await reader
        return got

    assert asyncio.run(main()) == ["first"]
    assert closed == [True]
    assert outcomes(transport) == []


def test_a_failure_mid_async_stream_counts() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    async def breaking(prompt: str, *, mode: str) -> AsyncIterator[str]:
        yield "a"
        raise RuntimeError("HTTP 500 mid-stream")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="mid-stream"):
            async for _ in llm.wrap_stream(breaking)("x"):
                pass

    asyncio.run(main())
    (outcome,) = outcomes(transport)
    assert (outcome["ok"], outcome["error"]) == (False, "RuntimeError: HTTP 500 mid-stream")


def test_a_sync_stream_past_its_deadline_is_recorded_then_and_keeps_flowing() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    def late(prompt: str, *, mode: str) -> Iterator[str]:
        deadline = time.monotonic() + 10  # bounds a broken test only
        while not outcomes(transport) and time.monotonic() < deadline:
            time.sleep(0.01)  # no first chunk until the deadline was recorded
        yield from prompt.split()

    generate = llm.wrap_stream(late, deadline_s=0.05)
    assert list(generate("a b")) == ["a", "b"]
    (outcome,) = outcomes(transport)  # recorded once, at the deadline
    assert outcome["error"] == "DeadlineExceeded: no answer within the 0.05 s deadline"
    assert ms(outcome, "latency_ms") >= 50.0
    assert "first_token_ms" not in outcome
    llm.close()


def test_slowness_of_a_stream_is_judged_by_its_first_chunk() -> None:
    # 500 ms: a first chunk yielded at once stays far below it even on a loaded machine.
    settings = Settings(breaker={"slow_call_ms": 500.0})
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, settings=settings)

    def quick_start_long_answer(prompt: str, *, mode: str) -> Iterator[str]:
        yield "a"
        time.sleep(0.6)  # the whole answer is slower than 500 ms; its first chunk is not
        yield "b"

    def slow_start(prompt: str, *, mode: str) -> Iterator[str]:
        time.sleep(0.6)
        yield "a"

    for _ in range(3):
        assert list(llm.wrap_stream(quick_start_long_answer)("x")) == ["a", "b"]
    assert llm.mode == "creative"
    assert all(ms(o, "latency_ms") > 500.0 for o in outcomes(transport))
    for _ in range(3):
        assert list(llm.wrap_stream(slow_start)("x")) == ["a"]
    assert llm.mode == "balanced"
