"""Single-node Apache Kafka (KRaft, broker+controller) run straight from jars.

The jars come from Maven Central via deploy/kafka/pom.xml, so tests, CI and the
CLI get the real broker with only a JDK: no Docker engine, no tarball download.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from fragrance_ops.brokers.base import (
    LOCALHOST,
    BrokerSetupError,
    BrokerStartError,
    LocalBroker,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB_DIR = REPO_ROOT / "deploy" / "kafka" / "target" / "lib"
LOG4J_CONFIG = REPO_ROOT / "deploy" / "kafka" / "log4j2.properties"
#: Points at a directory of Kafka jars (overrides DEFAULT_LIB_DIR).
LIB_DIR_ENV = "FRAGRANCE_OPS_KAFKA_LIB"
#: Replaces DEFAULT_JVM_OPTIONS, e.g. "-Xmx1g" for a benchmark.
JVM_OPTIONS_ENV = "FRAGRANCE_OPS_KAFKA_JAVA_OPTS"
BUILD_COMMAND = "mvn -q -B -f deploy/kafka/pom.xml package"
#: A small heap: tests run one or two brokers on a 2-core CI machine.
DEFAULT_JVM_OPTIONS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
#: One-shot tools (storage format) only need to start fast.
_TOOL_JVM_OPTIONS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
_KAFKA_JAR = re.compile(r"^kafka_\d+\.\d+-(\d+(?:\.\d+)+)\.jar$")


def resolve_lib_dir(lib_dir: Path | None = None) -> Path:
    """The Kafka jar directory: argument, else $FRAGRANCE_OPS_KAFKA_LIB, else the repo's."""
    if lib_dir is None:
        from_env = os.environ.get(LIB_DIR_ENV)
        lib_dir = Path(from_env) if from_env else DEFAULT_LIB_DIR
    lib_dir = lib_dir.resolve()
    if not lib_dir.is_dir() or not any(lib_dir.glob("*.jar")):
        raise BrokerSetupError(
            f"no Kafka jars in {lib_dir}; build them with `{BUILD_COMMAND}` "
            f"from the repo root (or set {LIB_DIR_ENV})"
        )
    return lib_dir


def kafka_version_in(lib_dir: Path) -> str:
    """Version of the single kafka_<scala>-<version>.jar in ``lib_dir``."""
    versions = sorted(
        match.group(1)
        for jar in lib_dir.glob("kafka_*.jar")
        if (match := _KAFKA_JAR.match(jar.name))
    )
    if len(versions) != 1:
        raise BrokerSetupError(
            f"expected one kafka_2.13-<version>.jar in {lib_dir}, found {versions or 'none'}; "
            f"rebuild with `rm -rf {lib_dir} && {BUILD_COMMAND}`"
        )
    return versions[0]


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` if set, else ``java`` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home, "bin", "java"), os.X_OK):
        return str(Path(java_home, "bin", "java"))
    java = shutil.which("java")
    if java is None:
        raise BrokerSetupError("no `java` on PATH (Kafka 4.x needs a JDK >= 17), and no JAVA_HOME")
    return java


def new_cluster_id() -> str:
    """A KRaft cluster id, the same format `kafka-storage random-uuid` prints.

    Generated here to save a JVM launch (~1s) on every fresh broker.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # Kafka's Uuid.randomUuid() rule
            return cluster_id


class ApacheKafkaBroker(LocalBroker):
    """Real Apache Kafka, combined broker+controller, data on disk in ``work_dir``.

    Storage is formatted on the first start only, so ``restart()`` (and a new
    instance over the same ``work_dir``) keeps topics, records and offsets.
    """

    persistent: ClassVar[bool] = True
    kind: ClassVar[str] = "kafka"

    def __init__(
        self,
        work_dir: Path | None = None,
        port: int | None = None,
        lib_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        self._lib_dir = resolve_lib_dir(lib_dir)
        self._kafka_version = kafka_version_in(self._lib_dir)
        self._java = find_java()
        super().__init__(work_dir, port)
        self._controller_port = free_port(exclude=frozenset({self.port}))
        self._extra_properties = dict(extra_properties or {})

    @property
    def kafka_version(self) -> str:
        """E.g. "4.1.1", from the kafka_2.13-X.jar on the classpath."""
        return self._kafka_version

    @property
    def lib_dir(self) -> Path:
        return self._lib_dir

    @property
    def controller_port(self) -> int:
        return self._controller_port

    @property
    def cluster_id(self) -> str | None:
        """From meta.properties, written when the storage is formatted."""
        try:
            meta = (self.data_dir / "meta.properties").read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        for line in meta.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "cluster.id":
                return value.strip()
        return None

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def properties_path(self) -> Path:
        return self.work_dir / "server.properties"

    @property
    def properties(self) -> dict[str, str]:
        """The effective server.properties: test-friendly defaults, then extras."""
        port, cport = self.port, self._controller_port
        defaults = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOCALHOST}:{cport}",
            "listeners": f"PLAINTEXT://{LOCALHOST}:{port},CONTROLLER://{LOCALHOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{LOCALHOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            # Faust creates its changelog/repartition topics on demand.
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # One node: every internal topic has RF 1; one partition each makes
            # the first consumer group / transaction start in ms, not seconds.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Let compaction/retention happen within seconds in tests (topics
            # still need a small segment.ms to roll their active segment).
            "log.cleaner.backoff.ms": "500",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.retention.check.interval.ms": "1000",
            "log.segment.delete.delay.ms": "1000",
        }
        return defaults | self._extra_properties

    def _jvm(self, options: tuple[str, ...] | list[str]) -> list[str]:
        logging = [f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"] if LOG4J_CONFIG.is_file() else []
        return [self._java, *options, *logging, "-cp", str(self._lib_dir / "*")]

    def _prepare(self) -> None:
        """Write server.properties; format the storage only if never formatted."""
        self.properties_path.write_text(
            "".join(f"{key}={value}\n" for key, value in self.properties.items()),
            encoding="utf-8",
        )
        if (self.data_dir / "meta.properties").exists():
            return
        command = [
            *self._jvm(_TOOL_JVM_OPTIONS),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            new_cluster_id(),
            "-c",
            str(self.properties_path),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"=== fragrance-ops: formatting {command!r}\n".encode())
            log.flush()
            try:
                result = subprocess.run(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.work_dir,
                    timeout=120,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerStartError("kafka storage format timed out", self.log_tail()) from exc
        if result.returncode != 0:
            raise BrokerStartError(
                f"kafka storage format failed with code {result.returncode} (log: {self.log_path})",
                self.log_tail(),
            )

    def _command(self) -> list[str]:
        from_env = os.environ.get(JVM_OPTIONS_ENV)
        options = shlex.split(from_env) if from_env else list(DEFAULT_JVM_OPTIONS)
        return [*self._jvm(options), "kafka.Kafka", str(self.properties_path)]
