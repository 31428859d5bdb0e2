"""Input parsing shared by the generating pyfunc models (the merged causal LM and the routed one)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from merging.errors import ConfigError


def prompts(model_input: Any, who: str) -> list[str]:
    """The prompts of a pyfunc input: a DataFrame's `prompt` column, one string, or a list of strings.

    `who` names the model in the error (for example "generator input")."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ConfigError(f"{who}: expected a `prompt` column, got {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in model_input]
