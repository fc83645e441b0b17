"""Models for tests only, named in configs by dotted path (`tests.models.Deterministic`)."""

import os
import signal
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import MnistModel


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


class Stalling(MnistModel):
    """MnistModel whose `n`-th forward call (TEST_STALL="<n>:<marker file>") creates the marker file and sleeps
    for a minute: a test interrupts a script there (n=2 of export.py: inside torch.export's trace)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Stalling.calls += 1
        call, _, marker = os.environ.get("TEST_STALL", "").partition(":")
        if call and int(call) == Stalling.calls:
            open(marker, "w").close()
            time.sleep(60)
        return super().forward(x)
