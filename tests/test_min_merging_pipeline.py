"""MIN-Merging in the pipeline (prefect_test_harness, embedded MLflow): calibrate_router, routed evaluation,
registration of the routed pyfunc through the same gate, and the calibration input catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.merge_pipeline import run_pipeline
from merging.config import parse_config
from merging.errors import ConfigError
from merging.minmerging.calibration import calibration_set
from merging.synthetic import WORDS
from tests.test_pipeline import aliases, pipeline_config, versions

# Two vocabularies, one per task: a router over θ₀'s features can tell the tasks apart from the input.
VOCAB = {"two": WORDS[:12], "three": WORDS[12:]}


def write_texts(folder: Path, words: list[str], n: int = 30, split: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"text": f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]} {words[(5 * i + 2) % len(words)]}"}
        for i in range(n)
    ]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers import build_tiny_tasks

    root = tmp_path_factory.mktemp("min-family")
    base, fts, tasks = build_tiny_tasks(root)
    for name, words in VOCAB.items():
        write_texts(root / "calib" / name, words)
    write_texts(root / "calib" / "empty", [], n=0)
    return root, base, fts, tasks


def min_config(root: Path, base: Path, fts: list[Path], work: Path, **overrides: object) -> dict:
    data = pipeline_config(root, base, fts, work)
    data.update(
        {
            "merge_method": "min_merging",
            "parameters": {"neuron_ratio": 0.2, "shared_method": "ties", "shared_parameters": {"density": 0.5}},
            "calibration": {
                "tasks": [{"name": n, "dataset": str(root / "calib" / n)} for n in VOCAB],
                "ood": [{"name": "ood", "dataset": str(root / "data" / "ood")}],
                "samples": 24,
                "router": {"holdout": 0.25, "epochs": 200},
            },
            "registry": {**data["registry"], "model_name": "tiny-routed"},
        }
    )
    data.update(overrides)
    return data


def test_min_merging_flow_calibrates_evaluates_and_registers_the_routed_model(prefect_harness, family, tmp_path):
    import mlflow
    import pandas as pd

    root, base, fts, _ = family
    work = tmp_path / "work"
    # A static merge is champion first; the routed model then competes through the same gate.
    static = pipeline_config(
        root, base, fts, work, registry={"model_name": "tiny-routed", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}
    )
    first = run_pipeline(parse_config(static, "test"))
    assert first.registration is not None and "champion" in first.registration.aliases
    result = run_pipeline(parse_config(min_config(root, base, fts, work), "test"))

    # The router separates the two vocabularies; metrics reach MLflow.
    assert result.router is not None and result.router["router_accuracy"] >= 0.9
    assert not result.warnings
    reg = result.registration
    assert reg is not None and reg.version == "2"
    client = mlflow.MlflowClient(tracking_uri=reg.tracking_uri)
    run = client.get_run(reg.run_id)
    for key in (
        "router.router_accuracy",
        "router.threshold",
        "router.ood_detection_rate",
        "storage.patch_fraction_per_task",
        "strict_average_normalized",
        "routing_accuracy",
        "average_normalized",
        "shared.average_normalized",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["router.router_accuracy"] == pytest.approx(result.router["router_accuracy"])
    assert run.data.params["merge_method"] == "min_merging"
    # The gate decided by the same rule as for static merges.
    static_value = first.metrics["average_normalized"]
    routed_value = result.metrics["average_normalized"]
    assert reg.gate_passed == (routed_value >= static_value)
    assert aliases(reg.tracking_uri, "tiny-routed")["champion"] == ("2" if reg.gate_passed else "1")
    assert f"{routed_value:.4f}" in reg.gate_reason and f"{static_value:.4f}" in reg.gate_reason

    # Evaluation: the routed model is `merged`, θ_shared alone is `shared`; strict and routing rates reported.
    report = json.loads((work / "results" / result.merge_key[:16] / "results.json").read_text())
    merged = report["models"]["merged"]
    assert set(merged["strict"]) == {"two", "three"} and set(report["models"]["shared"]["scores"]) == {"two", "three"}
    assert merged["average_normalized"] == pytest.approx(result.metrics["average_normalized"])
    assert 0 <= merged["ood"]["ood"]["flagged_out_of_domain"] <= 1

    # Published with a manifest; the routed folder holds θ_shared, patches, router and heads.
    store = Path(result.published)
    assert store.name.endswith("-routed")
    for part in (
        "routed.json",
        "shared/config.json",
        "patches/two.safetensors",
        "router/router.json",
        "heads/three.safetensors",
        "base/config.json",  # θ₀ inside: the published routed model loads anywhere
        "mergeflow-manifest.json",
    ):
        assert (store / part).exists(), part
    assert json.loads((store / "routed.json").read_text())["base"] == "base"
    # One copy per version: the registered model references the published folder and holds no weights.
    mlflow.set_tracking_uri(reg.tracking_uri)  # registering did not set it (the conftest puts it back)
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{reg.run_id}/model", dst_path=str(tmp_path / "logged")))
    assert [p.parent.parent.name for p in logged.rglob("published.json")] == ["artifacts"]
    assert not list(logged.rglob("*.safetensors"))

    # The registered version is a pyfunc that routes raw text and predicts labels with the routed task's head.
    model = mlflow.pyfunc.load_model(f"models:/tiny-routed/{reg.version}")
    texts = [" ".join(VOCAB["two"][:3]), " ".join(VOCAB["three"][:3])]
    out = model.predict(pd.DataFrame({"text": texts}))
    assert list(out["task"]) == ["two", "three"]
    assert 0 <= out["label"][0] < 2 and 0 <= out["label"][1] < 3


def test_chance_router_warns_loudly_and_can_fail_the_run(prefect_harness, family, tmp_path, caplog):
    import mlflow

    root, base, fts, _ = family
    work = tmp_path / "work"
    # The evaluation data of both tasks come from the same words: the router cannot tell them apart.
    same = {
        "tasks": [{"name": n, "dataset": str(root / "data" / n)} for n in ("two", "three")],
        "samples": 24,
        "router": {"holdout": 0.25, "epochs": 50},
    }
    data = min_config(root, base, fts, work, calibration=same)
    result = run_pipeline(parse_config(data, "test"))
    assert result.warnings and "close to chance" in result.warnings[0]
    assert any("ROUTER WARNING" in r.getMessage() for r in caplog.records)
    reg = result.registration
    assert reg is not None
    client = mlflow.MlflowClient(tracking_uri=reg.tracking_uri)
    assert "close to chance" in client.get_run(reg.run_id).data.tags["mergeflow.warnings"]
    assert "close to chance" in client.get_model_version("tiny-routed", reg.version).tags["mergeflow.warnings"]
    # With fail_on_chance the run fails, and nothing new is registered.
    strict = min_config(root, base, fts, work, calibration={**same, "fail_on_chance": True})
    with pytest.raises(ConfigError, match="fail_on_chance"):
        run_pipeline(parse_config(strict, "test"))
    assert versions(reg.tracking_uri, "tiny-routed") == [reg.version]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": [{"name": "nope", "dataset": "X"}]}, "nope match no fine-tune"),
        ({"tasks": [{"name": "two", "dataset": "CAL/two"}]}, "no calibration texts for fine-tune\\(s\\) three"),
        ({"tasks": [{"name": "two", "dataset": "CAL/two"}, {"name": "three", "dataset": "CAL/empty"}]}, "is empty"),
        (
            {
                "tasks": [
                    {"name": "two", "dataset": "CAL/two", "text_column": "body"},
                    {"name": "three", "dataset": "CAL/three"},
                ]
            },
            "no column 'body'",
        ),
        (
            {"tasks": [{"name": "two", "dataset": "CAL/missing.jsonl"}, {"name": "three", "dataset": "CAL/three"}]},
            "does not exist",
        ),
    ],
)
def test_bad_calibration_sets_are_named(family, tmp_path, change, message):
    root, base, fts, _ = family
    cal = json.loads(json.dumps(change).replace("CAL", str(root / "calib")))
    config = parse_config(min_config(root, base, fts, tmp_path, calibration=cal), "test")
    with pytest.raises(ConfigError, match=message):
        calibration_set(config)


def test_one_task_and_missing_sections_are_errors(family, tmp_path):
    root, base, fts, _ = family
    one = min_config(
        root,
        base,
        fts,
        tmp_path,
        models=[{"model": str(fts[0]), "name": "two"}],
        calibration={"tasks": [{"name": "two", "dataset": str(root / "calib" / "two")}]},
    )
    with pytest.raises(ConfigError, match="at least two fine-tunes"):
        calibration_set(parse_config(one, "test"))
    no_section = min_config(root, base, fts, tmp_path)
    del no_section["calibration"]
    with pytest.raises(ConfigError, match="needs a `calibration` section"):
        parse_config(no_section, "test")
    bad_shared = min_config(root, base, fts, tmp_path, parameters={"shared_method": "nope"})
    with pytest.raises(ConfigError, match="unknown shared_method 'nope'"):
        parse_config(bad_shared, "test")
    bad_shared_params = min_config(root, base, fts, tmp_path, parameters={"shared_parameters": {"density": 3}})
    with pytest.raises(ConfigError, match=r"parameters\.shared_parameters\.density"):
        parse_config(bad_shared_params, "test")
    with pytest.raises(ConfigError, match=r"evaluation\.search"):
        parse_config(
            min_config(
                root,
                base,
                fts,
                tmp_path,
                evaluation={"tasks": [{"name": "two", "dataset": "x"}], "search": {"lambda": [0.5]}},
            ),
            "test",
        )


def test_neuron_ratio_auto_picks_the_best_validation_ratio_within_the_storage_budget(prefect_harness, family, tmp_path):
    from merging.minmerging.auto import estimated_patch_fraction
    from merging.minmerging.routed import RoutedModel

    root, base, fts, _ = family
    work = tmp_path / "work"
    params = {"neuron_ratio": "auto", "storage_budget": 0.12, "neuron_ratio_grid": [0.05, 0.2, 0.6]}
    params.update({"shared_method": "ties", "shared_parameters": {"density": 0.5}})
    data = min_config(root, base, fts, work, parameters=params)
    del data["registry"]
    result = run_pipeline(parse_config(data, "test"))
    choice = result.search
    assert choice is not None and choice["storage_budget"] == 0.12
    estimated = {float(k): v for k, v in choice["estimated_patch_fraction"].items()}
    fitting = [r for r, f in sorted(estimated.items()) if f <= 0.12]
    assert fitting and len(fitting) < 3  # the budget leaves the largest ratio out before anything is built
    assert [p["neuron_ratio"] for p in choice["points"]] == fitting
    assert all(p["patch_fraction"] <= 0.12 for p in choice["points"])
    best = max(choice["points"], key=lambda p: p["validation_normalized"])  # max keeps the first (smaller) on ties
    assert choice["neuron_ratio"] == best["neuron_ratio"]
    # The estimate is exactly the chosen patch's tensor bytes (rows and int64 indices of every linear layer)
    # over the model's parameter bytes; the measured fraction adds the files' headers and the folder's extras.
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base)
    routed = RoutedModel.load(result.merged_dir)
    patch = routed.patches["two"]
    tensor_bytes = sum(rows.numel() * rows.element_size() + idx.numel() * 8 for idx, rows in patch.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # patch_dtype auto (the default) stores this float32 model's rows in float16
    assert tensor_bytes / model_bytes == pytest.approx(
        estimated_patch_fraction(model, choice["neuron_ratio"], dtype=torch.float16)
    )
    chosen = next(p for p in choice["points"] if p["neuron_ratio"] == choice["neuron_ratio"])
    assert chosen["patch_fraction"] >= tensor_bytes / model_bytes
    assert not any((work / "neuron-ratio").glob("*/ratio-*"))  # scratch models are gone


def test_neuron_ratio_auto_bad_inputs(family, tmp_path):
    root, base, fts, _ = family
    no_eval = min_config(root, base, fts, tmp_path, parameters={"neuron_ratio": "auto"})
    del no_eval["evaluation"]
    with pytest.raises(ConfigError, match=r"neuron_ratio: `auto` is chosen on the evaluation"):
        parse_config(no_eval, "test")
    for bad, message in (
        ({"neuron_ratio": "most"}, r"parameters\.neuron_ratio"),
        ({"neuron_ratio": "auto", "storage_budget": 0}, r"parameters\.storage_budget"),
        ({"neuron_ratio": "auto", "neuron_ratio_grid": [0.1, 2]}, r"parameters\.neuron_ratio_grid"),
        ({"neuron_ratio": "auto", "neuron_ratio_grid": []}, r"parameters\.neuron_ratio_grid"),
        ({"shared_from": "base", "shared_method": "ties"}, r"parameters.*shared_from base makes θ_shared θ₀"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(min_config(root, base, fts, tmp_path, parameters=bad), "test").method_params()


def test_neuron_ratio_auto_budget_below_every_patch_fails_before_any_merging(prefect_harness, family, tmp_path):
    root, base, fts, _ = family
    work = tmp_path / "work"
    params = {"neuron_ratio": "auto", "storage_budget": 0.0001, "neuron_ratio_grid": [0.05, 0.2]}
    data = min_config(root, base, fts, work, parameters=params)
    del data["registry"]
    with pytest.raises(ConfigError, match=r"storage_budget 0\.0001: no neuron ratio of the grid fits"):
        run_pipeline(parse_config(data, "test"))
    assert not (work / "merged").exists()


def test_bad_calibration_fails_before_any_merging(prefect_harness, family, tmp_path):
    root, base, fts, _ = family
    work = tmp_path / "work"
    data = min_config(
        root,
        base,
        fts,
        work,
        calibration={
            "tasks": [{"name": "two", "dataset": str(root / "calib" / "two")}, {"name": "thre", "dataset": "x"}]
        },
    )
    with pytest.raises(ConfigError, match="thre match no fine-tune"):
        run_pipeline(parse_config(data, "test"))
    assert not (work / "merged").exists() and not (work / "enhanced").exists()


def test_static_merge_cannot_take_a_routed_method(family, tmp_path):
    from merging.engine.merge import MergeOptions, run_merge

    root, base, fts, _ = family
    config = parse_config(min_config(root, base, fts, tmp_path), "test")
    with pytest.raises(ConfigError, match="not a static merge"):
        run_merge(config, tmp_path / "out", MergeOptions(progress=False))


def test_zoo_calibration_takes_train_texts_and_treats_the_rest_as_out_of_domain(ci_zoo):
    from merging.evaluation.data import load_split
    from merging.zoo import zoo_merge_config

    root, manifest = ci_zoo
    merge_tasks = [t.name for t in manifest.merge_tasks()]
    config = zoo_merge_config(root, "task_arithmetic")
    # Merge only the first three fine-tunes: the other zoo tasks are out of domain for this merge.
    data = config.model_dump(mode="json", exclude_none=True)
    data["models"] = data["models"][:3]
    data.update(merge_method="min_merging", calibration={"zoo": str(root), "samples": 10, "seed": 3})
    calib = calibration_set(parse_config(data, "test"))
    assert list(calib.texts) == merge_tasks[:3]
    for task in merge_tasks[:3]:
        spec = next(t for t in manifest.tasks if t.name == task).spec(root)
        train = set(load_split(spec, "train").texts)
        assert len(calib.texts[task]) == 10 and set(calib.texts[task]) <= train
    others = [t.name for t in manifest.tasks if t.name not in merge_tasks[:3]]
    assert sorted(k.removeprefix("ood:") for k in calib.sources if k.startswith("ood:")) == sorted(others)
    assert len(calib.ood) == 10 * len(others)
    # Seeded: the same section draws the same texts.
    assert calibration_set(parse_config(data, "test")).texts == calib.texts


def test_demo_configs_load_for_every_method(ci_zoo, tmp_path):
    from flows.demo import DEMO_METHODS, demo_config
    from merging.config import load_config

    root, _ = ci_zoo
    for method, parameters in DEMO_METHODS.items():
        config = load_config(demo_config(root, method, parameters, tmp_path))
        assert config.merge_method == method and config.registry is not None
        if method == "min_merging":
            assert config.calibration is not None and config.calibration.zoo == str(root)
            assert len(calibration_set(config).texts) == len(config.fine_tunes())


def test_a_failed_min_merging_run_leaves_no_enhanced_fine_tunes(prefect_harness, family, tmp_path, monkeypatch):
    from merging.errors import MergeflowError

    root, base, fts, _ = family
    work = tmp_path / "work"
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEFLOW_FAULT_LAYER", "encoder.layer.0")
    with pytest.raises(MergeflowError, match="injected fault"):
        run_pipeline(parse_config(min_config(root, base, fts, work), "test"))
    assert (work / "enhanced").is_dir() and not list((work / "enhanced").iterdir())
