"""One copy per registered version: an MLflow model that references the published weights.

With `storage` configured the pipeline publishes the merged folder (every file's size and sha256 in
its manifest). Logging the same files again as the MLflow model would store the model twice, so
the registered model holds `published.json` instead: where the folder was published (its URI, the
S3 endpoint without credentials, the name of the Prefect Secret block if one was used) and the
manifest as it was at registration. Loading the model fetches the folder from there and checks
every file against that recorded manifest, so a published copy changed after registration is
refused, never served. Credentials come, as for every S3 read, from the environment or the block.

`published.json` is untrusted input when a registered model is loaded: its URI must be s3:// or
an absolute local folder, and its manifest entries pass the same checks as any manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from merging.errors import MergeflowError
from merging.untrusted import file_entries

REFERENCE = "published.json"


class PublishedWeightsError(MergeflowError):
    """The published folder a registered model references is missing or differs from its record."""


def endpoint_without_credentials(endpoint: str | None) -> str | None:
    """Returns the endpoint URL with any user:password@ removed (the reference must never hold secrets)."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def write_reference(dest: Path, uri: str, manifest: dict[str, Any], storage: Any = None) -> Path:
    """Writes `published.json` into the folder `dest` (created) and returns the file."""
    dest.mkdir(parents=True, exist_ok=True)
    record = {
        "format": 1,
        "uri": uri,
        "endpoint_url": endpoint_without_credentials(getattr(storage, "endpoint_url", None)),
        "region": getattr(storage, "region", None),
        "credentials_block": getattr(storage, "credentials_block", None),
        "files": manifest["files"],
    }
    path = dest / REFERENCE
    path.write_text(json.dumps(record, indent=1))
    return path


def read_reference(path: Path) -> dict[str, Any]:
    """Returns the checked record of a `published.json` (a clear error naming the file and field)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PublishedWeightsError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != 1:
        raise PublishedWeightsError(f"{path}: expected an object with format 1")
    uri = record.get("uri")
    if not isinstance(uri, str) or not uri:
        raise PublishedWeightsError(f"{path}: field 'uri' must be a non-empty string")
    if not uri.startswith("s3://") and ("://" in uri or not Path(uri).is_absolute()):
        raise PublishedWeightsError(f"{path}: field 'uri' {uri!r} must be s3://bucket/prefix or an absolute folder")
    for field in ("endpoint_url", "region", "credentials_block"):
        if record.get(field) is not None and not isinstance(record[field], str):
            raise PublishedWeightsError(f"{path}: field {field!r} must be a string or null")
    endpoint = record.get("endpoint_url")
    if endpoint and (urlsplit(endpoint).scheme not in ("http", "https") or urlsplit(endpoint).username):
        raise PublishedWeightsError(f"{path}: field 'endpoint_url' must be http(s):// without credentials")
    record["entries"] = file_entries(record.get("files"), f"{path}: files")
    return record


def resolve(folder: Path, cache: Path | None = None) -> Path:
    """Returns the local folder holding the model's files.

    `folder` itself when it holds no reference (the weights were logged in the MLflow model);
    else the published folder, fetched (S3) or found (local), every file checked against the record.
    """
    path = folder / REFERENCE
    if not path.is_file():
        return folder
    record = read_reference(path)
    expected: dict[str, tuple[int, str]] = record["entries"]
    uri = record["uri"]
    if uri.startswith("s3://"):
        from merging.pipeline_config import StorageConfig
        from tasks.download import fetch_model
        from tasks.storage import StorageError

        storage = StorageConfig(
            uri=uri,
            endpoint_url=record.get("endpoint_url"),
            region=record.get("region"),
            credentials_block=record.get("credentials_block"),
        )
        try:
            fetched = fetch_model(uri, storage=storage, cache=cache)
        except StorageError as exc:
            raise PublishedWeightsError(f"the registered model's weights at {uri}: {exc}") from None
        have = fetched.sha256
        changed = sorted(n for n, (_, sha) in expected.items() if have.get(n) != sha)
        extra = sorted(set(have) - set(expected))
        if changed or extra:
            raise PublishedWeightsError(
                f"the registered model's weights at {uri} differ from what was registered "
                f"(changed or missing: {changed[:5]}, not registered: {extra[:5]}); refusing to load them"
            )
        return fetched.path
    return _check_local(Path(uri), expected)


def _check_local(root: Path, expected: dict[str, tuple[int, str]]) -> Path:
    from merging.io.checkpoint import file_sha256
    from tasks.storage import MANIFEST

    if not root.is_dir():
        raise PublishedWeightsError(f"the registered model's weights: folder {root} does not exist")
    for name, (size, sha) in expected.items():
        file = root / name
        if not file.is_file() or file.stat().st_size != size or file_sha256(file) != sha:
            raise PublishedWeightsError(
                f"the registered model's weights: {file} differs from what was registered; refusing to load it"
            )
    extra = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]
    unknown = sorted(p.relative_to(root).as_posix() for p in extra if p.relative_to(root).as_posix() not in expected)
    if unknown:
        raise PublishedWeightsError(f"the registered model's weights in {root}: files not registered: {unknown[:5]}")
    return root
