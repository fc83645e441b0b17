"""Losses: any function `(output, target) -> scalar tensor` here can be named in a config's `loss`.

torch.nn's loss classes (`{"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.1}}`) work too."""

import torch
import torch.nn.functional as F


def nll_loss(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """For models that return log-probabilities (log_softmax), like MnistModel. `weight`: one per class."""
    return F.nll_loss(output, target, weight)


def cross_entropy(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """For models that return raw logits. `weight`: one per class."""
    return F.cross_entropy(output, target, weight)


def focal_loss(output: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Cross-entropy scaled by (1 - p_true)^gamma, so confident right answers count less (Lin et al. 2017,
    https://arxiv.org/abs/1708.02002); gamma=0 is plain cross-entropy. Takes logits or log-probabilities (log_softmax
    of either is the same). A custom loss with an argument: `"loss": {"type": "focal_loss", "args": {"gamma": 2.0}}`."""
    log_p = F.log_softmax(output, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return -((1 - log_p.exp()) ** gamma * log_p).mean()
