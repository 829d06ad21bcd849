"""Plain helper functions for tests (no fixtures here; those live in conftest)."""
