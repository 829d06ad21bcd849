"""The demo's timeline picture: what the operations layer did, on one time axis.

Rows, all against seconds since the demo started (the worker's timestamps):
reward and its window mean (with normalized reward on a second axis); the entropy
coefficient the stream sent; the LLM breaker's mode. Checkpoints (green), rollbacks (red)
and retunes (purple) are marked on every row.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # after the backend is chosen

if TYPE_CHECKING:
    from fragrance_ops.demo import Timeline

MODE_LEVELS = {"fast": 0, "balanced": 1, "creative": 2}


def plot_timeline(timeline: Timeline, path: Path) -> None:
    with timeline.lock:
        reward = list(timeline.reward)
        entropy = list(timeline.entropy)
        modes = list(timeline.modes)
        checkpoints = list(timeline.checkpoints)
        rollbacks = list(timeline.rollbacks)
        retunes = list(timeline.retunes)
    end = max([row[0] for row in reward] + [at for at, *_ in modes] + [1.0])
    figure, (rewards, coefficient, breaker) = plt.subplots(
        3, 1, figsize=(11, 8), sharex=True, height_ratios=(3, 2, 1.5)
    )
    figure.suptitle(f"fragrance-ops demo: {timeline.run_id}")
    if reward:
        times = [row[0] for row in reward]
        rewards.plot(times, [row[2] for row in reward], lw=0.6, color="0.6", label="reward")
        rewards.plot(times, [row[4] for row in reward], lw=1.5, color="C0", label="window mean")
        normalized = rewards.twinx()
        normalized.plot(times, [row[3] for row in reward], lw=0.4, color="C1", alpha=0.6)
        normalized.set_ylabel("normalized reward", color="C1")
    rewards.set_ylabel("reward (mean episode return)")
    rewards.legend(loc="lower right")
    if entropy:
        times = [at for at, _ in entropy] + [end]
        values = [value for _, value in entropy]
        coefficient.step(times, [*values, values[-1]], where="post", color="C2")
    coefficient.set_ylabel("entropy_coef sent")
    if modes:
        times = [0.0] + [at for at, *_ in modes] + [end]
        levels = [2] + [MODE_LEVELS[mode] for _, _, mode, *_ in modes]
        breaker.step(times, [*levels, levels[-1]], where="post", color="C3")
    breaker.set_yticks(list(MODE_LEVELS.values()), list(MODE_LEVELS))
    breaker.set_ylim(-0.5, 2.5)
    breaker.set_ylabel("LLM mode")
    breaker.set_xlabel("seconds since start")
    axes = (rewards, coefficient, breaker)
    # Events as vertical lines on every axis, each labelled once, on the axis named.
    marks = [
        *[(at, f"ckpt {step}", rewards, "green", ":", 1.0, 1.0) for at, step in checkpoints],
        *[
            (at, f"rollback {anomaly}->{restored}", rewards, "red", "-", 1.2, 0.02)
            for at, anomaly, restored, _reason in rollbacks
        ],
        *[
            (
                at,
                "retune " + ", ".join(f"{k}={v:.3g}" for k, v in changes.items()),
                coefficient,
                "purple",
                "--",
                1.0,
                0.9,
            )
            for at, changes, _size in retunes
        ],
    ]
    for at, label, labelled, color, style, width, height in marks:
        for axis in axes:
            axis.axvline(at, color=color, ls=style, lw=width)
        labelled.annotate(
            label,
            (at, height),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color=color,
            rotation=90 if labelled is rewards else 0,
            va="top" if height > 0.95 else "bottom",
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
