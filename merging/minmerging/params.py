"""Returns MIN-Merging's validated parameters (`merge_method: min_merging`, the config's `parameters`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from merging.methods.base import MethodParams


class MinMergingParams(MethodParams):
    """How important neurons are chosen, how θ_shared is merged, and how inputs are routed."""

    importance: Literal["activation", "norm"] = Field(
        default="activation", description="neuron score: mean |τₜᵏ·x| on task t's calibration texts, or ‖τₜᵏ‖₂"
    )
    neuron_ratio: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        default=0.1,
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
    shared_from: Literal["enhanced", "finetuned"] = Field(
        default="enhanced", description="θ_shared merges the enhanced fine-tunes (kept rows only) or the whole ones"
    )
    router_layer: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        default="auto",
        description="the router reads θ₀'s mean-pooled state after this many layers (null: the last; `auto`: the "
        "depth whose router is most accurate on the held-out calibration texts); a shallow router costs that "
        "share of a forward",
    )

    @field_validator("shared_method")
    @classmethod
    def _static(cls, v: str) -> str:
        from merging.methods import REGISTRY

        if v not in REGISTRY:
            raise ValueError(f"unknown shared_method {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v
