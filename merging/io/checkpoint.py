"""Returns read-only, memory-mapped access to a model checkpoint, one tensor at a time.

A checkpoint is a Hugging Face folder (single or sharded safetensors, or pytorch_model.bin),
or a bare `.safetensors` / `.bin` file. Pickle checkpoints are only ever opened with
`torch.load(weights_only=True)`, so a file that would run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.errors import CheckpointError
from merging.io.safetensors_format import MappedFile, TensorInfo, read_header
from merging.untrusted import UnsafeInputError, inside, relative_name

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that would make transformers import and run code shipped with a model: never read or copied.
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd")


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Returns the cache folder: $MERGEFLOW_CACHE_DIR, else $XDG_CACHE_HOME/mergeflow, else ~/.cache/mergeflow."""
    explicit = os.environ.get("MERGEFLOW_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergeflow"


class HashCache:
    """Returns file sha256s, remembering them by (path, size, mtime_ns, ctime_ns, inode) as git's index does.

    Re-merging the same inputs then costs no re-hashing; a file that changed in any of those
    respects is hashed again. Entries are saved with an atomic replace, so concurrent runs can
    at worst lose an entry, never corrupt the file.
    """

    def __init__(self, path: Path | None = None, hasher: Callable[[Path], str] | None = None):
        """`hasher` (default: the file's sha256) names what is remembered; another one needs its own `path`."""
        self.path = path or cache_dir() / "sha256-v1.json"
        self._hasher = hasher or file_sha256
        try:
            self._entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self._entries = {}
        self._lock = threading.Lock()
        self._dirty = False

    @staticmethod
    def _key(path: Path) -> tuple[str, dict[str, int]]:
        st = path.stat()
        # ctime cannot be set back by a writer (unlike mtime): a file rewritten in place with its
        # mtime restored still changes its ctime, so it is hashed again.
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
        return str(path.resolve()), stamp

    def sha256(self, path: Path) -> str:
        key, stamp = self._key(path)
        with self._lock:
            hit = self._entries.get(key)
        if hit and all(hit.get(k) == v for k, v in stamp.items()):
            return str(hit["sha256"])
        digest = self._hasher(path)
        with self._lock:
            self._entries[key] = {**stamp, "sha256": digest}
            self._dirty = True
        return digest

    def verify(self, path: Path) -> str:
        """Returns the sha256 of `path` read afresh, and corrects the remembered one if it was stale."""
        key, stamp = self._key(path)
        digest = self._hasher(path)
        with self._lock:
            if self._entries.get(key, {}).get("sha256") != digest:
                self._entries[key] = {**stamp, "sha256": digest}
                self._dirty = True
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Records the sha256 of a file this process just wrote and hashed, so nobody re-reads it."""
        key, stamp = self._key(path)
        with self._lock:
            self._entries[key] = {**stamp, "sha256": digest}
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache folder only costs re-hashing next time


def read_model_config(config_file: Path) -> dict[str, Any]:
    """Returns a model folder's config.json, refusing one that asks transformers to run the model's own code."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{config_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{config_file}: invalid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    if "auto_map" in data:
        raise CheckpointError(
            f"{config_file}: auto_map asks transformers to run code shipped with the model "
            f"({', '.join(sorted(map(str, data['auto_map'])))}); mergeflow never runs model code "
            "(trust_remote_code stays off): use a model whose architecture transformers ships"
        )
    return data


def _load_weights_only(path: Path) -> Any:
    """Returns a pickle checkpoint's contents, memory-mapped when it is in torch's zip format.

    Only `weights_only=True` loading is ever used: a file that would run code is refused.
    Files in the legacy (pre-zip) format cannot be memory-mapped and are read whole.
    """
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpoint:
    """A model's weights, opened lazily: headers at construction, tensor bytes on demand."""

    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or self.path.name
        if not self.path.exists():
            raise CheckpointError(f"model {self.label!r}: path {self.path} does not exist")
        self.files: list[Path] = []
        self.infos: dict[str, TensorInfo] = {}
        self._mapped: dict[Path, MappedFile] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self.config: dict[str, Any] | None = None
        self._index_map: dict[str, str] = {}
        self._open()

    # -- discovery ---------------------------------------------------------------------------
    def _open(self) -> None:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                self._add_safetensors([p])
            elif p.suffix in (".bin", ".pt", ".pth"):
                self._add_pickle([p])
            else:
                raise CheckpointError(f"{p}: unknown checkpoint format (expected .safetensors or .bin)")
            return
        self._refuse_outside_links(p)
        config_file = p / "config.json"
        if config_file.exists():
            self.config = read_model_config(config_file)
        if (p / SAFE_INDEX).exists():
            self._add_safetensors(self._index_files(p / SAFE_INDEX), index=p / SAFE_INDEX)
        elif (p / SAFE_SINGLE).exists():
            self._add_safetensors([p / SAFE_SINGLE])
        elif singles := sorted(p.glob("*.safetensors")):
            if len(singles) > 1:
                raise CheckpointError(
                    f"{p}: {len(singles)} .safetensors files but no {SAFE_INDEX}: cannot tell which hold the model"
                )
            self._add_safetensors(singles)
        elif (p / BIN_INDEX).exists():
            self._add_pickle(self._index_files(p / BIN_INDEX))
        elif (p / BIN_SINGLE).exists():
            self._add_pickle([p / BIN_SINGLE])
        else:
            raise CheckpointError(
                f"{p}: no model weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, or {BIN_SINGLE})"
            )

    def _refuse_outside_links(self, folder: Path) -> None:
        """Raises when a file of the model folder is a symlink that leaves the folder."""
        for f in folder.iterdir():
            if f.is_symlink():
                try:
                    inside(folder, f, f"model {self.label!r}")
                except UnsafeInputError as exc:
                    raise CheckpointError(f"{f}: symlink leaves the model folder ({exc})") from None

    def _index_files(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{index}: invalid index file ({type(exc).__name__}: {exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: invalid index file (weight_map must map tensor names to shard files)")
        self._index_map = dict(weight_map)
        files = []
        for name in sorted(set(self._index_map.values())):
            try:
                relative_name(name, f"{index}: weight_map shard")
                shard = inside(index.parent, index.parent / name, f"{index}: weight_map shard")
            except UnsafeInputError as exc:
                raise CheckpointError(str(exc)) from None
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard {name} which does not exist")
            files.append(index.parent / name)
        return files

    def _add_safetensors(self, files: list[Path], index: Path | None = None) -> None:
        for f in files:
            infos, _ = read_header(f)
            for name, info in infos.items():
                if name in self.infos:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self.infos[name].file}")
                self.infos[name] = info
            self.files.append(f)
        if index is not None:
            listed = set(self._index_map)
            found = set(self.infos)
            if listed != found:
                missing = sorted(listed - found)[:5]
                extra = sorted(found - listed)[:5]
                raise CheckpointError(
                    f"{index}: index and shards disagree (listed but absent: {missing}; present but unlisted: {extra})"
                )

    def _add_pickle(self, files: list[Path]) -> None:
        for f in files:
            try:
                state = _load_weights_only(f)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{f}: refused to load this pickle checkpoint: it holds objects other than "
                    f"tensors (loading it could execute code). Convert it to safetensors. ({str(exc).splitlines()[0]})"
                ) from exc
            except Exception as exc:  # torch raises several types for a damaged zip/pickle
                raise CheckpointError(f"{f}: cannot read pickle checkpoint ({type(exc).__name__}: {exc})") from exc
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{f}: expected a state dict of tensors, got {type(state).__name__}")
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {name!r} is a {type(value).__name__}, not a tensor")
                self._pickled[name] = value
                self.infos[name] = TensorInfo(
                    name, value.dtype, tuple(value.shape), f, -1, value.numel() * value.element_size()
                )
            self.files.append(f)

    # -- access ------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """Returns tensor `name` as a read-only view (memory-mapped; never write to it)."""
        if name in self._pickled:
            return self._pickled[name]
        try:
            info = self.infos[name]
        except KeyError:
            raise CheckpointError(f"model {self.label!r} ({self.path}): no tensor {name!r}") from None
        mapped = self._mapped.get(info.file)
        if mapped is None:
            mapped = self._mapped[info.file] = MappedFile(info.file)
        return mapped.tensor(info)

    def side_files(self) -> list[Path]:
        """Returns the non-weight files of a folder checkpoint (config, tokenizer, ...)."""
        if not self.path.is_dir():
            return []
        weight_files = set(self.files) | {self.path / SAFE_INDEX, self.path / BIN_INDEX}
        return sorted(
            f
            for f in self.path.iterdir()
            if f.is_file() and f not in weight_files and not f.is_symlink() and not f.name.endswith(CODE_SUFFIXES)
        )

    def close(self) -> None:
        for m in self._mapped.values():
            m.close()
        self._mapped.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
