"""Comparing saved and restored training state."""

from __future__ import annotations

from typing import Any

import torch


def states_equal(left: Any, right: Any) -> bool:
    """Nested state dicts (tensors, numbers, lists) equal exactly."""
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        return torch.equal(left, right)
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(states_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(states_equal, left, right))
    return bool(left == right)
