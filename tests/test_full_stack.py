"""Operations on the local full stack (SeaweedFS S3, mlflow server, Prefect server, all on PostgreSQL).

- the stack command: up (health, a second up is a no-op), status, env, down only what up started;
- deployments: `prefect deploy --all` registers the scheduled merge, the event-triggered re-merge
  and the watcher; a process worker runs them; a new fine-tune version makes the watcher emit
  `mergeflow.finetune.available` once, which triggers a re-merge through the gate;
- faults: the S3 server killed during an upload and restarted; MLflow down at registration;
- load: 20 pipeline runs at once against the same stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from infra.processes import alive, free_port, stop_pid
from infra.stack import Stack, StackConfig
from tests.helpers import build_tiny_tasks
from tests.servers import POSTGRES_URL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stack_env(full_stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Points this process (MLflow, boto3, Prefect) at the full stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    full_stack.up()
    env = full_stack.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield env


@pytest.fixture(scope="module")
def family3(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ops-family")
    base, fts, _ = build_tiny_tasks(root, finetunes=3)
    return root, base, fts


def tasks_section(root: Path) -> dict:
    return {
        "tasks": [
            {"name": n, "dataset": str(root / "data" / n), "num_labels": k, "max_length": 8}
            for n, k in [("two", 2), ("three", 3), ("four", 4), ("ood", 2)]
        ]
    }


def register_finetune(tracking_uri: str, name: str, folder: Path, task: str) -> str:
    """Returns the version of `folder` registered under `name` (artifacts logged raw, tagged with its task)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = client.get_experiment_by_name("finetunes") or client.get_experiment(
        client.create_experiment("finetunes")
    )
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_artifacts(str(folder), "model")
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    mv = client.create_model_version(
        name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags={"task": task}
    )
    return str(mv.version)


# -- the stack command -------------------------------------------------------------------------------


def test_stack_up_is_idempotent_status_env_and_down_stops_only_its_own(tmp_path: Path):
    from flows.cli import main as cli_main

    s3 = free_port()
    mlflow = free_port(avoid={s3})
    ports = {"s3_port": s3, "mlflow_port": mlflow, "prefect_port": free_port(avoid={s3, mlflow})}
    args = ["--data", str(tmp_path / "stack"), "--s3-port", str(ports["s3_port"]), "--mlflow-port"]
    args += [str(ports["mlflow_port"]), "--prefect-port", str(ports["prefect_port"])]
    assert cli_main(["stack", "up", *args]) == 0  # sqlite backend: no PostgreSQL URL given
    try:
        stack = Stack(StackConfig.for_folder(tmp_path / "stack"))
        state = json.loads((tmp_path / "stack" / "stack.json").read_text())
        pids = {n: s["pid"] for n, s in state["services"].items()}
        assert set(pids) == {"s3", "mlflow", "prefect"} and all(alive(p) for p in pids.values())
        assert (tmp_path / "stack" / "mlflow" / "mlflow.db").exists()
        assert oct((tmp_path / "stack" / "credentials.json").stat().st_mode & 0o777) == "0o600"
        # SeaweedFS keeps its socket and its glog files in the stack's folder, not in the system's temp folder.
        assert (tmp_path / "stack" / "s3" / "s3.sock").is_socket()
        assert list((tmp_path / "stack" / "logs").glob("weed.*"))
        assert not Path(f"/tmp/seaweedfs-s3-{ports['s3_port']}.sock").exists()
        # A second up is a no-op: same processes, nothing started.
        started = time.monotonic()
        assert cli_main(["stack", "up", "--data", str(tmp_path / "stack")]) == 0
        assert time.monotonic() - started < 10
        again = json.loads((tmp_path / "stack" / "stack.json").read_text())
        assert {n: s["pid"] for n, s in again["services"].items()} == pids
        assert cli_main(["stack", "status", "--data", str(tmp_path / "stack")]) == 0
        # A port taken by someone else is named, and nothing is started on it.
        other = Stack(StackConfig(data=tmp_path / "other", **{**ports, "s3_port": ports["s3_port"]}))
        with pytest.raises(Exception, match=f"port {ports['s3_port']}.*did not start"):
            other.up()
        assert other.down() == []
        # A foreign process is never stopped by down: only the PIDs up recorded.
        foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert sorted(stack.down()) == ["mlflow", "prefect", "s3"]
        assert foreign.poll() is None and not any(alive(p) for p in pids.values())
        foreign.kill()
        assert cli_main(["stack", "status", "--data", str(tmp_path / "stack")]) == 1
    finally:
        Stack(StackConfig.for_folder(tmp_path / "stack")).down()


