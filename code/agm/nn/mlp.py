"""The fully connected generator shared by the f-GAN of Chapter 4 and the GAN of Chapter 6."""

from __future__ import annotations

import torch
from torch import nn


class MLPGenerator(nn.Module):
    """z (B, L) -> images (B, 1, 28, 28) in [0, 1]: two hidden layers of widths h/2 and h with BatchNorm
    and ReLU, then a sigmoid over the 784 pixels."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        h = hidden
        self.net = nn.Sequential(
            nn.Linear(latent_dim, h // 2), nn.BatchNorm1d(h // 2), nn.ReLU(),
            nn.Linear(h // 2, h), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Linear(h, 784), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)  # (B, 1, 28, 28) in [0, 1]
