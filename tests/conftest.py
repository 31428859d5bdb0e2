from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Nothing phones home from the tests: the Prefect test harness starts a server that would send analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Never touch the user's cache from tests.
os.environ["MERGEFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergeflow-test-cache-")
atexit.register(shutil.rmtree, os.environ["MERGEFLOW_CACHE_DIR"], ignore_errors=True)  # tests leave nothing behind
# Nor in the system's temp folder: what libraries and the servers' processes put there (MLflow's model
# downloads, Prefect's runner storage, Dask's scratch space) goes into one folder removed at exit. pytest's
# own folders stay where they were, so a failed test's files are kept as its retention policy says.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_TMP = tempfile.mkdtemp(prefix="mergeflow-test-tmp-")
os.environ["TMPDIR"] = tempfile.tempdir = _TMP
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
torch.set_num_threads(2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the method tests compute (benchmarks/gpu_check.sh runs them with cuda)",
    )


def pytest_configure(config: pytest.Config) -> None:
    from tests.helpers import DEVICE_ENV

    device = config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device is available")
    os.environ[DEVICE_ENV] = device


@pytest.fixture(autouse=True, scope="session")
def _no_mlflow_default_store_in_the_checkout():
    """MLflow's default store is ./mlflow.db (with ./mlruns): a test that reaches MLflow with no tracking URI set
    writes there, in the checkout. None may."""
    strays = [Path.cwd() / name for name in ("mlflow.db", "mlruns")]
    before = {p for p in strays if p.exists()}
    yield
    written = sorted(str(p) for p in strays if p.exists() and p not in before)
    assert not written, f"a test used MLflow's default store (no tracking URI): {written}"


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_is_per_test():
    """Puts MLflow's process-wide tracking URI back after each test.

    `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which the pipeline reads as its default: a
    test that sets it would point every later test at its own (by then deleted) store.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def ci_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The `ci` zoo, built once per test session (about a minute on 2 cores)."""
    from merging.zoo.build import build_zoo

    root, manifest, _ = build_zoo(tmp_path_factory.mktemp("zoo") / "ci-joint", "ci", "joint")
    return root, manifest


@pytest.fixture(scope="session")
def causal_ci_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The causal `ci` zoo (SmolLM2-135M and three tiny fine-tunes), built once per test session (about two
    minutes on 2 cores)."""
    from merging.zoo.causal import build_causal_zoo

    root, manifest, _ = build_causal_zoo(tmp_path_factory.mktemp("causal-zoo") / "causal-ci", "ci")
    return root, manifest


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API server on a temporary database), started once per test session
    by the first test that asks for it (each start costs 15-20 s on two cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory: pytest.TempPathFactory):
    """The local full stack (S3, MLflow, Prefect server) on PostgreSQL, started once per test session."""
    from tests.servers import start_stack, stop_stack

    stack = start_stack(tmp_path_factory.mktemp("full-stack"))
    yield stack
    stop_stack(stack)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
