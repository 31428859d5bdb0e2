"""Returns a merge plan built from checkpoint headers only: roles, layer groups, ties, heads.

Every model must hold the base's tensors with the same shapes and dtypes; differences are
collected and reported together, naming each tensor. Tensors that belong to one task (heads)
are set aside and never merged: each model's under its label, the base's own under `base`.

Heads, as a rule: (1) tensors matching `task_specific` are heads in every model, the base
included, whatever their shapes; (2) tensors of fine-tunes that the base lacks are heads when
their shapes differ between fine-tunes; (3) when the base carries a pretraining head (tensors
matching PRETRAINING_HEAD that no fine-tune has, e.g. `BertForMaskedLM`'s `cls.*`), that head is
the base's, and every fine-tune tensor the base lacks (a freshly initialised pooler, a classifier)
is that fine-tune's head.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from merging.errors import PlanError
from merging.io.checkpoint import Checkpoint

DEFAULT_TASK_SPECIFIC = ["classifier.*", "*.classifier.*", "score.*", "qa_outputs.*", "pre_classifier.*"]
# A pretraining head (masked-LM `cls.*`, RoBERTa's `lm_head.*`) that no fine-tune kept: the base's own head.
PRETRAINING_HEAD = ["cls.*", "lm_head.*", "*.cls.*"]
BASE_HEAD = "base"  # heads/base.safetensors holds the base's own task-specific tensors
EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|"
    r"wte|wpe|embed_positions|shared|embeddings?)(\.weight)?$"
)
# GPT-2 style Conv1D weights are stored (in, out) and used as x @ W.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_PATTERN = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")
# Bare projection parameters used as x @ P (open_clip's text_projection, visual.proj).
XP_PATTERN = re.compile(r"(^|\.)(text_projection|proj)$")
LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.\d+)\.")


class Role(StrEnum):
    NEURON = "neuron"
    POINT = "point"
    EMBEDDING = "embedding"
    TASK_SPECIFIC = "task_specific"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its role, group, and the name it has in each input model."""

    name: str
    role: Role
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: str
    transposed: bool = False
    tied_to: str | None = None
    sources: tuple[str, ...] = ()  # the tensor's name in each fine-tune, in model order

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def neuron_shape(self) -> tuple[int, ...]:
        """Returns the (rows, cols) shape in which rows are neurons, or the 1-D shape."""
        if self.role == Role.POINT:
            return (self.numel,)
        if self.transposed:
            return (self.shape[1], self.shape[0])
        return (self.shape[0], math.prod(self.shape[1:]))


@dataclass
class MergePlan:
    """The tensors to merge (base order), aliases of tied weights, and each model's heads."""

    tensors: list[TensorPlan]
    heads: dict[str, list[str]] = field(default_factory=dict)  # model label -> its tensor names

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.tied_to is None]

    def aliases(self) -> dict[str, list[str]]:
        """Returns merged tensor name -> the names of the tied tensors written with the same values."""
        out: dict[str, list[str]] = defaultdict(list)
        for t in self.tensors:
            if t.tied_to is not None:
                out[t.tied_to].append(t.name)
        return dict(out)

    def groups(self) -> dict[str, list[TensorPlan]]:
        out: dict[str, list[TensorPlan]] = defaultdict(list)
        for t in self.merged:
            out[t.layer].append(t)
        return dict(out)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_of(name: str) -> str:
    """Returns the layer group of a tensor: `...layers.N` for blocks, else its parent module."""
    m = LAYER_PATTERN.match(name)
    if m:
        return m.group(1)
    parent = name.rsplit(".", 1)[0] if "." in name else name
    return parent


def role_of(name: str, shape: tuple[int, ...]) -> Role:
    """Returns the role of a mergeable tensor from its name and shape."""
    if len(shape) <= 1:
        return Role.POINT
    if len(shape) == 2 and EMBEDDING_PATTERN.search(name):
        return Role.EMBEDDING
    return Role.NEURON


def is_transposed(name: str, shape: tuple[int, ...], model_type: str | None, patterns: list[str]) -> bool:
    """Returns True when the 2-D weight is used as x @ W, so its columns are the neurons."""
    if len(shape) != 2:
        return False
    if _matches(name, patterns):
        return True
    if model_type in CONV1D_MODEL_TYPES and CONV1D_PATTERN.search(name):
        return True
    return bool(XP_PATTERN.search(name))


def align_names(base: set[str], model: set[str]) -> dict[str, str]:
    """Returns base name -> model name, allowing one model-class prefix on either side.

    `BertModel` saves `encoder.layer.0...` while `BertForSequenceClassification` saves
    `bert.encoder.layer.0...`: both describe the same tensor.
    """
    best: dict[str, str] = {b: b for b in base if b in model}
    prefixes = {n.split(".", 1)[0] + "." for n in model | base if "." in n}
    for p in prefixes:
        added = {b: p + b for b in base if p + b in model}
        stripped = {b: b[len(p) :] for b in base if b.startswith(p) and b[len(p) :] in model}
        for cand in (added, stripped):
            if len(cand) > len(best):
                best = cand
    return best


