"""The schema of a zoo's `zoo.yaml`: the base, every task with its data and provenance, every fine-tune."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec
from merging.untrusted import UnsafeInputError, relative_name

ZOO_FORMAT: Literal[2] = 2
M = TypeVar("M", bound=BaseModel)


def _inside_zoo(name: str) -> str:
    """A manifest path must stay inside the zoo's folder (a zoo may come from someone else)."""
    try:
        return relative_name(name, "path")
    except UnsafeInputError as exc:
        raise ValueError(str(exc)) from exc


ZooPath = Annotated[str, AfterValidator(_inside_zoo)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseEntry(Strict):
    path: ZooPath
    source: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parameters: int = Field(gt=0)


class Scores(Strict):
    validation: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)


class FineTuneEntry(Strict):
    path: ZooPath
    seed: int
    steps: int = Field(gt=0, description="optimizer steps run (early stopping may end a run before its budget)")
    best_step: int = Field(default=0, ge=0, description="the step whose validation score was kept")
    learning_rate: float = Field(gt=0, description="chosen on validation from learning_rate_grid")
    learning_rate_grid: dict[str, float] = Field(default_factory=dict, description="rate → best validation score")
    weight_decay: float = Field(ge=0)
    seconds: float = Field(ge=0)
    scores: Scores
    margin_over_probe: float = Field(description="fine-tune test score minus the base probe's, in points")
    task_vector_norm: float | None = Field(default=None, description="||θ_ft − θ_base|| / ||θ_base||, encoder only")


class TaskEntry(Strict):
    name: str
    role: Literal["merge", "out_of_domain"]
    label_names: list[str] = Field(min_length=2)
    metric: Literal["accuracy", "macro_f1"]
    max_length: int = Field(ge=2)
    data: ZooPath
    counts: dict[Literal["train", "validation", "test"], int]
    package: str
    origin: str
    license: str
    construction: str
    probe: Scores
    probe_head: ZooPath
    finetune: FineTuneEntry | None = None

    def spec(self, root: Path) -> TaskSpec:
        """Returns the evaluation TaskSpec of this task, with paths resolved under the zoo's folder."""
        return TaskSpec(
            name=self.name,
            dataset=str(root / self.data),
            label_names=self.label_names,
            metric=self.metric,
            max_length=self.max_length,
            model=str(root / self.finetune.path) if self.finetune else None,
        )


class BuildEnvironment(Strict):
    """What fine-tuning's floating point depends on: the same key built under another torch version, intra-op
    thread count or CPU instruction set gives slightly different weights, and a task whose validation scores are
    near a tie (zoo v2's dialogue_next_line) can then keep another checkpoint."""

    torch: str
    threads: int = Field(ge=1)
    cpu_capability: str


def build_environment() -> BuildEnvironment:
    """Returns this process's build environment."""
    import torch

    return BuildEnvironment(
        torch=torch.__version__, threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability()
    )


class ZooManifest(Strict):
    format: Literal[1, 2] = ZOO_FORMAT
    key: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of everything the build depends on")
    suite: Literal["sentences", "lexicon"] = "lexicon"
    size: Literal["ci", "full"]
    head: Literal["joint", "frozen"]
    seed: int
    build_seconds: float = Field(ge=0)
    base: BaseEntry
    tasks: list[TaskEntry] = Field(min_length=2)
    environment: BuildEnvironment | None = Field(default=None, description="where the fine-tunes were trained")

    def merge_tasks(self) -> list[TaskEntry]:
        return [t for t in self.tasks if t.role == "merge"]

    def ood_tasks(self) -> list[TaskEntry]:
        return [t for t in self.tasks if t.role == "out_of_domain"]


def weights_digest(root: Path, manifest: ZooManifest) -> str:
    """Returns a sha256 over the weights a zoo build produced (base, fine-tunes, probe heads): two builds of one key
    have the same digest only if they trained the same weights (benchmarks resume on it, not on the key)."""
    from merging.io.checkpoint import file_sha256

    h = hashlib.sha256(manifest.base.sha256.encode())
    for task in manifest.tasks:
        files = [root / task.probe_head]
        if task.finetune is not None:
            files += sorted((root / task.finetune.path).glob("*.safetensors"))
        for path in files:
            h.update(f"{path.relative_to(root)}:{file_sha256(path)}".encode())
    return h.hexdigest()


def load_manifest(path: str | Path) -> ZooManifest:
    """Returns the validated manifest at `path` (a zoo folder or its zoo.yaml)."""
    return read_manifest(path, ZooManifest, "zoo", "mergeflow zoo build")


def read_manifest(path: str | Path, schema: type[M], kind: str, command: str) -> M:
    """Returns the `schema`-validated zoo.yaml at `path` (folder or file); errors name the file, `kind` and the
    `command` that builds one."""
    file = Path(path)
    if file.is_dir():
        file = file / "zoo.yaml"
    if not file.is_file():
        raise ConfigError(f"{file}: no zoo manifest here; build one with `{command}`")
    try:
        return schema.model_validate(yaml.safe_load(file.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file}: not a valid {kind} manifest: {exc}") from exc
