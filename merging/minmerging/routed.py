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
classifier.
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


def neuron_patch(finetuned: torch.nn.Module, masks: dict[str, torch.Tensor], small_tensors: bool = False) -> Patch:
    """Returns a task's patch: for each masked tensor, its important row indices and the fine-tune's rows;
    with `small_tensors`, also every one-dimensional parameter (biases, LayerNorm scales) whole."""
    state = finetuned.state_dict()
    missing = sorted(set(masks) - set(state))
    if missing:
        raise ConfigError(f"neuron masks name tensors the fine-tune does not have: {missing[:3]}")
    patch = {name: (idx.long(), state[name][idx.long()].detach().clone()) for name, idx in masks.items()}
    if small_tensors:
        for name, param in finetuned.named_parameters():
            if param.dim() == 1 and name not in patch:
                patch[name] = (torch.arange(param.shape[0]), param.detach().clone())
    return patch


def _grid(output: torch.Tensor, members: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns broadcast indices that address rows `members` (first dim) × every middle position × `idx` (last)."""
    nd = output.dim()
    shape = [1] * nd
    out = []
    for d in range(nd):
        values = members if d == 0 else idx if d == nd - 1 else torch.arange(output.shape[d])
        view = list(shape)
        view[d] = -1
        out.append(values.view(view))
    return tuple(out)


def _pooled_output(out: Any) -> torch.Tensor:
    features = getattr(out, "pooler_output", None)
    if features is None:
        raise ConfigError("the routed encoder has no pooled output to hand to a task head")
    return features


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
        self._deltas = self._row_deltas()
        modules = dict(self.shared.named_modules())
        self._hooks = [
            modules[name].register_forward_hook(self._patch_hook(modules[name], deltas))
            for name, deltas in sorted(self._deltas.items())
        ]

    def _row_deltas(self) -> dict[str, list[tuple[int, str, torch.Tensor, torch.Tensor]]]:
        """Returns, per patched module, (task index, parameter kind, row indices, θₜ's rows − θ_shared's rows).

        Kinds: "weight" of a linear layer (rows = output neurons), "scale" of a LayerNorm, and "bias" of either.
        """
        params = dict(self.shared.named_parameters())
        modules = dict(self.shared.named_modules())
        out: dict[str, list[tuple[int, str, torch.Tensor, torch.Tensor]]] = {}
        for task, patch in self.patches.items():
            j = self.router.tasks.index(task)
            for name, (idx, rows) in patch.items():
                if name not in params:
                    raise ConfigError(f"patch of task {task!r} names {name}, which the shared model does not have")
                module_name, _, attr = name.rpartition(".")
                module = modules.get(module_name)
                if isinstance(module, torch.nn.Linear) and attr in ("weight", "bias"):
                    kind = attr
                elif isinstance(module, torch.nn.LayerNorm) and attr in ("weight", "bias"):
                    kind = "scale" if attr == "weight" else "bias"
                else:
                    raise ConfigError(
                        f"patch tensor {name} is not a parameter of a linear layer or LayerNorm of the shared model"
                    )
                shared = params[name].detach()
                if rows.shape[1:] != shared.shape[1:] or (idx.numel() and int(idx.max()) >= shared.shape[0]):
                    raise ConfigError(f"patch of task {task!r}: {name} rows do not fit the shared tensor")
                delta = (rows.to(shared.dtype) - shared[idx.long()]).contiguous()
                out.setdefault(module_name, []).append((j, kind, idx.long(), delta))
        return out

    def _patch_hook(self, module: torch.nn.Module, deltas: list[tuple[int, str, torch.Tensor, torch.Tensor]]):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            weights = getattr(self._route, "weights", None)  # (batch, tasks), zero where a task is not an expert
            if weights is None:
                return None
            x = args[0]
            normalized = None
            for j, kind, idx, delta in deltas:
                members = weights[:, j].nonzero().flatten()
                if members.numel() == 0:
                    continue
                w = weights[members, j].to(output.dtype).view(-1, *([1] * (output.dim() - 1)))
                if kind == "weight":  # y = x Wᵀ: the patched rows gain x Δᵀ
                    update = w * (x[members] @ delta.t())
                elif kind == "bias":
                    update = (w * delta).expand(*output[members].shape[:-1], idx.numel())
                else:  # LayerNorm y = x̂ γ + β: the patched scale adds x̂ Δγ
                    if normalized is None:
                        assert isinstance(module, torch.nn.LayerNorm)
                        normalized = torch.nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
                    update = w * (normalized[members][..., idx] * delta)
                output.index_put_(_grid(output, members, idx), update, accumulate=True)
            return output

        return hook

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    def router_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns the router's input for a tokenized batch: θ₀'s mean-pooled state after `router_layer` layers."""
        return layer_pooled(self.base, batch, self.router_layer)

    def _routed_forward(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Returns θ_shared's pooled output with each input's experts mixed in by `weights` (inputs × tasks)."""
        self._route.weights = weights
        try:
            out = self.shared(**batch)
        finally:
            self._route.weights = None
        return _pooled_output(out)

    @torch.inference_mode()
    def run(self, texts: list[str], oracle: list[str] | None = None) -> list[Routed]:
        """Returns each input's route and head features (and label, when its task has a head).

        `oracle` names each input's task: the router is bypassed (the ceiling a perfect router gives).
        """
        if oracle is not None and len(oracle) != len(texts):
            raise ConfigError(f"oracle routing: {len(oracle)} task names for {len(texts)} inputs")
        results: list[Routed] = []
        n_tasks = len(self.router.tasks)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = self._batch(chunk)
            if oracle is None:
                experts, weights, ood = self.router.route(self.router_features(batch), self.top_k)
            else:
                names = oracle[start : start + self.batch_size]
                unknown = sorted(set(names) - set(self.router.tasks))
                if unknown:
                    raise ConfigError(f"oracle routing: unknown task(s) {unknown}; known: {self.router.tasks}")
                experts = torch.tensor([[self.router.tasks.index(n)] for n in names])
                weights, ood = torch.ones(len(names), 1), torch.zeros(len(names), dtype=torch.bool)
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
            "shared": _relative(shared_dir, folder),
            "base": _relative(base_dir, folder),
            "tasks": self.router.tasks,
            "ood_model": self.ood_model,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "router_layer": self.router_layer,
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
            router_layer=_router_layer(manifest.get("router_layer"), folder),
        )


def _router_layer(value: Any, folder: Path) -> int | None:
    """Returns routed.json's `router_layer` (absent or null: the last layer), checked."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{folder}/routed.json: router_layer must be a layer count >= 0 or null, got {value!r}")
    return value
