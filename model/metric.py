"""Metrics: any function `(output, target) -> scalar tensor` here can be listed in a config's `metrics`.

A metric returns the batch mean; the trainer weights it by the batch size, so epoch values are
exact sample averages. Metrics stay on the device: no `.item()` here."""

import torch


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(dim=1) == target).float().mean()


def top_k_acc(output: torch.Tensor, target: torch.Tensor, k: int = 3) -> torch.Tensor:
    return (output.topk(k, dim=1).indices == target.unsqueeze(1)).any(dim=1).float().mean()


def true_class_prob(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean probability the model gives the right class (how sure it is, not only whether it is right).
    Takes logits or log-probabilities: softmax of either is the same."""
    return output.softmax(dim=1).gather(1, target.unsqueeze(1)).mean()
