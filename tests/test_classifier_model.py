"""The registered form of a static encoder merge: a multi-task classifier pyfunc logged as models from code."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from merging.config import MergeConfig
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import ConfigError
from tests.helpers import build_tiny_tasks


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    from tasks.classifier_model import save_classifier_model

    root = tmp_path_factory.mktemp("classifier")
    base, fts, tasks = build_tiny_tasks(root / "tiny")
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(base),
        models=[{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],  # type: ignore[list-item]
        parameters={"lambda": 0.5},
    )
    merged = root / "merged"
    run_merge(config, merged, MergeOptions(progress=False))
    meta = {"two": {"label_names": ["no", "yes"], "max_length": 8}, "three": {"max_length": 8}}
    out = save_classifier_model(merged, root / "mlflow-model", meta)
    return root, merged, out, tasks


def test_saved_model_is_code_not_a_pickle_and_pins_its_requirements(saved):
    _root, _merged, out, _tasks = saved
    files = {p.name for p in out.rglob("*")}
    assert "python_model.pkl" not in files and "classifier_model.py" in files
    mlmodel = (out / "MLmodel").read_text()
    assert "model_code_path" in mlmodel
    requirements = (out / "requirements.txt").read_text().split()
    assert any(r.startswith("mergeflow==") for r in requirements)
    assert any(r.startswith("torch==") for r in requirements) and len(requirements) <= 8
    assert (out / "input_example.json").exists()


def test_predictions_equal_the_evaluation_harness(saved):
    import mlflow

    from merging.evaluation.encoder import encode, load_encoder
    from merging.evaluation.heads import load_head

    _root, merged, out, tasks = saved
    model = mlflow.pyfunc.load_model(str(out))
    specs = {t.name: t for t in tasks}
    from merging.evaluation.data import load_split

    frame = pd.DataFrame(
        [{"task": name, "text": text} for name in ("three", "two") for text in load_split(specs[name], "test").texts]
    )
    got = model.predict(frame)
    assert list(got.columns) == ["task", "label", "label_index", "score", "probabilities"]
    assert len(got) == len(frame) and list(got["task"]) == list(frame["task"])  # input order kept
    encoder = load_encoder(merged)
    for name in ("two", "three"):
        rows = got[got["task"] == name]
        texts = list(frame[frame["task"] == name]["text"])
        probs = torch.softmax(load_head(merged / "heads" / f"{name}.safetensors").logits(encode(encoder, texts, 8)), -1)
        assert list(rows["label_index"]) == probs.argmax(-1).tolist()
        got_probs = torch.tensor([list(p) for p in rows["probabilities"]], dtype=torch.float64)
        torch.testing.assert_close(got_probs, probs.double(), rtol=1e-5, atol=1e-6)
        assert rows["score"].tolist() == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)
    # Label names where the evaluation config gave them, class indices otherwise.
    assert set(got[got["task"] == "two"]["label"]) <= {"no", "yes"}
    assert set(got[got["task"] == "three"]["label"]) <= {"0", "1", "2"}


def test_bad_inputs_are_named(saved):
    import mlflow

    _root, _merged, out, _tasks = saved
    model = mlflow.pyfunc.load_model(str(out))
    with pytest.raises(Exception, match=r"no head for task\(s\) \['nope'\]; known tasks: \['three', 'two'\]"):
        model.predict(pd.DataFrame({"task": ["two", "nope"], "text": ["a", "b"]}))
    with pytest.raises(Exception, match="task"):
        model.predict(pd.DataFrame({"text": ["only text"]}))
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['text'\]"):
        python_model = model.unwrap_python_model()  # loaded from the logged code file, not this checkout
        assert type(python_model).__name__ == "MultiTaskClassifier"
        python_model.predict(None, pd.DataFrame({"task": ["two"]}))


def test_loading_needs_only_the_logged_folder(saved, tmp_path: Path):
    import shutil

    import mlflow

    _root, merged, out, _tasks = saved
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    moved = tmp_path / "merged-moved"
    shutil.move(str(merged), moved)  # the logged model must not need the merged folder it came from
    try:
        model = mlflow.pyfunc.load_model(str(copy))
        assert len(model.predict(pd.DataFrame({"task": ["two"], "text": ["merge the model"]}))) == 1
    finally:
        shutil.move(str(moved), merged)


def test_registry_fetch_checks_every_file_against_the_logged_manifest(saved, tmp_path: Path):
    import mlflow

    from tasks.download import fetch_model
    from tasks.register import _save_mlflow_model
    from tasks.storage import IntegrityError

    _root, merged, _out, _tasks = saved
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    experiment = mlflow.create_experiment("fetch", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        _save_mlflow_model(merged, tmp_path / "saved", "feature-extraction", {"two": {"max_length": 8}})
        mlflow.log_artifacts(str(tmp_path / "saved"), "model")
    ref = f"runs:/{run.info.run_id}/model"
    mlflow.set_tracking_uri(None)  # the fetch uses the URI it is given, and leaves the process's alone
    fetched = fetch_model(ref, tracking_uri=tracking, cache=tmp_path / "cache")
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != tracking
    assert fetched.detail["manifest"] == "yes"
    assert (fetched.path / "config.json").exists() and (fetched.path / "heads" / "two.safetensors").exists()
    weights = next((tmp_path / "art").rglob("artifacts/model/model.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one byte changed after logging
    with pytest.raises(IntegrityError, match=r"artifacts/model/model\.safetensors does not match the sha256"):
        fetch_model(ref, tracking_uri=tracking, cache=tmp_path / "cache2")
    weights.write_bytes(original)
    (weights.parent / "added.json").write_text("{}")  # a file slipped in after logging
    with pytest.raises(IntegrityError, match=r"not in the mergeflow-manifest\.json"):
        fetch_model(ref, tracking_uri=tracking, cache=tmp_path / "cache3")
