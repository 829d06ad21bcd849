"""Reference computations with numpy that tests compare the stream's results against."""

from __future__ import annotations

import numpy as np


def window_stats(rewards: np.ndarray, index: int, window: int) -> tuple[float, float, int]:
    """(mean, population std, count) of the ``window`` rewards ending at ``index``."""
    values = rewards[max(0, index - window + 1) : index + 1]
    return float(values.mean()), float(values.std()), len(values)
