"""The rules: plain Python, no Kafka or Faust import. The worker's agents call them, and
the SDKs share those they apply locally (the LLM breaker); ``tests/test_layers.py`` keeps
both sides from importing each other through here."""

Position = tuple[int, int]
"""(attempt, step): how the rules order a run's metrics; a rollback starts a new attempt."""
