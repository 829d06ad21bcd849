"""The one error type for a payload that is not a valid contract event.

InvalidEvent (ValueError)
  .field   dotted path of the offending field, or None when the payload as a whole is bad
  .reason  what is wrong, in words fit for a dead-letter record
"""

from __future__ import annotations


class InvalidEvent(ValueError):
    """A payload failed to decode or validate against its event schema."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)
