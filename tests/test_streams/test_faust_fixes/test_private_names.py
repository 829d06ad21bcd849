"""Every private name of Faust, mode and aiokafka the corrections rely on still exists."""

from __future__ import annotations

import importlib
import inspect

import pytest

from streams.faust_fixes import PRIVATE_NAMES


@pytest.mark.parametrize(("module", "owner", "name"), PRIVATE_NAMES)
def test_the_private_name_exists(module: str, owner: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), owner)
    # Methods and class attributes, or instance attributes assigned in the class's code.
    source = inspect.getsource(cls)
    assert hasattr(cls, name) or f"self.{name} =" in source or f"self.{name}:" in source, (
        f"{module}.{owner}.{name} is gone: the correction using it needs a new look"
    )
