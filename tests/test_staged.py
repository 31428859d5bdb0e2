"""The staged merge (plan → prepare the output → one step per layer, written in place → finalize) against the
one-process merge, and its resumption after a killed run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from merging.config import load_config
from merging.engine.finalize import finalize, staged_merge
from merging.engine.inplace import output_entries, partial_dir
from merging.engine.merge import MergeOptions, run_merge
from merging.engine.staged import (
    close_inputs,
    merge_layer,
    open_inputs,
    plan_inputs,
    plan_merge,
    prepare_output,
)
from merging.errors import MergeflowError
from merging.io.writer import ShardedWriter
from merging.synthetic import build_family
from tests.helpers import METHODS, write_config


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_staged_equals_one_process_merge(tmp_path: Path, method: str) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=3, classification=True)
    extra = {"parameters": {"trim_scope": "model"}} if method == "ties" else {}
    config = load_config(write_config(tmp_path / "c.yml", method, base, fts, **extra))
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    report = staged_merge(config, tmp_path / "staged", cache=tmp_path / "cache")
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "staged")
    assert report.heads and (tmp_path / "staged" / "heads").is_dir()
    assert not partial_dir(tmp_path / "staged").exists()  # written in place, then renamed: nothing left beside it


def test_sharded_output_is_written_in_place_and_equals_one_process_merge(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    run_merge(config, tmp_path / "one", MergeOptions(progress=False, out_shard_size=40_000))
    staged_merge(config, tmp_path / "staged", tmp_path / "cache", shard_size=40_000)
    files = folder_bytes(tmp_path / "staged")
    assert "model.safetensors.index.json" in files and sum(n.endswith(".safetensors") for n in files) > 2
    assert folder_bytes(tmp_path / "one") == files


def _first_slot(config, part: Path, group: str, shard_size: int) -> tuple[Path, int]:
    """Returns the shard file and offset of a layer group's first tensor in the partial output."""
    base, models = open_inputs(config)
    try:
        plan = plan_inputs(config, base, models)
        writer = ShardedWriter.reopen(part / "model", output_entries(config, plan), shard_size)
        slot = writer.slots[plan.groups()[group][0].name]
        writer.abort()
        return part / "model" / writer.filenames[slot.shard], slot.offset
    finally:
        close_inputs(base, models)


def test_a_killed_run_resumes_only_the_missing_layers_and_checks_the_journaled_ones(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "neuromerging", base, fts))
    cache, out = tmp_path / "cache", tmp_path / "out"
    staged = prepare_output(config, plan_merge(config, cache), out, cache=cache)
    assert len(staged.groups) >= 3
    first = [merge_layer(config, staged, g) for g in staged.groups[:2]]  # then the run is killed
    assert not any(r.reused for r in first) and not out.exists()
    part = partial_dir(out.resolve())
    assert len(list((part / "journal").iterdir())) == 2
    # A new run (a new plan) has the same key and keeps the partial folder: two layers reused, the rest merged.
    again = prepare_output(config, plan_merge(config, cache), out, cache=cache)
    assert again.key == staged.key
    results = [merge_layer(config, again, g) for g in again.groups]
    assert [r.reused for r in results] == [True, True] + [False] * (len(again.groups) - 2)
    assert [r.sha256 for r in results[:2]] == [r.sha256 for r in first]
    # A journaled layer whose bytes changed since is merged again, not reused.
    shard, offset = _first_slot(config, part, results[0].group, again.shard_size)
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    redone = merge_layer(config, again, results[0].group)
    assert not redone.reused and redone.sha256 == results[0].sha256
    # A journal that no longer agrees with a layer's result: finishing is refused, nothing is published.
    journal = next(p for p in (part / "journal").iterdir() if json.loads(p.read_text())["group"] == results[1].group)
    entry = json.loads(journal.read_text())
    journal.write_text(json.dumps({**entry, "sha256": "0" * 64}))
    with pytest.raises(MergeflowError, match="changed since it was merged"):
        finalize(config, again, results, cache)
    assert not out.exists()
    journal.write_text(json.dumps(entry))
    finalize(config, again, results, cache)
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(tmp_path / "one") == folder_bytes(out)
    assert not part.exists()


