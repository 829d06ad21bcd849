"""The OpenAI-compatible wrapper against a real chat completions server on loopback."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

pytest.importorskip("openai", reason="the openai extra is not installed")

from openai import AsyncOpenAI, BadRequestError, InternalServerError, OpenAI, RateLimitError

from config.settings import LlmModeSettings, Settings
from producers import InMemoryTransport
from producers.llm import LlmClient
from producers.llm_deadlines import DeadlineExceeded
from producers.llm_openai import AsyncOpenAIChat, OpenAIChat
from tests.helpers.chat_server import ChatServer, Reply
from tests.helpers.llm import MODEL, Clock, outcomes

MESSAGES = [{"role": "user", "content": "a fresh citrus accord"}]


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as chat_server:
        yield chat_server


def sync_chat(server: ChatServer, transport: InMemoryTransport, **options: object) -> OpenAIChat:
    client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)
    settings = Settings(sdk={"llm_modes": {"fast": {"model": "qwen-small"}}})
    llm = LlmClient(MODEL, transport=transport, settings=settings)
    return OpenAIChat(llm, client, **options)  # type: ignore[arg-type]


def test_the_mode_table_chooses_model_temperature_and_max_tokens(server: ChatServer) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport)
    reply = chat.create(MESSAGES)
    assert reply.choices[0].message.content == (
        "[qwen-fragrance t=0.9 max=1024] a fresh citrus accord"
    )
    for _ in range(3):  # three local failures: downshift to balanced
        chat.llm.record(ok=False, mode="creative", latency_ms=1.0, error="boom")
    chat.create(MESSAGES, top_p=0.5)  # other arguments pass through
    for _ in range(3):
        chat.llm.record(ok=False, mode="balanced", latency_ms=1.0, error="boom")
    chat.create(MESSAGES)
    sent = [(r["model"], r.get("temperature"), r.get("max_tokens")) for r in server.requests]
    assert sent == [
        ("qwen-fragrance", 0.9, 1024),
        ("qwen-fragrance", 0.7, 768),
        ("qwen-small", 0.3, 256),  # the fast model of the settings, its defaults kept
    ]
    assert server.requests[1]["top_p"] == 0.5
    assert [o["ok"] for o in outcomes(transport)] == [True, *[False] * 3, True, *[False] * 3, True]
    with pytest.raises(TypeError, match="chosen by the wrapper"):
        chat.create(MESSAGES, model="gpt-other")


def test_429_and_500_count_and_trip_the_breaker_a_400_does_not(server: ChatServer) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport)
    server.script(Reply(status=400), Reply(status=429), Reply(status=500), Reply(status=503))
    with pytest.raises(BadRequestError):
        chat.create(MESSAGES)
    with pytest.raises(RateLimitError):
        chat.create(MESSAGES)
    for _ in range(2):
        with pytest.raises(InternalServerError):
            chat.create(MESSAGES)
    errors = [o["error"] for o in outcomes(transport)]
    assert [str(e).split(":")[0] for e in errors] == [
        "RateLimitError",
        "InternalServerError",
        "InternalServerError",
    ]  # the 400 was the caller's: not published
    assert chat.llm.mode == "balanced"
    assert chat.create(MESSAGES).choices[0].message.content.startswith("[qwen-fragrance t=0.7")


def test_a_streamed_answer_is_one_outcome_with_its_first_chunk_time(server: ChatServer) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport)
    server.script(Reply(text="bergamot and neroli", delay_s=0.1, chunk_delay_s=0.05))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chat.stream(MESSAGES))
    assert text == "bergamot and neroli"
    assert server.requests[0]["stream"] is True
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is True
    first_token_ms, latency_ms = outcome["first_token_ms"], outcome["latency_ms"]
    assert isinstance(first_token_ms, float)
    assert isinstance(latency_ms, float)
    assert 100.0 <= first_token_ms < latency_ms
    assert latency_ms >= 200.0  # three chunks 50 ms apart after the first


def test_a_reader_that_stops_early_releases_the_connection(server: ChatServer) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport)
    server.script(Reply(chunks=("amber",) * 10_000, chunk_delay_s=0.001))
    gc.disable()  # the connection must be closed by the wrapper, not found by the collector
    try:
        stream = chat.stream(MESSAGES)
        assert next(stream).choices[0].delta.content == "amber"
        stream.close()
        assert server.hung_up.wait(10)  # the server's next writes failed
    finally:
        gc.enable()
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is True


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(chunks=("amber", " and"), error_event=True), "APIError"),
        (Reply(chunks=("amber", " and"), cut=True), "APIConnectionError"),
    ],
    ids=["sse-error-event", "connection-cut"],
)
def test_a_stream_that_breaks_mid_answer_counts(
    server: ChatServer, reply: Reply, error: str
) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport)
    server.script(reply)
    got: list[str] = []
    with pytest.raises(Exception, match=r".") as raised:
        got.extend(chunk.choices[0].delta.content or "" for chunk in chat.stream(MESSAGES))
    assert type(raised.value).__name__ == error
    assert got == ["amber", " and"]
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is False
    assert str(outcome["error"]).startswith(error)
    assert "first_token_ms" in outcome


def test_create_serves_from_the_cache_when_asked(server: ChatServer) -> None:
    transport = InMemoryTransport()
    chat = sync_chat(server, transport, cache=True)
    first = chat.create(MESSAGES)
    second = chat.create(MESSAGES)
    assert second == first
    assert len(server.requests) == 1
    chat.create([{"role": "user", "content": "another"}])
    assert len(server.requests) == 2


def test_a_fallback_model_serves_while_the_model_is_held_open(server: ChatServer) -> None:
    transport = InMemoryTransport()
    clock = Clock()
    client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)
    settings = Settings(breaker={"open_s": 10.0})
    primary = LlmClient(MODEL, transport=transport, settings=settings, clock=clock)
    backup = LlmClient("qwen-backup", transport=transport, settings=settings, clock=clock)
    chat = OpenAIChat(primary, client, fallback=OpenAIChat(backup, client))
    server.script(*[Reply(status=500)] * 3)
    for _ in range(3):
        with pytest.raises(InternalServerError):
            chat.create(MESSAGES)
    assert primary.status()["state"] == "open"
    chat.create(MESSAGES)  # held open: the backup serves, in creative
    assert (server.requests[-1]["model"], server.requests[-1]["temperature"]) == (
        "qwen-backup",
        0.9,
    )
    assert (outcomes(transport)[-1]["model"], chat.fallbacks) == ("qwen-backup", 1)
    clock.now += 10.0  # half-open: probes (creative) go to the model again
    chat.create(MESSAGES)
    assert (server.requests[-1]["model"], server.requests[-1]["temperature"]) == (MODEL, 0.9)
    assert outcomes(transport)[-1]["model"] == MODEL
    with pytest.raises(ValueError, match="comes back to it"):
        OpenAIChat(backup, client, fallback=OpenAIChat(primary, client, fallback=chat))


def test_no_fallback_serves_a_worse_mode_than_the_model_s_own(server: ChatServer) -> None:
    transport = InMemoryTransport()
    client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)
    primary = LlmClient(MODEL, transport=transport)
    backup = LlmClient("qwen-backup", transport=transport)
    for llm in (primary, backup):  # both downshifted to balanced
        for _ in range(3):
            llm.record(ok=False, mode="creative", latency_ms=1.0, error="boom")
    chat = OpenAIChat(primary, client, fallback=OpenAIChat(backup, client))
    chat.create(MESSAGES)
    assert (server.requests[-1]["model"], chat.fallbacks) == (MODEL, 0)


def test_the_async_client_creates_streams_and_is_cancelled_at_its_deadline(
    server: ChatServer,
) -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    modes = {
        "creative": LlmModeSettings(model="qwen-big", temperature=1.0),
        "balanced": LlmModeSettings(),
        "fast": LlmModeSettings(),
    }

    async def main() -> tuple[str, str]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        chat = AsyncOpenAIChat(llm, client, modes=modes)  # type: ignore[arg-type]
        # The same chat with a deadline: only the hung call uses it, so a loaded machine
        # cannot push the answered calls past it.
        hurried = AsyncOpenAIChat(llm, client, modes=modes, deadline_s=0.3)  # type: ignore[arg-type]
        reply = await chat.create(MESSAGES)
        streamed = "".join(
            [chunk.choices[0].delta.content or "" async for chunk in chat.stream(MESSAGES)]
        )
        server.script(Reply(delay_s=3.0))  # the server hangs
        with pytest.raises(DeadlineExceeded, match=r"0\.3 s deadline"):
            await hurried.create(MESSAGES)
        server.script(Reply(status=500))
        with pytest.raises(InternalServerError):
            await chat.create(MESSAGES)
        await client.close()
        return reply.choices[0].message.content or "", streamed

    reply, streamed = asyncio.run(main())
    assert reply == "[qwen-big t=1.0 max=None] a fresh citrus accord"
    assert streamed == reply
    assert [(o["ok"], str(o.get("error")).split(":")[0]) for o in outcomes(transport)] == [
        (True, "None"),
        (True, "None"),
        (False, "DeadlineExceeded"),
        (False, "InternalServerError"),
    ]
    assert "first_token_ms" in outcomes(transport)[1]
