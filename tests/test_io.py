"""Checkpoint formats in, safetensors shards out."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.config import load_config
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import ConfigError
from merging.io.checkpoint import Checkpoint
from merging.io.writer import ShardedWriter, parse_size
from tests.helpers import write_config


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2, generator=g).half(),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        "e.flag": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.double": torch.randn(3, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("shard_size", [10**9, 40])
def test_writer_round_trip_all_dtypes(tmp_path, shard_size):
    tensors = sample_tensors()
    writer = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], shard_size)
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    writer.close()
    ck = Checkpoint(tmp_path)
    assert set(ck.infos) == set(tensors)
    for name, want in tensors.items():
        got = ck.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        if shard_size > 10**6:
            assert torch.equal(load_file(tmp_path / "model.safetensors")[name], want)
    ck.close()


@pytest.mark.parametrize("piece", [2, 6, 1 << 20])
def test_writer_casts_piece_by_piece_with_the_same_bytes_and_digest(tmp_path, monkeypatch, piece):
    """A tensor written in another dtype is converted WRITE_PIECE bytes at a time: the same bytes as one whole cast,
    and the digest the writer reports is that of the whole cast's bytes."""
    import hashlib

    import merging.io.writer

    monkeypatch.setattr(merging.io.writer, "WRITE_PIECE", piece)
    g = torch.Generator().manual_seed(3)
    source = {
        "w": torch.randn(7, 5, generator=g),
        "b": torch.randn(3, generator=g),
        "e": torch.zeros(0, 2),
        "t": torch.randn(4, 6, generator=g).t(),  # strided: copied once, in the output dtype
    }
    writer = ShardedWriter(tmp_path, [(k, torch.bfloat16, tuple(v.shape)) for k, v in source.items()])
    for name, tensor in source.items():
        digest = hashlib.sha256()
        assert writer.write(name, tensor, digest) == tensor.numel() * 2
        whole = tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
        assert digest.hexdigest() == hashlib.sha256(whole).hexdigest()
    writer.close()
    written = load_file(tmp_path / "model.safetensors")
    for name, tensor in source.items():
        assert torch.equal(written[name], tensor.to(torch.bfloat16))


def test_writer_refuses_a_tensor_that_does_not_fit_its_slot(tmp_path):
    writer = ShardedWriter(tmp_path, [("w", torch.float32, (4, 4))])
    with pytest.raises(ValueError, match="'w'"):
        writer.write("w", torch.zeros(4, 5))
    writer.abort()


def test_reads_sharded_single_bare_and_pickle(tmp_path):
    tensors = {"x.weight": torch.randn(4, 4), "y.bias": torch.randn(4)}
    (tmp_path / "single").mkdir()
    save_file(tensors, tmp_path / "single" / "model.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "sharded").mkdir()
    writer = ShardedWriter(tmp_path / "sharded", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], 1)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    for src in ["single", "bare.safetensors", "bin", "sharded", "bin/pytorch_model.bin"]:
        with Checkpoint(tmp_path / src) as ck:
            assert {k: torch.equal(ck.tensor(k), v) for k, v in tensors.items()} == {"x.weight": True, "y.bias": True}


def test_merge_reads_a_pickle_base_and_safetensors_fine_tunes(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"l.weight": torch.randn(6, 4, generator=g)}
    (tmp_path / "base").mkdir()
    torch.save(base, tmp_path / "base" / "pytorch_model.bin")
    fts = []
    for i in range(2):
        (tmp_path / f"ft{i}").mkdir()
        save_file(
            {"l.weight": base["l.weight"] + 0.1 * torch.randn(6, 4, generator=g)},
            tmp_path / f"ft{i}" / "model.safetensors",
        )
        fts.append(tmp_path / f"ft{i}")
    cfg = load_config(write_config(tmp_path / "c.yml", "task_arithmetic", tmp_path / "base", fts))
    run_merge(cfg, tmp_path / "out", MergeOptions(progress=False))
    got = load_file(tmp_path / "out" / "model.safetensors")["l.weight"]
    f = [load_file(p / "model.safetensors")["l.weight"] for p in fts]
    torch.testing.assert_close(got, f[0] + f[1] - base["l.weight"])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    assert parse_size(77) == 77
    for bad in ["", "GB", "-1", "5 parsecs", "0"]:
        with pytest.raises(ConfigError, match="out-shard-size"):
            parse_size(bad)


def test_hash_cache_reuses_and_invalidates(tmp_path):
    import os

    from merging.io.checkpoint import HashCache, file_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    cache = HashCache(tmp_path / "cache.json")
    first = cache.sha256(f)
    assert first == file_sha256(f)
    cache.save()
    again = HashCache(tmp_path / "cache.json")
    assert again._entries[str(f.resolve())]["sha256"] == first  # persisted
    f.write_bytes(b"b" * 1000)  # same size, new content and mtime
    os.utime(f, ns=(1, 1))
    assert again.sha256(f) == file_sha256(f) != first


def test_reads_legacy_pickle_format(tmp_path):
    tensors = {"x.weight": torch.randn(3, 2)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with Checkpoint(tmp_path) as ck:
        assert torch.equal(ck.tensor("x.weight"), tensors["x.weight"])


def test_stale_temporaries_are_those_of_dead_processes_or_older_than_this_one(tmp_path):
    import os

    from merging.io.writer import remove_stale_temporaries, temporary_sibling

    dest = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-aaaa"
    alive = tmp_path / f".out.tmp-{os.getppid()}-bbbb"  # our parent is alive: another run's work in progress
    mine = tmp_path / f".out.tmp-{os.getpid()}-cccc"
    old_style = tmp_path / ".out.tmp-0a1b2c3d"
    trash = tmp_path / ".out.old-999999999-dddd"
    other = tmp_path / ".other.tmp-999999999-eeee"
    for d in (dead, alive, mine, old_style, trash, other):
        d.mkdir()
    os.utime(old_style, (1, 1))
    remove_stale_temporaries(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, mine.name, other.name])
    fresh = temporary_sibling(dest)
    assert fresh.name.startswith(f".out.tmp-{os.getpid()}-") and not fresh.exists()
