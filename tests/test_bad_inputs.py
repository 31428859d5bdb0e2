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
