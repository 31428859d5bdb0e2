"""Returns MIN-Merging's validated parameters (`merge_method: min_merging`, the config's `parameters`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from merging.methods.base import MethodParams
from merging.minmerging.grouped import RoutedCompute

SharedFrom = Literal["auto", "base", "enhanced", "finetuned"]
# float16 keeps a fine-tuned row to about 2% of its task vector (measured on zoo v2); bfloat16 (about 15%) is not
# offered: it would lose what the patch is for. `auto`: float16 for a float32 model (half the bytes, the same
# accuracy on zoo v2), the model's own dtype otherwise.
PatchDType = Literal["auto", "float32", "float16"]


def patch_torch_dtype(name: PatchDType, model_dtype: torch.dtype) -> torch.dtype:
    """Returns the torch dtype the patches' rows of a `model_dtype` model are stored in."""
    if name == "auto":
        return torch.float16 if model_dtype == torch.float32 else model_dtype
    return {"float32": torch.float32, "float16": torch.float16}[name]


Importance = Literal["auto", "activation", "norm"]


def resolve_importance(importance: Importance, causal: bool) -> Literal["activation", "norm"]:
    """Returns `auto` resolved by what was measured: norm for encoders (zoo v2 `full` at the defaults, both seeds:
    97.3 / 99.5 normalized against activation's 96.0 / 98.7, out-of-domain retention higher too), activation for
    causal LMs (the only importance the causal zoo measured)."""
    if importance == "auto":
        return "activation" if causal else "norm"
    return importance


# θ_shared = θ₀ is written by the merge step like any θ_shared (same folders, manifest, registration) as θ₀ + 0·Σ τₜ,
# which is θ₀ bit for bit.
BASE_AS_SHARED: tuple[str, dict[str, Any]] = ("task_arithmetic", {"lambda": 0.0})


def resolve_shared_from(shared_from: SharedFrom, causal: bool) -> SharedFrom:
    """Returns `auto` resolved by what was measured: θ₀ for encoders (zoo v2: a merged θ_shared broke the routed
    tasks' own heads), the merge of the enhanced fine-tunes for causal LMs (the causal zoo's measurements)."""
    if shared_from == "auto":
        return "enhanced" if causal else "base"
    return shared_from


def shared_merge(
    shared_from: SharedFrom, method: str, parameters: dict[str, Any], causal: bool
) -> tuple[str, dict[str, Any]]:
    """Returns (merge method, parameters) that write θ_shared."""
    if resolve_shared_from(shared_from, causal) == "base":
        return BASE_AS_SHARED[0], dict(BASE_AS_SHARED[1])
    return method, dict(parameters)


class MinMergingParams(MethodParams):
    """How important neurons are chosen, how θ_shared is merged, and how inputs are routed."""

    importance: Importance = Field(
        default="auto",
        description="neuron score: `activation`, mean |τₜᵏ·x| on task t's calibration texts, or `norm`, ‖τₜᵏ‖₂; "
        "`auto`: norm for encoders, activation for causal LMs (what was measured best on each zoo)",
    )
    neuron_ratio: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        default=0.5,
        description="share of each linear layer's rows kept per task; `auto`: the grid's best ratio on the "
        "evaluation tasks' validation splits whose patches fit storage_budget",
    )
    storage_budget: float = Field(
        default=0.2, gt=0, le=1, description="with neuron_ratio auto: most patch bytes per task (share of one model)"
    )
    neuron_ratio_grid: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
        min_length=1,
        description="with neuron_ratio auto: the ratios tried",
    )
    shared_method: str = Field(default="neuromerging", description="the static method that merges θ_shared")
    shared_parameters: dict[str, Any] = Field(default_factory=dict, description="that method's parameters")
    top_k: int = Field(default=1, ge=1, description="experts mixed per input (renormalized router weights)")
    ood_model: Literal["base", "shared"] = Field(default="base", description="what out-of-domain inputs run on")
    max_length: int = Field(default=64, ge=2, description="tokens per calibration and routed input")
    batch_size: int = Field(default=32, ge=1, description="calibration batch size")
    budget: Literal["layer", "model"] = Field(
        default="layer",
        description="keep the top neuron_ratio rows of each tensor, or of the whole model (rows ranked by score "
        "over their tensor's mean score)",
    )
    patch_small_tensors: bool = Field(
        default=False, description="patches also carry each task's 1-D tensors (biases, LayerNorm) whole"
    )
    patch_dtype: PatchDType = Field(
        default="auto",
        description="the dtype the patches' rows are stored in; `auto`: float16 for a float32 model (half the "
        "bytes; each row kept to about 2% of its task vector, the same accuracy on zoo v2), the model's own "
        "dtype otherwise",
    )
    patch_lm_head: bool = Field(
        default=False,
        description="a causal LM's output layer (one row per vocabulary token; the input embeddings too when tied) "
        "is scored and patched like the other linear layers",
    )
    prompt_prefixes: bool = Field(
        default=True,
        description="a causal LM's router is calibrated with half of its texts cut to a random prefix (4 tokens or "
        "more), as prompts are; encoders ignore it",
    )
    shared_from: SharedFrom = Field(
        default="auto",
        description="`base`: θ_shared is θ₀ itself, a routed input gets its own task's kept rows and no other task's "
        "vector (shared_method unused); `enhanced` / `finetuned`: shared_method's merge of the enhanced fine-tunes "
        "(kept rows only) or of the whole ones; `auto`: base for encoders, enhanced for causal LMs (what was measured "
        "best on each zoo)",
    )
    router_layer: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        default="auto",
        description="the router reads θ₀'s mean-pooled state after this many layers (null: the last; `auto`: the "
        "depth whose router is most accurate on the held-out calibration texts); a shallow router costs that "
        "share of a forward",
    )

    routed_compute: RoutedCompute = Field(
        default="grouped",
        description="how an encoder's top-1 routed batch runs: `grouped` sorts it by task and runs each task's slice "
        "through its linear layers with the task's rows written in (the FLOPs of a static forward; one in-memory copy "
        "of each patched linear layer per task), `delta` runs θ_shared and adds each task's row deltas (no copies, an "
        "extra product over the patched rows); top-k mixtures and generation always use deltas",
    )

    @field_validator("shared_method")
    @classmethod
    def _static(cls, v: str) -> str:
        from merging.methods import REGISTRY

        if v not in REGISTRY:
            raise ValueError(f"unknown shared_method {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    @model_validator(mode="after")
    def _shared_source(self) -> MinMergingParams:
        # A config that names a shared method wants a merged θ_shared: without shared_from it merges the enhanced
        # fine-tunes (the behaviour before θ₀ became the default); with shared_from base it is a contradiction.
        named = {"shared_method", "shared_parameters"} & self.model_fields_set
        if named and self.shared_from in ("auto", "base"):
            if "shared_from" in self.model_fields_set:
                why = "makes θ_shared θ₀ itself" if self.shared_from == "base" else "makes θ_shared θ₀ for an encoder"
                raise ValueError(
                    f"shared_from {self.shared_from} {why}, so {' and '.join(sorted(named))} would not be used; "
                    "set shared_from to enhanced or finetuned to merge θ_shared"
                )
            self.shared_from = "enhanced"
        return self
