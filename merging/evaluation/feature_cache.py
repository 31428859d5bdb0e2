"""Features on disk, keyed by content: the same encoder on the same texts is encoded once.

Every pipeline run scores the base (its probes) and each fine-tune beside the merged model; on a
schedule, or in `make demo`'s four runs, those encoders and texts do not change, and encoding them
is most of an evaluation's time. `encode_cached` keys a feature matrix by the sha256 of the
encoder's files (weights, config, tokenizer; sha256s remembered by `HashCache`), the sha256 of
the texts in order, the max length and the batch size (padding per batch changes the last bits),
and the torch version. A hit is read back (shape checked); a miss is encoded and written atomically.
The zoo build writes through the same cache, so a pipeline run on a freshly built zoo starts warm.

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
    feats = (_read(key) or {}).get("features")
    if feats is not None and tuple(feats.shape) == (len(texts), encoder.feature_dim):
        return feats
    feats = encode(encoder, texts, max_length, batch_size, progress, desc)
    _write(key, {"features": feats.contiguous()})
    return feats


def score_key(kind: str, folder: Path, texts: Sequence[str], settings: dict[str, str | int]) -> str:
    """Returns the sha256 naming `kind` scores of the model in `folder` on `texts` under `settings`."""
    identity = {
        "format": 1,
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
