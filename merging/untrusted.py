"""Returns values from outside (manifests, index files, configs, object keys, URIs) once they are safe.

Every name that becomes a path is a relative POSIX path with no `..`, no absolute part, no NUL,
newline or backslash; every blob name is 64 hex digits; every size a non-negative integer; every
path that may be a symlink is checked to stay inside its folder. User info leaves URIs
(split_credentials) or is redacted before it reaches a log, a param, a tag, a card or an artifact.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from merging.errors import MergeflowError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FORBIDDEN = ("\x00", "\n", "\r", "\\")
# scheme://user[:password]@host — the user info is what gets redacted
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/\s@'\"]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|sig|signature|token|access_token|"
    r"password|secret)=)[^&\s'\"]+",
    re.IGNORECASE,
)


class UnsafeInputError(MergeflowError):
    """A path, name or number from outside would leave its folder or is not what it claims to be."""


def relative_name(name: Any, where: str) -> str:
    """Returns `name` if it is a safe relative POSIX path inside its folder, else raises naming `where`."""
    if not isinstance(name, str) or not name:
        raise UnsafeInputError(f"{where}: expected a relative file name, got {name!r}")
    if any(c in name for c in _FORBIDDEN):
        raise UnsafeInputError(f"{where}: file name {name!r} holds a NUL, newline or backslash")
    if PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise UnsafeInputError(f"{where}: file name {name!r} is an absolute path")
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise UnsafeInputError(f"{where}: file name {name!r} leaves its folder or is malformed")
    return name


def sha256_hex(value: Any, where: str) -> str:
    """Returns `value` if it is a lowercase hex sha256 (64 digits), else raises naming `where`."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise UnsafeInputError(f"{where}: sha256 must be 64 lowercase hex digits, got {str(value)[:80]!r}")
    return value


def byte_size(value: Any, where: str) -> int:
    """Returns `value` if it is a non-negative integer byte count (not a bool or float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsafeInputError(f"{where}: size must be a non-negative integer, got {value!r}")
    return value


def inside(folder: Path, path: Path, where: str) -> Path:
    """Returns `path` resolved, if it (after following symlinks) stays inside `folder`."""
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafeInputError(f"{where}: {path.name} resolves to {resolved}, outside {root}")
    return resolved


def file_entries(entries: Any, where: str) -> dict[str, tuple[int, str]]:
    """Returns {name: (size, sha256)} from a manifest's `files` object, every field validated."""
    if not isinstance(entries, dict):
        raise UnsafeInputError(f"{where}: 'files' must be an object of name -> {{size, sha256}}")
    out: dict[str, tuple[int, str]] = {}
    for name, entry in entries.items():
        here = f"{where}: files[{name!r}]"
        relative_name(name, here)
        if not isinstance(entry, dict):
            raise UnsafeInputError(f"{here}: expected an object with size and sha256")
        out[name] = (byte_size(entry.get("size"), f"{here}.size"), sha256_hex(entry.get("sha256"), f"{here}.sha256"))
    return out


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """Returns (uri without user info, user, password): credentials leave the URI before it is recorded."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri, None, None
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, parts.username, parts.password


def redact_text(text: str) -> str:
    """Returns `text` with user info of every URI in it and signed-URL secrets replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}***", text)


def redact(value: Any) -> Any:
    """Returns a copy of a JSON-like value with every string passed through redact_text."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
