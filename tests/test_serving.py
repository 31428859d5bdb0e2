"""Registered champions served over HTTP by `mlflow models serve` (and `mlflow models predict` in batch):
the answers equal in-process predictions. Servers run on free loopback ports and are stopped with their
whole process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from infra.processes import free_port
from merging.config import MergeConfig
from merging.engine.merge import MergeOptions, run_merge
from merging.synthetic import build_family, write_bert_vocab
from tests.helpers import build_tiny_tasks

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def server_env(tracking: str) -> dict[str, str]:
    """The environment of `mlflow models serve|predict`: this venv first on PATH (it execs uvicorn)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true"}


def start_server(model_uri: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """Starts `mlflow models serve` on a free loopback port and waits for /ping.

    A free port is only free until someone binds it; when the server exits because its port was taken
    meanwhile, it is started again on a fresh port (three tries). Any other exit is a failure."""
    for _ in range(3):
        port = free_port()
        command = [MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local"]
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*command, "-h", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # generous: the suite must pass on a loaded machine
        while True:
            if proc.poll() is not None:
                text = log.read_text()
                if "address already in use" in text.lower():
                    break  # lost the port to another process: a fresh one
                raise AssertionError(f"mlflow models serve exited ({proc.returncode}):\n{text[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        return proc, url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                stop_server(proc)
                raise AssertionError(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve lost its port three times:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def served(model_uri: str, tracking: str, log: Path) -> Iterator[str]:
    """Runs `mlflow models serve` for `model_uri` on a free loopback port until the block ends."""
    proc, url = start_server(model_uri, server_env(tracking), log)
    try:
        yield url
    finally:
        stop_server(proc)


def invoke(url: str, frame: pd.DataFrame) -> pd.DataFrame:
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        answer = json.loads(r.read())
    return pd.DataFrame(answer["predictions"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A sqlite registry with two champions: a static classifier merge and a routed MIN-Merging model."""
    import mlflow
    import torch

    from merging.evaluation.heads import Head
    from merging.minmerging.build import MinMergingOptions, build_min_merging
    from merging.minmerging.router import RouterOptions
    from tasks.register import _save_mlflow_model
    from tasks.routed_model import log_routed_model

    root = tmp_path_factory.mktemp("serve")
    base, fts, _tasks = build_tiny_tasks(root / "tiny")
    merged = root / "merged"
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(base),
        models=[{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],  # type: ignore[list-item]
        parameters={"lambda": 0.5},
    )
    run_merge(config, merged, MergeOptions(progress=False))
    calibration = {"two": ["merge the model", "a neuron", "the base"], "three": ["task vectors", "of the fine", "a"]}
    heads = {"two": Head(torch.randn(2, 32), torch.zeros(2)), "three": Head(torch.randn(3, 32), torch.zeros(3))}
    options = MinMergingOptions(importance="norm", neuron_ratio=0.2, router=RouterOptions(holdout=0.34))
    build_min_merging(base, {"two": fts[0], "three": fts[1]}, calibration, root / "routed", options, heads)

    tracking = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    experiment = mlflow.create_experiment("serve", artifact_location=(root / "art").as_uri())
    client = mlflow.MlflowClient(tracking_uri=tracking)
    from tasks.storage import publish

    def logged(folder: Path, saved: str, task: str, labels: dict | None = None, published: str | None = None) -> str:
        """Returns the runs:/ URI of `folder` saved as the registry saves it (by reference when published)."""
        reference = None
        if published:
            manifest = publish(folder, str(root / "store" / published))
            reference = {"uri": str(root / "store" / published), "manifest": manifest, "storage": None}
        with mlflow.start_run(experiment_id=experiment):
            _save_mlflow_model(folder, root / saved, task, labels, reference)
            mlflow.log_artifacts(str(root / saved), "model")
            return f"runs:/{mlflow.active_run().info.run_id}/model"

    # The static champion as the pipeline registers it when storage is configured: one copy of the
    # weights, in the published folder; the MLflow model references it. "static-copy" holds them itself.
    labels = {"two": {"label_names": ["no", "yes"]}}
    static_uri = logged(merged, "saved", "feature-extraction", labels, published="static")
    static_copy_uri = logged(merged, "saved-copy", "feature-extraction", labels)
    with mlflow.start_run(experiment_id=experiment):
        routed_uri = log_routed_model(root / "routed", root).model_uri
    # A causal LM keeps MLflow's transformers flavor (text-generation), with an input example;
    # "llm-ref" is the same model published to storage, registered by reference (the generator pyfunc).
    llama_base, llama_fts = build_family(root / "llama", "llama", 2, scale=0.2)
    llm = root / "llm"
    llm_config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(llama_base),
        models=[{"model": str(f)} for f in llama_fts],  # type: ignore[misc]
        parameters={"lambda": 0.5},
    )
    run_merge(llm_config, llm, MergeOptions(progress=False))
    write_bert_vocab(llm, 64)  # the generated Llama has no tokenizer of its own
    llm_uri = logged(llm, "saved-llm", "text-generation")
    llm_ref_uri = logged(llm, "saved-llm-ref", "text-generation", published="llm")
    champions = {"static": static_uri, "static-copy": static_copy_uri, "routed": routed_uri}
    champions.update({"llm": llm_uri, "llm-ref": llm_ref_uri})
    for name, uri in champions.items():
        version = mlflow.register_model(uri, name)
        client.set_registered_model_alias(name, "champion", version.version)
    return root, tracking


def test_static_merge_champion_served_over_http_equals_in_process(registry):
    import mlflow

    root, tracking = registry
    frame = pd.DataFrame({"task": ["two", "three", "two"], "text": ["merge the model", "task vectors", "a neuron"]})
    mlflow.set_tracking_uri(tracking)
    local = mlflow.pyfunc.load_model("models:/static@champion").predict(frame)
    with served("models:/static@champion", tracking, root / "serve-static.log") as url:
        remote = invoke(url, frame)
        bad = pd.DataFrame({"task": ["nope"], "text": ["x"]})
        with pytest.raises(urllib.error.HTTPError) as info:
            invoke(url, bad)
        assert "no head for task(s) ['nope']" in info.value.read().decode()
    assert list(remote["task"]) == list(local["task"]) and list(remote["label"]) == list(local["label"])
    assert list(remote["label_index"]) == list(local["label_index"])
    assert remote["score"].tolist() == pytest.approx(local["score"].tolist(), abs=1e-6)
    for a, b in zip(remote["probabilities"], local["probabilities"]):
        assert list(a) == pytest.approx(list(b), abs=1e-6)


def weights_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def test_one_copy_per_version_the_referenced_models_answer_like_the_copies(registry):
    """With storage, the registered model holds a reference to the published folder and no weights;
    it loads them from there (checked against the manifest recorded at registration) and answers
    exactly as the model that holds them; a published file changed later is refused."""
    import mlflow
    import transformers

    from tasks.published_weights import PublishedWeightsError

    root, tracking = registry
    assert weights_in(root / "saved") == [] and weights_in(root / "saved-llm-ref") == []
    assert weights_in(root / "saved-copy")  # the copy holds the encoder and heads itself
    mlflow.set_tracking_uri(tracking)
    frame = pd.DataFrame({"task": ["two", "three", "two"], "text": ["merge the model", "task vectors", "a neuron"]})
    referenced = mlflow.pyfunc.load_model("models:/static@champion").predict(frame)
    copied = mlflow.pyfunc.load_model("models:/static-copy@champion").predict(frame)
    assert referenced.drop(columns="probabilities").equals(copied.drop(columns="probabilities"))
    assert list(referenced["label"][:1]) == [copied["label"][0]] and copied["label"][0] in ("no", "yes")
    # The causal LM: the generator pyfunc continues prompts as the transformers pipeline does, greedily.
    prompts = ["merge the model", "a neuron of"]
    generated = mlflow.pyfunc.load_model("models:/llm-ref@champion").predict(pd.DataFrame({"prompt": prompts}))
    pipe = transformers.pipeline("text-generation", model=str(root / "llm"), tokenizer=str(root / "llm"))
    want = [pipe(p, max_new_tokens=32, do_sample=False, return_full_text=False)[0]["generated_text"] for p in prompts]
    assert list(generated["prompt"]) == prompts and list(generated["generated_text"]) == want
    # A published file changed after registration (same size, one byte): refused, never served.
    head = root / "store" / "static" / "heads" / "two.safetensors"
    original = head.read_bytes()
    changed = bytearray(original)
    changed[-3] ^= 0x21
    head.write_bytes(bytes(changed))
    try:
        with pytest.raises(PublishedWeightsError, match=r"heads/two\.safetensors differs from what was registered"):
            mlflow.pyfunc.load_model("models:/static@champion")
    finally:
        head.write_bytes(original)


def test_routed_champion_served_over_http_equals_in_process(registry):
    import mlflow

    root, tracking = registry
    frame = pd.DataFrame({"text": ["merge the model", "task vectors", "of the fine tune"]})
    mlflow.set_tracking_uri(tracking)
    local = mlflow.pyfunc.load_model("models:/routed@champion").predict(frame)
    with served("models:/routed@champion", tracking, root / "serve-routed.log") as url:
        remote = invoke(url, frame)
    assert list(remote["task"]) == list(local["task"]) and list(remote["experts"]) == list(local["experts"])
    assert [x if x == x else None for x in remote["label"]] == [x if x == x else None for x in local["label"]]


def test_causal_lm_champion_served_over_http_equals_in_process(registry):
    import mlflow

    root, tracking = registry
    prompts = ["merge the model", "a neuron of"]
    mlflow.set_tracking_uri(tracking)
    local = mlflow.pyfunc.load_model("models:/llm@champion").predict(prompts)
    assert (root / "saved-llm" / "input_example.json").exists()
    with served("models:/llm@champion", tracking, root / "serve-llm.log") as url:
        body = json.dumps({"inputs": prompts}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            remote = json.loads(r.read())["predictions"]
    assert list(remote) == list(local) and all(isinstance(t, str) and t for t in remote)


def test_batch_scoring_mlflow_models_predict_on_csv_and_mergeflow_predict_on_parquet(registry, tmp_path: Path):
    import mlflow

    from flows.cli import main

    _root, tracking = registry
    frame = pd.DataFrame({"task": ["three", "two", "two"], "text": ["the base", "a neuron of the model", "merge"]})
    mlflow.set_tracking_uri(tracking)
    local = mlflow.pyfunc.load_model("models:/static@champion").predict(frame)
    # MLflow's own batch command reads JSON and CSV.
    frame.to_csv(tmp_path / "in.csv", index=False)
    command = [MLFLOW, "models", "predict", "-m", "models:/static@champion", "-i", str(tmp_path / "in.csv")]
    subprocess.run(
        [*command, "-t", "csv", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
        check=True,
        env=server_env(tracking),
        capture_output=True,
        timeout=600,
    )
    answer = json.loads((tmp_path / "out.json").read_text())
    batch = pd.DataFrame(answer["predictions"] if isinstance(answer, dict) else answer)
    assert list(batch["label_index"]) == list(local["label_index"])
    # Parquet in and out, in batches, the inputs kept beside the predictions.
    frame.to_parquet(tmp_path / "in.parquet")
    rc = main(
        [
            "predict",
            "models:/static@champion",
            str(tmp_path / "in.parquet"),
            str(tmp_path / "out.parquet"),
            "--batch-size",
            "2",
            "--tracking-uri",
            tracking,
        ]
    )
    assert rc == 0
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert list(scored["text"]) == list(frame["text"]) and list(scored["label_index"]) == list(local["label_index"])
    assert main(["predict", "models:/static@champion", str(tmp_path / "in.txt"), str(tmp_path / "o.parquet")]) == 2
