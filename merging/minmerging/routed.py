"""Returns MIN-Merging's routed model: θ_shared, per-task neuron patches, a router over θ₀'s features.

For a batch, every input is routed (top-1 by default; top-k mixes the experts' rows by that
input's renormalized router weights), and all in-domain inputs run one batched forward through
θ_shared in which every patched linear layer adds, for each input, Σⱼ wⱼ · x (θⱼ[rows] − θ_shared[rows])ᵀ
to its patched output rows: exactly the output of a model materialized with those rows, at the
cost of the patched rows only. The per-call route lives in thread-local state read by forward
hooks, so the shared module's weights are never modified and concurrent use is safe.
Out-of-domain inputs run on θ₀ or on θ_shared, by configuration. The router reads θ₀'s
mean-pooled hidden state after `router_layer` layers (None: the last), so a shallow router costs
a fraction of a forward. Encoders are transformers base models (`AutoModel`); the features
handed to each task's head are the pooled output, as BertForSequenceClassification feeds its
classifier. A causal LM (`...ForCausalLM`, `routed.json` says `model: causal_lm`) keeps its LM head,
its router reads the decoder stack, and it generates and is scored by perplexity through
`merging.minmerging.generation` (the patch math is in `patches.py`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from merging.errors import CheckpointError, ConfigError
from merging.evaluation.heads import Head
from merging.minmerging.features import layer_pooled
from merging.minmerging.grouped import Group, GroupedLinears, RoutedCompute, checked_compute, task_groups
from merging.minmerging.models import feature_model, is_causal_lm, load_model, load_tokenizer, quiet_transformers
from merging.minmerging.patches import Patch, neuron_patch, patch_hook, row_deltas
from merging.minmerging.routed_manifest import relative_to, router_layer_field, task_names_field
from merging.minmerging.router import Router

__all__ = ["OodModel", "Patch", "RoutedModel", "neuron_patch", "quiet_transformers"]

OodModel = Literal["base", "shared"]


def _pooled_output(out: Any) -> torch.Tensor:
    features = getattr(out, "pooler_output", None)
    if features is None:
        raise ConfigError("the routed encoder has no pooled output to hand to a task head")
    return features


@dataclass(frozen=True)
class Route:
    """One input's route: task (None when out-of-domain), experts and their weights, the router's top probability
    (1.0 under oracle routing)."""

    task: str | None
    experts: list[str]
    weights: list[float]
    confidence: float


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
        router_layer: int | None = None,
        compute: RoutedCompute = "grouped",
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
        self.router_layer = router_layer
        self._route = threading.local()  # this thread's per-input expert weights while a routed forward runs
        self._deltas = row_deltas(self.shared, patches, router.tasks)
        self.compute = checked_compute(compute, "routed compute")
        # encoders' top-1 batches run the grouped linear layers (grouped.py); generation keeps the delta hooks
        self._grouped = (
            GroupedLinears(shared, patches, router.tasks) if compute == "grouped" and not self.causal else None
        )
        grouped = self._grouped.install() if self._grouped is not None else set()
        modules = dict(self.shared.named_modules())
        current = lambda: getattr(self._route, "weights", None)  # noqa: E731
        ungrouped = lambda: None if getattr(self._route, "groups", None) else current()  # noqa: E731
        self._hooks = [
            modules[name].register_forward_hook(
                patch_hook(modules[name], deltas, ungrouped if name in grouped else current)
            )
            for name, deltas in sorted(self._deltas.items())
        ]

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    @property
    def causal(self) -> bool:
        """Whether θ_shared is a causal LM (routed generation) rather than an encoder (routed classification)."""
        return is_causal_lm(self.shared)

    def router_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns the router's input for a tokenized batch: θ₀'s mean-pooled state after `router_layer` layers."""
        return layer_pooled(feature_model(self.base), batch, self.router_layer)

    @contextmanager
    def routing(self, weights: torch.Tensor, groups: list[Group] | None = None) -> Iterator[None]:
        """Within the block, this thread's forwards of θ_shared mix in the experts by `weights` (inputs × tasks,
        zero where a task is not an input's expert; a single row routes every input of a batch alike); `groups`
        (a batch sorted by task) runs the grouped linear layers on each task's slice instead."""
        self._route.weights, self._route.groups = weights, groups
        try:
            if self._grouped is None:
                yield
            else:
                with self._grouped.active(groups):
                    yield
        finally:
            self._route.weights, self._route.groups = None, None

    def expert_weights(self, experts: list[str], weights: list[float]) -> torch.Tensor:
        """Returns the one-row weights (1 × tasks) of a route, for `routing`."""
        row = torch.zeros(1, len(self.router.tasks))
        for name, w in zip(experts, weights):
            row[0, self.router.tasks.index(name)] = w
        return row

    def _routed_forward(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Returns θ_shared's pooled output with each input's experts mixed in by `weights` (inputs × tasks)."""
        plan = task_groups(weights) if self._grouped is not None else None
        if plan is None:
            with self.routing(weights):
                return _pooled_output(self.shared(**batch))
        order, groups = plan  # sorted by task, each task's inputs a contiguous slice; then back in input order
        with self.routing(weights[order], groups):
            out = _pooled_output(self.shared(**{k: v[order] for k, v in batch.items()}))
        return out[torch.argsort(order)]

    def _route_batch(
        self, batch: dict[str, torch.Tensor], names: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (experts (N, k), their weights, out-of-domain mask, router top probability) of a tokenized
        batch; `names` (oracle routing) bypasses the router."""
        if names is None:
            features = self.router_features(batch)
            experts, weights, ood = self.router.route(features, self.top_k)
            return experts, weights, ood, self.router.probabilities(features).max(dim=-1).values
        unknown = sorted(set(names) - set(self.router.tasks))
        if unknown:
            raise ConfigError(f"oracle routing: unknown task(s) {unknown}; known: {self.router.tasks}")
        experts = torch.tensor([[self.router.tasks.index(n)] for n in names])
        ones = torch.ones(len(names), 1)
        return experts, ones, torch.zeros(len(names), dtype=torch.bool), ones.flatten()

    @torch.inference_mode()
    def routes(self, texts: list[str], oracle: list[str] | None = None) -> list[Route]:
        """Returns each input's route (read from its first `max_length` tokens); `oracle` names each input's task."""
        if oracle is not None and len(oracle) != len(texts):
            raise ConfigError(f"oracle routing: {len(oracle)} task names for {len(texts)} inputs")
        out: list[Route] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._batch(texts[start : start + self.batch_size])
            names = oracle[start : start + self.batch_size] if oracle is not None else None
            experts, weights, ood, top = self._route_batch(batch, names)
            for i in range(len(experts)):
                if bool(ood[i]):
                    out.append(Route(None, [], [], float(top[i])))
                else:
                    picked = [self.router.tasks[e] for e in experts[i].tolist()]
                    out.append(Route(picked[0], picked, [float(w) for w in weights[i]], float(top[i])))
        return out

    @torch.inference_mode()
    def run(self, texts: list[str], oracle: list[str] | None = None) -> list[Routed]:
        """Returns each input's route and head features (and label, when its task has a head).

        `oracle` names each input's task: the router is bypassed (the ceiling a perfect router gives).
        """
        if oracle is not None and len(oracle) != len(texts):
            raise ConfigError(f"oracle routing: {len(oracle)} task names for {len(texts)} inputs")
        if self.causal:
            raise ConfigError(
                "this routed model is a causal LM: use merging.minmerging.generation (generate, perplexity)"
            )
        results: list[Routed] = []
        n_tasks = len(self.router.tasks)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = self._batch(chunk)
            names = oracle[start : start + self.batch_size] if oracle is not None else None
            experts, weights, ood, _ = self._route_batch(batch, names)
            features = torch.empty(0)
            inside = (~ood).nonzero().flatten()
            outside = ood.nonzero().flatten()
            parts: dict[int, torch.Tensor] = {}
            if inside.numel():
                dense = torch.zeros(inside.numel(), n_tasks)
                dense.scatter_(1, experts[inside], weights[inside].float())
                sub = {k: v[inside] for k, v in batch.items()}
                for row, feat in zip(inside.tolist(), self._routed_forward(sub, dense)):
                    parts[row] = feat
            if outside.numel():
                model = self.base if self.ood_model == "base" else self.shared
                sub = {k: v[outside] for k, v in batch.items()}
                for row, feat in zip(outside.tolist(), _pooled_output(model(**sub))):
                    parts[row] = feat
            for i in range(len(chunk)):
                features = parts[i]
                if bool(ood[i]):
                    routed = Routed(None, [], [], features.clone())
                else:
                    names_i = [self.router.tasks[e] for e in experts[i].tolist()]
                    routed = Routed(names_i[0], names_i, [float(w) for w in weights[i]], features.clone())
                head = self.heads.get(routed.task) if routed.task else None
                if head is not None:
                    probs = torch.softmax(head.logits(features), dim=-1)
                    routed.label = int(probs.argmax())
                    routed.probabilities = probs.tolist()
                results.append(routed)
        return results

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
            "shared": relative_to(shared_dir, folder),
            "base": relative_to(base_dir, folder),
            "tasks": self.router.tasks,
            "ood_model": self.ood_model,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "router_layer": self.router_layer,
            "compute": self.compute,
            "model": "causal_lm" if self.causal else "encoder",
        }
        (folder / "routed.json").write_text(json.dumps(manifest, indent=1))
        return sizes

    @classmethod
    def load(cls, folder: Path, compute: RoutedCompute | None = None) -> RoutedModel:
        """Returns the routed model saved in `folder` (`compute`: instead of the one it was saved with)."""
        try:
            manifest = json.loads((folder / "routed.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: no readable routed.json ({exc})") from None
        kind = manifest.get("model", "encoder")
        if kind not in ("encoder", "causal_lm"):
            raise CheckpointError(f"{folder}/routed.json: model must be 'encoder' or 'causal_lm', got {kind!r}")
        router = Router.load(folder / "router")
        patches: dict[str, Patch] = {}
        for task in task_names_field(manifest.get("tasks"), folder):
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
        saved = checked_compute(manifest.get("compute", "grouped"), f"{folder}/routed.json: compute", CheckpointError)
        causal = kind == "causal_lm"
        shared, base = load_model(shared_dir, causal), load_model(base_dir, causal)
        tokenizer = load_tokenizer(base_dir, causal)
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
            router_layer=router_layer_field(manifest.get("router_layer"), folder),
            compute=compute or saved,
        )
