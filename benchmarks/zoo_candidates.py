"""Screens zoo v2's candidate tasks: which ones does fine-tuning improve over a linear probe, on validation?

The rule that chose the `full` zoo's merge tasks (docs/evaluation.md, "How the tasks were chosen"): a candidate is a
merge task when a fine-tuning run (seed 0, the `full` recipe, learning rate 5e-5; a candidate short
of the bar gets a second run at 1e-4 and the better run counts) beats the base's linear probe on the
candidate's *validation* split by at least 5 points; the test split is not read. Candidates that
fail the rule can still serve as out-of-domain tasks.

    .venv/bin/python benchmarks/zoo_candidates.py             # every candidate (~25 min on 2 cores)
    .venv/bin/python benchmarks/zoo_candidates.py movie_review tweet_sentiment

Writes benchmarks/results/zoo_candidates.json and prints a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.evaluation.encoder import encode, load_encoder  # noqa: E402
from merging.evaluation.heads import fit_probe  # noqa: E402
from merging.evaluation.metrics import score  # noqa: E402
from merging.zoo.build import base_model_path  # noqa: E402
from merging.zoo.finetune import Job, finetune_task, predict  # noqa: E402
from merging.zoo.splits import SIZES, split_seed, split_source  # noqa: E402
from merging.zoo.suites import BUILDERS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "zoo_candidates.json"
CANDIDATES = [
    "movie_review",
    "tweet_sentiment",
    "headline_match",
    "dialogue_next_line",
    "speech_continuation",
    "name_gender",
    "bbc_topic",
    "review_same_movie",
    "seinfeld_laugh",
    "news_same_article",
]
RULE_POINTS = 5.0


def main() -> None:
    names = sys.argv[1:] or CANDIDATES
    spec = SIZES["full"]
    base = base_model_path()
    encoder = load_encoder(base)
    rows = []
    for name in names:
        source = BUILDERS[name]()
        parts = split_source(source, spec, split_seed(name))  # the splits the zoo build uses
        feats = {s: encode(encoder, parts[s][0], source.max_length) for s in ("train", "validation")}
        labels = {s: torch.tensor(parts[s][1]) for s in ("train", "validation")}
        probe = fit_probe(
            feats["train"], labels["train"], len(source.label_names), feats["validation"], labels["validation"]
        )
        probe_val = score(source.metric, probe.predict(feats["validation"]), labels["validation"])
        started = time.perf_counter()
        tried: dict[str, float] = {}
        run = None
        for lr in (5e-5, 1e-4):
            job = Job(
                base,
                parts["train"],
                parts["validation"],
                probe,
                "joint",
                spec.recipe,
                source.max_length,
                0,
                source.label_names,
                source.metric,
            )
            one = finetune_task(job, learning_rates=(lr,))
            tried[f"{lr:g}"] = round(one.validation, 4)
            if run is None or one.validation > run.validation:
                run = one
            if 100 * (run.validation - probe_val) >= RULE_POINTS:
                break
        tokenizer = AutoTokenizer.from_pretrained(base)
        tuned_val = score(
            source.metric,
            predict(run.model, tokenizer, parts["validation"][0], source.max_length),
            labels["validation"],
        )
        row = {
            "task": name,
            "examples": len(source.texts),
            "train": len(parts["train"][0]),
            "validation": len(parts["validation"][0]),
            "probe_validation": round(probe_val, 4),
            "finetune_validation": round(tuned_val, 4),
            "margin_points": round(100 * (tuned_val - probe_val), 2),
            "selected": 100 * (tuned_val - probe_val) >= RULE_POINTS,
            "learning_rate": run.learning_rate,
            "runs": tried,
            "steps": run.steps,
            "best_step": run.best_step,
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(
            f"{name:22s} probe {probe_val:.3f}  fine-tune {tuned_val:.3f}  {row['margin_points']:+6.1f}  "
            f"{'merge' if row['selected'] else '-':5s}  {row['seconds']:.0f} s",
            flush=True,
        )
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rule_points": RULE_POINTS, "rows": []}
    kept = [r for r in existing["rows"] if r["task"] not in names]
    existing["rows"] = kept + rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
