"""Returns TIES' sign election and disjoint mean, shared by TIES, DARE-TIES and NeuroMerging."""

from __future__ import annotations

import torch


def elect_sign(values: torch.Tensor, tie_sign: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Returns the elected sign per entry, sign(sum over dim 0); entries whose sum is 0 get `tie_sign`."""
    total = values.sum(dim=0)
    sign = torch.sign(total)
    if isinstance(tie_sign, torch.Tensor):
        tie = tie_sign.to(sign.dtype).expand_as(sign)
    else:
        tie = torch.full_like(sign, float(tie_sign))
    return torch.where(sign == 0, tie, sign)


def disjoint_mean(
    values: torch.Tensor,
    elected: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the mean over dim 0 of the entries whose sign equals `elected` (+1 or -1).

    Zeros never count. Divides by the number of agreeing entries, or by the sum of their
    `weights` when given; where nothing agrees the result is 0.
    """
    agree = (values * elected.unsqueeze(0)) > 0  # same sign as elected, and not zero
    total = (values * agree).sum(dim=0)
    if weights is None:
        divisor = agree.sum(dim=0).to(values.dtype)
    else:
        w = weights.to(values.dtype).reshape((-1,) + (1,) * (values.dim() - 1))
        divisor = (agree * w).sum(dim=0)
    return total.div_(divisor.masked_fill_(divisor == 0, 1))
