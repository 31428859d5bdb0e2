"""Returns the embedded-default demo: build a small model family locally, merge it with every method."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from merging.config import load_config
from merging.merge import MergeOptions, MergeReport, run_merge
from merging.synthetic import build_family

DEMO_METHODS: dict[str, dict[str, object]] = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3, "lambda": 1.0},
    "dare_linear": {"density": 0.5, "lambda": 0.5},
    "dare_ties": {"density": 0.5, "lambda": 1.0},
    "neuromerging": {"density": 0.3, "lambda": "auto"},
}


def task_vector_cosines(base: Path, merged: Path, fine_tunes: list[Path]) -> list[float]:
    """Returns the cosine between the merged model's task vector and each fine-tune's (shared tensors)."""
    from merging.checkpoint import Checkpoint
    from merging.plan import align_names

    with Checkpoint(base) as b, Checkpoint(merged) as m:
        cos = []
        for ft_path in fine_tunes:
            with Checkpoint(ft_path) as ft:
                names = align_names(set(m.infos), set(ft.infos))
                dot = na = nb = 0.0
                for name, src in names.items():
                    if name not in b.infos:
                        continue
                    tm = m.tensor(name).double() - b.tensor(name).double()
                    tf = ft.tensor(src).double() - b.tensor(name).double()
                    dot += float((tm * tf).sum())
                    na += float((tm * tm).sum())
                    nb += float((tf * tf).sum())
                cos.append(dot / max(1e-300, (na * nb) ** 0.5))
        return cos


def run_demo(workdir: Path | None = None, n_finetunes: int = 3) -> list[tuple[str, MergeReport, list[float]]]:
    """Returns (method, report, cosines) for each method merged on a generated BERT family."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    root = workdir or Path(tempfile.mkdtemp(prefix="mergeflow-demo-"))
    base, fine_tunes = build_family(root / "models", "bert", n_finetunes, classification=True, hidden=64, layers=2)
    results = []
    for method, params in DEMO_METHODS.items():
        config_path = root / f"{method}.yml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "merge_method": method,
                    "base_model": str(base),
                    "models": [{"model": str(f), "name": f.name} for f in fine_tunes],
                    "parameters": params,
                    "dtype": "float32",
                },
                sort_keys=False,
            )
        )
        out = root / "merged" / method
        report = run_merge(load_config(config_path), out, MergeOptions(progress=False, overwrite=True))
        with torch.inference_mode():
            AutoModel.from_pretrained(out)  # the merged folder must load as a transformers model
        results.append((method, report, task_vector_cosines(base, out, fine_tunes)))
    return results
