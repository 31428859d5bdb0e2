"""Object storage: one boto3 client factory, verified uploads and downloads, publish-by-manifest.

A published model is a prefix (S3) or a folder (local) holding its files and, written last,
`mergeflow-manifest.json` with every file's size and sha256. Readers look for the manifest
first, so they never see a half-written model; every file they fetch is checked against it.
Each S3 object also carries its sha256 in its metadata. Credentials come from the environment
(boto3's usual chain) or a Prefect Secret block, and are never logged or recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

import merging
from merging.errors import MergeflowError
from merging.io.checkpoint import file_sha256
from merging.io.writer import publish_folder, temporary_sibling
from merging.pipeline_config import StorageConfig
from merging.untrusted import file_entries

MANIFEST = "mergeflow-manifest.json"
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


PUBLISHED_MARK = "read-through-manifest"


class StorageError(MergeflowError):
    """A storage operation failed; the message names the location, never the credentials."""


class CredentialsError(StorageError):
    """The S3 server refused the credentials (retrying cannot help)."""


class IntegrityError(StorageError):
    """A stored file does not match the size or sha256 its manifest records."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r}: no bucket name")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, self.key(name.strip("/")))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class TransientStorageError(StorageError):
    """The S3 endpoint could not be reached or was busy: a retry may succeed."""


def is_transient(exc: BaseException | None) -> bool:
    """Returns whether a failure may go away on retry: a connection, timeout or busy server, nothing else.

    Not found, refused credentials, an offline hub, a bad manifest or config fail on the first attempt.
    """
    if exc is None:
        return False
    if isinstance(exc, (TransientStorageError, ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ConnectTimeout", "ReadTimeout", "ConnectionError", "EndpointConnectionError", "ChunkedEncodingError"}:
        return True
    code = getattr(exc, "error_code", None)  # MlflowException
    return code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Returns whether a failed network task should be retried (see is_transient)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as raised:
        exc = raised
    return is_transient(exc if isinstance(exc, BaseException) else None)


def _credentials(config: StorageConfig | None) -> dict[str, str]:
    """Returns explicit credentials from a Prefect Secret block, or {} for boto3's own chain (environment)."""
    if config is None or not config.credentials_block:
        return {}
    from prefect.blocks.system import Secret

    try:
        value: Any = Secret.load(config.credentials_block).get()
    except ValueError as exc:
        raise StorageError(f"storage.credentials_block: no Prefect Secret block {config.credentials_block!r}") from exc
    if isinstance(value, str):
        value = json.loads(value)
    keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    if not isinstance(value, dict) or "aws_access_key_id" not in value:
        raise StorageError(
            f"storage.credentials_block {config.credentials_block!r}: expected a JSON object with "
            "aws_access_key_id and aws_secret_access_key"
        )
    return {k: str(value[k]) for k in keys if value.get(k)}


def s3_client(config: StorageConfig | None = None) -> Any:
    """Returns a boto3 S3 client: endpoint and region from the config or the environment, retries with backoff."""
    endpoint = (config.endpoint_url if config else None) or os.environ.get("MERGEFLOW_S3_ENDPOINT_URL")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    region = (config.region if config else None) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    attempts = config.max_attempts if config else 5
    botocore_config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
        connect_timeout=10,
        read_timeout=60,
    )
    session = boto3.session.Session(**_credentials(config))
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=botocore_config)


