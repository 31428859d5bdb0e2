"""The download cache: every fetched file stored once under `<cache>/blobs/<sha256>` and linked into
`<cache>/snapshots/<key>/`, whose record is written last; a file lock per snapshot makes two runs that
fetch the same model at once do the work once. download.py fetches into it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from merging.io.checkpoint import cache_dir, file_sha256
from merging.io.writer import temporary_sibling
from merging.untrusted import UnsafeInputError, file_entries, relative_name, sha256_hex

SNAPSHOT_RECORD = ".mergeflow-snapshot.json"


@dataclass(frozen=True)
class FetchedModel:
    """A model available locally: where it came from, its folder, and each file's sha256."""

    reference: str
    kind: str  # local | s3 | mlflow | hub
    path: Path
    sha256: dict[str, str] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)  # e.g. the registry version an alias resolved to
    reused: bool = False


class Snapshots:
    """The content-addressed cache: blobs by sha256, snapshot folders of links, a lock per snapshot."""

    def __init__(self, root: Path | None = None):
        self.root = (root or cache_dir()) / "models"
        self.blobs = self.root / "blobs"
        self.snapshots = self.root / "snapshots"
        self.locks = self.root / "locks"
        for d in (self.blobs, self.snapshots, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(identity: str) -> str:
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.locks / f"{key}.lock"), timeout=3600)

    def find(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """Returns a complete snapshot whose files still have their recorded sizes."""
        folder = self.snapshots / key
        try:
            record = json.loads((folder / SNAPSHOT_RECORD).read_text())
            for name, (size, _) in file_entries(record["files"], str(folder / SNAPSHOT_RECORD)).items():
                if (folder / name).is_symlink() or (folder / name).stat().st_size != size:
                    return None
        except (OSError, ValueError, KeyError, TypeError, UnsafeInputError):
            return None
        return folder, record

    def add_blob(self, path: Path, sha256: str | None = None) -> str:
        """Returns the sha256 of `path` after moving it into the blob store (a blob already there is kept)."""
        digest = sha256_hex(sha256, f"blob for {path.name}") if sha256 else file_sha256(path)
        blob = self.blobs / digest
        if blob.exists() and blob.stat().st_size == path.stat().st_size:
            path.unlink()
        else:
            os.replace(path, blob)
            blob.chmod(0o444)
        return digest

    def has_blob(self, sha256: str, size: int) -> bool:
        blob = self.blobs / sha256_hex(sha256, "blob name")
        return blob.exists() and blob.stat().st_size == size

    def publish(self, key: str, files: dict[str, str], record: dict[str, Any]) -> Path:
        """Returns the snapshot folder made of links to `files` ({name: sha256}), its record written last."""
        folder = self.snapshots / key
        tmp = temporary_sibling(folder)
        tmp.mkdir()
        try:
            entries = {}
            for name, digest in files.items():
                target = tmp / relative_name(name, f"snapshot {key}")
                blob = self.blobs / sha256_hex(digest, f"snapshot {key}: {name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob, target)
                except OSError:
                    shutil.copy2(blob, target)
                entries[name] = {"sha256": digest, "size": target.stat().st_size}
            (tmp / SNAPSHOT_RECORD).write_text(json.dumps({**record, "files": entries}, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def from_snapshot(ref: str, kind: str, folder: Path, record: dict[str, Any], reused: bool) -> FetchedModel:
    sha = {name: e["sha256"] for name, e in record["files"].items()}
    return FetchedModel(ref, kind, folder, sha, dict(record.get("detail", {})), reused)
