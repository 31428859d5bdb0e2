"""Features on disk, keyed by content: the same encoder on the same texts is encoded once.

Every pipeline run scores the base (its probes) and each fine-tune beside the merged model; on a
schedule, or in `make demo`'s four runs, those encoders and texts do not change, and encoding them
is most of an evaluation's time. `encode_cached` keys a feature matrix by the encoder's files
(safetensors by their tensors: name, dtype, shape, bytes, so the same weights written again, as
MIN-Merging's θ_shared = θ₀ is, are the same encoder; config and tokenizer by their bytes; digests
remembered by `HashCache`), the sha256 of the texts in order, the max length and the batch size
(padding per batch changes the last bits), and the torch version. A hit is read back (shape
checked); a miss is encoded and written atomically. The zoo build writes through the same cache, so
a pipeline run on a freshly built zoo starts warm.

Probes are cached the same way (`probe_cached`): keyed by the train and validation features and
labels, the number of labels, the C grid, the seed and the library versions, so the base's probes
(fitted by the zoo build) are fitted again by no pipeline run.

Scores are cached the same way (`scores_cached`): a causal LM's perplexity on a domain's texts is
keyed by the model folder's digest, the texts, the window length, the batch size, the device and
the torch and transformers versions. The causal zoo build scores its base and fine-tunes through
it, so a pipeline run on the zoo scores only the merged models.

Entries live in `<cache>/features/` (`mergeflow cache status|gc` counts and collects them);
`MERGEFLOW_FEATURE_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from merging.evaluation.encoder import Encoder, encode
from merging.evaluation.heads import PROBE_C_GRID, Head, fit_probe
from merging.io.checkpoint import HashCache, cache_dir, file_sha256

# Files of a model folder that do not change its features.
IGNORED = {"README.md", "mergeflow-manifest.json", "mergeflow_config.yml", "tasks.json", "routed.json"}
_HASHES: HashCache | None = None
_TENSOR_HASHES: HashCache | None = None


def enabled() -> bool:
    return os.environ.get("MERGEFLOW_FEATURE_CACHE", "1") != "0"


def tensors_sha256(path: Path) -> str:
    """Returns the sha256 over a safetensors file's tensors (name, dtype, shape and bytes, by name, with -0.0
    counted as +0.0): two files holding the same tensors in another order, at other offsets or with other
    metadata give one digest (MIN-Merging's θ_shared = θ₀ is the base's tensors rewritten). A file safetensors
    cannot open gets its file sha256 (loading it fails later, where the error is reported)."""
    from safetensors import safe_open

    digest = hashlib.sha256(b"tensors-v2\0")
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor + 0.0  # -0.0 → +0.0: a merge writes θ₀'s -0.0 back as +0.0, the same number
                digest.update(f"{len(name)}:{name}\0".encode())
                _tensor_identity(digest, tensor)
    except Exception:
        return "file:" + file_sha256(path)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """Returns the sha256 over the top-level files of a model folder that determine its features; safetensors
    files count by their tensors (`tensors_sha256`), every other file by its bytes."""
    global _HASHES, _TENSOR_HASHES
    if _HASHES is None or _HASHES.path != cache_dir() / "sha256-v1.json":
        _HASHES = HashCache()
    if _TENSOR_HASHES is None or _TENSOR_HASHES.path != cache_dir() / "tensors-sha256-v2.json":
        _TENSOR_HASHES = HashCache(cache_dir() / "tensors-sha256-v2.json", hasher=tensors_sha256)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in IGNORED:
            hashes = _TENSOR_HASHES if path.name.endswith(".safetensors") else _HASHES
            digest.update(f"{path.name}\0{hashes.sha256(path)}\0".encode())
    _HASHES.save()
    _TENSOR_HASHES.save()
    return digest.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def feature_key(encoder: Encoder, texts: Sequence[str], max_length: int, batch_size: int) -> str:
    tokenizer = encoder.tokenizer_path
    identity = {
        "format": 2,  # 2: safetensors files count by their tensors
        "model": folder_digest(encoder.path),
        "tokenizer": folder_digest(tokenizer) if tokenizer is not None and tokenizer != encoder.path else None,
        "texts": texts_digest(texts),
        "count": len(texts),
        "max_length": int(max_length),
        "batch_size": int(batch_size),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def encode_cached(
    encoder: Encoder,
    texts: Sequence[str],
    max_length: int = 64,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "encode",
) -> torch.Tensor:
    """Returns `encode(...)`'s features, read from the cache when the same encoder saw the same texts."""
    if not enabled() or not texts:
        return encode(encoder, texts, max_length, batch_size, progress, desc)
    key = feature_key(encoder, texts, max_length, batch_size)
    feats = (_read(key) or {}).get("features")
    if feats is not None and tuple(feats.shape) == (len(texts), encoder.feature_dim):
        return feats
    feats = encode(encoder, texts, max_length, batch_size, progress, desc)
    _write(key, {"features": feats.contiguous()})
    return feats


