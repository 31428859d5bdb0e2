"""`mergeflow stack`: the local full stack (SeaweedFS S3, mlflow server, Prefect server) up, down, status, env."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.processes import StackError
    from infra.stack import Stack, StackConfig

    config = StackConfig.for_folder(
        args.data,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
        postgres_url=args.postgres_url,
    )
    stack = Stack(config)
    try:
        if args.stack_command == "up":
            services = stack.up()
            for name, s in services.items():
                print(f"{name:8s} {s.url:28s} pid {s.pid:<8d} log {s.log}")
            backend = "PostgreSQL" if config.postgres_url else "sqlite"
            print(f"\nMLflow and Prefect store their state in {backend}; data folder {config.data}")
            print("\nexport these to use the stack (or: eval $(mergeflow stack env)):")
            print_env(stack.env())
        elif args.stack_command == "env":
            print_env(stack.env())
        elif args.stack_command == "status":
            status = stack.status()
            for name, st in status.items():
                word = "healthy" if st["healthy"] else ("running, not answering" if st["running"] else "stopped")
                print(f"{name:8s} {word:24s} {st['url'] or '':28s} pid {st['pid'] or '-'}")
            return 0 if all(st["healthy"] for st in status.values()) else 1
        else:
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing this stack started is running")
    except StackError as exc:
        print(f"mergeflow: stack: {exc}", file=sys.stderr)
        return 2
    return 0


def print_env(env: dict[str, str]) -> None:
    import shlex

    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


def add_stack_parser(sub: Any) -> None:
    st = sub.add_parser("stack", help="the local full stack: SeaweedFS S3, mlflow server, Prefect server")
    st.add_argument("stack_command", choices=["up", "down", "status", "env"])
    st.add_argument("--data", default="mergeflow-stack", help="data folder (state, logs, sqlite, S3 volumes)")
    st.add_argument("--s3-port", type=int, default=None, help="S3 API port (default 8333)")
    st.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default 5000)")
    st.add_argument("--prefect-port", type=int, default=None, help="Prefect API and UI port (default 4200)")
    st.add_argument(
        "--postgres-url",
        default=None,
        help="PostgreSQL server for MLflow's and Prefect's databases (default $MERGEFLOW_POSTGRES_URL; none: sqlite)",
    )
    st.set_defaults(func=cmd_stack)
