"""Returns classification heads: read from a checkpoint, or fitted as a linear probe on frozen features.

A head is the task-specific Linear layer (`classifier.weight`, `classifier.bias`); mergeflow never
merges it (DESIGN.md). The linear probe is the reference every merge must beat: a softmax
regression fitted on the base encoder's features of a task's train split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merging.errors import CheckpointError

HEAD_NAMES = ("classifier", "score")
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class Head:
    """A linear head: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (num_labels, feature_dim) float32
    bias: torch.Tensor  # (num_labels,) float32

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=-1)

    def state_dict(self, prefix: str = "classifier.") -> dict[str, torch.Tensor]:
        return {f"{prefix}weight": self.weight.contiguous(), f"{prefix}bias": self.bias.contiguous()}


def head_from_tensors(tensors: dict[str, torch.Tensor], where: str) -> Head:
    """Returns the head among `tensors` (any `…classifier.weight`/`…score.weight` and its bias)."""
    for name in HEAD_NAMES:
        weights = [k for k in tensors if k == f"{name}.weight" or k.endswith(f".{name}.weight")]
        if len(weights) == 1:
            weight = tensors[weights[0]].float()
            bias_name = weights[0][: -len("weight")] + "bias"
            bias = tensors[bias_name].float() if bias_name in tensors else torch.zeros(weight.shape[0])
            if weight.dim() != 2:
                raise CheckpointError(
                    f"{where}: head tensor {weights[0]} should be 2-D, has shape {list(weight.shape)}"
                )
            return Head(weight, bias)
    raise CheckpointError(f"{where}: no classification head (a tensor named classifier.weight or score.weight)")


def load_head(path: str | Path) -> Head:
    """Returns the head stored in a fine-tune folder, a checkpoint file, or a merged model's heads/<task> file."""
    from merging.io.checkpoint import Checkpoint

    suffixes = tuple(f"{h}.{p}" for h in HEAD_NAMES for p in ("weight", "bias"))
    with Checkpoint(Path(path)) as ckpt:
        wanted = [n for n in ckpt.infos if n in suffixes or n.endswith(tuple("." + s for s in suffixes))]
        return head_from_tensors({n: ckpt.tensor(n).clone() for n in wanted}, str(path))


def fit_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    num_labels: int,
    validation: torch.Tensor | None = None,
    validation_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> Head:
    """Returns a softmax-regression head fitted on frozen features (C chosen on validation when given).

    Features are standardized for the fit and the scaling is folded back into the weights, so the head
    applies to raw features exactly like the checkpoint's own Linear layer.
    """
    from sklearn.linear_model import LogisticRegression

    x = train.double().numpy()
    y = train_labels.numpy()
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"a probe needs at least two classes in the train split; found {present.tolist()}")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6

    def fit(c: float) -> LogisticRegression:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        return model.fit((x - mean) / std, y)

    if validation is not None and validation_labels is not None and len(validation_labels):
        xv = (validation.double().numpy() - mean) / std
        # the grid's best model is the fit (lbfgs is deterministic: fitting its C again gives the same weights)
        fits = [(m.score(xv, validation_labels.numpy()), -c, m) for c in PROBE_C_GRID for m in [fit(c)]]
        model = max(fits, key=lambda f: f[:2])[2]
    else:
        model = fit(PROBE_C_GRID[len(PROBE_C_GRID) // 2])
    coef, intercept = model.coef_, model.intercept_
    weight = np.zeros((num_labels, x.shape[1]))
    bias = np.full(num_labels, -1e4)  # classes absent from the train split are never predicted
    if coef.shape[0] == 1:  # binary: sklearn fits one logit z; [-z/2, z/2] has the same softmax
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    for row, cls in enumerate(model.classes_):
        weight[cls] = coef[row] / std
        bias[cls] = intercept[row] - (coef[row] * mean / std).sum()
    return Head(torch.from_numpy(weight).float(), torch.from_numpy(bias).float())
