"""The one codec: orjson on the wire, strict pydantic validation on decode."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas.errors import InvalidEvent
from schemas.events import Command, Event, RunAnnounced, RunFinished

E = TypeVar("E", bound=Event)

DEFAULT_MAX_EVENT_BYTES = 256 * 1024
_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def encode(event: Event) -> bytes:
    """Serialize an event to its wire form."""
    return orjson.dumps(event.model_dump(exclude_none=True))


def _loads(payload: bytes | None, max_bytes: int) -> Any:
    if payload is None:
        raise InvalidEvent("payload is empty (tombstone or null value)")
    if len(payload) > max_bytes:
        raise InvalidEvent(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    return data


def _invalid(exc: ValidationError) -> InvalidEvent:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InvalidEvent(f"{first['msg']}{more}", field=field)


def validate(event_type: type[E], data: dict[str, Any]) -> E:
    """Validate a mapping as an event; raise InvalidEvent naming the field and the reason."""
    try:
        return event_type.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def decode(
    event_type: type[E], payload: bytes | None, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> E:
    """Decode and validate one event; raise InvalidEvent naming the field and the reason."""
    return validate(event_type, _loads(payload, max_bytes))


def decode_command(payload: bytes | None, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Command:
    """Decode a command of any type (discriminated by its ``type`` field)."""
    data = _loads(payload, max_bytes)
    try:
        return _COMMAND_ADAPTER.validate_python(data, strict=True)
    except ValidationError as exc:
        raise _invalid(exc) from None


def decode_run_event(
    payload: bytes | None, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> RunAnnounced | RunFinished:
    """Decode a ``trainer.runs`` record: a finish (``"type": "finished"``) or an
    announcement (no ``type``; validated exactly as before finishes existed)."""
    data = _loads(payload, max_bytes)
    kind = data.get("type")
    if kind is None:
        return validate(RunAnnounced, data)
    if kind == "finished":
        return validate(RunFinished, data)
    raise InvalidEvent(
        f"unknown run event type {kind!r} (expected 'finished' or none)", field="type"
    )
