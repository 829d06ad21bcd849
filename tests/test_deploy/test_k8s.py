"""deploy/k8s, validated offline against the Kubernetes JSON schemas (kubernetes-validate,
strict: unknown fields fail) and checked for what the workers need. No cluster here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from config.settings import Settings
from tests.test_deploy.support import K8S, load_yaml, load_yaml_all, settings_env, settings_from_env

# The oldest Kubernetes release still commonly supported, and the newest the package knows.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
EXAMPLE_SECRET = "secret.example.yaml"
DATA_DIR = "/var/lib/fragrance-ops"


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(K8S / "kustomization.yaml")
    return loaded


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    """Every resource of deploy/k8s (the example Secret included), by "kind/name"."""
    found: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_yaml_all(path):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def worker_env(resources: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What a worker pod's environment holds: the ConfigMap and the (example) Secret."""
    container = pod_spec(resources["Deployment/fragrance-ops-worker"])["containers"][0]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= resources[f"ConfigMap/{source['configMapRef']['name']}"]["data"]
        else:
            env |= resources[f"Secret/{source['secretRef']['name']}"]["stringData"]
    # Values Kubernetes fills in (valueFrom: the pod's IP) are not settings.
    env |= {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    return env


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(
        path.name for path in manifest_files() if path.name != EXAMPLE_SECRET
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_manifests_validate_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = load_yaml_all(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_rejects_an_unknown_field(resources: dict[str, dict[str, Any]]) -> None:
    deployment = copy.deepcopy(resources["Deployment/fragrance-ops-worker"])
    pod_spec(deployment)["containers"][0]["readinessprobe"] = {"tcpSocket": {"port": 9300}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_every_variable_is_a_real_setting(
    resources: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = worker_env(resources)
    assert set(env) == set(settings_env(env)), "only fragrance-ops settings belong here"
    settings: Settings = settings_from_env(monkeypatch, env)
    assert settings.metrics.bind == "0.0.0.0"
    assert str(settings.worker.data_dir) == DATA_DIR
    assert settings.kafka.sasl_password is not None


def test_the_worker_deployment(resources: dict[str, dict[str, Any]]) -> None:
    deployment = resources["Deployment/fragrance-ops-worker"]
    partitions = int(worker_env(resources)["FRAGRANCE_OPS_KAFKA__PARTITIONS"])
    assert 2 == deployment["spec"]["replicas"] <= partitions
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    (container,) = spec["containers"]
    assert container["command"] == ["fragrance-ops", "worker"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= container["resources"].keys()
    port = int(worker_env(resources)["FRAGRANCE_OPS_METRICS__PORT"])
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == "metrics", probe
    # The root filesystem is read-only: data_dir and /tmp are emptyDirs.
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[DATA_DIR]]
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_each_worker_advertises_its_pod_ip_for_state_requests(
    resources: dict[str, dict[str, Any]],
) -> None:
    container = pod_spec(resources["Deployment/fragrance-ops-worker"])["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    names = [item["name"] for item in container["env"]]
    assert names.index("POD_IP") < names.index("FRAGRANCE_OPS_METRICS__URL")  # $() order
    port = worker_env(resources)["FRAGRANCE_OPS_METRICS__PORT"]
    assert worker_env(resources)["FRAGRANCE_OPS_METRICS__URL"] == f"http://$(POD_IP):{port}"


def test_the_metrics_service_selects_the_workers_for_prometheus(
    resources: dict[str, dict[str, Any]],
) -> None:
    service = resources["Service/fragrance-ops-worker-metrics"]
    deployment = resources["Deployment/fragrance-ops-worker"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == worker_env(resources)["FRAGRANCE_OPS_METRICS__PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"].get(
        "annotations", {}
    ), "annotating pods too makes a kubernetes-pods job scrape every worker twice"


def test_the_topics_job_creates_the_topics_with_the_same_settings(
    resources: dict[str, dict[str, Any]],
) -> None:
    job = resources["Job/fragrance-ops-topics"]
    worker = pod_spec(resources["Deployment/fragrance-ops-worker"])["containers"][0]
    (container,) = pod_spec(job)["containers"]
    assert container["command"] == ["fragrance-ops", "topics", "create"]
    assert container["envFrom"] == worker["envFrom"]
    assert container["image"] == worker["image"]
    assert pod_spec(job)["restartPolicy"] in {"OnFailure", "Never"}


def test_the_autoscaler_stops_at_the_partition_count(resources: dict[str, dict[str, Any]]) -> None:
    hpa = resources["HorizontalPodAutoscaler/fragrance-ops-worker"]
    partitions = int(worker_env(resources)["FRAGRANCE_OPS_KAFKA__PARTITIONS"])
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fragrance-ops-worker"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] == partitions


def test_the_example_secret_holds_placeholders_only(resources: dict[str, dict[str, Any]]) -> None:
    secret = resources["Secret/fragrance-ops-kafka"]
    assert "data" not in secret
    for value in secret["stringData"].values():
        assert "CHANGE-ME" in value
    assert "EXAMPLE" in (K8S / EXAMPLE_SECRET).read_text()


def test_the_kustomization_sets_the_image_every_workload_uses(
    resources: dict[str, dict[str, Any]],
) -> None:
    (image,) = kustomization()["images"]
    for name in ("Deployment/fragrance-ops-worker", "Job/fragrance-ops-topics"):
        (container,) = pod_spec(resources[name])["containers"]
        assert container["image"].partition(":")[0] == image["name"], name
