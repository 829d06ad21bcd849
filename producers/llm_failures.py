"""Which exceptions of an LLM call count as the model failing (resilience4j's record and
ignore lists, with HTTP status codes judged the way serving stacks mean them).

A breaker that counts every exception lets a caller's bug (a prompt that fails validation,
a wrong argument) downshift a model for every replica. So, for an exception raised by the
wrapped call, in this order:

1. an instance of an ``ignore`` type is **ignored**: neither a failure nor a success, no
   outcome is published (resilience4j's ``ignoreExceptions``);
2. when ``record`` is not empty, an instance of a ``record`` type is a **failure** and any
   other exception is a **success** for the breaker (resilience4j's ``recordExceptions``:
   the call answered, the error is the caller's business);
3. otherwise an exception carrying an HTTP status (``status_code``, as the ``openai``
   package's ``APIStatusError``; or ``response.status_code``, as httpx's and requests'
   errors) is a failure for 5xx, 408 (timeout) and 429 (overloaded) and ignored for the
   other 4xx: the request was wrong, not the model;
4. anything else (timeouts, connection errors, a crashed server) is a failure.

The defaults ignore ``ValueError`` and ``TypeError``: the caller's own errors.
Plain Python: no Kafka import.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: What a call's exception means for the breaker.
Verdict = Literal["failure", "success", "ignored"]

#: HTTP statuses of a request that was fine but not served: the model's failure.
FAILING_CLIENT_STATUSES = frozenset({408, 429})

DEFAULT_IGNORED: tuple[type[BaseException], ...] = (ValueError, TypeError)


def http_status(error: BaseException) -> int | None:
    """The HTTP status an exception carries, if any (openai, httpx, requests)."""
    for holder in (error, getattr(error, "response", None)):
        status = getattr(holder, "status_code", None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status
    return None


#: An exception class, or its dotted name (``builtins.ValueError``, ``openai.APIError``).
ExceptionSpec = type[BaseException] | str


def exception_types(specs: Iterable[ExceptionSpec]) -> tuple[type[BaseException], ...]:
    """Exception classes from classes or dotted names.

    A name that does not resolve to an exception class is the deployment's mistake: it
    raises ``ValueError`` naming it, when the client is made, not at the first failure.
    """
    types: list[type[BaseException]] = []
    for name in specs:
        if not isinstance(name, str):
            if not (isinstance(name, type) and issubclass(name, BaseException)):
                raise ValueError(f"{name!r} is not an exception class")
            types.append(name)
            continue
        module_name, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name or "builtins"), attribute)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"exception {name!r} not found: {exc}") from None
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            raise ValueError(f"{name!r} is not an exception class")
        types.append(found)
    return tuple(types)


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """The record and ignore lists; ``judge`` applies them (the module doc)."""

    record: tuple[type[BaseException], ...] = ()
    ignore: tuple[type[BaseException], ...] = DEFAULT_IGNORED

    @classmethod
    def from_names(cls, record: Iterable[str], ignore: Iterable[str]) -> FailurePolicy:
        return cls(exception_types(record), exception_types(ignore))

    def judge(self, error: BaseException) -> Verdict:
        if isinstance(error, self.ignore):
            return "ignored"
        if self.record:
            return "failure" if isinstance(error, self.record) else "success"
        status = http_status(error)
        if status is not None and 400 <= status < 500 and status not in FAILING_CLIENT_STATUSES:
            return "ignored"
        return "failure"
