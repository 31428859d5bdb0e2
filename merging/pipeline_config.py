"""The pipeline's config sections (`mergeflow run`; `mergeflow merge` ignores them): evaluation, registry,
storage, router calibration, the watcher and how the pipeline runs. Each is validated like the merge keys,
and errors name the key (`pipeline.yml: storage.uri: ...`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec


class EvaluationConfig(BaseModel):
    """What to evaluate on: a zoo's tasks or explicit tasks, the splits, and an optional validation grid."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    zoo: str | None = None  # a zoo folder: its tasks, data and heads (from zoo.yaml)
    tasks: list[TaskSpec] = Field(default_factory=list)
    split: str = "test"
    validation_split: str = "validation"
    search: dict[str, list[Any]] = Field(default_factory=dict)  # parameter -> values, searched on validation
    objective: Literal["average", "average_normalized"] = "average_normalized"
    # the head protocol of the validation search: `own` (each fine-tune's head) or `refit` (a linear head
    # fitted on the merged encoder's train features, as the base's probe is); both are always reported
    heads: Literal["own", "refit"] = "own"
    batch_size: int = Field(default=128, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _some_tasks(self) -> EvaluationConfig:
        if self.zoo is None and not self.tasks:
            raise ValueError("give a zoo folder or a list of tasks")
        if self.search and self.validation_split == self.split:
            raise ValueError(f"validation_split and split are both {self.split!r}: λ must not be chosen on test")
        return self


class GateConfig(BaseModel):
    """The promotion gate: `champion` moves when `metric` beats the champion's by at least `min_margin`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    metric: str = "average_normalized"
    min_margin: float = 0.0
    higher_is_better: bool = True


class RegistryConfig(BaseModel):
    """Where runs are tracked and the merged model is registered."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    tracking_uri: str | None = None  # default: sqlite in the run folder (the embedded default)
    experiment: str = "mergeflow"
    model_name: str = Field(min_length=1)
    gate: GateConfig = Field(default_factory=GateConfig)
    pipeline_task: str | None = None  # transformers pipeline of the logged model; default from the architecture
    # With `storage` set: "reference" logs a model that loads the published files (one copy of the weights,
    # each file checked against the manifest recorded at registration); "copy" logs the weights again.
    weights: Literal["reference", "copy"] = "reference"


class StorageConfig(BaseModel):
    """Where merged models are published: a local folder or s3://bucket/prefix (credentials never here)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    uri: str = Field(min_length=1)
    endpoint_url: str | None = None
    region: str | None = None
    credentials_block: str | None = None  # a Prefect Secret block holding {"aws_access_key_id", ...}
    multipart_threshold_mb: int = Field(default=64, ge=5)
    max_attempts: int = Field(default=5, ge=1)

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(f"storage uri {v!r}: expected a local folder or s3://bucket/prefix")
        if v.startswith("s3://") and not v[5:].split("/", 1)[0]:
            raise ValueError(f"storage uri {v!r}: no bucket name")
        return v


class CalibrationSource(BaseModel):
    """Texts of one task (or of out-of-domain inputs): a dataset, its text column, its split, how many to sample."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, description="the fine-tune whose task these texts are (its name or folder name)")
    dataset: str = Field(min_length=1, description="file, folder, saved dataset, or hub dataset name")
    text_column: str = "text"
    split: str = "train"
    split_column: str = "split"
    samples: int | None = Field(default=None, ge=1, description="default: calibration.samples")


class RouterSettings(BaseModel):
    """The router MLP and its out-of-domain threshold."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden: int = Field(default=64, ge=1)
    epochs: int = Field(default=300, ge=1)
    learning_rate: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    holdout: float = Field(default=0.2, gt=0, lt=1)
    target_recall: float = Field(default=0.99, gt=0, le=1)
    seed: int = 0


class CalibrationConfig(BaseModel):
    """Router calibration data (MIN-Merging): per fine-tune, texts of its task; optionally out-of-domain texts."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    zoo: str | None = None  # a zoo folder: each merge task's train split, its out-of-domain tasks as `ood`
    tasks: list[CalibrationSource] = Field(default_factory=list)
    ood: list[CalibrationSource] = Field(default_factory=list)
    samples: int = Field(default=200, ge=1, description="texts per task when a source gives no count")
    seed: int = 0
    router: RouterSettings = Field(default_factory=RouterSettings)
    fail_on_chance: bool = False  # a router near chance accuracy fails the run instead of warning

    @model_validator(mode="after")
    def _some_tasks(self) -> CalibrationConfig:
        if self.zoo is None and not self.tasks:
            raise ValueError("give a zoo folder or a list of tasks (name, dataset, text_column, samples)")
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names repeat: {repeated}")
        return self


class WatchConfig(BaseModel):
    """Where new fine-tunes appear (the watcher flow emits `mergeflow.finetune.available` for each new one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mlflow_model: str | None = None  # every new version of this registered model is a new fine-tune
    s3_prefix: str | None = None  # every new folder with a published manifest under this prefix is one
    task_tag: str = "task"  # a model version tag naming the fine-tune's task (its label in the merge)
    variable: str | None = None  # the Prefect variable holding what was seen (default: from the model name)

    @model_validator(mode="after")
    def _something(self) -> WatchConfig:
        if not self.mlflow_model and not self.s3_prefix:
            raise ValueError("give mlflow_model (a registered model) or s3_prefix (s3://bucket/prefix) to watch")
        if self.s3_prefix and not self.s3_prefix.startswith("s3://"):
            raise ValueError(f"s3_prefix {self.s3_prefix!r}: expected s3://bucket/prefix")
        return self


class CacheGcConfig(BaseModel):
    """What the deployed flows remove from the download and layer caches after each merge."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = True
    keep_days: float | None = Field(default=14.0, ge=0)  # entries unused this long go
    max_size: str | None = None  # then least recently used entries above this size go (e.g. "50GB")
    grace_hours: float = Field(default=1.0, ge=0)  # max_size never removes entries used this recently

    @field_validator("max_size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            from merging.io.writer import parse_size

            try:
                parse_size(v, "pipeline.cache_gc.max_size")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v


class PipelineConfig(BaseModel):
    """How the pipeline runs: its working folder and the task runner of the per-layer fan-out."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    workdir: str | None = None
    runner: Literal["threads", "sequential", "dask"] = "threads"
    max_workers: int = Field(default=2, ge=1)
    dask_address: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the layer tasks compute (the statistics too)
    cache_gc: CacheGcConfig = Field(default_factory=CacheGcConfig)  # run by the deployed flows after each merge
