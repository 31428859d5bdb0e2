"""Returns a validated merge configuration from YAML (mergekit's shape plus mergeflow's keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.engine.plan import DEFAULT_TASK_SPECIFIC
from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.methods.base import MethodParams
from merging.minmerging.params import MinMergingParams, shared_merge
from merging.pipeline_config import (
    CalibrationConfig,
    EvaluationConfig,
    PipelineConfig,
    RegistryConfig,
    StorageConfig,
    WatchConfig,
)
from merging.untrusted import redact

DType = Literal["float32", "float16", "bfloat16", "float64"]
MERGEKIT_UNSUPPORTED = ("slices", "modules")
# Methods that route per input (not a function on tensors): they need a `calibration` section and run in the pipeline.
ROUTED_METHODS: dict[str, type[MethodParams]] = {"min_merging": MinMergingParams}


class ModelParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weight: float | None = None
    density: float | None = Field(default=None, gt=0, le=1)


class ModelEntry(BaseModel):
    """One fine-tuned model: where it is, an optional name (used for its head file), its weight and density."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    name: str | None = None
    parameters: ModelParameters = Field(default_factory=ModelParameters)

    @field_validator("model")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model path is empty")
        return v


class MergeConfig(BaseModel):
    """A merge: method, base model, fine-tunes, method parameters and output options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    merge_method: str
    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    seed: int = 0
    task_specific: list[str] = Field(default_factory=lambda: list(DEFAULT_TASK_SPECIFIC))
    transposed: list[str] = Field(default_factory=list)
    allow_dtype_mismatch: bool = False
    tokenizer_source: Literal["base"] | None = None
    name: str | None = None
    evaluation: EvaluationConfig | None = None
    registry: RegistryConfig | None = None
    storage: StorageConfig | None = None
    calibration: CalibrationConfig | None = None
    watch: WatchConfig | None = None
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in REGISTRY and v not in ROUTED_METHODS:
            known = sorted([*REGISTRY, *ROUTED_METHODS])
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _routed_needs_calibration(self) -> MergeConfig:
        if self.merge_method in ROUTED_METHODS and self.calibration is None:
            raise ValueError(f"merge_method {self.merge_method} routes inputs and needs a `calibration` section")
        if (
            self.merge_method in ROUTED_METHODS
            and self.parameters.get("neuron_ratio") == "auto"
            and self.evaluation is None
        ):
            raise ValueError(
                "parameters.neuron_ratio: `auto` is chosen on the evaluation tasks' validation splits; "
                "add an `evaluation` section or give a ratio"
            )
        if self.merge_method in ROUTED_METHODS and self.evaluation is not None and self.evaluation.search:
            raise ValueError(
                f"evaluation.search: the validation grid searches static merges; {self.merge_method} is routed "
                "(set parameters.shared_parameters by hand, or search them with the shared method first)"
            )
        return self

    @property
    def routed(self) -> bool:
        """Whether the method routes per input (MIN-Merging) rather than producing one static model."""
        return self.merge_method in ROUTED_METHODS

    def method_params(self) -> MethodParams:
        """Returns the method's validated parameters (raises pydantic's ValidationError)."""
        if self.merge_method in ROUTED_METHODS:
            return ROUTED_METHODS[self.merge_method].model_validate(self.parameters)
        return REGISTRY[self.merge_method].params_model.model_validate(self.parameters)

    def require_static(self) -> None:
        """Raises ConfigError when the method routes per input and so is not one static merge of tensors."""
        if self.routed:
            raise ConfigError(
                f"merge_method {self.merge_method} is not a static merge: it calibrates a router on data and "
                "runs in the pipeline (`mergeflow run CONFIG`); its θ_shared is merged by parameters.shared_method"
            )

    def shared_config(self, causal: bool = False) -> MergeConfig:
        """Returns the static merge that writes a routed method's θ_shared (`causal`: the base is a causal LM)."""
        params = self.method_params()
        assert isinstance(params, MinMergingParams)
        method, parameters = shared_merge(params.shared_from, params.shared_method, params.shared_parameters, causal)
        return self.model_copy(update={"merge_method": method, "parameters": parameters})

    def fine_tunes(self) -> list[ModelEntry]:
        """Returns the models entries that are not the base model (mergekit lists the base there too)."""
        return [m for m in self.models if m.model != self.base_model]

    def model_weight(self, entry: ModelEntry, params: MethodParams) -> float:
        for v in (entry.parameters.weight, params.weight):
            if v is not None:
                return float(v)
        return 1.0

    def model_density(self, entry: ModelEntry, params: MethodParams) -> float:
        for v in (entry.parameters.density, params.density):
            if v is not None:
                return float(v)
        return 1.0


def _format_errors(source: str, exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> MergeConfig:
    """Returns the validated config, or raises ConfigError naming the file and every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key in MERGEKIT_UNSUPPORTED:
        if key in data:
            raise ConfigError(f"{source}: {key}: mergekit's `{key}` is not supported by mergeflow (merge whole models)")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    try:
        params = config.method_params()
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, "parameters.")) from None
    if isinstance(params, MinMergingParams):
        try:
            config.shared_config().method_params()
        except ValidationError as exc:
            raise ConfigError(_format_errors(source, exc, "parameters.shared_parameters.")) from None
    if not config.fine_tunes():
        raise ConfigError(f"{source}: models: every entry is the base model; nothing to merge")
    return config


def load_config(path: str | Path) -> MergeConfig:
    """Returns the validated config read from a YAML file, with model paths resolved."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    config = parse_config(data, str(path))
    return resolve_paths(config, path.parent)


def resolve_paths(config: MergeConfig, root: Path) -> MergeConfig:
    """Returns the config with relative local paths resolved (from the working folder, else the config's)."""

    def resolve(ref: str) -> str:
        p = Path(ref).expanduser()
        if p.is_absolute() or "://" in ref or ref.startswith("models:/"):
            return ref
        if p.exists():
            return str(p.resolve())
        beside = root / p
        return str(beside.resolve()) if beside.exists() else ref

    models = [m.model_copy(update={"model": resolve(m.model)}) for m in config.models]
    update: dict[str, Any] = {"base_model": resolve(config.base_model), "models": models}
    if config.evaluation is not None and config.evaluation.zoo:
        update["evaluation"] = config.evaluation.model_copy(update={"zoo": resolve(config.evaluation.zoo)})
    if config.calibration is not None:
        cal = config.calibration
        update["calibration"] = cal.model_copy(
            update={
                "zoo": resolve(cal.zoo) if cal.zoo else None,
                "tasks": [t.model_copy(update={"dataset": resolve(t.dataset)}) for t in cal.tasks],
                "ood": [t.model_copy(update={"dataset": resolve(t.dataset)}) for t in cal.ood],
            }
        )
    if config.storage is not None and "://" not in config.storage.uri:
        # A local store is recorded in the registry (published.json): absolute, wherever the run started.
        folder = Path(config.storage.uri).expanduser()
        update["storage"] = config.storage.model_copy(update={"uri": str(folder.resolve())})
    return config.model_copy(update=update)


def dump_config(config: MergeConfig) -> str:
    """Returns the resolved config as YAML, re-loadable by load_config.

    The `pipeline` section (work folder, task runner) is how a run executed, not what it merged:
    it is left out, so the same merge writes the same bytes whichever runner produced it.
    """
    data = redact(config.model_dump(mode="json", exclude_none=True, exclude={"pipeline"}))
    return yaml.safe_dump(data, sort_keys=False)
