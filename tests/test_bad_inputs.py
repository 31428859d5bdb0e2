"""The catalogue of bad inputs: each gives a clear error naming the file/tensor/field, and no output."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from tests.helpers import leftovers, write_config


def _tensors(seed: int = 0, vocab: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(vocab, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.ones(8),
    }


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


class Case:
    """A workspace with a valid base and two fine-tunes that a case then breaks."""

    def __init__(self, root: Path):
        self.root = root
        self.base = _save(root / "base", _tensors(0))
        self.fts = [_save(root / f"ft{i}", _tensors(i + 1)) for i in range(2)]
        self.out = root / "merged"
        self.config = write_config(root / "merge.yml", "ties", self.base, self.fts)

    def edit_ft(self, i: int, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
        tensors = load_file(self.fts[i] / "model.safetensors")
        fn(tensors)
        save_file(tensors, self.fts[i] / "model.safetensors")

    def edit_config(self, fn: Callable[[dict], None]) -> None:
        data = yaml.safe_load(self.config.read_text())
        fn(data)
        self.config.write_text(yaml.safe_dump(data))


def _shape(c: Case) -> None:
    c.edit_ft(1, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(16, 9)))


def _missing(c: Case) -> None:
    c.edit_ft(0, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _extra(c: Case) -> None:
    c.edit_ft(0, lambda t: t.__setitem__("model.layers.0.adapter.weight", torch.zeros(4, 8)))


def _vocab(c: Case) -> None:
    c.edit_ft(1, lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(22, 8)))


def _dtype(c: Case) -> None:
    c.edit_ft(0, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half()))


def _truncated(c: Case) -> None:
    f = c.fts[1] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _corrupt_header(c: Case) -> None:
    f = c.fts[0] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#not json!!#"
    f.write_bytes(bytes(data))


def _header_too_long(c: Case) -> None:
    f = c.fts[0] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))


def _nan(c: Case) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")

    c.edit_ft(1, poison)


def _inf_in_base(c: Case) -> None:
    tensors = load_file(c.base / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, c.base / "model.safetensors")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))

    marker = ""


def _pickle_exec(c: Case) -> None:
    shutil.rmtree(c.fts[0])
    c.fts[0].mkdir()
    _Exploit.marker = str(c.root / "PWNED")
    torch.save({"model.norm.weight": torch.ones(8), "payload": _Exploit()}, c.fts[0] / "pytorch_model.bin")


def _unknown_method(c: Case) -> None:
    c.edit_config(lambda d: d.__setitem__("merge_method", "tiess"))


def _density_zero(c: Case) -> None:
    c.edit_config(lambda d: d["models"][1]["parameters"].__setitem__("density", 0.0))


def _density_above_one(c: Case) -> None:
    c.edit_config(lambda d: d.setdefault("parameters", {}).__setitem__("density", 1.5))


def _missing_model(c: Case) -> None:
    c.edit_config(lambda d: d["models"][0].__setitem__("model", str(c.root / "no-such-model")))


def _typo_key(c: Case) -> None:
    c.edit_config(lambda d: d.__setitem__("merge_methd", "ties"))


def _bad_param(c: Case) -> None:
    c.edit_config(lambda d: d.setdefault("parameters", {}).__setitem__("lambda", "auto"))


def _invalid_yaml(c: Case) -> None:
    c.config.write_text("merge_method: ties\nmodels: [unclosed\n")


def _slices(c: Case) -> None:
    c.edit_config(lambda d: d.__setitem__("slices", [{"sources": []}]))


def _only_base(c: Case) -> None:
    c.edit_config(lambda d: d.__setitem__("models", [{"model": str(c.base)}]))


def _index_missing_shard(c: Case) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (c.fts[1] / "model.safetensors.index.json").write_text(json.dumps(index))


# -- hardening: paths from index files, model folders and configs ------------------------------------


def _index_traversal(c: Case) -> None:
    outside = c.root / "outside.safetensors"
    save_file(_tensors(5), outside)
    weights = load_file(c.fts[1] / "model.safetensors")
    (c.fts[1] / "model.safetensors").unlink()
    save_file(weights, c.fts[1] / "model-00001-of-00001.safetensors")
    index = {"weight_map": {n: "../outside.safetensors" for n in weights}}
    (c.fts[1] / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_absolute(c: Case) -> None:
    index = {"weight_map": {"model.norm.weight": "/etc/passwd"}}
    (c.fts[1] / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_list(c: Case) -> None:
    (c.fts[1] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _symlink_side_file(c: Case) -> None:
    secret = c.root / "secret.txt"
    secret.write_text("TOP-SECRET-SIDE-FILE")
    (c.base / "tokenizer.json").symlink_to(secret)


def _weights_dir(c: Case) -> None:
    (c.fts[0] / "model.safetensors").unlink()
    (c.fts[0] / "model.safetensors").mkdir()


def _auto_map(c: Case) -> None:
    (c.base / "config.json").write_text(
        json.dumps({"model_type": "evil-arch", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}})
    )
    (c.base / "modeling_evil.py").write_text("open('PWNED', 'w').write('ran')\n")


def _config_not_utf8(c: Case) -> None:
    (c.base / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')


# -- hardening: safetensors headers -------------------------------------------------------------------


def _rewrite_header(c: Case, i: int, fn: Callable[[dict], object]) -> None:
    f = c.fts[i] / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header = fn(header) or header
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    f.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def _overlap(c: Case) -> None:
    def shift(h: dict) -> None:
        up, down = h["model.layers.0.mlp.up_proj.weight"], h["model.layers.0.mlp.down_proj.weight"]
        down["data_offsets"] = list(up["data_offsets"])  # same shape and size: reads up_proj's bytes

    _rewrite_header(c, 0, shift)


def _dtype_wrong_type(c: Case) -> None:
    _rewrite_header(c, 0, lambda h: h["model.norm.weight"].__setitem__("dtype", {"F32": 1}))


def _metadata_wrong_type(c: Case) -> None:
    _rewrite_header(c, 0, lambda h: h.__setitem__("__metadata__", ["not", "a", "map"]))


def _deep_header(c: Case) -> None:
    f = c.fts[0] / "model.safetensors"
    body = b"[" * 100_000 + b"]" * 100_000
    f.write_bytes(struct.pack("<Q", len(body)) + body)


# -- hardening: numbers ----------------------------------------------------------------------------------


def _lambda_inf(c: Case) -> None:
    c.edit_config(lambda d: d.__setitem__("parameters", {"lambda": float("inf")}))


def _weight_huge(c: Case) -> None:
    c.edit_config(lambda d: d["models"][0]["parameters"].__setitem__("weight", 1e400))


def _lambda_nan(c: Case) -> None:
    c.edit_config(
        lambda d: (d.__setitem__("merge_method", "neuromerging"), d.__setitem__("parameters", {"lambda": float("nan")}))
    )


def _weights_cancel(c: Case) -> None:
    # Finite parameters whose merge is not finite: normalize divides by a weight sum of exactly 0.
    c.edit_ft(0, lambda t: t.__setitem__("model.norm.weight", torch.full((8,), 3e38)))
    c.edit_ft(1, lambda t: t.__setitem__("model.norm.weight", torch.full((8,), 3e38)))
    c.edit_config(
        lambda d: (d.__setitem__("merge_method", "task_arithmetic"), d.__setitem__("parameters", {"lambda": 1.0}))
    )


CATALOGUE = [
    ("shape mismatch", _shape, ["shape mismatch", "model.layers.0.mlp.up_proj.weight", "[16, 8]", "[16, 9]"]),
    ("missing tensor", _missing, ["missing tensor", "model.layers.1.mlp.up_proj.weight", "ft0"]),
    ("extra tensor", _extra, ["extra tensor", "model.layers.0.adapter.weight", "task_specific"]),
    ("vocab mismatch", _vocab, ["vocab-size mismatch", "model.embed_tokens.weight", "20", "22"]),
    ("dtype mismatch", _dtype, ["dtype mismatch", "model.norm.weight", "float16"]),
    ("truncated file", _truncated, ["truncated", "ft1/model.safetensors"]),
    ("corrupt header", _corrupt_header, ["corrupt safetensors header", "ft0/model.safetensors"]),
    ("header length past end", _header_too_long, ["corrupt safetensors header", "ft0/model.safetensors"]),
    ("NaN in a weight", _nan, ["NaN/Inf", "model.layers.1.mlp.up_proj.weight", "ft1"]),
    ("Inf in the base", _inf_in_base, ["NaN/Inf", "model.norm.weight", "base"]),
    ("pickle that runs code", _pickle_exec, ["refused", "pytorch_model.bin", "execute code"]),
    ("unknown method", _unknown_method, ["merge.yml", "merge_method", "tiess", "known:"]),
    ("density 0", _density_zero, ["merge.yml", "models.1.parameters.density", "greater than 0"]),
    ("density above 1", _density_above_one, ["merge.yml", "parameters.density", "less than or equal to 1"]),
    ("missing model path", _missing_model, ["no-such-model", "does not exist"]),
    ("unknown key", _typo_key, ["merge.yml", "merge_methd", "Extra inputs"]),
    ("bad method parameter", _bad_param, ["merge.yml", "parameters.lambda"]),
    ("invalid YAML", _invalid_yaml, ["merge.yml", "invalid YAML"]),
    ("mergekit slices", _slices, ["merge.yml", "slices", "not supported"]),
    ("nothing to merge", _only_base, ["merge.yml", "nothing to merge"]),
    ("index lists a missing shard", _index_missing_shard, ["model.safetensors.index.json", "does not exist"]),
    ("index path leaves the folder", _index_traversal, ["model.safetensors.index.json", "../outside.safetensors"]),
    ("index names an absolute path", _index_absolute, ["model.safetensors.index.json", "absolute"]),
    ("index weight_map is a list", _index_list, ["model.safetensors.index.json", "weight_map"]),
    ("side file is a symlink out", _symlink_side_file, ["tokenizer.json", "symlink leaves the model folder"]),
    ("weights file is a directory", _weights_dir, ["ft0/model.safetensors", "directory"]),
    ("auto_map asks to run model code", _auto_map, ["config.json", "auto_map", "never runs model code"]),
    ("config.json not UTF-8", _config_not_utf8, ["config.json", "not UTF-8"]),
    ("overlapping data_offsets", _overlap, ["ft0/model.safetensors", "overlapping data_offsets"]),
    ("dtype of the wrong JSON type", _dtype_wrong_type, ["ft0/model.safetensors", "model.norm.weight", "dtype"]),
    ("__metadata__ not a map", _metadata_wrong_type, ["ft0/model.safetensors", "__metadata__"]),
    ("header nested too deeply", _deep_header, ["ft0/model.safetensors", "corrupt safetensors header"]),
    ("lambda .inf", _lambda_inf, ["merge.yml", "parameters.lambda", "finite"]),
    ("weight 1e400", _weight_huge, ["merge.yml", "models.0.parameters.weight", "finite"]),
    ("NeuroMerging lambda .nan", _lambda_nan, ["merge.yml", "parameters.lambda", "finite"]),
    ("merge overflows to Inf", _weights_cancel, ["model.norm.weight", "NaN/Inf", "the merge produced"]),
]


@pytest.mark.parametrize("label,breaker,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, capsys, label, breaker, expected):
    case = Case(tmp_path)
    breaker(case)
    code = main(["merge", str(case.config), str(case.out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, f"{label}: expected a clean error, got exit {code}"
    for text in expected:
        assert text in err, f"{label}: {text!r} not in error:\n{err}"
    assert leftovers(tmp_path, "merged") == []
    assert not (tmp_path / "PWNED").exists()


def test_failure_mid_merge_leaves_no_output_and_keeps_existing(tmp_path, capsys):
    case = Case(tmp_path)
    assert main(["merge", str(case.config), str(case.out), "--no-progress"]) == 0
    before = (case.out / "model.safetensors").read_bytes()
    _nan(case)  # a later layer: the merge starts, writes earlier tensors, then fails
    assert main(["merge", str(case.config), str(case.out), "--no-progress", "--overwrite"]) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert leftovers(tmp_path, "merged") == ["merged"]  # no temporaries
    assert (case.out / "model.safetensors").read_bytes() == before  # the old output is untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path exists only on machines without a GPU")
def test_cuda_requested_without_gpu(tmp_path, capsys):
    case = Case(tmp_path)
    assert main(["merge", str(case.config), str(case.out), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert leftovers(tmp_path, "merged") == []


def test_bad_shard_size(tmp_path, capsys):
    case = Case(tmp_path)
    assert main(["merge", str(case.config), str(case.out), "--out-shard-size", "lots"]) == 2
    assert "out-shard-size" in capsys.readouterr().err


# -- hardening: --overwrite never deletes an input, the current folder or home -------------------------


@pytest.mark.parametrize("target", ["base", "holder", "inside", "cwd", "home"])
def test_overwrite_refuses_to_delete_inputs(tmp_path, capsys, monkeypatch, target):
    case = Case(tmp_path / "work")
    (case.base / "keep.txt").write_text("input")
    out = {
        "base": case.base,
        "holder": tmp_path / "work",
        "inside": case.base / "sub",
        "cwd": tmp_path,
        "home": tmp_path / "home",
    }[target]
    out.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code = main(["merge", str(case.config), str(out), "--no-progress", "--overwrite"])
    assert code == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (case.base / "keep.txt").read_text() == "input"
    assert (case.base / "model.safetensors").exists() and out.exists()


# -- hardening: the hash cache sees a file rewritten in place --------------------------------------------


def test_file_rewritten_with_mtime_restored_is_hashed_again(tmp_path):
    from merging.io.checkpoint import HashCache

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 64)
    cache = HashCache(tmp_path / "hashes.json")
    first = cache.sha256(f)
    st = f.stat()
    with f.open("r+b") as fh:  # same size, same inode, mtime put back: only ctime tells
        fh.write(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(f) != first


def test_staged_rerun_verifies_inputs_before_reusing_layers(tmp_path):
    from merging.config import load_config
    from merging.engine.staged import plan_merge

    case = Case(tmp_path)
    cache = tmp_path / "cache"
    config = load_config(case.config)
    first = plan_merge(config, cache)
    # Rewrite a fine-tune in place, keeping size, inode and mtime (a stale hash cache would keep its sha256).
    f = case.fts[0] / "model.safetensors"
    st = f.stat()
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    data = case.root / "tmp.safetensors"
    save_file(tensors, data)
    with f.open("r+b") as fh:
        fh.write(data.read_bytes())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = plan_merge(config, cache)
    assert second.key != first.key


# -- hardening: heads of a classification base and of a pretraining-head base ----------------------------


def test_classification_base_keeps_its_head_and_the_fine_tunes_heads(tmp_path, capsys):
    base = _tensors(0)
    base["classifier.weight"] = torch.randn(1000, 8)
    base["classifier.bias"] = torch.zeros(1000)
    fts = []
    for i, labels in enumerate((3, 5)):
        t = _tensors(i + 1)
        t["classifier.weight"] = torch.randn(labels, 8)
        t["classifier.bias"] = torch.zeros(labels)
        fts.append(_save(tmp_path / f"ft{i}", t))
    cfg = write_config(tmp_path / "m.yml", "task_arithmetic", _save(tmp_path / "base", base), fts)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    heads = sorted(p.name for p in (tmp_path / "out" / "heads").iterdir())
    assert heads == ["base.safetensors", "ft0.safetensors", "ft1.safetensors"]
    assert load_file(tmp_path / "out" / "heads" / "ft1.safetensors")["classifier.weight"].shape == (5, 8)
    assert load_file(tmp_path / "out" / "heads" / "base.safetensors")["classifier.weight"].shape == (1000, 8)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "heads/base.safetensors" in card and "heads/ft0.safetensors" in card


def test_pretraining_head_base_merges_with_classification_fine_tunes(tmp_path):
    base = _tensors(0)
    base["cls.predictions.bias"] = torch.zeros(20)
    base["cls.predictions.transform.dense.weight"] = torch.randn(8, 8)
    fts = []
    for i in range(2):
        t = _tensors(i + 1)
        t["model.pooler.dense.weight"] = torch.randn(8, 8)  # freshly initialised by the fine-tune
        t["classifier.weight"] = torch.randn(2 + i, 8)
        fts.append(_save(tmp_path / f"ft{i}", t))
    cfg = write_config(tmp_path / "m.yml", "ties", _save(tmp_path / "base", base), fts)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    assert set(load_file(tmp_path / "out" / "heads" / "base.safetensors")) == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
    }
    assert set(load_file(tmp_path / "out" / "heads" / "ft0.safetensors")) == {
        "classifier.weight",
        "model.pooler.dense.weight",
    }


def test_card_shows_the_per_model_densities_used(tmp_path):
    case = Case(tmp_path)
    case.edit_config(lambda d: d["models"][1]["parameters"].__setitem__("density", 0.3))
    assert main(["merge", str(case.config), str(case.out), "--no-progress"]) == 0
    card = (case.out / "README.md").read_text()
    assert "`ft0` weight 1, density 0.5" in card and "`ft1` weight 1, density 0.3" in card


# -- hardening: a killed run's temporary folder is removed by the next run --------------------------------


def test_leftover_temporaries_of_dead_runs_are_removed(tmp_path):
    case = Case(tmp_path)
    dead = tmp_path / ".merged.tmp-999999999-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    old_style = tmp_path / ".merged.tmp-0a1b2c3d"
    old_style.mkdir()
    os.utime(old_style, (1, 1))
    assert main(["merge", str(case.config), str(case.out), "--no-progress"]) == 0
    assert leftovers(tmp_path, "merged") == ["merged"]


# -- hardening: a full disk is a one-line error and leaves nothing ------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root; skipped where it cannot be mounted)."""
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _too_big_for_the_small_disk(tmp_path):
    big = {"model.layers.0.mlp.up_proj.weight": torch.randn(512, 256), "model.norm.weight": torch.ones(256)}
    base = _save(tmp_path / "base", big)
    fts = [_save(tmp_path / f"ft{i}", {k: v + 0.1 * (i + 1) for k, v in big.items()}) for i in range(2)]
    return write_config(tmp_path / "m.yml", "task_arithmetic", base, fts)


