"""What counts as the model failing: record and ignore lists, HTTP statuses."""

from __future__ import annotations

import pytest

from producers.llm_failures import FailurePolicy, exception_types, http_status


class StatusError(Exception):
    """As the ``openai`` package's ``APIStatusError``: the status on the exception."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


class ResponseError(Exception):
    """As httpx's ``HTTPStatusError`` and requests' ``HTTPError``: the status on its response."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.response = Response(status_code)


class ModelOverloaded(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (TimeoutError("deadline"), "failure"),
        (ConnectionError("refused"), "failure"),
        (RuntimeError("the server crashed"), "failure"),
        (ValueError("prompt too long"), "ignored"),  # the caller's own errors
        (TypeError("unexpected keyword"), "ignored"),
        (StatusError(500), "failure"),
        (StatusError(503), "failure"),
        (StatusError(408), "failure"),  # the server timed out
        (StatusError(429), "failure"),  # overloaded
        (StatusError(400), "ignored"),  # a bad request is the caller's
        (StatusError(401), "ignored"),
        (StatusError(404), "ignored"),
        (ResponseError(502), "failure"),
        (ResponseError(422), "ignored"),
    ],
)
def test_the_default_policy_counts_the_model_s_failures_not_the_caller_s(
    error: BaseException, verdict: str
) -> None:
    assert FailurePolicy().judge(error) == verdict


def test_a_record_list_counts_only_what_it_names_and_the_ignore_list_wins() -> None:
    policy = FailurePolicy(record=(ModelOverloaded, TimeoutError), ignore=(ValueError,))
    assert policy.judge(ModelOverloaded()) == "failure"
    assert policy.judge(TimeoutError()) == "failure"
    assert policy.judge(StatusError(503)) == "success"  # not recorded: the call answered
    assert policy.judge(ValueError()) == "ignored"
    assert FailurePolicy(record=(ValueError,), ignore=(ValueError,)).judge(ValueError()) == (
        "ignored"
    )


def test_http_status_reads_the_exception_or_its_response() -> None:
    assert http_status(StatusError(429)) == 429
    assert http_status(ResponseError(503)) == 503
    assert http_status(RuntimeError()) is None
    odd = RuntimeError()
    odd.status_code = "500"  # type: ignore[attr-defined]  # not an HTTP status
    assert http_status(odd) is None


def test_exception_names_resolve_or_fail_naming_the_name() -> None:
    assert exception_types(["builtins.ValueError", "TimeoutError", "asyncio.TimeoutError"]) == (
        ValueError,
        TimeoutError,
        TimeoutError,
    )
    with pytest.raises(ValueError, match=r"'nowhere\.Error' not found"):
        exception_types(["nowhere.Error"])
    with pytest.raises(ValueError, match=r"'builtins\.len' is not an exception class"):
        exception_types(["builtins.len"])
    assert exception_types([KeyError, "KeyError"]) == (KeyError, KeyError)
    with pytest.raises(ValueError, match="is not an exception class"):
        exception_types([len])  # type: ignore[list-item]