def test_a_taken_port_of_a_later_service_refuses_before_anything_starts(tmp_path: Path):
    """The CI failure of 2026-11-29: MLflow's port was taken after S3 had started. Every port is now
    checked before the first server starts, and SeaweedFS's internal ports never take ours."""
    import socket

    from infra.processes import PortTaken

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        s3 = free_port(avoid={taken})
        config = StackConfig(
            data=tmp_path / "stack", s3_port=s3, mlflow_port=taken, prefect_port=free_port(avoid={s3, taken})
        )
        stack = Stack(config)
        with pytest.raises(PortTaken, match=f"mlflow: port {taken} .*did not start") as info:
            stack.up()
        assert (info.value.service, info.value.port) == ("mlflow", taken)
        assert stack.down() == []  # S3 was never started
        assert not (tmp_path / "stack" / "s3").exists()
    # Ports handed out while others are promised but not yet bound never repeat a promised one.
    promised: set[int] = set()
    for _ in range(200):
        port = free_port(avoid=promised)
        assert port not in promised
        promised.add(port)


def test_full_stack_runs_on_postgresql(full_stack: Stack):
    import psycopg2

    from infra.postgres import database_url

    services = full_stack.up()
    assert POSTGRES_URL.startswith("postgresql")
    conn = psycopg2.connect(database_url(POSTGRES_URL, f"{full_stack.config.db_prefix}_mlflow"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'registered_models'")
        assert cur.fetchone()[0] == 1
    conn.close()
    conn = psycopg2.connect(database_url(POSTGRES_URL, f"{full_stack.config.db_prefix}_prefect"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'")
        assert cur.fetchone()[0] == 1
    conn.close()
    assert "--backend-store-uri" in services["mlflow"].command


# -- deployments, worker, watcher ------------------------------------------------------------------


def wait_for_runs(deployment: str, count: int, timeout: float = 300) -> list:
    """Returns the finished flow runs of `deployment` once `count` of them are final (fails on a failed one)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def fetch() -> list:
        async with get_client() as client:
            dep_name = deployment.split("/")[1]
            deps = await client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[dep_name]))
            )
            dep = next(d for d in deps if d.name == dep_name)
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))

    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = asyncio.run(fetch())
        final = [r for r in runs if r.state is not None and r.state.is_final()]
        for r in final:
            assert r.state.is_completed(), f"{deployment} run {r.name} ended {r.state.type}: {r.state.message}"
        if len(final) >= count:
            return final
        time.sleep(1)
    raise TimeoutError(f"{deployment}: {count} finished runs not seen in {timeout} s")


def run_result(flow_run) -> object:
    return flow_run.state.result()


def test_deployments_schedule_watch_and_remerge_through_the_gate(stack_env, full_stack, family3, tmp_path: Path):
    import mlflow
    from prefect.deployments import run_deployment

    root, base, fts = family3
    tracking = stack_env["MLFLOW_TRACKING_URI"]
    v1 = register_finetune(tracking, "ops-finetunes", fts[0], "two")
    v2 = register_finetune(tracking, "ops-finetunes", fts[1], "three")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": f"models:/ops-finetunes/{v1}", "name": "two"},
            {"model": f"models:/ops-finetunes/{v2}", "name": "three"},
        ],
        "parameters": {"lambda": 0.5},
        "evaluation": tasks_section(root),
        "registry": {"model_name": "ops-merged"},
        "watch": {"mlflow_model": "ops-finetunes"},
        "pipeline": {"workdir": str(tmp_path / "work")},
    }
    config_path = tmp_path / "pipeline.yml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **stack_env, "MERGEFLOW_HOME": str(ROOT), "MERGEFLOW_CONFIG": str(config_path)}
    prefect = str(Path(sys.executable).parent / "prefect")
    subprocess.run(
        [prefect, "work-pool", "create", "mergeflow", "--type", "process", "--overwrite"],
        env=env,
        check=True,
        capture_output=True,
    )
    deploy = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    for name in ("scheduled-merge", "remerge-on-finetune", "watch-finetunes"):
        assert f"'{name}'" in deploy.stdout or name in deploy.stdout
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "mergeflow", "--limit", "2"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},  # picks each run up within a second (default: 10 s)
        cwd=ROOT,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # The scheduled deployment, run once now: version 1 becomes champion.
        first = run_deployment("mergeflow-scheduled-merge/scheduled-merge", timeout=600, poll_interval=1)
        assert first.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
        client = mlflow.MlflowClient(tracking_uri=tracking)
        assert client.get_registered_model("ops-merged").aliases == {"champion": "1", "candidate": "1"}
        # The watcher sees only the champion's own inputs: no event.
        watched = run_deployment("mergeflow-watch/watch-finetunes", timeout=300, poll_interval=1)
        assert watched.state.is_completed() and run_result(watched) == []
        # A third fine-tune lands: the watcher announces it once, the trigger starts a re-merge.
        v3 = register_finetune(tracking, "ops-finetunes", fts[2], "four")
        watched = run_deployment("mergeflow-watch/watch-finetunes", timeout=300, poll_interval=1)
        assert run_result(watched) == [{"reference": f"models:/ops-finetunes/{v3}", "name": "four"}]
        remerged = wait_for_runs("mergeflow-remerge/remerge-on-finetune", 1, timeout=600)
        summary = run_result(remerged[0])
        assert summary["skipped"] is False and summary["version"] == "2"
        assert summary["inputs"]["four"] == f"models:/ops-finetunes/{v3}"
        assert set(summary["inputs"]) == {"base", "two", "three", "four"}
        mv = client.get_model_version("ops-merged", "2")
        assert mv.tags["mergeflow.input.four"].startswith(f"models:/ops-finetunes/{v3} sha256:")
        aliases = client.get_registered_model("ops-merged").aliases
        passed = "champion" in summary["aliases"]
        assert aliases["champion"] == ("2" if passed else "1") and aliases["candidate"] == "2"
        assert ("passes" if passed else "fails") in summary["gate"]
        # Watching again announces nothing: the same fine-tune never triggers twice.
        watched = run_deployment("mergeflow-watch/watch-finetunes", timeout=300, poll_interval=1)
        assert run_result(watched) == []
        time.sleep(5)
        assert len(wait_for_runs("mergeflow-remerge/remerge-on-finetune", 1, timeout=30)) == 1
    finally:
        # A graceful stop first; a busy machine can take long to stop a worker, so wait generously
        # and kill the whole process group only when the graceful stop has timed out.
        stop_pid(worker.pid, timeout=120)
        worker.wait(10)
        worker_log.close()


# -- faults -------------------------------------------------------------------------------------------


def test_s3_killed_during_upload_then_restarted(stack_env, full_stack, tmp_path: Path):
    """The publish task retries until the restarted server takes the upload; readers never see a partial model."""
    from prefect import flow

    from flows.merge_pipeline import publish_task
    from merging.pipeline_config import StorageConfig
    from tasks.download import fetch_model
    from tasks.storage import MANIFEST, S3Location, StorageError, list_objects, read_manifest

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(24):  # 24 × 4 MiB: long enough to kill the server in the middle
        (folder / f"part-{i:02d}.bin").write_bytes(os.urandom(4 * 2**20))
    uri = "s3://mergeflow/fault/big"
    storage = StorageConfig(uri=uri, max_attempts=2)
    loc = S3Location.parse(uri)
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # a reader polling all along: a manifest means every file is there and verified
        while not stop.is_set():
            try:
                fetched = fetch_model(uri, storage, cache=tmp_path / f"cache-{len(seen)}")
                seen.append(f"complete:{len([p for p in fetched.path.iterdir() if not p.name.startswith('.')])}")
            except StorageError as exc:
                absent = MANIFEST in str(exc) or "no objects" in str(exc) or "reach the S3" in str(exc)
                seen.append("absent" if absent else f"error:{exc}")
            time.sleep(0.3)

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(list_objects(loc)) >= 2:
                    break
            except StorageError:
                pass
            time.sleep(0.05)
        full_stack.stop_service("s3")
        seen.append("killed")
        time.sleep(3)
        full_stack.up()
        seen.append("restarted")

    @flow(name="publish-under-fault")
    def publish_flow() -> str:
        return publish_task(folder, uri, storage)

    threads = [threading.Thread(target=reader), threading.Thread(target=killer)]
    for t in threads:
        t.start()
    published = publish_flow()
    threads[1].join()
    time.sleep(1)
    stop.set()
    threads[0].join()
    assert published == uri and "killed" in seen and "restarted" in seen
    complete = [s for s in seen if s.startswith("complete")]
    assert all(s == "complete:24" for s in complete)  # never a partial model
    assert not [s for s in seen if s.startswith("error:")], sorted(set(seen))
    assert "absent" in seen  # the reader did look while the upload was under way
    manifest = read_manifest(loc)
    assert manifest is not None and len(manifest["files"]) == 24
    final = fetch_model(uri, storage, cache=tmp_path / "cache-final")  # every file's sha256 checked
    for name in manifest["files"]:
        assert (final.path / name).read_bytes() == (folder / name).read_bytes()


def test_mlflow_down_fails_before_merging_then_rerun_registers(stack_env, full_stack, family3, tmp_path: Path):
    import mlflow

    from flows.merge_pipeline import run_pipeline
    from merging.config import parse_config
    from merging.errors import MergeflowError

    root, base, fts = family3
    tracking = stack_env["MLFLOW_TRACKING_URI"]
    data = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],
        "parameters": {"density": 0.5},
        "evaluation": tasks_section(root),
        "registry": {"model_name": "ops-mlflow-down", "tracking_uri": tracking},
        "storage": {"uri": "s3://mergeflow/ops-mlflow-down"},
        "pipeline": {"workdir": str(tmp_path / "work")},
    }
    full_stack.stop_service("mlflow")
    try:
        started = time.monotonic()
        with pytest.raises(MergeflowError, match=r"MLflow at .* cannot be reached.*nothing was merged"):
            run_pipeline(parse_config(data, "ops.yml"))
        failed_after = time.monotonic() - started
    finally:
        full_stack.up()
    # Checked before anything was downloaded or merged (it used to surface after merge, evaluate
    # and publish, minutes later): no merged folder, no published model.
    assert not (tmp_path / "work" / "merged").exists()
    assert failed_after < 120, failed_after
    client = mlflow.MlflowClient(tracking_uri=tracking)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model("ops-mlflow-down")  # nothing registered, no alias anywhere
    again = run_pipeline(parse_config(data, "ops.yml"))
    assert again.layers_merged
    assert again.registration is not None and again.registration.version == "1"
    assert client.get_registered_model("ops-mlflow-down").aliases == {"champion": "1", "candidate": "1"}


# -- load ---------------------------------------------------------------------------------------------


def test_twenty_concurrent_runs_all_register_intact_models(stack_env, full_stack, family3, tmp_path: Path):
    import hashlib

    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.merge_pipeline import run_pipeline
    from merging.config import parse_config

    root, base, fts = family3
    tracking = stack_env["MLFLOW_TRACKING_URI"]
    runs = 20
    results: dict[int, object] = {}
    errors: dict[int, BaseException] = {}

    def one(i: int) -> None:
        data = {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],
            "parameters": {"lambda": round(0.05 * (i + 1), 2)},  # 20 different merges
            "evaluation": tasks_section(root),  # each version gets the gate's metric
            "registry": {"model_name": "ops-load", "tracking_uri": tracking},
            "storage": {"uri": "s3://mergeflow/ops-load"},
            "pipeline": {"workdir": str(tmp_path / f"work-{i}"), "max_workers": 1},
        }
        try:
            # Prefect's settings context is per thread: point each thread at the stack's server.
            with temporary_settings({PREFECT_API_URL: stack_env["PREFECT_API_URL"]}):
                results[i] = run_pipeline(parse_config(data, f"load-{i}.yml"))
        except BaseException as exc:  # collected and reported below
            errors[i] = exc

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert not errors, {i: repr(e) for i, e in errors.items()}
    client = mlflow.MlflowClient(tracking_uri=tracking)
    versions = client.search_model_versions("name='ops-load'")
    assert sorted(int(v.version) for v in versions) == list(range(1, runs + 1))
    keys = {v.tags["mergeflow.merge_key"] for v in versions}
    assert keys == {r.merge_key for r in results.values()}  # one version per run, none lost or mixed
    for v in versions:
        local = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/ops-load/{v.version}", dst_path=str(tmp_path / f"dl-{v.version}")
            )
        )
        manifest = json.loads((local / "mergeflow-manifest.json").read_text())
        for name, entry in manifest["files"].items():
            assert hashlib.sha256((local / name).read_bytes()).hexdigest() == entry["sha256"], (v.version, name)
        run = next(r for r in results.values() if r.merge_key == v.tags["mergeflow.merge_key"])
        assert run.registration.version == str(v.version)
    # Promotion is serialized: every run compared against the champion of its time, so the champion
    # is the best version, and every promotion beat the champion it saw (racing runs compared
    # against a stale one, and one failed moving the alias on PostgreSQL).
    gate = "mergeflow.metric.average_normalized"
    champion = client.get_model_version_by_alias("ops-load", "champion")
    assert all(gate in (v.tags or {}) for v in versions)
    best = max(float(v.tags[gate]) for v in versions)
    assert float(champion.tags[gate]) == best, (champion.version, best)
    promoted = sorted(
        (int(r.registration.version), r.metrics["average_normalized"])
        for r in results.values()
        if "champion" in r.registration.aliases
    )
    values = [v for _, v in promoted]
    assert values == sorted(values), promoted  # in registration order, each promotion was no worse
    (tmp_path / "load.json").write_text(json.dumps({"runs": runs, "seconds": elapsed}))
    print(f"\n{runs} concurrent runs finished in {elapsed:.1f} s")


# -- past one machine ---------------------------------------------------------------------------------


def test_dask_runner_on_two_worker_processes_matches_threads(stack_env, full_stack, family3, tmp_path: Path):
    """Inputs and output through S3; the mapped per-layer merge on a local Dask cluster of 2 processes."""
    from flows.merge_pipeline import run_pipeline
    from merging.config import parse_config
    from tasks.download import fetch_model
    from tasks.storage import publish
    from tests.test_staged import folder_bytes

    _, base, fts = family3
    for name, folder in (("base", base), ("two", fts[0]), ("three", fts[1])):
        publish(folder, f"s3://mergeflow/dask-inputs/{name}")

    def config(runner: str) -> object:
        data = {
            "merge_method": "neuromerging",
            "base_model": "s3://mergeflow/dask-inputs/base",
            "models": [
                {"model": "s3://mergeflow/dask-inputs/two", "name": "two"},
                {"model": "s3://mergeflow/dask-inputs/three", "name": "three"},
            ],
            "storage": {"uri": "s3://mergeflow/dask-out"},
            "pipeline": {"workdir": str(tmp_path / runner), "runner": runner, "max_workers": 2},
        }
        return parse_config(data, f"{runner}.yml")

    threads = run_pipeline(config("threads"))
    # Same downloads, but no cached layers: the dask run really merges every layer on its workers.
    import shutil

    from merging.engine.staged import layer_cache

    shutil.rmtree(layer_cache())
    dask = run_pipeline(config("dask"))
    assert dask.layers_merged and not dask.layers_reused
    assert dask.merge_key == threads.merge_key
    assert folder_bytes(dask.merged_dir) == folder_bytes(threads.merged_dir)
    pulled = fetch_model(dask.published, cache=tmp_path / "pull")
    assert {n: b for n, b in folder_bytes(pulled.path).items() if not n.startswith(".")} == folder_bytes(
        dask.merged_dir
    )


def test_prefect_server_accepts_the_kubernetes_work_pool_template(stack_env):
    """The Prefect server validates the base job template (placeholders declared, variables a JSON schema)."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "infra" / "k8s" / "work-pool-job-template.json").read_text())

    async def create() -> object:
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name="mergeflow-k8s", type="kubernetes", base_job_template=template), overwrite=True
            )
            return await client.read_work_pool("mergeflow-k8s")

    pool = asyncio.run(create())
    assert pool.base_job_template["variables"]["properties"]["image"]["default"] == "mergeflow:0.1.0"
    broken = json.loads(json.dumps(template))
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] = "{{ nope }}"
    del broken["variables"]["properties"]["image"]

    async def create_broken() -> None:
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name="mergeflow-k8s-broken", type="kubernetes", base_job_template=broken)
            )

    with pytest.raises(Exception, match=r"nope|image|placeholder|variable"):
        asyncio.run(create_broken())


