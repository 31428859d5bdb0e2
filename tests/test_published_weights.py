"""`published.json`: the reference a registered model keeps to its one published copy of the weights.

It is read when a registered model is loaded, so it is untrusted input: every field is checked and
every file is compared with the manifest recorded at registration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merging.errors import MergeflowError
from merging.untrusted import UnsafeInputError
from tasks.published_weights import (
    REFERENCE,
    PublishedWeightsError,
    endpoint_without_credentials,
    read_reference,
    resolve,
    write_reference,
)
from tasks.storage import publish


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, dict]:
    model = tmp_path / "model"
    (model / "heads").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "config.json").write_text("{}")
    (model / "heads" / "a.safetensors").write_bytes(b"head")
    store = tmp_path / "store" / "m"
    manifest = publish(model, str(store))
    return store, manifest


def test_a_reference_to_a_local_published_folder_resolves_to_it_checked(published, tmp_path: Path):
    store, manifest = published
    ref = tmp_path / "logged"
    write_reference(ref, str(store), manifest)
    assert resolve(ref) == store
    assert resolve(tmp_path / "store") == tmp_path / "store"  # no reference: the folder itself
    # Changed (same size), missing and unregistered files are each refused, naming the file.
    target = store / "heads" / "a.safetensors"
    target.write_bytes(b"HEAD")
    with pytest.raises(PublishedWeightsError, match=r"heads/a\.safetensors differs from what was registered"):
        resolve(ref)
    target.write_bytes(b"head")
    (store / "extra.bin").write_bytes(b"x")
    with pytest.raises(PublishedWeightsError, match=r"files not registered: \['extra\.bin'\]"):
        resolve(ref)
    (store / "extra.bin").unlink()
    (store / "config.json").unlink()
    with pytest.raises(PublishedWeightsError, match=r"config\.json differs"):
        resolve(ref)


def test_the_reference_never_holds_credentials():
    assert endpoint_without_credentials("http://KEY:SECRET@127.0.0.1:8333/x") == "http://127.0.0.1:8333/x"
    assert endpoint_without_credentials("https://s3.example.com") == "https://s3.example.com"
    assert endpoint_without_credentials(None) is None


def test_a_reference_written_with_a_credentialed_endpoint_keeps_only_the_host(published, tmp_path: Path):
    from merging.pipeline_config import StorageConfig

    _store, manifest = published
    storage = StorageConfig(uri="s3://b/p", endpoint_url="http://AKIA:topsecret@127.0.0.1:9/", credentials_block="k")
    path = write_reference(tmp_path / "logged", "s3://b/p/m", manifest, storage)
    text = path.read_text()
    assert "topsecret" not in text and "AKIA" not in text
    assert read_reference(path)["endpoint_url"] == "http://127.0.0.1:9/"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uri": "relative/folder"}, "field 'uri'.*must be s3://bucket/prefix or an absolute folder"),
        ({"uri": "http://evil.example/model"}, "field 'uri'.*must be s3://"),
        ({"uri": ""}, "field 'uri' must be a non-empty string"),
        ({"uri": 7}, "field 'uri' must be a non-empty string"),
        ({"format": 2}, "expected an object with format 1"),
        ({"endpoint_url": "http://k:s@host:1"}, "field 'endpoint_url' must be http.* without credentials"),
        ({"endpoint_url": "file:///etc"}, "field 'endpoint_url' must be http"),
        ({"credentials_block": ["x"]}, "field 'credentials_block' must be a string or null"),
    ],
)
def test_a_hostile_reference_is_a_clear_error_naming_the_field(published, tmp_path: Path, change, message):
    store, manifest = published
    path = write_reference(tmp_path / "logged", str(store), manifest)
    record = json.loads(path.read_text())
    record.update(change)
    path.write_text(json.dumps(record))
    with pytest.raises(PublishedWeightsError, match=message):
        read_reference(path)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "a/../../b", "x\nname"])
def test_a_reference_whose_file_names_leave_the_folder_is_refused(published, tmp_path: Path, name: str):
    store, manifest = published
    path = write_reference(tmp_path / "logged", str(store), manifest)
    record = json.loads(path.read_text())
    record["files"][name] = {"size": 4, "sha256": "0" * 64}
    path.write_text(json.dumps(record))
    with pytest.raises(UnsafeInputError):
        read_reference(path)


def test_an_unreadable_reference_names_the_file(tmp_path: Path):
    (tmp_path / REFERENCE).write_text("{not json")
    with pytest.raises(MergeflowError, match=f"{REFERENCE}: not readable JSON"):
        resolve(tmp_path)
