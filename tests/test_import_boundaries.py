"""The worker, the CLI and the LLM and rating SDKs never import a training framework: torch,
Lightning, transformers and Stable-Baselines3 are optional extras for trainers only."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

FRAMEWORKS = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "accelerate",
    "safetensors",
    "stable_baselines3",
)

NO_FRAMEWORK = (
    "streams.app",
    "streams.runtime",
    "fragrance_ops.cli",
    "fragrance_ops.operator",
    "producers",
    "producers.trainer",
    "producers.reward_window",
    "producers.llm",
    "producers.llm_openai",
    "producers.llm_litellm",
    "producers.ratings",
    "schemas",
)


def imported_frameworks(*modules: str) -> dict[str, list[str]]:
    """The frameworks each module loads when imported, in order, in one fresh interpreter
    (a framework another module loaded first is charged to that one; any load is seen)."""
    program = (
        "import importlib, sys\n"
        "loaded = {}\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        f"    loaded[module] = sorted(n for n in {FRAMEWORKS!r} if n in sys.modules)\n"
        "print(loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120
    )
    return dict(ast.literal_eval(result.stdout))


def test_the_worker_and_the_service_sdks_import_no_training_framework() -> None:
    # One interpreter for all of them: a subprocess each took most of this file's time.
    loaded = imported_frameworks(*NO_FRAMEWORK)
    assert loaded == {module: [] for module in NO_FRAMEWORK}


@pytest.mark.parametrize(
    ("module", "framework"),
    [("producers.lightning", "lightning"), ("producers.hf_trainer", "transformers")],
)
def test_the_framework_callbacks_do_import_theirs(module: str, framework: str) -> None:
    # The check above would pass on a broken probe; this shows the probe sees an import.
    assert framework in imported_frameworks(module)[module]
