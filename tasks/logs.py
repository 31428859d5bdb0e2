"""Returns the logger of the current Prefect run, or mergeflow's own when called outside one."""

from __future__ import annotations

import logging
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mergeflow")
