"""The production stack files and the deployments file, checked without Docker or Kubernetes (not on these machines).

Structure only: every service builds from a Dockerfile in the repo or names an image, depends only on
services that exist, waits on health checks, keeps ports on loopback, and takes secrets from the
environment; the Dockerfiles copy only what exists; the Kubernetes job template declares every
placeholder it uses; the deployments' entrypoints are real flows and the trigger listens for the
watcher's event. The Prefect server's own validation of the job template runs in test_full_stack.py.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_services_images_dependencies_and_health():
    data = compose()
    services = data["services"]
    assert set(services) == {"postgres", "s3", "mlflow", "prefect-server", "prefect-worker"}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            dockerfile = (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"} and "healthcheck" in services[dep], (name, dep)
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: port {port} is not bound to loopback"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (INFRA / source).exists(), f"{name}: {source} missing"
            else:
                assert source in data["volumes"], f"{name}: volume {source} not declared"


def test_compose_wires_postgres_s3_mlflow_and_prefect_together():
    services = compose()["services"]
    text = (INFRA / "docker-compose.yml").read_text()
    mlflow_args = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow_args and "@postgres:5432/mlflow" in mlflow_args
    assert "--artifacts-destination=s3://" in mlflow_args
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://") and db.endswith("@postgres:5432/prefect")
    worker = services["prefect-worker"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["MERGEFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    # The databases the services use are the ones the init script creates.
    init = (INFRA / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow;" in init and "CREATE DATABASE prefect;" in init
    # No secret is written in the file: each comes from the environment, required where it must be.
    assert "${POSTGRES_PASSWORD:?" in text and "${S3_SECRET_KEY:?" in text
    assert not re.search(r"^\s*\w*(PASSWORD|SECRET\w*):\s*[^$\s]", text, re.MULTILINE)
    example = dict(
        line.split("=", 1)
        for line in (INFRA / "stack.env.example").read_text().split("\n")
        if line and not line.startswith("#")
    )
    assert {"POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"} <= set(example)
    identities = json.loads((INFRA / "seaweedfs-s3.json").read_text())["identities"]
    assert identities and identities[0]["credentials"]


def test_dockerfiles_copy_only_what_exists_and_pin_what_the_project_pins():
    constraints = (ROOT / "constraints.txt").read_text()
    for dockerfile in (INFRA / "docker").glob("*.Dockerfile"):
        lines = dockerfile.read_text().splitlines()
        assert any(line.startswith("FROM ") for line in lines), dockerfile
        for line in lines:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} missing"
        assert any(line.startswith("USER ") for line in lines), f"{dockerfile.name} runs as root"
    mergeflow = (INFRA / "docker" / "mergeflow.Dockerfile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", constraints)
    assert torch_pin and f"torch=={torch_pin.group(1)}" in mergeflow
    mlflow_pin = re.search(r"mlflow==([\d.]+)", constraints)
    assert mlflow_pin and f"mlflow=={mlflow_pin.group(1)}" in (INFRA / "docker" / "mlflow.Dockerfile").read_text()


def placeholders(value: object) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= placeholders(v)
    elif isinstance(value, list):
        for v in value:
            found |= placeholders(v)
    elif isinstance(value, str):
        found |= set(re.findall(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}", value))
    return found


def test_kubernetes_job_template_declares_every_placeholder():
    template = json.loads((INFRA / "k8s" / "work-pool-job-template.json").read_text())
    job = template["job_configuration"]
    manifest = job["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    declared = set(template["variables"]["properties"])
    assert placeholders(job) <= declared, placeholders(job) - declared
    for name, spec in template["variables"]["properties"].items():
        if "default" in spec and "enum" in spec:
            assert spec["default"] in spec["enum"], name
    assert template["variables"]["properties"]["image"]["default"].startswith("mergeflow:")


def test_deployments_name_real_flows_and_the_watchers_event():
    from prefect import Flow

    from flows.watch import EVENT

    data = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in data["deployments"]}
    assert set(deployments) == {"scheduled-merge", "remerge-on-finetune", "watch-finetunes"}
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, func), Flow), d["entrypoint"]
        assert d["work_pool"]["name"] == "mergeflow"
    assert deployments["scheduled-merge"]["schedules"][0]["cron"]
    trigger = deployments["remerge-on-finetune"]["triggers"][0]
    assert trigger["expect"] == [EVENT]
    assert trigger["parameters"]["finetune"] == "{{ event.payload.reference }}"
