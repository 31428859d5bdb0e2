"""Download step: a model reference becomes a verified local folder in a content-addressed cache.

References: a local folder (used in place), `s3://bucket/prefix`, an MLflow model URI
(`models:/name@alias`, `models:/name/3`, `runs:/<run id>/path`), or a Hugging Face repo id
(`org/name` or `org/name@revision`). Every fetched file is stored once under
`<cache>/blobs/<sha256>` and linked into `<cache>/snapshots/<key>/`, whose record is written last;
a file lock per snapshot makes two runs fetching the same model at once do the work once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from prefect import task

from merging.errors import CheckpointError, ConfigError, MergeflowError
from merging.io.checkpoint import file_sha256
from merging.io.writer import remove_stale_temporaries
from merging.pipeline_config import StorageConfig
from merging.untrusted import file_entries, inside, relative_name, sha256_hex
from tasks.published_weights import REFERENCE
from tasks.snapshots import SNAPSHOT_RECORD, FetchedModel, Snapshots, from_snapshot
from tasks.storage import (
    MANIFEST,
    PUBLISHED_MARK,
    IntegrityError,
    S3Location,
    StorageError,
    download_file,
    is_transient,
    list_objects,
    read_manifest,
    retry_transient,
    s3_client,
)

HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "tokenizer*", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def reference_kind(ref: str) -> str:
    """Returns how a reference is fetched: local, s3, mlflow or hub."""
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith(("models:/", "runs:/")):
        return "mlflow"
    if "://" in ref:
        raise ConfigError(
            f"model reference {ref!r}: unsupported scheme (use a local folder, s3://, models:/, runs:/ or a hub id)"
        )
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        return "local"
    return "hub"


def fetch_model(
    ref: str,
    storage: StorageConfig | None = None,
    tracking_uri: str | None = None,
    cache: Path | None = None,
) -> FetchedModel:
    """Returns the model at `ref` as a verified local folder (fetched once, then reused)."""
    kind = reference_kind(ref)
    if kind == "local":
        path = Path(ref).expanduser().resolve()
        if not path.exists():
            raise CheckpointError(f"model reference {ref!r}: local path {path} does not exist")
        return FetchedModel(ref, "local", path)
    store = Snapshots(cache)
    if kind == "s3":
        return _fetch_s3(ref, store, storage)
    if kind == "mlflow":
        return _fetch_mlflow(ref, store, tracking_uri)
    return _fetch_hub(ref, store)


def _fetch_s3(ref: str, store: Snapshots, storage: StorageConfig | None) -> FetchedModel:
    loc = S3Location.parse(ref)
    client = s3_client(storage)
    manifest = read_manifest(loc, storage, client=client, missing_ok=True)
    if manifest is not None:
        expected = file_entries(manifest["files"], f"{ref}/{MANIFEST}")
    else:
        listing = list_objects(loc, storage, client=client)
        if not listing:
            raise StorageError(f"{ref}: no objects under this prefix")
        expected = {}
        for name, size in listing.items():
            relative_name(name, f"{ref}: object key")
            meta = client.head_object(Bucket=loc.bucket, Key=loc.key(name)).get("Metadata", {})
            if meta.get("mergeflow") == PUBLISHED_MARK:
                # Published by mergeflow, yet no manifest: an upload still running (or one that failed).
                raise StorageError(
                    f"{ref}: a mergeflow upload without its {MANIFEST} (not finished, or failed); not read"
                )
            recorded = meta.get("sha256", "")
            expected[name] = (size, sha256_hex(recorded, f"{ref}/{name}: sha256 metadata") if recorded else "")
    identity = "s3\0" + ref + "\0" + json.dumps(sorted(expected.items()))
    key = store.key(identity)
    with store.lock(key):
        found = store.find(key)
        if found:
            return from_snapshot(ref, "s3", *found, reused=True)
        files = {}
        for name, (size, sha) in expected.items():
            if sha and store.has_blob(sha, size):
                files[name] = sha
                continue
            tmp = store.blobs / f".{uuid.uuid4().hex}.part"
            digest = download_file(loc, name, tmp, size, sha or None, storage, client)
            files[name] = store.add_blob(tmp, digest)
        detail = {"manifest": "yes" if manifest is not None else "no (hashes from object metadata or computed)"}
        folder = store.publish(key, files, {"reference": ref, "kind": "s3", "detail": detail})
        return from_snapshot(ref, "s3", folder, json.loads((folder / SNAPSHOT_RECORD).read_text()), reused=False)


def resolve_mlflow(ref: str, tracking_uri: str | None) -> tuple[str, dict[str, str]]:
    """Returns (an immutable artifact URI, details) for a `models:/` or `runs:/` reference."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/") :].split("/", 1)[0]
        return ref, {"run_id": run_id}
    body = ref[len("models:/") :]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.partition("/")
            if not version.isdigit():
                raise ConfigError(f"{ref!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        where = tracking_uri or "the default tracking URI"
        raise MergeflowError(f"{ref}: not found in the MLflow registry at {where} ({exc.error_code})") from None
    return f"models:/{mv.name}/{mv.version}", {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id or ""}


def _hf_folder(root: Path) -> Path:
    """Returns the folder inside downloaded MLflow artifacts that holds the weights and config.json."""
    candidates = [p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not candidates:
        candidates = [p.parent for p in root.rglob("*.safetensors")]
    if not candidates:
        raise CheckpointError(f"{root}: the MLflow model holds no safetensors weights")
    return min(candidates, key=lambda p: len(p.parts))


def _recorded_files(manifest_file: Path | None, ref: str) -> dict[str, tuple[int, str]]:
    """Returns the validated {name: (size, sha256)} of a logged model's manifest ({} when it has none)."""
    if manifest_file is None:
        return {}
    try:
        data = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{ref}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{ref}: {MANIFEST} is not a JSON object")
    return file_entries(data.get("files"), f"{ref}/{MANIFEST}")


def _fetch_mlflow(ref: str, store: Snapshots, tracking_uri: str | None) -> FetchedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    artifact_uri, detail = resolve_mlflow(ref, tracking_uri)
    key = store.key(f"mlflow\0{tracking_uri}\0{artifact_uri}")
    with store.lock(key):
        found = store.find(key)
        if found:
            return from_snapshot(ref, "mlflow", *found, reused=True)
        downloads = store.root / "mlflow-download"
        remove_stale_temporaries(downloads)  # what a killed run left (its process is gone)
        with tempfile.TemporaryDirectory(dir=store.root, prefix=f".{downloads.name}.tmp-{os.getpid()}-") as tmp:
            try:  # the URI is passed, never set process-wide (a later run must not inherit it)
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
                    )
                )
            except MlflowException as exc:
                if is_transient(exc):
                    raise
                raise MergeflowError(f"{ref}: cannot download the model's artifacts ({exc.error_code})") from None
            manifests = sorted(local.rglob(MANIFEST), key=lambda p: len(p.parts))
            manifest_file = manifests[0] if manifests else None  # the logged model's own, at its root
            recorded = _recorded_files(manifest_file, ref)
            reference = next(iter(sorted(local.rglob(REFERENCE), key=lambda p: len(p.parts))), None)
            if reference is not None:  # one copy per version: the weights are the published folder
                return _fetch_referenced(ref, store, reference, manifest_file, recorded, detail)
            weights = _hf_folder(local)
            chosen = {p.relative_to(weights).as_posix(): p for p in weights.rglob("*") if p.is_file()}
            for name, path in chosen.items():
                inside(local, path, f"{ref}: artifact {name}")
            tok = next((p for p in local.rglob("components/tokenizer") if p.is_dir()), None)
            if tok is not None:  # the transformers flavor keeps the tokenizer apart from the weights
                for p in tok.iterdir():
                    if p.is_file() and p.name not in chosen:
                        chosen[p.name] = p
            files = {}
            for name, path in chosen.items():
                digest = file_sha256(path)
                if recorded:  # the manifest names files relative to the logged model's root, where it lies
                    assert manifest_file is not None
                    logged = path.relative_to(manifest_file.parent).as_posix()
                    want = recorded.get(logged)
                    if want is None:
                        raise IntegrityError(f"{ref}: file {logged} is not in the {MANIFEST} written at logging")
                    if want[1] != digest or want[0] != path.stat().st_size:
                        raise IntegrityError(
                            f"{ref}: file {logged} does not match the sha256 recorded when it was logged"
                        )
                files[name] = store.add_blob(path, digest)
            detail["manifest"] = "yes" if recorded else "no"
            folder = store.publish(key, files, {"reference": ref, "kind": "mlflow", "detail": detail})
        return from_snapshot(ref, "mlflow", folder, json.loads((folder / SNAPSHOT_RECORD).read_text()), reused=False)


