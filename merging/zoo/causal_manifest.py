"""The schema of a causal zoo's `zoo.yaml`, and the evaluation tasks and merge config it implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from merging.config import MergeConfig
from merging.evaluation.data import TaskSpec
from merging.zoo.manifest import ZooPath, read_manifest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Perplexities(Strict):
    validation: float = Field(gt=0)
    test: float = Field(gt=0)


class NllDrop(Strict):
    validation: float
    test: float


class CausalBase(Strict):
    path: ZooPath
    source: str = Field(description="the GGUF file the base was de-quantized from")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of that GGUF file")
    parameters: int = Field(gt=0)
    note: str


class CausalFineTune(Strict):
    path: ZooPath
    method: Literal["full"] = Field(description="full fine-tuning: every weight trains")
    seed: int
    steps: int = Field(gt=0)
    tokens: int = Field(gt=0, description="training tokens seen (steps × batch × block)")
    learning_rate: float = Field(gt=0)
    seconds: float = Field(ge=0)
    perplexity: Perplexities
    nll_drop: NllDrop = Field(description="base NLL − fine-tune NLL on its own domain, nats per token")
    task_vector_norm: float = Field(ge=0, description="||θ_ft − θ_base|| / ||θ_base||")


class DomainEntry(Strict):
    name: str
    role: Literal["merge", "out_of_domain"]
    data: ZooPath
    counts: dict[Literal["train", "validation", "test"], int]
    max_length: int = Field(ge=2, description="tokens per scored window")
    package: str
    origin: str
    license: str
    construction: str
    base: Perplexities
    finetune: CausalFineTune | None = None

    def spec(self, root: Path) -> TaskSpec:
        """Returns the perplexity TaskSpec of this domain, with paths resolved under the zoo's folder."""
        return TaskSpec(
            name=self.name,
            dataset=str(root / self.data),
            metric="perplexity",
            max_length=self.max_length,
            model=str(root / self.finetune.path) if self.finetune else None,
        )


class CausalZooManifest(Strict):
    format: Literal[1] = 1
    kind: Literal["causal"] = "causal"
    key: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of everything the build depends on")
    size: Literal["ci", "full"]
    seed: int
    build_seconds: float = Field(ge=0)
    base: CausalBase
    domains: list[DomainEntry] = Field(min_length=2)

    def merge_domains(self) -> list[DomainEntry]:
        return [d for d in self.domains if d.role == "merge"]


def load_causal_manifest(path: str | Path) -> CausalZooManifest:
    """Returns the validated manifest of the causal zoo at `path` (its folder or its zoo.yaml)."""
    return read_manifest(path, CausalZooManifest, "causal zoo", "mergeflow zoo build --kind causal")


def is_causal_zoo(path: str | Path) -> bool:
    """Returns whether the zoo at `path` (folder or zoo.yaml) is a causal one (its manifest says `kind: causal`)."""
    file = Path(path)
    file = file / "zoo.yaml" if file.is_dir() else file
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "causal"


def causal_zoo_tasks(root: str | Path, manifest: CausalZooManifest | None = None) -> list[TaskSpec]:
    """Returns the perplexity tasks of the causal zoo at `root`: fine-tuned domains and out-of-domain ones."""
    folder = Path(root).resolve()
    manifest = manifest or load_causal_manifest(folder)
    return [d.spec(folder) for d in manifest.domains]


def causal_zoo_merge_config(
    root: str | Path, method: str, parameters: dict[str, Any] | None = None, manifest: CausalZooManifest | None = None
) -> MergeConfig:
    """Returns a merge config of the causal zoo's base and every fine-tune with `method` and `parameters`."""
    folder = Path(root).resolve()
    manifest = manifest or load_causal_manifest(folder)
    return MergeConfig(
        merge_method=method,
        base_model=str(folder / manifest.base.path),
        models=[{"model": str(folder / d.finetune.path)} for d in manifest.merge_domains() if d.finetune],  # type: ignore[misc]
        parameters=dict(parameters or {}),
        name=f"causal-zoo-{manifest.size}-{method}",
    )
