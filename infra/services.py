"""The local full stack's services: its configuration, what it records per service, and how each server
(SeaweedFS S3, mlflow server, Prefect server) is started and checked. stack.py runs them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from infra.postgres import database_url, ensure_database
from infra.processes import HOST, executable, free_port, port_open, spawn, wait_until

SERVICES = ("s3", "mlflow", "prefect")
STATE = "stack.json"
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), the terminating NUL included: stay below both
UNIX_SOCKET_PATH_MAX = 100


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


class ServiceStarters:
    """How each service starts; mixed into Stack, which owns the state, the environment and health checks."""

    config: StackConfig
    data: Path

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
        logs = self.data / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [
            executable("weed"),
            f"-logdir={logs}",  # glog's files (default: the system's temp folder, left behind)
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
        socket = folder / "s3.sock"  # default /tmp/seaweedfs-s3-<port>.sock, left behind
        if len(str(socket).encode()) < UNIX_SOCKET_PATH_MAX:
            command.append(f"-s3.localSocket={socket}")
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


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _redact_command(command: list[str]) -> list[str]:
    return [_redact(a) if a.startswith("postgresql") else a for a in command]