def test_watcher_on_an_s3_prefix_sees_only_published_folders_once(stack_env, family3, tmp_path: Path):
    from prefect.variables import Variable

    from flows.watch import digest, watch_finetunes
    from tasks.storage import MANIFEST, S3Location, publish, s3_client

    _, base, fts = family3
    publish(fts[0], "s3://mergeflow/landing/ft-two")
    publish(fts[1], "s3://mergeflow/landing/ft-three")
    loc = S3Location.parse("s3://mergeflow/landing/ft-three")
    s3_client().delete_object(Bucket=loc.bucket, Key=loc.key(MANIFEST))  # still uploading, as far as readers know
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(fts[2]), "name": "four"}],
        "registry": {"model_name": "ops-s3-watch", "tracking_uri": stack_env["MLFLOW_TRACKING_URI"]},
        "watch": {"s3_prefix": "s3://mergeflow/landing"},
    }
    path = tmp_path / "watch.yml"
    path.write_text(yaml.safe_dump(config))
    assert watch_finetunes(str(path)) == [{"reference": "s3://mergeflow/landing/ft-two", "name": "ft-two"}]
    assert watch_finetunes(str(path)) == []  # seen: never announced twice
    publish(fts[1], "s3://mergeflow/landing/ft-three")  # the upload finishes
    assert watch_finetunes(str(path)) == [{"reference": "s3://mergeflow/landing/ft-three", "name": "ft-three"}]
    seen = Variable.get("mergeflow-watch-ops-s3-watch")
    assert seen == [digest("s3://mergeflow/landing/ft-two"), digest("s3://mergeflow/landing/ft-three")]
