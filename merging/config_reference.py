"""Checks the configuration reference (docs/reference/configuration.md) against the pydantic models.

The reference is hand-written, so it can say what a key means; this check keeps it from drifting: every key
the models accept must have a row, every row must name a key the models accept, and a default written as a
single literal must equal the model's default. `mkdocs build --strict` runs it through docs/hooks.py.

Conventions of the page: in a table whose first column is `key`, each backticked token of that column is a
full key path (`storage.uri`, `models[].parameters.weight`, `evaluation.tasks[].name`). In a table whose
first two columns are `method` and `key`, the method cell names methods (or `all`) and the key cell names
their parameters.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

NONE_MARK = "—"
_TICKED = re.compile(r"`([^`]+)`")


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """Returns (the BaseModel inside `annotation`, whether it sits in a list), or (None, False)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin is list:
        (item,) = typing.get_args(annotation) or (None,)
        inner, _ = _nested_model(item)
        return inner, inner is not None
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner, in_list = _nested_model(arg)
            if inner is not None:
                return inner, in_list
    return None, False


def _default(field: Any) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return PydanticUndefined


def model_keys(model: type[BaseModel], prefix: str = "") -> tuple[dict[str, Any], set[str]]:
    """Returns ({leaf key path: default}, {section key paths}) of `model`, aliases as YAML spells them."""
    leaves: dict[str, Any] = {}
    sections: set[str] = set()
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        inner, in_list = _nested_model(field.annotation)
        if inner is None:
            leaves[key] = _default(field)
            continue
        sections.add(key)
        sub_leaves, sub_sections = model_keys(inner, key + ("[]." if in_list else "."))
        leaves.update(sub_leaves)
        sections |= sub_sections
    return leaves, sections


def method_parameters() -> dict[str, dict[str, Any]]:
    """Returns {method: {parameter as YAML spells it: default}} for every static and routed method."""
    from merging.config import ROUTED_METHODS
    from merging.methods import REGISTRY

    models = {name: m.params_model for name, m in REGISTRY.items()} | dict(ROUTED_METHODS)
    return {name: model_keys(params)[0] for name, params in models.items()}


def _cells(line: str) -> list[str]:
    """Returns a table row's cells (an escaped `\\|` is text, not a border)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Returns each markdown table as (header cells, body rows)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _literal(cell: str) -> tuple[bool, Any]:
    """Returns (True, value) when a default cell is one literal (`x`, a number, a bool, —), else (False, None)."""
    cell = cell.strip()
    if cell == NONE_MARK:
        return True, None
    ticked = _TICKED.fullmatch(cell)
    text = ticked.group(1) if ticked else cell
    if not ticked and not re.fullmatch(r"-?[0-9.e+-]+|true|false", cell):
        return False, None
    try:
        return True, yaml.safe_load(text)
    except yaml.YAMLError:
        return False, None


def _same(value: Any, expected: Any) -> bool:
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    if isinstance(value, (int, float)) and isinstance(expected, (int, float)):
        return float(value) == float(expected)
    return bool(value == expected)


def _default_problem(where: str, cell: str | None, expected: Any) -> str | None:
    """Returns a problem when a default cell holding one literal disagrees with the model's default."""
    if cell is None:
        return None
    is_literal, value = _literal(cell)
    if not is_literal:
        return None
    if expected is PydanticUndefined:
        expected = None  # a required key: the reference writes —
    if _same(value, expected):
        return None
    return f"{where}: the reference's default {cell} is not the model's {expected!r}"


def check_reference(markdown: str) -> list[str]:
    """Returns the problems of a configuration reference page (an empty list when it matches the models)."""
    from merging.config import MergeConfig

    leaves, sections = model_keys(MergeConfig)
    methods = method_parameters()
    problems: list[str] = []
    documented: set[str] = set()
    documented_params: set[tuple[str, str]] = set()
    for header, rows in _tables(markdown):
        lowered = [h.lower() for h in header]
        default_col = lowered.index("default") if "default" in lowered else None
        if lowered[:1] == ["key"]:
            for row in rows:
                default = row[default_col] if default_col is not None and default_col < len(row) else None
                keys = _TICKED.findall(row[0])
                for key in keys:
                    if key in leaves:
                        documented.add(key)
                        if len(keys) == 1:
                            problem = _default_problem(f"`{key}`", default, leaves[key])
                            if problem:
                                problems.append(problem)
                    elif key in sections:
                        documented.add(key)
                    else:
                        problems.append(f"`{key}`: documented, but no config model has this key")
        elif lowered[:2] == ["method", "key"]:
            for row in rows:
                names = list(methods) if row[0].strip().lower() == "all" else _TICKED.findall(row[0])
                keys = _TICKED.findall(row[1])
                default = row[default_col] if default_col is not None and default_col < len(row) else None
                for name in names:
                    if name not in methods:
                        problems.append(f"method `{name}`: documented, but no such method is registered")
                        continue
                    for key in keys:
                        if key not in methods[name]:
                            problems.append(f"`{name}` parameter `{key}`: documented, but the method has none")
                            continue
                        documented_params.add((name, key))
                        if len(keys) == 1:
                            problem = _default_problem(f"`{name}` parameter `{key}`", default, methods[name][key])
                            if problem:
                                problems.append(problem)
    problems += [f"`{key}`: a config key missing from the reference" for key in sorted(set(leaves) - documented)]
    for name, params in sorted(methods.items()):
        problems += [
            f"`{name}` parameter `{key}`: missing from the reference"
            for key in sorted(params)
            if (name, key) not in documented_params
        ]
    return problems