def build_plan(
    base: Checkpoint,
    models: list[Checkpoint],
    task_specific: list[str] | None = None,
    transposed: list[str] | None = None,
    allow_dtype_mismatch: bool = False,
) -> MergePlan:
    """Returns the plan for merging `models` into `base`, or raises PlanError listing every problem."""
    patterns = DEFAULT_TASK_SPECIFIC if task_specific is None else task_specific
    model_type = (base.config or {}).get("model_type")
    problems: list[str] = []
    base_names = set(base.infos)
    mappings = [align_names(base_names, set(m.infos)) for m in models]

    # The base's own head: its task-specific tensors, and a pretraining head no fine-tune kept.
    pretraining_head = [n for n in base.infos if _matches(n, PRETRAINING_HEAD) and all(n not in mp for mp in mappings)]
    base_head = [n for n in base.infos if _matches(n, patterns) or n in pretraining_head]
    # Tensors not in the base: heads when declared or when their shapes differ between fine-tunes.
    heads: dict[str, list[str]] = {BASE_HEAD: base_head, **{m.label: [] for m in models}}
    extras: dict[str, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    for m, mapping in zip(models, mappings):
        used = {src for b, src in mapping.items() if not _matches(b, patterns)}
        for name in sorted(set(m.infos) - used):
            if _matches(name, patterns) or pretraining_head:
                heads[m.label].append(name)
            else:
                extras[name].append((m.label, m.infos[name].shape))
    for name, owners in extras.items():
        shapes = {s for _, s in owners}
        if len(shapes) > 1:
            for label, _ in owners:
                heads[label].append(name)
        else:
            problems.append(
                f"extra tensor {name!r} {owners[0][1]} in {', '.join(lbl for lbl, _ in owners)} "
                "is not in the base model (add it to `task_specific` if it is a task head)"
            )

    tensors: list[TensorPlan] = []
    for name, info in base.infos.items():
        if name in base_head:
            continue  # the base's own head is never merged
        sources = []
        for m, mapping in zip(models, mappings):
            src = mapping.get(name)
            if src is None:
                problems.append(f"missing tensor {name!r} in model {m.label!r} ({m.path})")
                continue
            sources.append(src)
            other = m.infos[src]
            if other.shape != info.shape:
                role = role_of(name, info.shape)
                if role == Role.EMBEDDING and other.shape[1:] == info.shape[1:]:
                    problems.append(
                        f"vocab-size mismatch in {name!r}: base has {info.shape[0]} rows, "
                        f"model {m.label!r} has {other.shape[0]} (resize the embeddings to the same tokenizer first)"
                    )
                else:
                    problems.append(
                        f"shape mismatch in {name!r}: base {list(info.shape)}, model {m.label!r} {list(other.shape)}"
                    )
            elif other.dtype != info.dtype and not allow_dtype_mismatch:
                problems.append(
                    f"dtype mismatch in {name!r}: base {str(info.dtype).removeprefix('torch.')}, "
                    f"model {m.label!r} {str(other.dtype).removeprefix('torch.')} "
                    "(set `allow_dtype_mismatch: true` to compute in float32 anyway)"
                )
        if not info.dtype.is_floating_point:
            role = Role.POINT  # integer buffers (position ids) are copied, see merge driver
        else:
            role = role_of(name, info.shape)
        tensors.append(
            TensorPlan(
                name=name,
                role=role,
                shape=info.shape,
                dtype=info.dtype,
                layer=layer_of(name),
                transposed=is_transposed(name, info.shape, model_type, transposed or []),
                sources=tuple(sources),
            )
        )
    if problems:
        listing = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise PlanError(f"models cannot be merged with base {base.path}:\n  - {listing}{more}")
    return MergePlan(tensors=_mark_tied(tensors, base, models), heads={k: v for k, v in heads.items() if v})


def _mark_tied(tensors: list[TensorPlan], base: Checkpoint, models: list[Checkpoint]) -> list[TensorPlan]:
    """Returns the tensors with tied copies (equal bytes in every model) marked as aliases."""
    by_shape: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if len(t.shape) == 2 and t.numel > 0:
            by_shape[(t.shape, t.dtype)].append(i)
    out = list(tensors)
    for idxs in by_shape.values():
        if len(idxs) < 2 or not any(tensors[i].role == Role.EMBEDDING for i in idxs):
            continue
        for a_pos, a in enumerate(idxs):
            if out[a].tied_to is not None:
                continue
            for b in idxs[a_pos + 1 :]:
                if out[b].tied_to is not None:
                    continue
                ta, tb = tensors[a], tensors[b]
                same = torch.equal(base.tensor(ta.name), base.tensor(tb.name)) and all(
                    torch.equal(m.tensor(sa), m.tensor(sb)) for m, sa, sb in zip(models, ta.sources, tb.sources)
                )
                if same:
                    out[b] = TensorPlan(**{**tb.__dict__, "tied_to": ta.name})
    return out