def test_a_merge_that_cannot_fit_fails_before_writing_naming_the_folder_and_bytes(tmp_path, small_disk, capsys):
    cfg = _too_big_for_the_small_disk(tmp_path)
    code = main(["merge", str(cfg), str(small_disk / "merged"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    # 512x256 float32 weights + the norm + the card margin; the tmpfs has 256 KiB.
    assert f"not enough free space: the merged model in {small_disk}" in err and "Traceback" not in err
    import re

    needed = int(re.search(r"the merged model in \S+: [\d.]+ \w+ \((\d+) bytes\)", err).group(1))
    assert 512 * 256 * 4 + 256 * 4 < needed < 512 * 256 * 4 + 256 * 4 + 128 * 1024  # weights + side files + card
    assert "Nothing was written" in err
    assert list(small_disk.iterdir()) == []


def test_disk_full_while_writing_is_a_clear_error_and_leaves_no_partial_output(
    tmp_path, small_disk, capsys, monkeypatch
):
    # The check passed (here: turned off) but the disk fills while the merge writes.
    monkeypatch.setenv("MERGEFLOW_SKIP_SPACE_CHECK", "1")
    cfg = _too_big_for_the_small_disk(tmp_path)
    code = main(["merge", str(cfg), str(small_disk / "merged"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no space left on the device" in err and "Traceback" not in err
    assert list(small_disk.iterdir()) == []  # no output, no temporary folder


def test_the_staged_merge_writes_the_model_once_so_a_model_that_fits_once_fits(tmp_path, small_disk):
    """The model fits once on the small disk, not twice: with its cache and its output both there, the staged
    merge (what the pipeline runs) still succeeds, because each layer is written once, in place. A model that
    cannot fit fails before anything is merged, naming the folder and the bytes, and leaves nothing partial."""
    from merging.config import load_config
    from merging.engine.finalize import staged_merge
    from merging.engine.inplace import partial_dir
    from merging.engine.merge import MergeOptions, run_merge
    from merging.io.diskspace import DiskSpaceError

    cfg = _too_big_for_the_small_disk(tmp_path)
    with pytest.raises(DiskSpaceError) as info:
        staged_merge(load_config(cfg), small_disk / "big", small_disk / "cache")
    assert f"the merged model in {small_disk}" in str(info.value) and "Nothing was written" in str(info.value)
    assert not (small_disk / "big").exists() and not partial_dir(small_disk / "big").exists()
    assert {p.name for p in small_disk.iterdir()} <= {"cache", ".big.lock"}  # the statistics, an empty lock file

    layer = {"model.layers.0.mlp.up_proj.weight": torch.randn(128, 256), "model.norm.weight": torch.ones(256)}
    base = _save(tmp_path / "base", layer)
    fts = [_save(tmp_path / f"ft{i}", {k: v + 0.1 * (i + 1) for k, v in layer.items()}) for i in range(2)]
    config = load_config(write_config(tmp_path / "m.yml", "task_arithmetic", base, fts))
    model = 128 * 256 * 4 + 256 * 4
    assert 2 * model > 256 * 1024  # written twice (a layer cache, then a copy) it would not fit
    staged_merge(config, small_disk / "out", small_disk / "cache")
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    assert {p.name: p.read_bytes() for p in (small_disk / "out").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()
    }


# -- hardening: Ctrl-C mid-merge is one line and leaves nothing -------------------------------------------


def test_interrupt_mid_merge_prints_one_line_and_leaves_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    big = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(768, 768) for i in range(24)}
    base = _save(tmp_path / "base", big)
    fts = [_save(tmp_path / f"ft{i}", {k: v + 0.01 * (i + 1) for k, v in big.items()}) for i in range(3)]
    cfg = write_config(tmp_path / "m.yml", "neuromerging", base, fts)
    # A process started in the background by a non-interactive shell (`cmd &`, as a CI runner may start the
    # tests) inherits SIGINT as ignored, and Python keeps it so: the child restores Ctrl-C's default first.
    entry = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, "merge", str(cfg), str(tmp_path / "merged"), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, text
    assert text.strip() == "mergeflow: interrupted; nothing was published"
    assert leftovers(tmp_path, "merged") == []
