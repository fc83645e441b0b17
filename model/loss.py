"""Losses: any function `(output, target) -> scalar tensor` here can be named in a config's `loss`.

torch.nn's loss classes (`{"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.1}}`) work too.
"""

import torch
import torch.nn.functional as F


def nll_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that return log-probabilities (log_softmax), like MnistModel."""
    return F.nll_loss(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that return raw logits."""
    return F.cross_entropy(output, target)
