"""Process inspection for tests that check no broker process is left behind."""

from __future__ import annotations

from pathlib import Path


def live_pids_in_group(pgid: int) -> list[int]:
    """Pids of non-zombie processes whose process group is ``pgid`` (Linux /proc).

    Zombies are ignored: they hold no port or memory and are reaped by init,
    sometimes seconds later, which would make ``os.killpg(pgid, 0)`` flaky.
    """
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited while we were looking
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parens.
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(text.split(" ", 1)[0]))
    return pids
