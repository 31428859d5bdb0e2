"""Returns MIN-Merging's routed model: θ_shared, per-task neuron patches, a router over θ₀'s features.

For a batch, every input is routed (top-1 by default; top-k mixes the experts' rows by the
renormalized router weights, averaged over the inputs of a group), inputs are grouped by route,
and each group runs one batched forward through `torch.func.functional_call` with the patched
weights, so the shared module is never modified and concurrent use is safe. Out-of-domain inputs
run on θ₀ or on θ_shared, by configuration. Encoders are transformers base models (`AutoModel`);
the features handed to each task's head are the pooled output, as BertForSequenceClassification
feeds its classifier.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from merging.errors import CheckpointError, ConfigError
from merging.evaluation.heads import Head
from merging.minmerging.router import Router

Patch = dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor name -> (row indices, θₜ's rows)
OodModel = Literal["base", "shared"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' load reports (a classification checkpoint loaded as its base model lists its head)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _relative(path: Path, folder: Path) -> str:
    """Returns `path` relative to `folder` when it lies inside it (so the folder can move), else absolute."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def neuron_patch(finetuned: torch.nn.Module, masks: dict[str, torch.Tensor]) -> Patch:
    """Returns a task's patch: for each masked tensor, its important row indices and the fine-tune's rows."""
    state = finetuned.state_dict()
    missing = sorted(set(masks) - set(state))
    if missing:
        raise ConfigError(f"neuron masks name tensors the fine-tune does not have: {missing[:3]}")
    return {name: (idx.long(), state[name][idx.long()].detach().clone()) for name, idx in masks.items()}


