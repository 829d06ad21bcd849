"""A real Prometheus server (Debian package) scraping given targets every second.

Its data lives in a temp dir removed on ``stop``; it runs under ``spawn_supervised``, so it
dies with the test process even when pytest is SIGKILLed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import orjson

from fragrance_ops.brokers import free_port
from fragrance_ops.processes import spawn_supervised, stop_supervised

HOST = "127.0.0.1"


def prometheus_executable() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )


class PrometheusServer:
    def __init__(self, targets: list[str]) -> None:
        executable = prometheus_executable()
        if executable is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
        self.executable = executable
        self.port = free_port(HOST)
        self.work_dir = Path(tempfile.mkdtemp(prefix="fragrance-prometheus-"))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "fragrance-ops", "static_configs": [{"targets": targets}]}
            ],
        }
        # JSON is YAML: no YAML library needed for the config file.
        (self.work_dir / "prometheus.yml").write_bytes(orjson.dumps(config))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        with (self.work_dir / "prometheus.log").open("ab") as log:
            self._proc = spawn_supervised(
                [
                    self.executable,
                    f"--config.file={self.work_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.work_dir / 'data'}",
                    f"--web.listen-address={HOST}:{self.port}",
                ],
                name="prometheus",
                log=log,
                grace_s=5.0,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(
            "prometheus not ready:\n" + (self.work_dir / "prometheus.log").read_text()[-2000:]
        )

    def query(self, promql: str) -> list[dict[str, object]]:
        """The instant vector of ``promql``, as Prometheus' HTTP API returns it."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = orjson.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of ``promql``, or None while it has no sample."""
        result = self.query(promql)
        if not result:
            return None
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def stop(self) -> None:
        if self._proc is not None:
            stop_supervised(self._proc, 10.0)
            self._proc = None
        shutil.rmtree(self.work_dir, ignore_errors=True)
