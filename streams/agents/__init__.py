"""Faust agents: decode, validate, call a rule, forward. One module per processor."""