def mean_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Returns the attention-masked mean of the last hidden state (the router's input)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


@dataclass
class Routed:
    """One input's route and result: task (None when out-of-domain), experts, weights, head features."""

    task: str | None
    experts: list[str]
    weights: list[float]
    features: torch.Tensor
    label: int | None = None
    probabilities: list[float] = field(default_factory=list)


class RoutedModel:
    def __init__(
        self,
        shared: torch.nn.Module,
        base: torch.nn.Module,
        tokenizer: Any,
        router: Router,
        patches: dict[str, Patch],
        heads: dict[str, Head] | None = None,
        ood_model: OodModel = "base",
        top_k: int = 1,
        max_length: int = 64,
        batch_size: int = 64,
    ):
        unknown = sorted(set(patches) - set(router.tasks))
        if unknown:
            raise ConfigError(f"patches for tasks the router does not know: {unknown}")
        self.shared = shared.eval()
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.router = router
        self.patches = patches
        self.heads = heads or {}
        self.ood_model = ood_model
        self.top_k = top_k
        self.max_length = max_length
        self.batch_size = batch_size
        self._shared_params = dict(self.shared.named_parameters())

    def patched_parameters(self, experts: list[int], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns the replaced tensors for a route: θ_shared + Σⱼ wⱼ (θ_shared with task j's rows − θ_shared)."""
        out: dict[str, torch.Tensor] = {}
        for j, w in zip(experts, weights.tolist()):
            for name, (idx, rows) in self.patches.get(self.router.tasks[j], {}).items():
                shared = self._shared_params[name].detach()
                if name not in out:
                    out[name] = shared.clone()
                out[name][idx] += w * (rows.to(shared.dtype) - shared[idx])
        return out

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    @torch.inference_mode()
    def run(self, texts: list[str], oracle: list[str] | None = None) -> list[Routed]:
        """Returns each input's route and head features (and label, when its task has a head).

        `oracle` names each input's task: the router is bypassed (the ceiling a perfect router gives).
        """
        if oracle is not None and len(oracle) != len(texts):
            raise ConfigError(f"oracle routing: {len(oracle)} task names for {len(texts)} inputs")
        results: list[Routed | None] = [None] * len(texts)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = self._batch(chunk)
            if oracle is None:
                experts, weights, ood = self.router.route(mean_pooled(self.base, batch), self.top_k)
            else:
                names = oracle[start : start + self.batch_size]
                experts = torch.tensor([[self.router.tasks.index(n)] for n in names])
                weights, ood = torch.ones(len(names), 1), torch.zeros(len(names), dtype=torch.bool)
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i in range(len(chunk)):
                groups[() if bool(ood[i]) else tuple(experts[i].tolist())].append(i)
            for key, members in groups.items():
                sub = {k: v[members] for k, v in batch.items()}
                if not key:
                    model = self.base if self.ood_model == "base" else self.shared
                    out = model(**sub)
                    group_weights = torch.ones(0)
                else:
                    group_weights = weights[members].mean(dim=0)
                    group_weights = group_weights / group_weights.sum()
                    params = self.patched_parameters(list(key), group_weights)
                    out = functional_call(self.shared, params, args=(), kwargs=sub)
                features = out.pooler_output if getattr(out, "pooler_output", None) is not None else None
                if features is None:
                    raise ConfigError("the routed encoder has no pooled output to hand to a task head")
                for row, i in enumerate(members):
                    task = self.router.tasks[key[0]] if key else None
                    routed = Routed(
                        task,
                        [self.router.tasks[e] for e in key],
                        [float(w) for w in group_weights],
                        features[row].clone(),
                    )
                    head = self.heads.get(task) if task else None
                    if head is not None:
                        probs = torch.softmax(head.logits(features[row]), dim=-1)
                        routed.label = int(probs.argmax())
                        routed.probabilities = probs.tolist()
                    results[start + i] = routed
        return [r for r in results if r is not None]

    # -- storage -------------------------------------------------------------------------------
    def save(self, folder: Path, shared_dir: Path, base_dir: Path) -> dict[str, int]:
        """Writes the routed model's manifest, patches and router (θ_shared and θ₀ by reference); returns bytes."""
        folder.mkdir(parents=True, exist_ok=True)
        sizes: dict[str, int] = {}
        for task, patch in self.patches.items():
            tensors = {}
            for name, (idx, rows) in patch.items():
                tensors[f"{name}.indices"] = idx.contiguous()
                tensors[f"{name}.rows"] = rows.contiguous()
            path = folder / "patches" / f"{task}.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_file(tensors, str(path))
            sizes[f"patch:{task}"] = path.stat().st_size
        self.router.save(folder / "router")
        sizes["router"] = sum(p.stat().st_size for p in (folder / "router").iterdir())
        if self.heads:
            head_dir = folder / "heads"
            head_dir.mkdir(exist_ok=True)
            for task, head in self.heads.items():
                tensors = {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}
                save_file(tensors, str(head_dir / f"{task}.safetensors"))
        manifest = {
            "format": 1,
            "kind": "mergeflow-routed",
            "shared": _relative(shared_dir, folder),
            "base": _relative(base_dir, folder),
            "tasks": self.router.tasks,
            "ood_model": self.ood_model,
            "top_k": self.top_k,
            "max_length": self.max_length,
        }
        (folder / "routed.json").write_text(json.dumps(manifest, indent=1))
        return sizes

    @classmethod
    def load(cls, folder: Path) -> RoutedModel:
        from transformers import AutoModel, AutoTokenizer

        try:
            manifest = json.loads((folder / "routed.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: no readable routed.json ({exc})") from None
        router = Router.load(folder / "router")
        patches: dict[str, Patch] = {}
        for task in manifest["tasks"]:
            path = folder / "patches" / f"{task}.safetensors"
            if not path.exists():
                continue
            raw = load_file(str(path))
            names = sorted({k.rsplit(".", 1)[0] for k in raw})
            patches[task] = {n: (raw[f"{n}.indices"], raw[f"{n}.rows"]) for n in names}
        heads = {}
        for path in sorted((folder / "heads").glob("*.safetensors")) if (folder / "heads").is_dir() else []:
            raw = load_file(str(path))
            heads[path.stem] = Head(raw["weight"], raw["bias"])
        shared_dir, base_dir = folder / manifest["shared"], folder / manifest["base"]  # absolute paths stay absolute
        for role, path in (("shared", shared_dir), ("base", base_dir)):
            if not (path / "config.json").exists():
                raise CheckpointError(f"{folder}/routed.json: the {role} model {path} is missing")
        with quiet_transformers():
            shared = AutoModel.from_pretrained(shared_dir, trust_remote_code=False)
            base = AutoModel.from_pretrained(base_dir, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
        return cls(
            shared,
            base,
            tokenizer,
            router,
            patches,
            heads,
            manifest["ood_model"],
            int(manifest["top_k"]),
            int(manifest["max_length"]),
        )
