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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from infra.postgres import database_url, ensure_database
from infra.processes import (
    HOST,
    PortTaken,
    StackError,
    alive,
    executable,
    free_port,
    http_ok,
    port_open,
    spawn,
    stop_pid,
    wait_until,
)

SERVICES = ("s3", "mlflow", "prefect")
STATE = "stack.json"


@dataclass
class StackConfig:
    """Where the stack keeps its data, which ports it listens on, and which database backs it."""

    data: Path = Path("mergeflow-stack")
    s3_port: int = 8333
    mlflow_port: int = 5000
    prefect_port: int = 4200
    postgres_url: str | None = None  # postgresql://user@host:port (a database in it is created per service)
    db_prefix: str = "mergeflow"
    bucket: str = "mergeflow"
    timeout: float = 120.0

    def __post_init__(self) -> None:
        self.data = Path(self.data).resolve()
        if self.postgres_url is None:
            self.postgres_url = os.environ.get("MERGEFLOW_POSTGRES_URL") or None

    @classmethod
    def for_folder(cls, data: str | Path, **given: Any) -> StackConfig:
        """Returns the config of the stack in `data`: what its last `up` used, overridden by the given values."""
        saved: dict[str, Any] = {}
        path = Path(data).resolve() / STATE
        if path.exists():
            try:
                saved = dict(json.loads(path.read_text()).get("config", {}))
            except (OSError, ValueError):
                saved = {}
        if saved.get("postgres_url") and "***" in saved["postgres_url"]:
            saved.pop("postgres_url")  # a password is never written down: give it again
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in saved.items() if k in known}
        values.update({k: v for k, v in given.items() if v is not None})
        values["data"] = Path(data)
        return cls(**values)


@dataclass
class Service:
    """One started server: its PID (a process group leader), URL, log and the command that started it."""

    name: str
    pid: int
    url: str
    log: str
    command: list[str]
    ports: dict[str, int] = field(default_factory=dict)


# -- the stack ------------------------------------------------------------------------------------------


class Stack:
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

    def _s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        return boto3.client(
            "s3",
            endpoint_url=f"http://{HOST}:{self.config.s3_port}",
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )

    def _s3_ok(self) -> bool:
        try:
            self._s3_client().list_buckets()
            return True
        except Exception:
            return False

    # starting ------------------------------------------------------------------------------------
    def _start_s3(self) -> Service:
        c = self.config
        folder = self.data / "s3"
        folder.mkdir(parents=True, exist_ok=True)
        previous = self._state().get("s3")
        old = previous.ports if previous else {}

        # Promised to our own servers; the internal ports must never be one of them.
        taken = {c.s3_port, c.mlflow_port, c.prefect_port}

        def port(key: str) -> int:  # the same internal ports across restarts, so the data folder stays valid
            chosen = old[key] if key in old and old[key] not in taken and not port_open(old[key]) else None
            chosen = chosen if chosen is not None else free_port(avoid=taken)
            taken.add(chosen)
            return chosen

        ports = {f: port(f) for f in ("master", "volume", "filer", "admin", "webdav")}
        grpc = {f: port(f"{f}.grpc") for f in ("master", "volume", "filer", "s3", "admin")}
        debug = {"debug": port("debug"), "s3.debug": port("s3.debug")}
        command = [
            executable("weed"),
            "mini",
            f"-dir={folder}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-s3.port={c.s3_port}",
            # Off: their default ports are fixed (8181, 9101), so two stacks on one machine would collide.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        command += [f"-{name}.port={port}" for name, port in ports.items()]
        command += [f"-{name}.port={port}" for name, port in debug.items()]
        command += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
        log = self.data / "logs" / "s3.log"
        pid = spawn(command, self._base_env(), log)
        all_ports = {"s3": c.s3_port, **ports, **debug, **{f"{k}.grpc": v for k, v in grpc.items()}}
        service = Service("s3", pid, f"http://{HOST}:{c.s3_port}", str(log), command, all_ports)
        wait_until(self._s3_ok, c.timeout, f"SeaweedFS S3 on port {c.s3_port} (log: {log})", pid)
        client = self._s3_client()
        try:
            client.create_bucket(Bucket=c.bucket)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        return service

    def _start_mlflow(self) -> Service:
        c = self.config
        folder = self.data / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        if c.postgres_url:
            database = f"{c.db_prefix}_mlflow"
            ensure_database(c.postgres_url, database)
            backend = database_url(c.postgres_url, database)
        else:
            backend = f"sqlite:///{folder / 'mlflow.db'}"
        command = [
            executable("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(c.mlflow_port),
            "--workers",
            "2",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            f"s3://{c.bucket}/mlflow-artifacts",
        ]
        log = self.data / "logs" / "mlflow.log"
        pid = spawn(command, self._base_env(), log)
        url = f"http://{HOST}:{c.mlflow_port}"
        wait_until(
            lambda: self.healthy("mlflow"), c.timeout, f"mlflow server on port {c.mlflow_port} (log: {log})", pid
        )
        return Service("mlflow", pid, url, str(log), _redact_command(command), {"http": c.mlflow_port})

    def _start_prefect(self) -> Service:
        c = self.config
        folder = self.data / "prefect"
        folder.mkdir(parents=True, exist_ok=True)
        env = self._base_env()
        env["PREFECT_HOME"] = str(folder)
        if c.postgres_url:
            database = f"{c.db_prefix}_prefect"
            ensure_database(c.postgres_url, database)
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url(c.postgres_url, database, "asyncpg")
        else:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
        command = [executable("prefect"), "server", "start", "--host", HOST, "--port", str(c.prefect_port)]
        log = self.data / "logs" / "prefect.log"
        pid = spawn(command, env, log)
        url = f"http://{HOST}:{c.prefect_port}"
        wait_until(
            lambda: self.healthy("prefect"), c.timeout, f"Prefect server on port {c.prefect_port} (log: {log})", pid
        )
        return Service("prefect", pid, url, str(log), command, {"http": c.prefect_port})

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


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _redact_command(command: list[str]) -> list[str]:
    return [_redact(a) if a.startswith("postgresql") else a for a in command]
