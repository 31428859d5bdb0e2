"""The documentation cannot drift from the code: the configuration reference against the config models, a page
per command, every example listed, and `mkdocs build --strict` failing on each kind of drift."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merging.config_reference import check_reference, method_parameters, model_keys

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference" / "configuration.md"
MKDOCS = Path(sys.executable).parent / "mkdocs"


def _hooks():
    spec = importlib.util.spec_from_file_location("mergeflow_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_lists_exactly_the_models_keys():
    assert check_reference(REFERENCE.read_text()) == []


def test_the_key_paths_come_from_the_nested_models():
    from merging.config import MergeConfig

    leaves, sections = model_keys(MergeConfig)
    assert {
        "storage.uri",
        "models[].parameters.weight",
        "evaluation.tasks[].metric",
        "calibration.ood[].samples",
    } <= set(leaves)
    assert {"registry.gate", "calibration.router", "pipeline.cache_gc", "models[].parameters"} <= sections
    assert leaves["calibration.router.holdout"] == 0.2 and leaves["pipeline.runner"] == "threads"
    params = method_parameters()
    assert params["neuromerging"]["lambda"] == "auto" and params["ties"]["normalize"] is True
    assert "neuron_ratio" in params["min_merging"] and "lambda_" not in params["task_arithmetic"]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("| `storage.region` |", "| `storage.regoin` |"), "`storage.regoin`: documented, but no config model"),
        (("| `storage.region` |", "| `storage.regoin` |"), "`storage.region`: a config key missing"),
        (("| `seed` | `0` |", "| `seed` | `1` |"), "`seed`: the reference's default `1` is not the model's 0"),
        (("| `pipeline.runner` | `threads` |", "| `pipeline.runner` | `dask` |"), "`pipeline.runner`: the reference's"),
        (("| `ties` | `normalize` |", "| `ties` | `normalise` |"), "`ties` parameter `normalise`: documented"),
        (("| `ties` | `normalize` |", "| `ties` | `normalise` |"), "`ties` parameter `normalize`: missing"),
        (("| `min_merging` | `top_k` |", "| `min_merging` | `top_n` |"), "`min_merging` parameter `top_k`: missing"),
        (
            ("| `ties` | `lambda` | `1.0` |", "| `ties` | `lambda` | `0.5` |"),
            "`ties` parameter `lambda`: the reference",
        ),
        (
            ("| `dare_linear`, `dare_ties` | `rescale` |", "| `dare_lin`, `dare_ties` | `rescale` |"),
            "method `dare_lin`",
        ),
    ],
)
def test_the_check_names_each_kind_of_drift(edit, problem):
    text = REFERENCE.read_text()
    assert edit[0] in text
    problems = check_reference(text.replace(edit[0], edit[1], 1))
    assert any(p.startswith(problem) for p in problems), problems


def test_a_key_added_to_a_model_without_a_row_is_caught(monkeypatch):
    from merging.pipeline_config import StorageConfig

    fields = dict(StorageConfig.model_fields)
    fields["profile"] = fields["region"]
    monkeypatch.setattr(StorageConfig, "model_fields", fields)
    assert "`storage.profile`: a config key missing from the reference" in check_reference(REFERENCE.read_text())


def test_every_command_has_a_page_in_the_nav_and_its_help():
    hooks = _hooks()
    commands = hooks.commands()
    assert {"merge", "methods", "run", "demo", "zoo build", "evaluate", "stack", "cache", "predict"} <= set(commands)
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = []

    def walk(items):
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                walk(value) if isinstance(value, list) else pages.append(value)

    walk(nav)
    for command in commands:
        page = hooks.command_page(command)
        assert page in pages and (ROOT / "docs" / page).is_file(), command
        assert f"<!-- mergeflow-help: {command} -->" in (ROOT / "docs" / page).read_text()
    assert all((ROOT / "docs" / p).is_file() for p in pages)


def _site_copy(tmp_path: Path) -> Path:
    for name in ("docs", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


# Not --quiet: mkdocs counts the warnings strict mode fails on only when they are logged.
def _build(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(root / "site")],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_site_builds_strictly_and_each_drift_fails_it(tmp_path: Path):
    root = _site_copy(tmp_path / "ok")
    built = _build(root)
    assert built.returncode == 0, built.stderr
    merge_page = (root / "site" / "cli" / "merge" / "index.html").read_text()
    assert "usage: mergeflow merge" in merge_page and "--out-shard-size" in merge_page

    broken = _site_copy(tmp_path / "link")
    page = broken / "docs" / "pipeline.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    failed = _build(broken)
    assert failed.returncode != 0 and "no-such-page.md" in failed.stderr

    drift = _site_copy(tmp_path / "key")
    ref = drift / "docs" / "reference" / "configuration.md"
    ref.write_text(
        ref.read_text().replace("| `storage.max_attempts` | `5` | boto3 retries (standard mode, backoff) |\n", "")
    )
    failed = _build(drift)
    assert failed.returncode != 0 and "`storage.max_attempts`: a config key missing from the reference" in failed.stderr

    unlisted = _site_copy(tmp_path / "example")
    (unlisted / "examples" / "merge-extra.yml").write_text("merge_method: ties\n")
    failed = _build(unlisted)
    assert failed.returncode != 0 and "merge-extra.yml" in failed.stderr
