"""Shared building blocks: attention, the transformer block, the U-Net, small MLPs and convolutions."""

from torch import nn


def parameter_count(model: nn.Module) -> int:
    """The number of scalar parameters of ``model``, trainable or not."""
    return sum(p.numel() for p in model.parameters())
