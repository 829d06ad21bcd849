"""The public names of each package are exactly its ``__all__``, and all of them exist."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["schemas", "producers", "fragrance_ops.brokers"])
def test_all_names_exist_and_nothing_else_is_public(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    for name in exported:
        assert hasattr(module, name), f"{package}.{name}"
    public = {name for name in vars(module) if not name.startswith("_")}
    submodules = {name for name in public if type(getattr(module, name)).__name__ == "module"}
    assert public - submodules == set(exported)
