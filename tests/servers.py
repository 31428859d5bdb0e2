"""The local full stack for the integration tests: `infra.stack` on free loopback ports, backed by PostgreSQL.

SeaweedFS S3, `mlflow server` (artifacts in that S3) and a Prefect server, started for real from the
installed packages; MLflow's and Prefect's databases live in the machine's PostgreSQL
(`$MERGEFLOW_TEST_POSTGRES_URL`, default postgresql://postgres@127.0.0.1:5432) under a prefix unique
to the test session, dropped at the end. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from infra.postgres import drop_database
from infra.processes import PortTaken, free_port
from infra.stack import Stack, StackConfig

ACCESS_KEY = "mergeflow-test-key"
SECRET_KEY = "mergeflow-test-secret-0123456789"
POSTGRES_URL = os.environ.get("MERGEFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")


def start_stack(root: Path, attempts: int = 3) -> Stack:
    """Returns a running stack in `root` with the tests' S3 key pair and databases of its own.

    A free port is only free until someone binds it: on a shared machine another process may take one
    of ours between choosing it and starting the server. The stack then refuses before starting
    anything (`PortTaken`), and we choose fresh ports; any other failure is raised at once.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "credentials.json").write_text(json.dumps({"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}))
    for attempt in range(attempts):
        s3 = free_port()
        mlflow = free_port(avoid={s3})
        config = StackConfig(
            data=root,
            s3_port=s3,
            mlflow_port=mlflow,
            prefect_port=free_port(avoid={s3, mlflow}),
            postgres_url=POSTGRES_URL,
            db_prefix=f"mergeflow_test_{secrets.token_hex(4)}",
        )
        stack = Stack(config)
        try:
            stack.up()
        except PortTaken:
            stop_stack(stack)
            if attempt == attempts - 1:
                raise
            continue
        except BaseException:
            stop_stack(stack)
            raise
        return stack
    raise AssertionError("unreachable")


def stop_stack(stack: Stack) -> None:
    stack.down()
    url = stack.config.postgres_url
    if url:
        for service in ("mlflow", "prefect"):
            drop_database(url, f"{stack.config.db_prefix}_{service}")
