"""Writes the per-task bar chart of an evaluation report as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: str | Path, title: str = "per-task scores") -> Path:
    """Writes grouped bars (one group per task; base probe, fine-tuned, each merged model) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t["name"] for t in report["tasks"]]
    series: dict[str, dict[str, float]] = {
        "base (probe)": report["base_probe"]["scores"],
        "fine-tuned": report["finetuned"],
    }
    for name, scores in report["models"].items():
        merged = dict(scores["scores"])
        merged.update({t: v["merged_probe"] for t, v in scores.get("ood", {}).items()})
        series[name] = merged
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) * max(1, len(series) / 3)), 4.2))
    for i, (name, scores) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(tasks))]
        ax.bar(xs, [scores.get(t, float("nan")) for t in tasks], width, label=name)
    ood = {t["name"] for t in report["tasks"] if t["role"] == "out_of_domain"}
    ax.set_xticks(range(len(tasks)), [f"{t}\n(out-of-domain, probe)" if t in ood else t for t in tasks], fontsize=8)
    ax.set_ylabel(f"{report['split']} score")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=min(4, len(series)))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
