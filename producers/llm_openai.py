"""OpenAI-compatible chat completions through the LLM SDK (extra ``openai``).

    from openai import OpenAI
    llm = LlmClient("qwen-fragrance")
    chat = OpenAIChat(llm, OpenAI(base_url="http://vllm:8000/v1", api_key="-", max_retries=0))
    reply = chat.create([{"role": "user", "content": "a fresh citrus accord"}])
    for chunk in chat.stream([{"role": "user", "content": "a warm amber"}]):
        print(chunk.choices[0].delta.content or "", end="")

The breaker's mode picks what is sent: ``sdk.llm_modes`` (or ``modes=``) maps each mode to
a model id (None: the ``LlmClient``'s model), a temperature and ``max_tokens``; other
keyword arguments go to ``chat.completions.create`` as given (``model`` is the mode's and
refused). Each call, or each stream, is one outcome of ``LlmClient.wrap`` /
``wrap_stream``: the ``openai`` package's ``RateLimitError`` (429) and
``InternalServerError`` (5xx) carry their status and count; other 4xx are the caller's;
connection errors and timeouts count. A stream that breaks (an SSE error event, a
connection cut mid-body) counts when it breaks. ``AsyncOpenAIChat`` is the same for
``AsyncOpenAI``.

The ``openai`` client retries 429 and 5xx itself (``max_retries``, 2 by default) before
the SDK sees the outcome; a deadline covers its retries too. ``max_retries=0`` lets the
breaker see each failure. ``cache=True`` serves ``create`` from the response cache
(``ChatCompletion`` stored as its JSON), keyed by mode, messages and arguments.

Fallback to another model: ``OpenAIChat(llm, client, fallback=OpenAIChat(backup, client))``.
While ``llm``'s breaker holds its model open (downshifted, not yet probing), calls go to the
fallback when the fallback serves a better mode (down its own chain of fallbacks), reported
under the fallback's model and breaker; once ``llm`` probes again (half-open) or recovers,
calls come back to it. Without a fallback, the downshift alone applies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator, Iterable, Mapping
from typing import Any, Self, cast

from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from config.settings import LlmModeSettings
from producers.llm import Caching, LlmClient
from producers.llm_failures import ExceptionSpec
from rules.breaker import MODES
from schemas.events import LlmMode

__all__ = ["AsyncOpenAIChat", "OpenAIChat", "mode_parameters"]

log = logging.getLogger(__name__)

#: Cached ``ChatCompletion``s travel as their JSON.
COMPLETION_CACHING = Caching(
    dumps=lambda completion: cast(ChatCompletion, completion).model_dump_json().encode(),
    loads=ChatCompletion.model_validate_json,
)


def mode_parameters(
    llm: LlmClient, modes: Mapping[LlmMode, LlmModeSettings], mode: LlmMode
) -> dict[str, Any]:
    """``model``, and ``temperature`` and ``max_tokens`` when set, for a call in ``mode``."""
    chosen = modes[mode]
    return {"model": chosen.model or llm.model} | chosen.sampling()


def _no_model(kwargs: Mapping[str, Any]) -> None:
    if "model" in kwargs or "stream" in kwargs:
        raise TypeError("model and stream are chosen by the wrapper (the mode; create/stream)")


class _Chat:
    fallback: Self | None

    def __init__(
        self,
        llm: LlmClient,
        *,
        modes: Mapping[LlmMode, LlmModeSettings] | None,
        deadline_s: float | None,
        cache: bool,
        record: Iterable[ExceptionSpec] | None,
        ignore: Iterable[ExceptionSpec] | None,
        fallback: Self | None,
    ) -> None:
        self.llm = llm
        self.modes: dict[LlmMode, LlmModeSettings] = dict(
            modes if modes is not None else llm.settings.sdk.llm_modes
        )
        self._options: dict[str, Any] = {"deadline_s": deadline_s, "record": record}
        self._options["ignore"] = ignore
        self._cache = COMPLETION_CACHING if cache else False
        chain = fallback
        while chain is not None:
            if chain.llm.model == llm.model:
                raise ValueError(f"the fallback chain of {llm.model} comes back to it")
            chain = chain.fallback
        self.fallback = fallback
        self.fallbacks = 0  # calls served by the fallback

    def parameters(self, mode: LlmMode) -> dict[str, Any]:
        return mode_parameters(self.llm, self.modes, mode)

    def serving(self) -> Self:
        """This chat, or (down its chain) the fallback that serves the best mode while this
        model's breaker holds it open; never raises."""
        fallback = self.fallback
        if fallback is None:
            return self
        try:
            mine = self.llm.status()
            if mine["state"] != "open":
                return self  # closed, or half-open: probes and the rest go to this model
            theirs = fallback.serving()
            if MODES.index(theirs.llm.mode) < MODES.index(mine["mode"]):
                self.fallbacks += 1
                return theirs
        except Exception:
            log.exception("choosing a fallback failed; serving with %s", self.llm.model)
        return self


