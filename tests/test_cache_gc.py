"""`mergeflow cache status|gc`: what the download and layer caches hold, what goes, and what a running flow keeps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.cache import entries, gc, in_use, status
from tasks.snapshots import Snapshots

DAY = 86400.0


def _blob(store: Snapshots, data: bytes) -> str:
    tmp = store.blobs / f".{hashlib.sha256(data).hexdigest()[:8]}.part"
    tmp.write_bytes(data)
    return store.add_blob(tmp)


def _snapshot(store: Snapshots, identity: str, files: dict[str, bytes], age_days: float) -> str:
    key = store.key(identity)
    store.publish(key, {name: _blob(store, data) for name, data in files.items()}, {"reference": identity})
    _age(store.snapshots / key, age_days)
    for blob in store.blobs.iterdir():
        _age(blob, age_days)
    return key


def _layers(root: Path, merge_key: str, groups: int, nbytes: int, age_days: float) -> list[Path]:
    folder = root / "layers"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{merge_key}.stats.json"]
    paths[0].write_text("{}")
    for g in range(groups):
        layer_key = hashlib.sha256(f"{merge_key}\0{g}".encode()).hexdigest()
        path = folder / f"{layer_key}.safetensors"
        path.write_bytes(b"x" * nbytes)
        meta = path.with_suffix(".json")
        meta.write_text(json.dumps({"group": str(g), "sha256": "0" * 64, "nbytes": nbytes, "merge_key": merge_key}))
        paths += [path, meta]
    for p in paths:
        _age(p, age_days)
    return paths


def _age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))


@pytest.fixture
def cache(tmp_path: Path) -> dict:
    root = tmp_path / "cache"
    store = Snapshots(root)
    shared = b"tokenizer shared by both" * 10
    old = _snapshot(store, "old-model", {"model.safetensors": b"o" * 4000, "tokenizer.json": shared}, 30)
    new = _snapshot(store, "new-model", {"model.safetensors": b"n" * 3000, "tokenizer.json": shared}, 0.01)
    old_merge, new_merge = "a" * 64, "b" * 64
    _layers(root, old_merge, 3, 5000, 20)
    _layers(root, new_merge, 2, 6000, 0.02)
    return {"root": root, "store": store, "old": old, "new": new, "old_merge": old_merge, "new_merge": new_merge}


def test_status_counts_entries_and_bytes_once_per_inode(cache):
    st = status(cache["root"])
    models, layers = st["areas"]["models"], st["areas"]["layers"]
    assert models["entries"] == 2 and layers["entries"] == 2
    # Snapshots hard-link their blobs: 4000 + 3000 + one shared tokenizer (240), plus the two records.
    records = sum(p.stat().st_size for p in (cache["root"] / "models" / "snapshots").rglob(".mergeflow-snapshot.json"))
    assert models["bytes"] == 4000 + 3000 + 240 + records
    assert layers["bytes"] == sum(p.stat().st_size for p in (cache["root"] / "layers").iterdir())
    assert st["bytes"] == models["bytes"] + layers["bytes"] and models["in_use"] == 0
    found = {(e.area, e.key) for e in entries(cache["root"])}
    assert found == {("models", cache["old"]), ("models", cache["new"])} | {
        ("layers", cache["old_merge"]),
        ("layers", cache["new_merge"]),
    }


def test_gc_by_age_removes_old_entries_and_their_unlinked_blobs_only(cache):
    root, store = cache["root"], cache["store"]
    shared_blob = hashlib.sha256(b"tokenizer shared by both" * 10).hexdigest()
    old_blob = hashlib.sha256(b"o" * 4000).hexdigest()
    dry = gc(root, keep_days=7, dry_run=True)
    assert {r["key"] for r in dry.removed} == {cache["old"], cache["old_merge"]}
    assert (store.snapshots / cache["old"]).exists() and (store.blobs / old_blob).exists()  # nothing removed
    report = gc(root, keep_days=7, grace_seconds=0)
    assert {(r["area"], r["key"], r["why"]) for r in report.removed} == {
        ("models", cache["old"], "age"),
        ("layers", cache["old_merge"], "age"),
    }
    assert not (store.snapshots / cache["old"]).exists() and (store.snapshots / cache["new"]).exists()
    assert not (store.blobs / old_blob).exists() and (store.blobs / shared_blob).exists()  # still linked by new
    assert report.blobs_removed == 1
    assert (
        not list((root / "layers").glob(f"{cache['old_merge']}*"))
        and (root / "layers" / f"{'b' * 64}.stats.json").exists()
    )
    assert report.bytes_after == status(root)["bytes"] < report.bytes_before
    assert store.find(cache["new"]) is not None  # the kept snapshot is still complete


def test_gc_by_size_evicts_least_recently_used_first_and_respects_the_grace(cache):
    root = cache["root"]
    total = status(root)["bytes"]
    report = gc(root, max_size=total - 1, grace_seconds=0)
    assert [r["key"] for r in report.removed] == [cache["old"]]  # the least recently used, and enough
    report = gc(root, max_size=0, grace_seconds=2 * 3600)  # the rest were used within two hours: kept
    assert {r["key"] for r in report.removed} == {cache["old_merge"]}
    assert status(root)["areas"]["layers"]["entries"] == 1


def test_entries_in_use_by_a_flow_are_never_removed(cache):
    root = cache["root"]
    with in_use("layers", [cache["old_merge"]], root), in_use("models", [cache["old"]], root):
        report = gc(root, keep_days=0, grace_seconds=0)
        assert set(report.skipped_in_use) == {f"layers/{cache['old_merge']}", f"models/{cache['old']}"}
        assert status(root)["areas"]["layers"]["in_use"] == 1
    assert (root / "layers" / f"{cache['old_merge']}.stats.json").exists()
    # Taking the lock stamps the entry as used now: an age-based gc keeps it afterwards too.
    assert cache["old_merge"] not in {r["key"] for r in gc(root, keep_days=1).removed}


def test_an_entry_held_by_another_process_is_kept(cache):
    root = cache["root"]
    code = (
        "import sys, time; from pathlib import Path; from tasks.cache import in_use\n"
        f"with in_use('layers', ['{cache['old_merge']}'], Path(r'{root}')):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        report = gc(root, keep_days=0, grace_seconds=0)
        assert f"layers/{cache['old_merge']}" in report.skipped_in_use
        assert (root / "layers" / f"{cache['old_merge']}.stats.json").exists()
    finally:
        proc.kill()
        proc.wait()
    assert cache["old_merge"] in {r["key"] for r in gc(root, keep_days=0, grace_seconds=0).removed}


def test_blobs_stay_while_a_download_holds_a_snapshot_lock(cache):
    root, store = cache["root"], cache["store"]
    old_blob = hashlib.sha256(b"o" * 4000).hexdigest()
    with store.lock("c" * 32):
        report = gc(root, keep_days=7, grace_seconds=0)
    assert cache["old"] in {r["key"] for r in report.removed}
    assert report.blobs_removed == 0 and (store.blobs / old_blob).exists()
    assert gc(root, keep_days=7, grace_seconds=0).blobs_removed == 1  # the next gc takes it


def test_cli_status_gc_and_bad_arguments(cache, capsys):
    root = str(cache["root"])
    assert main(["cache", "status", "--cache-dir", root]) == 0
    out = capsys.readouterr().out
    assert "models" in out and "2 entries" in out and "zoo" in out
    assert main(["cache", "gc", "--cache-dir", root, "--keep-days", "7", "--dry-run"]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache-dir", root, "--keep-days", "7", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["removed"]) == 2
    assert main(["cache", "gc", "--cache-dir", root]) == 2
    assert "--keep-days N, --max-size SIZE" in capsys.readouterr().err
    assert main(["cache", "gc", "--cache-dir", root, "--max-size", "12XB"]) == 2
    assert "--max-size: cannot read '12XB'" in capsys.readouterr().err


def test_cache_gc_config_is_validated_and_the_deployed_flows_run_it(tmp_path, monkeypatch):
    from flows.deployed import collect_cache
    from merging.config import parse_config
    from merging.errors import ConfigError

    base = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m"}]}
    with pytest.raises(ConfigError, match=r"pipeline\.cache_gc\.max_size"):
        parse_config({**base, "pipeline": {"cache_gc": {"max_size": "lots"}}}, "test")
    with pytest.raises(ConfigError, match=r"pipeline\.cache_gc\.keep_days"):
        parse_config({**base, "pipeline": {"cache_gc": {"keep_days": -1}}}, "test")
    root = tmp_path / "cache"
    _layers(root, "d" * 64, 1, 100, 30)
    _layers(root, "e" * 64, 1, 100, 0)
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(root))
    report = collect_cache(parse_config(base, "test"))  # default policy: unused for 14 days
    assert report is not None and [r["key"] for r in report["removed"]] == ["d" * 64]
    off = parse_config({**base, "pipeline": {"cache_gc": {"enabled": False}}}, "test")
    _layers(root, "f" * 64, 1, 100, 30)
    assert collect_cache(off) is None and (root / "layers" / f"{'f' * 64}.stats.json").exists()


def test_evaluation_features_are_counted_and_collected_by_age_and_size(tmp_path: Path):
    root = tmp_path / "cache"
    keys = {}
    for name, days in (("old", 30.0), ("mid", 3.0), ("new", 0.0)):
        key = hashlib.sha256(name.encode()).hexdigest()
        path = root / "features" / key[:2] / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"f" * 1000)
        _age(path, days)
        keys[name] = path
    (root / "features" / "zz").mkdir()
    (root / "features" / "zz" / "not-a-key.safetensors").write_bytes(b"?")  # never an entry
    st = status(root)["areas"]["features"]
    assert st["entries"] == 3 and st["in_use"] == 0
    report = gc(root, keep_days=7, grace_seconds=0)
    assert [(r["area"], r["why"]) for r in report.removed] == [("features", "age")] and not keys["old"].exists()
    report = gc(root, max_size=1500, grace_seconds=0)  # the least recently used goes first
    assert not keys["mid"].exists() and keys["new"].exists() and report.freed_bytes == 1000
    assert not (root / "inuse").exists() or not list((root / "inuse").glob("features-*"))