def _explain(exc: Exception, where: str) -> StorageError:
    if isinstance(exc, NoCredentialsError):
        return CredentialsError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, EndpointConnectionError):
        return TransientStorageError(f"{where}: cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in CREDENTIAL_ERRORS:
            return CredentialsError(f"{where}: the S3 server refused the credentials ({code}); check the access key")
        if code in ("NoSuchBucket", "404", "NotFound", "NoSuchKey"):
            return StorageError(f"{where}: not found ({code})")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling", "ServiceUnavailable"):
            return TransientStorageError(f"{where}: S3 server busy or failing ({code or status}); retrying may help")
        return StorageError(f"{where}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")
    if isinstance(exc, BotoCoreError):  # connection resets, read timeouts
        return TransientStorageError(f"{where}: {type(exc).__name__}: {exc}")
    return StorageError(f"{where}: {type(exc).__name__}: {exc}")


def check_storage(config: StorageConfig) -> None:
    """Raises a clear StorageError now if the configured storage cannot be written (checked before merging)."""
    if not config.uri.startswith("s3://"):
        target = Path(config.uri).expanduser().resolve()
        probe = next((p for p in [target, *target.parents] if p.exists()), None)
        if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(f"storage.uri {config.uri}: cannot create or write {target}")
        return
    loc = S3Location.parse(config.uri)
    client = s3_client(config.model_copy(update={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=loc.bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            return  # publishing creates it
        raise _explain(exc, f"storage {loc}") from None
    except (BotoCoreError, NoCredentialsError) as exc:
        raise _explain(exc, f"storage {loc}") from None


def folder_manifest(folder: Path) -> dict[str, Any]:
    """Returns the manifest of a local folder: every file's size and sha256 (the manifest itself excluded)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return {"format": 1, "mergeflow": merging.__version__, "files": files}


# -- publishing ---------------------------------------------------------------------------------


def publish(folder: Path, uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """Returns the manifest after publishing `folder` at `uri` (S3 prefix or local folder), manifest last."""
    manifest = folder_manifest(folder)
    if uri.startswith("s3://"):
        _publish_s3(folder, S3Location.parse(uri), manifest, config)
    else:
        _publish_local(folder, Path(uri), manifest)
    return manifest


def _publish_local(folder: Path, dest: Path, manifest: dict[str, Any]) -> None:
    if (dest / MANIFEST).exists() and json.loads((dest / MANIFEST).read_text())["files"] == manifest["files"]:
        return  # the same model is already published there
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest)
    try:
        shutil.copytree(folder, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_s3(folder: Path, loc: S3Location, manifest: dict[str, Any], config: StorageConfig | None) -> None:
    client = s3_client(config)
    where = str(loc)
    try:
        existing = read_manifest(loc, config, client=client, missing_ok=True)
    except (StorageError, MergeflowError) as exc:
        if isinstance(exc, (CredentialsError, TransientStorageError)):
            raise
        existing = {"files": None}  # a damaged or hostile manifest there: replaced by this one
    if existing is not None and existing["files"] == manifest["files"]:
        return
    threshold = (config.multipart_threshold_mb if config else 64) * 2**20
    transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
    uploaded: list[str] = []
    try:
        try:
            client.head_bucket(Bucket=loc.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=loc.bucket)
        if existing is not None:  # a different model was there: hide it before replacing its files
            client.delete_object(Bucket=loc.bucket, Key=loc.key(MANIFEST))
        for name, entry in manifest["files"].items():
            key = loc.key(name)
            client.upload_file(
                str(folder / name),
                loc.bucket,
                key,
                # `mergeflow` marks an object whose model is read only through its manifest (written last).
                ExtraArgs={"Metadata": {"sha256": entry["sha256"], "mergeflow": PUBLISHED_MARK}},
                Config=transfer,
            )
            uploaded.append(key)
        body = json.dumps(manifest, indent=1).encode()
        client.put_object(Bucket=loc.bucket, Key=loc.key(MANIFEST), Body=body, ContentType="application/json")
    except (ClientError, BotoCoreError, NoCredentialsError) as exc:
        for key in uploaded:  # best effort: without a manifest nobody reads them anyway
            try:
                client.delete_object(Bucket=loc.bucket, Key=key)
            except (ClientError, BotoCoreError):
                break
        raise _explain(exc, f"publishing {folder} to {where}") from None


# -- reading ------------------------------------------------------------------------------------


def read_manifest(
    loc: S3Location, config: StorageConfig | None = None, client: Any = None, missing_ok: bool = False
) -> dict[str, Any] | None:
    """Returns the manifest published at an S3 prefix (None when absent and `missing_ok`)."""
    client = client or s3_client(config)
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.key(MANIFEST))["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket") and missing_ok:
            return None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise StorageError(
                f"{loc}: no {MANIFEST}: not a published model (or its upload has not finished)"
            ) from None
        raise _explain(exc, str(loc)) from None
    except (BotoCoreError, NoCredentialsError) as exc:
        raise _explain(exc, str(loc)) from None
    try:
        manifest = json.loads(body)
    except ValueError:
        raise StorageError(f"{loc}/{MANIFEST}: not a valid manifest (not JSON)") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise StorageError(f"{loc}/{MANIFEST}: not a valid manifest (no 'files' object)")
    file_entries(manifest["files"], f"{loc}/{MANIFEST}")  # every name, size and sha256 checked here
    return dict(manifest)


def list_objects(loc: S3Location, config: StorageConfig | None = None, client: Any = None) -> dict[str, int]:
    """Returns {relative name: size} of every object under an S3 prefix (all pages)."""
    client = client or s3_client(config)
    prefix = f"{loc.prefix}/" if loc.prefix else ""
    out: dict[str, int] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) :]] = int(obj["Size"])
    except (ClientError, BotoCoreError, NoCredentialsError) as exc:
        raise _explain(exc, str(loc)) from None
    return out


def download_file(
    loc: S3Location, name: str, dest: Path, size: int, sha256: str | None, config: StorageConfig | None, client: Any
) -> str:
    """Returns the sha256 of one object downloaded to `dest`, checked against `size` and `sha256` when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        client.download_file(loc.bucket, loc.key(name), str(tmp))
        got_size = tmp.stat().st_size
        if got_size != size:
            raise IntegrityError(f"{loc}/{name}: size {got_size} bytes, expected {size}")
        digest = file_sha256(tmp)
        if sha256 is not None and digest != sha256:
            raise IntegrityError(f"{loc}/{name}: sha256 {digest[:16]}… does not match the recorded {sha256[:16]}…")
        os.replace(tmp, dest)
        return digest
    except (ClientError, BotoCoreError, NoCredentialsError) as exc:
        raise _explain(exc, f"{loc}/{name}") from None
    finally:
        tmp.unlink(missing_ok=True)