class OpenAIChat(_Chat):
    """``openai.OpenAI``'s ``chat.completions`` in the breaker's mode, reported."""

    def __init__(
        self,
        llm: LlmClient,
        client: OpenAI,
        *,
        modes: Mapping[LlmMode, LlmModeSettings] | None = None,
        deadline_s: float | None = None,
        cache: bool = False,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        fallback: Self | None = None,
    ) -> None:
        super().__init__(
            llm,
            modes=modes,
            deadline_s=deadline_s,
            cache=cache,
            record=record,
            ignore=ignore,
            fallback=fallback,
        )
        self.client = client
        self._create = llm.wrap(self._complete, cache=self._cache, **self._options)
        self._stream = llm.wrap_stream(self._open_stream, **self._options)

    def _complete(self, messages: Any, *, mode: LlmMode, **kwargs: Any) -> ChatCompletion:
        params = self.parameters(mode) | kwargs
        return cast(
            ChatCompletion,
            self.client.chat.completions.create(messages=messages, stream=False, **params),
        )

    def _open_stream(
        self, messages: Any, *, mode: LlmMode, **kwargs: Any
    ) -> Stream[ChatCompletionChunk]:
        params = self.parameters(mode) | kwargs
        return cast(
            Stream[ChatCompletionChunk],
            self.client.chat.completions.create(messages=messages, stream=True, **params),
        )

    def create(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        """One completion (``messages`` as the ``openai`` package takes them)."""
        _no_model(kwargs)
        return self.serving()._create(messages, **kwargs)

    def stream(self, messages: Any, **kwargs: Any) -> Generator[ChatCompletionChunk, None, None]:
        """A streamed completion's chunks; the request is sent at the first ``next()``."""
        _no_model(kwargs)
        return self.serving()._stream(messages, **kwargs)


class AsyncOpenAIChat(_Chat):
    """``openai.AsyncOpenAI``'s ``chat.completions`` in the breaker's mode, reported."""

    def __init__(
        self,
        llm: LlmClient,
        client: AsyncOpenAI,
        *,
        modes: Mapping[LlmMode, LlmModeSettings] | None = None,
        deadline_s: float | None = None,
        cache: bool = False,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        fallback: Self | None = None,
    ) -> None:
        super().__init__(
            llm,
            modes=modes,
            deadline_s=deadline_s,
            cache=cache,
            record=record,
            ignore=ignore,
            fallback=fallback,
        )
        self.client = client
        self._create = llm.wrap(self._complete, cache=self._cache, **self._options)
        self._stream = llm.wrap_stream(self._open_stream, **self._options)

    async def _complete(self, messages: Any, *, mode: LlmMode, **kwargs: Any) -> ChatCompletion:
        params = self.parameters(mode) | kwargs
        return cast(
            ChatCompletion,
            await self.client.chat.completions.create(messages=messages, stream=False, **params),
        )

    async def _open_stream(
        self, messages: Any, *, mode: LlmMode, **kwargs: Any
    ) -> AsyncStream[ChatCompletionChunk]:
        params = self.parameters(mode) | kwargs
        return cast(
            AsyncStream[ChatCompletionChunk],
            await self.client.chat.completions.create(messages=messages, stream=True, **params),
        )

    async def create(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        """One completion (``messages`` as the ``openai`` package takes them)."""
        _no_model(kwargs)
        return await self.serving()._create(messages, **kwargs)

    def stream(self, messages: Any, **kwargs: Any) -> AsyncGenerator[ChatCompletionChunk, None]:
        """A streamed completion's chunks (``async for``); sent at the first chunk asked."""
        _no_model(kwargs)
        return self.serving()._stream(messages, **kwargs)
