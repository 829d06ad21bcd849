"""The LiteLLM callback: a real Router with LiteLLM's mock_response, no network."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch of the cost map
pytest.importorskip("litellm", reason="the litellm extra is not installed")

import litellm
from litellm import Router

from config.settings import LlmModeSettings, Settings
from producers import InMemoryTransport
from producers.llm import LlmClient
from producers.llm_litellm import LiteLLMOutcomes
from tests.helpers.llm import MODEL, outcomes

# LiteLLM's own TypedDicts make pydantic warn when a Router builds them; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")

MESSAGES = [{"role": "user", "content": "a fresh citrus accord"}]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """LiteLLM runs sync callbacks on its own threads, after the call returns."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.02)


def router(answer: str = "bergamot and neroli") -> Router:
    deployments = [
        {
            "model_name": f"{MODEL}-{mode}",
            "litellm_params": {"model": f"openai/qwen-{mode}", "api_key": "unused"},
        }
        for mode in ("creative", "balanced", "fast")
    ]
    for deployment in deployments:
        deployment["litellm_params"]["mock_response"] = answer  # type: ignore[index]
    return Router(model_list=deployments, num_retries=0)


@pytest.fixture
def callbacks() -> Callable[[LiteLLMOutcomes], None]:
    """Installs a callback in LiteLLM for one test only."""
    saved = list(litellm.callbacks)

    def install(outcomes_logger: LiteLLMOutcomes) -> None:
        litellm.callbacks = [outcomes_logger]

    yield install  # type: ignore[misc]
    litellm.callbacks = saved


def rate_limited() -> Exception:
    return litellm.RateLimitError("slow down", llm_provider="openai", model="qwen")


def test_router_calls_become_outcomes_in_the_mode_of_their_group(
    callbacks: Callable[[LiteLLMOutcomes], None],
) -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    logger = LiteLLMOutcomes(llm)
    callbacks(logger)
    calls = router()
    assert logger.request(llm) == {
        "model": "qwen-fragrance-creative",
        "temperature": 0.9,
        "max_tokens": 1024,
    }
    reply = calls.completion(messages=MESSAGES, **logger.request(llm))
    assert reply.choices[0].message.content == "bergamot and neroli"
    wait_for(lambda: len(outcomes(transport)) == 1, "the success")
    for _ in range(3):  # three 429s in creative: the local breaker trips
        with pytest.raises(litellm.RateLimitError):
            calls.completion(messages=MESSAGES, mock_response=rate_limited(), **logger.request(llm))
    wait_for(lambda: len(outcomes(transport)) == 4, "the failures")
    assert [(o["ok"], o["mode"]) for o in outcomes(transport)] == [
        (True, "creative"),
        (False, "creative"),
        (False, "creative"),
        (False, "creative"),
    ]
    assert str(outcomes(transport)[1]["error"]).startswith("RateLimitError")
    assert llm.mode == "balanced"
    assert logger.request(llm)["model"] == "qwen-fragrance-balanced"
    calls.completion(messages=MESSAGES, **logger.request(llm))
    wait_for(lambda: len(outcomes(transport)) == 5, "the balanced call")
    assert outcomes(transport)[4]["mode"] == "balanced"
    assert logger.errors == 0


def test_the_caller_s_errors_and_other_models_are_not_reported(
    callbacks: Callable[[LiteLLMOutcomes], None],
) -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    logger = LiteLLMOutcomes(llm)
    callbacks(logger)
    bad_request = litellm.BadRequestError("prompt too long", model="qwen", llm_provider="openai")
    with pytest.raises(litellm.BadRequestError):
        router().completion(messages=MESSAGES, mock_response=bad_request, **logger.request(llm))
    litellm.completion(model="openai/another-model", messages=MESSAGES, mock_response="hi")
    wait_for(lambda: llm.stats.ignored == 1 and logger.skipped == 1, "both judged")
    assert outcomes(transport) == []


def test_async_and_streamed_calls_are_reported_with_their_first_chunk_time(
    callbacks: Callable[[LiteLLMOutcomes], None],
) -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    logger = LiteLLMOutcomes(llm)
    callbacks(logger)
    calls = router()

    async def main() -> str:
        await calls.acompletion(messages=MESSAGES, **logger.request(llm))
        with pytest.raises(litellm.InternalServerError):
            await calls.acompletion(
                messages=MESSAGES, mock_response=Exception("engine died"), **logger.request(llm)
            )
        stream = await calls.acompletion(messages=MESSAGES, stream=True, **logger.request(llm))
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        # LiteLLM logs async calls in tasks of their own: the loop runs until they did.
        await asyncio.to_thread(wait_for, lambda: len(outcomes(transport)) == 3, "3 outcomes")
        return text

    assert asyncio.run(main()) == "bergamot and neroli"
    # Those tasks may finish in any order: sorted by kind, not by arrival.
    got = outcomes(transport)
    (failed,) = [o for o in got if not o["ok"]]
    assert str(failed["error"]).split(":")[0] == "InternalServerError"
    streamed = [o for o in got if o["ok"] and "first_token_ms" in o]
    assert len(streamed) == 1  # the plain call has no first chunk time
    assert isinstance(streamed[0]["first_token_ms"], float)


def test_groups_come_from_the_settings_and_must_be_distinct() -> None:
    settings = Settings(sdk={"llm_modes": {"fast": {"model": "qwen-small"}}})
    llm = LlmClient(MODEL, transport=InMemoryTransport(), settings=settings)
    logger = LiteLLMOutcomes(llm)
    assert [logger.group(llm, mode) for mode in ("creative", "balanced", "fast")] == [
        "qwen-fragrance-creative",
        "qwen-fragrance-balanced",
        "qwen-small",
    ]
    same = LlmModeSettings(model="qwen")
    with pytest.raises(ValueError, match="needs a group of its own"):
        LiteLLMOutcomes(llm, modes={"creative": same, "balanced": same, "fast": same})
