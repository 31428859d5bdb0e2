"""Turns off what phones home (Prefect's server analytics, MLflow's telemetry) or only warns about the hub.

These machines have no network, and a merge pipeline has no reason to report usage: the command line and
`run_pipeline` (the library entry) both call `quiet_defaults` before Prefect or MLflow start. A variable the
user set is kept.
"""

from __future__ import annotations


def quiet_defaults() -> None:
    """Turns off what phones home or only warns about the hub (these machines have no network)."""
    import logging
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
