"""The rules: plain Python, no Kafka or Faust import. Agents call these."""

Position = tuple[int, int]
"""(attempt, step): how the rules order a run's metrics; a rollback starts a new attempt."""