def _tensor_identity(digest: Any, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        digest.update(b"none\0")
        return
    tensor = tensor.contiguous()
    digest.update(f"{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def probe_key(tensors: Sequence[torch.Tensor | None], num_labels: int, seed: int) -> str:
    """Returns the sha256 naming a probe fitted on `tensors` (train features and labels, validation features
    and labels) with `num_labels` outputs, the C grid, the seed and the library versions."""
    import sklearn

    digest = hashlib.sha256(b"probe-v1\0")
    for tensor in tensors:
        _tensor_identity(digest, tensor)
    settings = [num_labels, seed, list(PROBE_C_GRID), sklearn.__version__, np.__version__, torch.__version__]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def probe_cached(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    num_labels: int,
    validation: torch.Tensor | None = None,
    validation_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> Head:
    """Returns `fit_probe(...)`, read back when the same features and labels were fitted before: the base's
    probes, fitted by the zoo build, are refitted by no pipeline run (a hit is the fit's exact weights)."""
    if not enabled():
        return fit_probe(train, train_labels, num_labels, validation, validation_labels, seed=seed)
    key = probe_key([train, train_labels, validation, validation_labels], num_labels, seed)
    stored = _read(key) or {}
    weight, bias = stored.get("weight"), stored.get("bias")
    if (
        weight is not None
        and bias is not None
        and tuple(weight.shape) == (num_labels, train.shape[1])
        and tuple(bias.shape) == (num_labels,)
    ):
        return Head(weight, bias)
    head = fit_probe(train, train_labels, num_labels, validation, validation_labels, seed=seed)
    _write(key, {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()})
    return head


def score_key(kind: str, folder: Path, texts: Sequence[str], settings: dict[str, str | int]) -> str:
    """Returns the sha256 naming `kind` scores of the model in `folder` on `texts` under `settings`."""
    identity = {
        "format": 2,
        "kind": kind,
        "model": folder_digest(folder),
        "texts": texts_digest(texts),
        "count": len(texts),
        "torch": torch.__version__,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def scores_cached(
    kind: str,
    folder: str | Path,
    texts: Sequence[str],
    settings: dict[str, str | int],
    compute: Callable[[], dict[str, float]],
) -> dict[str, float]:
    """Returns `compute()` (named float scores of the model in `folder` on `texts`), read back from the cache
    when the same model files saw the same texts under the same settings. Floats are stored as float64:
    a hit returns exactly what the computation returned."""
    if not enabled() or not texts:
        return compute()
    key = score_key(kind, Path(folder), texts, settings)
    stored = _read(key)
    if stored is not None and all(t.dtype == torch.float64 and t.shape == (1,) for t in stored.values()):
        return {name: float(t[0]) for name, t in stored.items()}
    scores = compute()
    _write(key, {name: torch.tensor([float(v)], dtype=torch.float64) for name, v in scores.items()})
    return scores


def _entry(key: str) -> Path:
    return cache_dir() / "features" / key[:2] / f"{key}.safetensors"


def _read(key: str) -> dict[str, torch.Tensor] | None:
    """Returns a cache entry's tensors, or None when it is missing or damaged (then it is computed again)."""
    path = _entry(key)
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception:
        return None
    os.utime(path)  # its last use, for `cache gc`
    return tensors


def _write(key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a cache entry atomically; a full disk never fails an evaluation."""
    path = _entry(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{key}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
