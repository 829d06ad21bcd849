"""LiteLLM calls feed the breaker: a ``CustomLogger`` callback, modes as model groups
(extra ``litellm``).

    llm = LlmClient("qwen-fragrance")
    outcomes = LiteLLMOutcomes(llm)               # groups: qwen-fragrance-creative, ...
    litellm.callbacks = [outcomes]                # or the proxy's litellm_settings.callbacks
    router = Router(model_list=[{"model_name": "qwen-fragrance-creative", ...}, ...])
    reply = router.completion(messages=messages, **outcomes.request(llm))

Each mode of each client is a LiteLLM model group (a ``Router``'s ``model_name``, or the
model a proxy is asked for): ``sdk.llm_modes[mode].model`` when set, otherwise
``<model>-<mode>``. ``request(llm)`` picks the mode for the next call (a probe while the
breaker probes) and returns the group, temperature and max_tokens to send.

The callback (``log_success_event``/``log_failure_event`` for sync calls, their ``async_``
variants for async ones, as LiteLLM calls them) turns every call of a known group into an
outcome of its client, in its mode: latency from LiteLLM's start and end times, time to
first chunk for streams, failures judged by the client's failure policy (LiteLLM's
exceptions carry ``status_code``: 429 and 5xx count, other 4xx are the caller's). A Router's
retries and fallbacks are calls too: each attempt is reported under its own group. Calls
of other models and LiteLLM cache hits are not reported (counted in ``skipped``). The
callback never raises into LiteLLM. LiteLLM runs sync callbacks on its own threads, so an
outcome may be published just after the call returned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from config.settings import LlmModeSettings
from producers.llm import LlmClient
from rules.breaker import MODES
from schemas.events import LlmMode

__all__ = ["LiteLLMOutcomes"]

log = logging.getLogger(__name__)


def _seconds(moment: object) -> float | None:
    if isinstance(moment, datetime):
        return moment.timestamp()
    if isinstance(moment, int | float):
        return float(moment)
    return None


class LiteLLMOutcomes(CustomLogger):
    """Publishes LiteLLM calls' outcomes through the ``LlmClient`` of their model group."""

    def __init__(
        self,
        clients: LlmClient | Iterable[LlmClient],
        *,
        modes: Mapping[LlmMode, LlmModeSettings] | None = None,
    ) -> None:
        super().__init__()
        self.clients = [clients] if isinstance(clients, LlmClient) else list(clients)
        self._modes: dict[str, Mapping[LlmMode, LlmModeSettings]] = {}
        self._groups: dict[str, tuple[LlmClient, LlmMode]] = {}
        for llm in self.clients:
            table = modes if modes is not None else llm.settings.sdk.llm_modes
            self._modes[llm.model] = table
            for mode in MODES:
                group = self.group(llm, mode)
                if group in self._groups:
                    other, other_mode = self._groups[group]
                    raise ValueError(
                        f"model group {group!r} is both {other.model}/{other_mode} and "
                        f"{llm.model}/{mode}: each mode needs a group of its own"
                    )
                self._groups[group] = (llm, mode)
        self.reported = 0
        self.skipped = 0
        self.errors = 0

    def group(self, llm: LlmClient, mode: LlmMode) -> str:
        """The LiteLLM model group serving ``llm``'s model in ``mode``."""
        chosen = self._modes[llm.model][mode].model
        return chosen or f"{llm.model}-{mode}"

    def request(self, llm: LlmClient) -> dict[str, Any]:
        """``model`` (the group), ``temperature`` and ``max_tokens`` for the next call."""
        mode = llm.choose_mode()
        return {"model": self.group(llm, mode)} | self._modes[llm.model][mode].sampling()

    # -- LiteLLM's hooks ---------------------------------------------------------------

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._outcome(kwargs, start_time, end_time, failed=False)

    def log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._outcome(kwargs, start_time, end_time, failed=True)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._outcome(kwargs, start_time, end_time, failed=False)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._outcome(kwargs, start_time, end_time, failed=True)

    # -- the outcome -------------------------------------------------------------------

    def _outcome(
        self, kwargs: dict[str, Any], start_time: Any, end_time: Any, *, failed: bool
    ) -> None:
        try:
            target = self._target(kwargs)
            if target is None or kwargs.get("cache_hit"):
                self.skipped += 1
                return
            llm, mode = target
            started, ended = _seconds(start_time), _seconds(end_time)
            latency_ms = 0.0 if started is None or ended is None else (ended - started) * 1e3
            first_token_ms = None
            first = _seconds(kwargs.get("completion_start_time"))
            if kwargs.get("stream") and not failed and first is not None and started is not None:
                first_token_ms = max(first - started, 0.0) * 1e3
            error: BaseException | None = None
            if failed:
                raised = kwargs.get("exception")
                error = (
                    raised
                    if isinstance(raised, BaseException)
                    else RuntimeError(str(raised or "LiteLLM call failed"))
                )
            llm.report(mode, latency_ms=latency_ms, error=error, first_token_ms=first_token_ms)
            self.reported += 1
        except Exception:
            self.errors += 1
            log.exception("publishing a LiteLLM outcome failed; the call is unaffected")

    def _target(self, kwargs: Mapping[str, Any]) -> tuple[LlmClient, LlmMode] | None:
        """The client and mode of the call's model group (a Router's, else the model)."""
        standard = kwargs.get("standard_logging_object") or {}
        metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
        for name in (standard.get("model_group"), metadata.get("model_group"), kwargs.get("model")):
            if isinstance(name, str) and name in self._groups:
                return self._groups[name]
        return None
