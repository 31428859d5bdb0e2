"""Features on disk, keyed by content: the same encoder on the same texts is encoded once.

Every pipeline run scores the base (its probes) and each fine-tune beside the merged model; on a
schedule, or in `make demo`'s four runs, those encoders and texts do not change, and encoding them
is most of an evaluation's time. `encode_cached` keys a feature matrix by the sha256 of the
encoder's files (weights, config, tokenizer; sha256s remembered by `HashCache`), the sha256 of
the texts in order, the max length and the batch size (padding per batch changes the last bits),
and the torch version. A hit is read back (shape checked); a miss is encoded and written atomically.
The zoo build writes through the same cache, so a pipeline run on a freshly built zoo starts warm.

Entries live in `<cache>/features/` (`mergeflow cache status|gc` counts and collects them);
`MERGEFLOW_FEATURE_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from merging.evaluation.encoder import Encoder, encode
from merging.io.checkpoint import HashCache, cache_dir

# Files of a model folder that do not change its features.
IGNORED = {"README.md", "mergeflow-manifest.json", "mergeflow_config.yml", "tasks.json", "routed.json"}
_HASHES: HashCache | None = None


def enabled() -> bool:
    return os.environ.get("MERGEFLOW_FEATURE_CACHE", "1") != "0"


def folder_digest(folder: Path) -> str:
    """Returns the sha256 over the top-level files of a model folder that determine its features."""
    global _HASHES
    if _HASHES is None or _HASHES.path != cache_dir() / "sha256-v1.json":
        _HASHES = HashCache()
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in IGNORED:
            digest.update(f"{path.name}\0{_HASHES.sha256(path)}\0".encode())
    _HASHES.save()
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
        "format": 1,
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
    folder = cache_dir() / "features" / key[:2]
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
        except Exception:  # a damaged entry is recomputed and replaced
            feats = None
        if feats is not None and tuple(feats.shape) == (len(texts), encoder.feature_dim):
            os.utime(path)  # its last use, for `cache gc`
            return feats
    feats = encode(encoder, texts, max_length, batch_size, progress, desc)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{uuid.uuid4().hex}.tmp"
    try:
        save_file({"features": feats.contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a full disk never fails an evaluation
        tmp.unlink(missing_ok=True)
    return feats