def test_a_partial_folder_of_another_layout_is_started_afresh(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "task_arithmetic", base, fts))
    cache, out = tmp_path / "cache", tmp_path / "out"
    staged = plan_merge(config, cache)
    one = prepare_output(config, staged, out, cache=cache)
    merge_layer(config, one, one.groups[0])
    # The same merge with another shard size: the journaled layer sits at other offsets, so nothing is reused.
    other = prepare_output(config, staged, out, shard_size=40_000, cache=cache)
    results = [merge_layer(config, other, g) for g in other.groups]
    assert not any(r.reused for r in results)
    finalize(config, other, results, cache)
    run_merge(config, tmp_path / "one", MergeOptions(progress=False, out_shard_size=40_000))
    assert folder_bytes(tmp_path / "one") == folder_bytes(out)


def test_key_changes_with_parameters_and_inputs(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    a = load_config(write_config(tmp_path / "a.yml", "task_arithmetic", base, fts, parameters={"lambda": 0.3}))
    b = load_config(write_config(tmp_path / "b.yml", "task_arithmetic", base, fts, parameters={"lambda": 0.4}))
    cache = tmp_path / "cache"
    ka = plan_merge(a, cache).key
    assert ka != plan_merge(b, cache).key
    # Renaming the merge does not change what is merged.
    assert plan_merge(a.model_copy(update={"name": "other"}), cache).key == ka
    (fts[0] / "model.safetensors").write_bytes((fts[1] / "model.safetensors").read_bytes())
    assert plan_merge(a, cache).key != ka


def test_finalize_refuses_missing_layers(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    staged = prepare_output(config, plan_merge(config, tmp_path / "cache"), tmp_path / "out")
    results = [merge_layer(config, staged, g) for g in staged.groups[1:]]
    with pytest.raises(MergeflowError, match=staged.groups[0].replace(".", r"\.")):
        finalize(config, staged, results, tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_merge_layer_needs_a_prepared_output(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    staged = plan_merge(config, tmp_path / "cache")
    with pytest.raises(MergeflowError, match="prepare_output"):
        merge_layer(config, staged, staged.groups[0])
    with pytest.raises(MergeflowError, match="not in the plan"):
        merge_layer(config, staged, "no.such.layer")


def test_finalize_keeps_an_identical_output_and_redoes_a_touched_one(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "task_arithmetic", base, fts))
    cache = tmp_path / "cache"
    first = staged_merge(config, tmp_path / "out", cache)
    assert not first.reused
    before = folder_bytes(tmp_path / "out")
    again = staged_merge(config, tmp_path / "out", cache)
    assert again.reused and folder_bytes(tmp_path / "out") == before
    # Someone edits the output: the next run writes it again.
    (tmp_path / "out" / "README.md").write_text("edited")
    third = staged_merge(config, tmp_path / "out", cache)
    assert not third.reused and folder_bytes(tmp_path / "out") == before
    # A different config text (it is in the model card) is a different output.
    renamed = staged_merge(config.model_copy(update={"name": "renamed"}), tmp_path / "out", cache)
    assert not renamed.reused and folder_bytes(tmp_path / "out") != before


def test_two_runs_of_one_merge_at_once_write_it_once(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    reports: list = []
    errors: list = []

    def run() -> None:
        try:
            reports.append(staged_merge(config, tmp_path / "out", tmp_path / "cache"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.reused for r in reports) == [False, True]  # the second waited, then found it done
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "out")


def test_a_worker_thread_keeps_its_buffers_between_layer_tasks_until_finalize(tmp_path: Path) -> None:
    from merging.engine import staged as staged_module

    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    staged = prepare_output(config, plan_merge(config, tmp_path / "cache"), tmp_path / "out")
    largest = max(staged.groups, key=lambda g: staged.group_bytes[g])
    results = [merge_layer(config, staged, largest)]
    kept = {k: v.data_ptr() for k, v in staged_module._thread_buffers().items()}
    assert kept
    # Every later task on this thread works in the same memory: no fresh allocation, no page faults.
    results += [merge_layer(config, staged, g) for g in staged.groups if g != largest]
    assert {k: v.data_ptr() for k, v in staged_module._thread_buffers().items()} == kept
    finalize(config, staged, results, tmp_path / "cache")
    assert not staged_module._BUFFERS  # released once the layers are done
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "out")
