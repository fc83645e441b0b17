import logging

import torch.nn as nn


class BaseModel(nn.Module):
    """An nn.Module whose str() ends with its number of trainable parameters."""

    logger = logging.getLogger("train")  # the run's log, as in the classic template

    def __str__(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{super().__str__()}\nTrainable parameters: {trainable:,}"
