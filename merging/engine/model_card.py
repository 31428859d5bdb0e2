"""Returns the model card (README.md) of a merged model: method, parameters, inputs and hashes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

import merging
from merging.engine.labels import model_labels

if TYPE_CHECKING:
    from merging.config import MergeConfig
    from merging.engine.output import MergeReport
    from merging.methods.base import MergeMethod, MethodParams


@dataclass(frozen=True)
class InputRecord:
    """One input model: its role label, path, and sha256 of each weight file."""

    label: str
    path: str
    sha256: dict[str, str]


def render_model_card(config: MergeConfig, method: MergeMethod, params: MethodParams, report: MergeReport) -> str:
    """Returns the markdown model card, with YAML front matter a model hub understands."""
    front: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["merge", "mergeflow", config.merge_method],
        "base_model": [config.base_model],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {config.name or 'Merged model'}", ""]
    lines += [
        f"Merged with [mergeflow](https://pypi.org/project/mergeflow/) {merging.__version__} using "
        f"**{method.pretty_name}** ([paper]({method.reference_url})).",
        "",
        "## Method and parameters",
        "",
        f"- method: `{method.name}` — {method.describe(params) or method.pretty_name}",
        f"- parameters: `{params.model_dump(by_alias=True, exclude_none=True)}`",
        "- per model (the weight and density actually used): "
        + "; ".join(
            f"`{label}` weight {config.model_weight(e, params):g}, density {config.model_density(e, params):g}"
            for e, label in zip(config.fine_tunes(), _labels(config))
        ),
        f"- seed: {config.seed}",
        f"- output dtype: {config.out_dtype or config.dtype or 'same as base'}",
    ]
    if report.stats.thresholds is not None:
        lines.append("- whole-model trim thresholds |τ| ≥ " + ", ".join(f"{t:.6g}" for t in report.stats.thresholds))
    if report.stats.trimmed_l1_fraction is not None:
        lines.append(
            "- share of ‖τ‖₁ removed by trimming (σₜ): "
            + ", ".join(f"{s:.4f}" for s in report.stats.trimmed_l1_fraction)
        )
    lines += ["", "## Inputs", "", "| role | path | file | sha256 |", "|---|---|---|---|"]
    for rec in report.inputs:
        for fname, digest in sorted(rec.sha256.items()):
            lines.append(f"| {rec.label} | `{rec.path}` | {fname} | `{digest}` |")
    lines += ["", "## Task-specific tensors (not merged)", ""]
    if report.heads:
        lines.append("Each model's own heads are kept unmerged under `heads/<model>.safetensors`:")
        lines.append("")
        for label, names in sorted(report.heads.items()):
            lines.append(f"- `heads/{label}.safetensors`: " + ", ".join(f"`{n}`" for n in names))
    else:
        lines.append("None.")
    lines += [
        "",
        "## Configuration",
        "",
        "Re-run this merge with `mergeflow merge mergeflow_config.yml OUT_DIR`:",
        "",
        "```yaml",
        _config_yaml(config),
        "```",
        "",
    ]
    return "\n".join(lines)


def _labels(config: MergeConfig) -> list[str]:
    return model_labels(config)


def _config_yaml(config: MergeConfig) -> str:
    from merging.config import dump_config  # merging.config imports the method registry, which imports this module

    return dump_config(config).strip()