def _fetch_referenced(
    ref: str,
    store: Snapshots,
    reference: Path,
    manifest_file: Path | None,
    recorded: dict[str, tuple[int, str]],
    detail: dict[str, str],
) -> FetchedModel:
    """Returns the published folder a registered model references, every file checked against the record."""
    from tasks.published_weights import read_reference, resolve

    if not recorded or manifest_file is None:
        raise IntegrityError(f"{ref}: a model that references published weights must carry its {MANIFEST}")
    inside(manifest_file.parent, reference, f"{ref}: artifact {REFERENCE}")
    logged = reference.relative_to(manifest_file.parent).as_posix()
    want = recorded.get(logged)
    if want is None or want != (reference.stat().st_size, file_sha256(reference)):
        raise IntegrityError(f"{ref}: {logged} does not match the sha256 recorded when it was logged")
    record = read_reference(reference)
    path = resolve(reference.parent, cache=store.root.parent)
    sha = {name: digest for name, (_, digest) in record["entries"].items()}
    return FetchedModel(ref, "mlflow", path, sha, {**detail, "weights": record["uri"], "manifest": "yes"})


def _fetch_hub(ref: str, store: Snapshots) -> FetchedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo, _, revision = ref.partition("@")
    try:
        local = Path(
            snapshot_download(
                repo, revision=revision or None, allow_patterns=HUB_PATTERNS, cache_dir=str(store.root / "hub")
            )
        )
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        raise MergeflowError(
            f"model reference {ref!r} is a Hugging Face repo id, but the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}) and it is not in the cache; "
            "use a local folder, s3:// or models:/ reference"
        ) from exc
    except HfHubHTTPError as exc:
        raise MergeflowError(f"model reference {ref!r}: the hub refused the download ({exc})") from exc
    commit = local.name
    key = store.key(f"hub\0{repo}\0{commit}")
    with store.lock(key):
        found = store.find(key)
        if found:
            return from_snapshot(ref, "hub", *found, reused=True)
        files = {}
        for p in sorted(local.rglob("*")):
            if p.is_file():
                copy = store.blobs / f".{uuid.uuid4().hex}.part"
                shutil.copyfile(p, copy)
                files[p.relative_to(local).as_posix()] = store.add_blob(copy)
        folder = store.publish(key, files, {"reference": ref, "kind": "hub", "detail": {"commit": commit}})
        return from_snapshot(ref, "hub", folder, json.loads((folder / SNAPSHOT_RECORD).read_text()), reused=False)


download_model = task(
    fetch_model,
    name="download",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_transient,
    task_run_name="download {ref}",
)
