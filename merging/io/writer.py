"""Returns a streaming writer of Hugging Face-style safetensors shards.

The plan fixes every output tensor's name, dtype and shape in advance, so each shard's header is
written first and tensors are written into their offsets as they are produced (in any order),
without holding a shard in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merging.errors import ConfigError
from merging.io.safetensors_format import dtype_itemsize, header_bytes, tensor_bytes

DEFAULT_SHARD_SIZE = 5 * 1000**3
WRITE_PIECE = 64 << 20  # bytes of output converted at a time when a tensor needs a cast
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(text: str | int, what: str = "out-shard-size") -> int:
    """Returns a byte count from `5GB`, `500MB`, `2GiB` or a plain integer (`what` names it in errors)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ConfigError(f"{what}: cannot read {text!r} (use bytes, or e.g. 5GB, 500MB)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ConfigError(f"{what}: must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardedWriter:
    """Writes tensors, in any order, into shards whose layout is fixed at construction.

    `ShardedWriter(folder, entries, ...)` creates the shard files (headers written, data space
    allocated); `ShardedWriter.reopen(folder, entries, ...)` opens shards an earlier writer created
    with the same layout, so another process can write its tensors into them (the pipeline's
    per-layer tasks), after checking that each file has the planned size and header."""

    def __init__(
        self,
        folder: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        prefix: str = "model",
        *,
        create: bool = True,
    ):
        self.folder = folder
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            nbytes = dtype_itemsize(dtype) * math.prod(shape)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, shape))
            size += nbytes
        n = len(groups)
        self.filenames = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, Slot] = {}
        self._fds: list[int] = []
        self.total_size = 0
        try:
            for i, group in enumerate(groups):
                header, spans = header_bytes(group, metadata or {"format": "pt"})
                data_len = spans[-1][1] if spans else 0
                path = folder / self.filenames[i]
                if create:
                    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                    self._fds.append(fd)
                    os.pwrite(fd, header, 0)
                    os.ftruncate(fd, len(header) + data_len)
                else:
                    fd = os.open(path, os.O_RDWR)
                    self._fds.append(fd)
                    if os.fstat(fd).st_size != len(header) + data_len or os.pread(fd, len(header), 0) != header:
                        raise ConfigError(f"{path}: not the shard this merge's layout plans (size or header differs)")
                for (name, dtype, shape), (begin, end) in zip(group, spans):
                    self.slots[name] = Slot(i, len(header) + begin, end - begin, dtype, shape)
                self.total_size += data_len
        except BaseException:
            self.abort()
            raise
        self._written: set[str] = set()

    @classmethod
    def reopen(
        cls,
        folder: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        prefix: str = "model",
    ) -> ShardedWriter:
        """Returns a writer into the shards an earlier writer with the same layout created (ConfigError if they
        are missing or differ)."""
        try:
            return cls(folder, entries, max_shard_bytes, metadata, prefix, create=False)
        except FileNotFoundError as e:
            raise ConfigError(f"{e.filename}: a planned shard is missing") from None

    def write(self, name: str, tensor: torch.Tensor, digest: Any = None) -> int:
        """Writes `tensor` (cast to the planned dtype) into its slot; returns the number of bytes written, and adds
        them to `digest` (a hashlib object) when given.

        A contiguous CPU tensor that needs a cast is converted one piece at a time (WRITE_PIECE bytes of output), so
        no whole-size copy is made."""
        slot = self.slots[name]
        t = tensor.detach()
        if not t.is_contiguous() or t.device.type != "cpu":
            # One contiguous copy in the output dtype (a strided view would be copied whole anyway).
            t = torch.empty(t.shape, dtype=slot.dtype).copy_(t)
        flat = t.reshape(-1)
        if flat.numel() * slot.dtype.itemsize != slot.nbytes:
            raise ValueError(f"tensor {name!r}: {tuple(tensor.shape)} does not fit its slot {slot.shape}")
        step = max(1, flat.numel()) if flat.dtype == slot.dtype else max(1, WRITE_PIECE // slot.dtype.itemsize)
        for start in range(0, max(1, flat.numel()), step):
            piece = flat[start : start + step]
            view = memoryview(tensor_bytes(piece.to(slot.dtype))).cast("B")
            if digest is not None:
                digest.update(view)
            offset = slot.offset + start * slot.dtype.itemsize
            done = 0
            while done < view.nbytes:
                done += os.pwrite(self._fds[slot.shard], view[done:], offset + done)
        self._written.add(name)
        return slot.nbytes

    def read(self, name: str) -> bytes:
        """Returns the bytes now in `name`'s slot (for checking what an earlier writer wrote)."""
        slot = self.slots[name]
        chunks = []
        done = 0
        while done < slot.nbytes:
            chunk = os.pread(self._fds[slot.shard], slot.nbytes - done, slot.offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def missing(self) -> list[str]:
        return sorted(set(self.slots) - self._written)

    def sync(self) -> None:
        """Flushes what was written to disk (the shards stay open)."""
        for fd in self._fds:
            os.fsync(fd)

    def close(self, index_name: str = "model.safetensors.index.json") -> None:
        """Flushes the shards and writes the index when there is more than one shard."""
        self.sync()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.filenames) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.filenames[s.shard] for name, s in sorted(self.slots.items())},
            }
            (self.folder / index_name).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Closes the shards without flushing them or writing the index."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def temporary_sibling(dest: Path) -> Path:
    """Returns a fresh temporary folder name beside `dest`, marked with this process's id.

    Leftovers of killed runs (a dead process id, or older than this process) are removed first.
    """
    remove_stale_temporaries(dest)
    return dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(dest: Path) -> None:
    """Removes `.DEST.tmp-*` / `.DEST.old-*` folders whose process is gone (or that predate this process)."""
    import psutil

    started = psutil.Process().create_time()
    for leftover in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
        tail = leftover.name.rsplit(".tmp-", 1)[-1].rsplit(".old-", 1)[-1]
        pid = tail.split("-", 1)[0] if "-" in tail else ""
        try:
            if not leftover.is_dir() or leftover.is_symlink():
                continue
            if pid.isdigit():
                stale = int(pid) != os.getpid() and not psutil.pid_exists(int(pid))
            else:  # written before folders carried a process id
                stale = leftover.stat().st_mtime < started
            if stale:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def publish_folder(tmp: Path, dest: Path) -> None:
    """Makes the complete folder `tmp` visible as `dest` by renames, replacing an older `dest` if there is one."""
    if dest.exists():
        trash = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dest.rename(trash)
        tmp.rename(dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(dest)
