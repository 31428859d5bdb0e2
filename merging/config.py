"""Returns a validated merge configuration from YAML (mergekit's shape plus mergeflow's keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.methods.base import MethodParams
from merging.plan import DEFAULT_TASK_SPECIFIC

DType = Literal["float32", "float16", "bfloat16", "float64"]
MERGEKIT_UNSUPPORTED = ("slices", "modules")


class ModelParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float | None = None
    density: float | None = Field(default=None, gt=0, le=1)


class ModelEntry(BaseModel):
    """One fine-tuned model: where it is, an optional name (used for its head file), its weight and density."""

    model_config = ConfigDict(extra="forbid")
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

    model_config = ConfigDict(extra="forbid")
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

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    def method_params(self) -> MethodParams:
        """Returns the method's validated parameters (raises pydantic's ValidationError)."""
        return REGISTRY[self.merge_method].params_model.model_validate(self.parameters)

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
        config.method_params()
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, "parameters.")) from None
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
    return config.model_copy(update={"base_model": resolve(config.base_model), "models": models})


def dump_config(config: MergeConfig) -> str:
    """Returns the resolved config as YAML, re-loadable by load_config."""
    data = config.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
