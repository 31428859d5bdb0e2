"""The pipeline against real servers on 127.0.0.1: SeaweedFS S3 and an `mlflow server` whose artifacts go to it.

No mocks: boto3 talks HTTP to `weed mini`, MLflow talks HTTP to its server, Prefect runs in its test harness.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import boto3
import pytest

from flows.merge_pipeline import run_pipeline
from merging.config import parse_config
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import MergeflowError
from merging.pipeline_config import StorageConfig
from merging.zoo import zoo_merge_config
from tasks.download import fetch_model
from tasks.storage import (
    MANIFEST,
    CredentialsError,
    IntegrityError,
    S3Location,
    StorageError,
    publish,
    read_manifest,
)
from tests.helpers import build_tiny_tasks
from tests.servers import ACCESS_KEY, SECRET_KEY
from tests.test_pipeline import pipeline_config
from tests.test_staged import folder_bytes


@pytest.fixture(scope="module")
def stack(full_stack):
    services = full_stack.up()  # running (a fault test may have restarted one)
    return services["s3"], services["mlflow"]


@pytest.fixture
def s3_env(stack, monkeypatch: pytest.MonkeyPatch):
    s3, _ = stack
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT_URL", s3.url)
    return s3


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stack-family")
    base, fts, _ = build_tiny_tasks(root)
    return root, base, fts


def client(s3) -> object:
    return boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def count_objects(s3, bucket: str, prefix: str) -> int:
    c = client(s3)
    try:
        return int(c.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0))
    except c.exceptions.NoSuchBucket:
        return 0


def all_objects(s3) -> dict[tuple[str, str], tuple[int, str]]:
    """Returns every object in every bucket: (bucket, key) → (size, ETag)."""
    c = client(s3)
    out = {}
    for bucket in c.list_buckets()["Buckets"]:
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                out[(bucket["Name"], obj["Key"])] = (int(obj["Size"]), obj["ETag"])
    return out


def written_between(before: dict, after: dict) -> int:
    """Returns the bytes of the objects that are new or changed in `after`."""
    return sum(size for k, (size, etag) in after.items() if before.get(k, (None, None))[1] != etag)


def test_publish_then_download_from_s3_verified_and_shared(s3_env, family, tmp_path: Path):
    _, base, _ = family
    manifest = publish(base, "s3://models/tiny/base")
    # Every object carries its sha256; the manifest was written (and is listed) with every file.
    c = client(s3_env)
    head = c.head_object(Bucket="models", Key="tiny/base/model.safetensors")
    assert head["Metadata"]["sha256"] == manifest["files"]["model.safetensors"]["sha256"]
    # Two downloads of the same model at once: one fetch, both get the same verified folder.
    results = []

    def fetch() -> None:
        results.append(fetch_model("s3://models/tiny/base", cache=tmp_path / "cache"))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].path == results[1].path
    assert sorted(r.reused for r in results) == [False, True]
    for name in manifest["files"]:
        assert (results[0].path / name).read_bytes() == (base / name).read_bytes()


def test_a_mergeflow_upload_without_its_manifest_is_never_read(s3_env, family, tmp_path: Path):
    _, base, _ = family
    publish(base, "s3://models/tiny/unfinished")
    c = client(s3_env)
    c.delete_object(Bucket="models", Key=f"tiny/unfinished/{MANIFEST}")  # as if the upload had not finished
    with pytest.raises(StorageError, match=r"mergeflow upload without its mergeflow-manifest\.json"):
        fetch_model("s3://models/tiny/unfinished", cache=tmp_path / "cache")
    # A folder uploaded by other tools (no manifest, no mergeflow mark) is still read, hashed on arrival.
    for path in base.iterdir():
        c.upload_file(str(path), "models", f"tiny/foreign/{path.name}")
    fetched = fetch_model("s3://models/tiny/foreign", cache=tmp_path / "cache")
    assert (fetched.path / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_corrupted_object_is_detected_by_its_hash(s3_env, family, tmp_path: Path):
    _, base, _ = family
    publish(base, "s3://models/tiny/corrupt")
    c = client(s3_env)
    body = bytearray(c.get_object(Bucket="models", Key="tiny/corrupt/model.safetensors")["Body"].read())
    body[-8] ^= 0x5A  # same size, different content
    c.put_object(Bucket="models", Key="tiny/corrupt/model.safetensors", Body=bytes(body))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 .* does not match"):
        fetch_model("s3://models/tiny/corrupt", cache=tmp_path / "cache")
    snapshots = tmp_path / "cache" / "models" / "snapshots"
    assert not [p for p in snapshots.iterdir() if not p.name.startswith(".")]


def test_wrong_credentials_clear_error_and_nothing_uploaded(
    s3_env, family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _, base, _ = family
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(CredentialsError, match="refused the credentials") as info:
        publish(base, "s3://models/tiny/wrong-keys", StorageConfig(uri="s3://models/tiny/wrong-keys", max_attempts=1))
    assert "not-the-secret" not in str(info.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    assert count_objects(s3_env, "models", "tiny/wrong-keys/") == 0
    assert read_manifest(S3Location.parse("s3://models/tiny/wrong-keys"), missing_ok=True) is None


def test_credentials_from_a_prefect_secret_block(prefect_harness, s3_env, family, monkeypatch: pytest.MonkeyPatch):
    from prefect.blocks.system import Secret

    _, base, _ = family
    Secret(value={"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}).save(
        "mergeflow-s3", overwrite=True
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = StorageConfig(uri="s3://models/tiny/block", credentials_block="mergeflow-s3")
    publish(base, config.uri, config)
    assert read_manifest(S3Location.parse(config.uri), config) is not None
    missing = StorageConfig(uri="s3://models/tiny/block", credentials_block="no-such-block")
    with pytest.raises(StorageError, match="no Prefect Secret block 'no-such-block'"):
        publish(base, missing.uri, missing)


def test_pipeline_on_the_servers(prefect_harness, stack, s3_env, ci_zoo, tmp_path: Path):
    s3, mlflow_server = stack
    zoo, manifest = ci_zoo
    # Inputs from S3 and from a local folder: the zoo's base and first fine-tune are published to S3 first.
    first_task = manifest.merge_tasks()[0]
    publish(zoo / manifest.base.path, "s3://models/zoo/base")
    publish(zoo / first_task.finetune.path, f"s3://models/zoo/{first_task.name}")
    config = zoo_merge_config(zoo, "task_arithmetic", {"lambda": 0.3}, manifest)
    data = config.model_dump(mode="json", exclude_none=True)
    data["base_model"] = "s3://models/zoo/base"
    data["models"][0] = {"model": f"s3://models/zoo/{first_task.name}", "name": first_task.name}
    data["evaluation"] = {"zoo": str(zoo)}
    data["registry"] = {"model_name": "zoo-stack", "tracking_uri": mlflow_server.url}
    data["storage"] = {"uri": "s3://merged/zoo"}
    data["pipeline"] = {"workdir": str(tmp_path / "work")}
    before = all_objects(s3)
    first = run_pipeline(parse_config(data, "stack.yml"))
    assert first.registration is not None and first.registration.aliases == ["candidate", "champion"]
    # One copy of the weights per version: what the run wrote to object storage (the published folder
    # and every MLflow artifact, both in this S3) is at most 1.1x the model's size.
    model_bytes = sum(p.stat().st_size for p in first.merged_dir.rglob("*") if p.is_file())
    written = written_between(before, all_objects(s3))
    print(f"object storage writes of one run: {written} bytes for a {model_bytes}-byte model")
    assert model_bytes <= written <= 1.1 * model_bytes, (written, model_bytes)
    assert first.inputs["base"]["kind"] == "s3" and first.inputs[first_task.name]["kind"] == "s3"
    # The merged weights equal the ones merged from the local folders.
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    weights = "model.safetensors"
    assert (tmp_path / "one" / weights).read_bytes() == (first.merged_dir / weights).read_bytes()
    assert (tmp_path / "one" / "heads").is_dir() and folder_bytes(tmp_path / "one" / "heads") == folder_bytes(
        first.merged_dir / "heads"
    )
    # Published to S3 with its manifest; readable back through the pipeline's own download.
    loc = S3Location.parse(first.published or "")
    assert client(s3).head_object(Bucket=loc.bucket, Key=loc.key(MANIFEST))
    back = fetch_model(first.published or "", cache=tmp_path / "cache")
    assert (back.path / weights).read_bytes() == (first.merged_dir / weights).read_bytes()

    # models:/name@champion: loaded and predicting, and usable as a merge input.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model("models:/zoo-stack@champion")
    task = sorted(p.stem for p in (first.merged_dir / "heads").glob("*.safetensors"))[0]
    out = model.predict(pd.DataFrame({"task": [task, task], "text": ["a wonderful day", "terrible news"]}))
    assert list(out["task"]) == [task, task] and all(0 <= s <= 1 for s in out["score"])
    fetched = fetch_model("models:/zoo-stack@champion", tracking_uri=mlflow_server.url, cache=tmp_path / "cache")
    assert fetched.kind == "mlflow" and fetched.detail["version"] == "1" and fetched.detail["manifest"] == "yes"
    assert (fetched.path / "config.json").exists() and list(fetched.path.glob("*.safetensors"))
    assert fetched.detail["weights"] == first.published  # the registered version's one copy
    # Its answers equal the classifier built from the local merged folder.
    from tasks.classifier_model import save_classifier_model

    local_model = tmp_path / "local-classifier"
    save_classifier_model(first.merged_dir, local_model, {})
    frame = pd.DataFrame({"task": [task, task], "text": ["a wonderful day", "terrible news"]})
    expected = mlflow.pyfunc.load_model(str(local_model)).predict(frame)
    assert list(out["label_index"]) == list(expected["label_index"])
    assert [round(x, 6) for x in out["score"]] == [round(x, 6) for x in expected["score"]]

    # A second, worse merge (λ far too large): registered as candidate; the gate keeps champion.
    worse = dict(data, parameters={"lambda": 3.0})
    second = run_pipeline(parse_config(worse, "stack.yml"))
    reg = second.registration
    assert second.metrics["average_normalized"] < first.metrics["average_normalized"]
    assert reg is not None and reg.aliases == ["candidate"] and not reg.gate_passed
    c = mlflow.MlflowClient(mlflow_server.url)
    assert {a: str(v) for a, v in c.get_registered_model("zoo-stack").aliases.items()} == {
        "candidate": "2",
        "champion": "1",
    }

    # Someone with write access to the bucket replaces a head of the published champion, manifest
    # and object metadata included: the registered version refuses to load it.
    from tasks.published_weights import PublishedWeightsError

    head = next(iter(sorted(p.name for p in (first.merged_dir / "heads").glob("*.safetensors"))))
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(first.merged_dir, altered)
    blob = bytearray((altered / "heads" / head).read_bytes())
    blob[-4] ^= 0x5A
    (altered / "heads" / head).write_bytes(bytes(blob))
    publish(altered, first.published or "")
    with pytest.raises(PublishedWeightsError, match="differ from what was registered"):
        mlflow.pyfunc.load_model("models:/zoo-stack@champion")
    with pytest.raises(PublishedWeightsError, match="differ from what was registered"):
        fetch_model("models:/zoo-stack@champion", tracking_uri=mlflow_server.url, cache=tmp_path / "cache2")


def test_killed_run_on_the_servers_then_rerun(prefect_harness, stack, s3_env, family, tmp_path: Path, monkeypatch):
    s3, mlflow_server = stack
    root, base, fts = family
    work = tmp_path / "work"
    data = pipeline_config(root, base, fts, work, merge_method="neuromerging", parameters={})
    data["registry"] = {"model_name": "tiny-killed", "tracking_uri": mlflow_server.url}
    data["storage"] = {"uri": "s3://merged/killed"}
    # A layer cache of its own: another test may already have merged these same inputs.
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEFLOW_FAULT_LAYER", "encoder.layer.0")
    with pytest.raises(MergeflowError, match="injected fault"):
        run_pipeline(parse_config(data, "stack.yml"))
    import mlflow

    c = mlflow.MlflowClient(mlflow_server.url)
    assert not c.search_model_versions("name='tiny-killed'")
    assert count_objects(s3, "merged", "killed/") == 0
    monkeypatch.delenv("MERGEFLOW_FAULT_LAYER")
    result = run_pipeline(parse_config(data, "stack.yml"))
    assert "encoder.layer.0" in result.layers_merged and result.layers_reused
    run_merge(parse_config(data, "stack.yml"), tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(result.merged_dir) == folder_bytes(tmp_path / "one")
    assert result.registration is not None and result.registration.aliases == ["candidate", "champion"]
    manifest = json.loads(
        client(s3)
        .get_object(Bucket="merged", Key=f"{S3Location.parse(result.published or '').prefix}/{MANIFEST}")["Body"]
        .read()
    )
    assert set(manifest["files"]) == set(folder_bytes(result.merged_dir))


# -- a published model is untrusted input ------------------------------------------------------------


def _tamper_manifest(s3, prefix: str, edit) -> None:
    c = client(s3)
    key = f"{prefix}/{MANIFEST}"
    manifest = json.loads(c.get_object(Bucket="models", Key=key)["Body"].read())
    edit(manifest["files"])
    c.put_object(Bucket="models", Key=key, Body=json.dumps(manifest).encode())


@pytest.mark.parametrize(
    "name",
    ["a/../../../../victim.txt", "/tmp/victim.txt", "x/./../victim.txt", "ok\nname", "..", "a\\..\\victim.txt"],
)
def test_manifest_file_name_that_leaves_the_snapshot_is_refused(s3_env, family, tmp_path: Path, name):
    from merging.untrusted import UnsafeInputError

    _, base, _ = family
    prefix = f"tiny/traversal-{abs(hash(name))}"
    publish(base, f"s3://models/{prefix}")
    c = client(s3_env)
    c.put_object(Bucket="models", Key=f"{prefix}/evil.txt", Body=b"written by a stranger")
    import hashlib

    digest = hashlib.sha256(b"written by a stranger").hexdigest()
    _tamper_manifest(s3_env, prefix, lambda f: f.__setitem__(name, {"size": 21, "sha256": digest}))
    with pytest.raises(UnsafeInputError, match="files"):
        fetch_model(f"s3://models/{prefix}", cache=tmp_path / "cache" / "deep" / "er")
    assert not list(tmp_path.rglob("victim.txt"))


def test_manifest_sha256_used_as_a_path_is_refused(s3_env, family, tmp_path: Path):
    from merging.untrusted import UnsafeInputError

    _, base, _ = family
    secret = tmp_path / "local-secret.txt"
    secret.write_text("LOCAL SECRET")
    publish(base, "s3://models/tiny/blobpath")
    relative = f"../../{'../' * 12}{secret}"
    _tamper_manifest(
        s3_env, "tiny/blobpath", lambda f: f.__setitem__("tokenizer.json", {"size": 12, "sha256": relative})
    )
    with pytest.raises(UnsafeInputError, match="sha256 must be 64 lowercase hex digits"):
        fetch_model("s3://models/tiny/blobpath", cache=tmp_path / "cache")


def test_manifest_entry_of_the_wrong_type_is_a_clear_error_that_is_never_retried(s3_env, family, tmp_path: Path):
    from tasks.storage import is_transient

    _, base, _ = family
    publish(base, "s3://models/tiny/badtype")
    _tamper_manifest(s3_env, "tiny/badtype", lambda f: f.__setitem__("model.safetensors", ["not", "an", "object"]))
    with pytest.raises(MergeflowError, match="expected an object with size and sha256") as raised:
        fetch_model("s3://models/tiny/badtype", cache=tmp_path / "cache")
    assert not is_transient(raised.value)


def test_secrets_never_reach_what_the_pipeline_writes(prefect_harness, stack, family, tmp_path: Path, monkeypatch):
    """Distinct fake secrets in the environment, URIs and a Prefect Secret block; all the run wrote is searched."""
    import uuid

    import mlflow

    s3, mlflow_server = stack
    root, base, fts = family
    env_secret = f"env-secret-{uuid.uuid4().hex}"
    uri_password = f"uri-password-{uuid.uuid4().hex}"
    monkeypatch.setenv("MERGEFLOW_SOME_TOKEN", env_secret)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    host = mlflow_server.url.split("://", 1)[1]
    s3_host = s3.url.split("://", 1)[1]
    data = pipeline_config(root, base, fts, tmp_path / "work")
    data["registry"] = {"model_name": "secret-check", "tracking_uri": f"http://tracker:{uri_password}@{host}"}
    data["storage"] = {
        "uri": "s3://merged/secret-check",
        "endpoint_url": f"http://{ACCESS_KEY}:{SECRET_KEY}@{s3_host}",
        "credentials_block": "secret-check-keys",
    }
    from prefect.blocks.system import Secret

    block_secret = f"block-secret-{uuid.uuid4().hex}"
    keys = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, "comment": block_secret}
    Secret(value=json.dumps(keys)).save("secret-check-keys", overwrite=True)
    from datetime import UTC, datetime

    started = datetime.now(UTC)
    result = run_pipeline(parse_config(data, "secrets.yml"))
    assert result.registration is not None
    secrets = [env_secret, uri_password, SECRET_KEY, block_secret]
    # Everything written locally: the work folder (merged model, card, config, results, logs).
    found = []
    for path in (tmp_path / "work").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            found += [(str(path), s) for s in secrets if s.encode() in blob]
    # The published copy and the registered model's artifacts, downloaded back.
    storage = StorageConfig(uri="s3://merged", endpoint_url=s3.url)
    published = fetch_model(result.published or "", storage=storage, cache=tmp_path / "cache")
    artifacts = Path(
        mlflow.artifacts.download_artifacts(
            run_id=result.registration.run_id, dst_path=str(tmp_path / "artifacts"), tracking_uri=mlflow_server.url
        )
    )
    for root in (published.path, artifacts):
        for path in root.rglob("*"):
            if path.is_file():
                found += [(str(path), s) for s in secrets if s.encode() in path.read_bytes()]
    # MLflow's records: params, tags, the version's tags; Prefect's: the flow run's parameters and logs.
    client = mlflow.MlflowClient(mlflow_server.url)
    run = client.get_run(result.registration.run_id)
    version = client.get_model_version("secret-check", result.registration.version)
    records = json.dumps([run.data.params, run.data.tags, version.tags, version.description or ""])
    # Every page of what Prefect recorded since the run started (the harness serves the whole test session,
    # and its server returns at most 200 rows a request).
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        LogFilter,
        LogFilterTimestamp,
    )

    def every_page(read) -> list:  # type: ignore[no-untyped-def]
        rows, offset = [], 0
        while page := read(offset):
            rows += page
            offset += len(page)
        return rows

    with get_client(sync_client=True) as pc:
        since = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=started))
        flow_runs = every_page(lambda at: pc.read_flow_runs(flow_run_filter=since, limit=200, offset=at))
        logs = every_page(
            lambda at: pc.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=started)), limit=200, offset=at)
        )
    assert flow_runs and logs, "the run left no flow run or log to search"
    records += json.dumps([fr.parameters for fr in flow_runs], default=str)
    records += json.dumps([log.message for log in logs], default=str)
    found += [("records", s) for s in secrets if s in records]
    # Prefect's database file itself (the harness's sqlite): the block is stored there encrypted.
    from prefect.settings import get_current_settings

    db_url = str(get_current_settings().server.database.connection_url.get_secret_value())
    db_file = Path(db_url.split("///", 1)[1]) if "sqlite" in db_url else None
    assert db_file is not None and db_file.exists(), db_url
    for path in db_file.parent.glob(db_file.name + "*"):  # the database and its WAL
        found += [(str(path), s) for s in secrets if s.encode() in path.read_bytes()]
    assert "***@" in records or "tracker" not in records
    assert not found, found
