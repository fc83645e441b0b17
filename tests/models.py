"""Models for tests only, named in configs by dotted path (`tests.models.Deterministic`)."""

import os
import signal

import torch
import torch.nn as nn
import torch.nn.functional as F


class Deterministic(nn.Module):
    """A small convnet without dropout or batch norm: a step depends only on the batch, so N processes
    with batch b match one process with batch N*b.

    TEST_SIGTERM="<rank>:<n>" in the environment: that rank sends itself SIGTERM in its n-th training
    forward pass (a preemption that reaches one rank first; the first-batch check's is the first).
    TEST_SIGKILL="<rank>:<n>:<marker file>": that rank dies by SIGKILL in its n-th training forward pass, once
    (the marker file records that it did).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=5, stride=2)
        self.fc = nn.Linear(8 * 12 * 12, num_classes)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            rank, _, call = os.environ.get("TEST_SIGTERM", "").partition(":")
            if call and int(call) == self.calls and rank == os.environ.get("RANK", "0"):
                os.kill(os.getpid(), signal.SIGTERM)
            rank, call, marker = (os.environ.get("TEST_SIGKILL", "").split(":") + ["", "", ""])[:3]
            if call and int(call) == self.calls and rank == os.environ.get("RANK", "0") and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return F.log_softmax(self.fc(F.relu(self.conv(x)).flatten(1)), dim=1)
