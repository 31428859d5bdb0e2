"""The local full stack: a SeaweedFS S3 server, an `mlflow server` whose artifacts go to it, and a Prefect server.

All three listen on 127.0.0.1 only. `up` starts what is not already running (a second `up` is a
no-op), waits until each answers its health check, and records what it started (PIDs, ports,
commands) in `<data>/stack.json`; `down` stops only those processes; `status` checks each one.
With a PostgreSQL URL (`--postgres-url` or `$MERGEFLOW_POSTGRES_URL`) MLflow's backend store and the
Prefect server's database live in PostgreSQL (databases `<prefix>_mlflow`, `<prefix>_prefect`,
created when missing), as in production; otherwise both use sqlite in the data folder. The S3
credentials are generated once per data folder (`credentials.json`, mode 0600). Telemetry and
analytics of the three servers are turned off.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict
from typing import Any

from infra.processes import (
    HOST,
    PortTaken,
    StackError,
    alive,
    http_ok,
    port_open,
    stop_pid,
)
from infra.services import SERVICES, STATE, Service, ServiceStarters, StackConfig, _redact


class Stack(ServiceStarters):
    """Starts, checks and stops the local full stack described by a StackConfig."""

    def __init__(self, config: StackConfig | None = None):
        self.config = config or StackConfig()
        self.data = self.config.data

    # state ---------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Service]:
        path = self.data / STATE
        if not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            return {name: Service(**s) for name, s in raw.get("services", {}).items()}
        except (OSError, ValueError, TypeError) as exc:
            raise StackError(
                f"{path}: unreadable stack state ({exc}); stop the servers by hand and delete it"
            ) from None

    def _save(self, services: dict[str, Service]) -> None:
        path = self.data / STATE
        tmp = path.with_suffix(".tmp")
        data = {"services": {n: asdict(s) for n, s in services.items()}, "config": self._config_json()}
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def _config_json(self) -> dict[str, Any]:
        data = asdict(self.config)
        data["data"] = str(self.config.data)
        if data.get("postgres_url"):
            data["postgres_url"] = _redact(data["postgres_url"])
        return data

    def credentials(self) -> dict[str, str]:
        """Returns the stack's S3 key pair, generated once per data folder (mode 0600)."""
        path = self.data / "credentials.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        self.data.mkdir(parents=True, exist_ok=True)
        creds = {"access_key": "mergeflow-" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(24)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        return creds

    def env(self) -> dict[str, str]:
        """Returns the environment variables that point mergeflow, MLflow, Prefect and boto3 at this stack."""
        creds = self.credentials()
        s3 = f"http://{HOST}:{self.config.s3_port}"
        return {
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{self.config.mlflow_port}",
            "PREFECT_API_URL": f"http://{HOST}:{self.config.prefect_port}/api",
            "MERGEFLOW_S3_ENDPOINT_URL": s3,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MERGEFLOW_STORAGE_URI": f"s3://{self.config.bucket}/models",
        }

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env())
        env.update(
            {
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            }
        )
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at an API
        return env

    # health --------------------------------------------------------------------------------------
    def healthy(self, name: str, service: Service | None = None) -> bool:
        c = self.config
        if name == "s3":
            return self._s3_ok()
        if name == "mlflow":
            return http_ok(f"http://{HOST}:{c.mlflow_port}/health")
        if name == "prefect":
            return http_ok(f"http://{HOST}:{c.prefect_port}/api/health")
        raise KeyError(name)

    def up(self) -> dict[str, Service]:
        """Returns the running services, starting those that are not (a no-op when all are up)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.credentials()
        services = self._state()
        starters = {"s3": self._start_s3, "mlflow": self._start_mlflow, "prefect": self._start_prefect}
        ports = {"s3": self.config.s3_port, "mlflow": self.config.mlflow_port, "prefect": self.config.prefect_port}
        to_start = []
        for name in SERVICES:
            known = services.get(name)
            if known is not None and alive(known.pid, known.command) and self.healthy(name):
                continue
            if known is not None and alive(known.pid, known.command):
                stop_pid(known.pid)  # ours but not answering: restart it
            to_start.append(name)
        for name in to_start:  # every port checked before anything starts: a refusal starts nothing
            if port_open(ports[name]):
                raise PortTaken(name, ports[name])
        for name in to_start:
            if port_open(ports[name]):  # taken while an earlier service started
                raise PortTaken(name, ports[name])
            try:
                services[name] = starters[name]()
            finally:
                self._save(services)
        return services

    def status(self) -> dict[str, dict[str, Any]]:
        """Returns per service: whether this stack started it, its PID, whether it runs and answers, its URL."""
        services = self._state()
        out = {}
        for name in SERVICES:
            s = services.get(name)
            running = s is not None and alive(s.pid, s.command)
            out[name] = {
                "started_by_stack": s is not None,
                "pid": s.pid if s else None,
                "running": running,
                "healthy": self.healthy(name) if running else False,
                "url": s.url if s else None,
                "log": s.log if s else None,
            }
        return out

    def down(self) -> list[str]:
        """Returns the names of the services it stopped: only those `up` started (by PID), newest first."""
        services = self._state()
        stopped = []
        for name in reversed(SERVICES):
            s = services.pop(name, None)
            if s is not None and alive(s.pid, s.command):
                stop_pid(s.pid)
                stopped.append(name)
            self._save(services)
        return stopped

    def stop_service(self, name: str) -> None:
        """Stops one service (the fault tests kill the S3 server or MLflow and start it again with `up`)."""
        services = self._state()
        s = services.get(name)
        if s is not None and alive(s.pid, s.command):
            stop_pid(s.pid, timeout=5)
