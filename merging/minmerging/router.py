"""Returns MIN-Merging's router: a small MLP over θ₀'s mean-pooled hidden state that names an input's task.

Trained on the calibration set labelled by task (seeded, full-batch, reproducible). An input whose
top probability falls under a threshold is out-of-domain; the threshold is chosen on held-out
calibration data so that a target share of in-domain inputs (default 99%) stays above it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from merging.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class RouterOptions:
    hidden: int = 64
    epochs: int = 300
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    holdout: float = 0.2  # share of each task's calibration inputs kept for accuracy and the threshold
    target_recall: float = 0.99  # share of held-out in-domain inputs that must stay in domain
    seed: int = 0


class RouterNet(torch.nn.Module):
    """Standardize, then Linear → ReLU → Linear: task logits."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int, hidden: int, tasks: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Router:
    """A trained router: its network, task names, OOD threshold and calibration metrics."""

    net: RouterNet
    tasks: list[str]
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @torch.inference_mode()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(features.float()), dim=-1)

    def route(self, features: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (expert indices (N, k), their renormalized weights (N, k), out-of-domain mask (N,))."""
        probs = self.probabilities(features)
        k = min(top_k, len(self.tasks))
        weights, experts = torch.topk(probs, k, dim=-1)
        ood = weights[:, 0] < self.threshold
        return experts, weights / weights.sum(dim=-1, keepdim=True), ood

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "router.safetensors"))
        meta = {
            "tasks": self.tasks,
            "threshold": self.threshold,
            "hidden": self.net.net[0].out_features,
            "dim": self.net.net[0].in_features,
            "metrics": self.metrics,
            "warnings": self.warnings,
        }
        (folder / "router.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Router:
        try:
            meta = json.loads((folder / "router.json").read_text())
            net = RouterNet(int(meta["dim"]), int(meta["hidden"]), len(meta["tasks"]))
            net.load_state_dict(load_file(str(folder / "router.safetensors")))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{folder}: not a readable router ({exc})") from None
        net.eval()
        metrics, warnings = meta.get("metrics", {}), meta.get("warnings", [])
        return cls(net, list(meta["tasks"]), float(meta["threshold"]), metrics, warnings)


def _split(labels: torch.Tensor, holdout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (train indices, held-out indices), stratified by task."""
    train, held = [], []
    for t in labels.unique().tolist():
        idx = (labels == t).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_held = max(1, round(holdout * idx.numel())) if idx.numel() > 1 else 0
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.cat(train), torch.cat(held)


def ood_threshold(top_probabilities: torch.Tensor, target_recall: float) -> float:
    """Returns the largest threshold that keeps at least `target_recall` of these in-domain inputs above it."""
    values = torch.sort(top_probabilities.double()).values
    allowed = math.floor((1.0 - target_recall) * values.numel() + 1e-9)  # inputs that may fall under it
    return float(values[allowed]) if values.numel() else 0.0


def train_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    tasks: list[str],
    options: RouterOptions | None = None,
    ood_features: torch.Tensor | None = None,
) -> Router:
    """Returns a router trained on (features, task labels); metrics on a stratified held-out share."""
    options = options or RouterOptions()
    if features.shape[0] == 0:
        raise ConfigError("calibration: the calibration set is empty; the router has nothing to learn from")
    present = sorted(set(labels.tolist()))
    if len(tasks) < 2 or len(present) < 2:
        raise ConfigError(
            f"calibration: inputs of {len(present)} task(s) ({', '.join(tasks[i] for i in present)}); "
            "routing needs at least two tasks"
        )
    absent = [tasks[i] for i in range(len(tasks)) if i not in present]
    if absent:
        raise ConfigError(f"calibration: no calibration inputs for task(s) {', '.join(absent)}")
    gen = torch.Generator().manual_seed(options.seed)
    train_idx, held_idx = _split(labels, options.holdout, gen)
    x = features.float()
    torch.manual_seed(options.seed)
    net = RouterNet(x.shape[1], options.hidden, len(tasks))
    net.mean.copy_(x[train_idx].mean(dim=0))
    net.std.copy_(x[train_idx].std(dim=0).clamp_min(1e-6) if train_idx.numel() > 1 else torch.ones(x.shape[1]))
    optimizer = torch.optim.Adam(net.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    for _ in range(options.epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[train_idx]), labels[train_idx])
        loss.backward()
        optimizer.step()
    net.eval()
    router = Router(net, list(tasks), 0.0)
    eval_idx = held_idx if held_idx.numel() else train_idx
    probs = router.probabilities(x[eval_idx])
    accuracy = float((probs.argmax(dim=-1) == labels[eval_idx]).float().mean())
    router.threshold = ood_threshold(probs.max(dim=-1).values, options.target_recall)
    router.metrics = {
        "router_accuracy": accuracy,
        "in_domain_recall": float((probs.max(dim=-1).values >= router.threshold).float().mean()),
        "threshold": router.threshold,
        "train_loss": float(loss.detach()),
        "held_out": float(eval_idx.numel()),
    }
    chance = 1.0 / len(tasks)
    if accuracy < chance + 0.5 * (1.0 - chance):
        router.warnings.append(
            f"router accuracy {accuracy:.3f} is close to chance ({chance:.3f}) for {len(tasks)} tasks: "
            "the calibration inputs do not tell the tasks apart; routed inference will mostly pick at random"
        )
    if ood_features is not None and ood_features.shape[0]:
        _, _, ood = router.route(ood_features)
        router.metrics["ood_detection_rate"] = float(ood.float().mean())
    return router


def router_summary(router: Router) -> dict[str, Any]:
    return {"tasks": router.tasks, "threshold": router.threshold, **router.metrics, "warnings": router.warnings}
