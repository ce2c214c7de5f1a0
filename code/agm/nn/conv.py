"""The convolutional encoder and decoder between 28x28 images and a 7x7 grid, shared by the VQ-VAE
(Chapter 23) and the latent-diffusion autoencoder (Chapter 36).

Two stride-2 convolutions take 28 -> 14 -> 7, residual blocks work at 7x7, and a 1x1 convolution
sets the grid's channels; the decoder mirrors it with transposed convolutions.
"""

from __future__ import annotations

from torch import nn

GRID = 7  # the grid is GRID x GRID: 28 -> 14 -> 7


class ResidualBlock(nn.Module):
    """h + conv1x1(silu(conv3x3(silu(h)))): the block of van den Oord et al. (2017), with the smooth SiLU
    in place of ReLU so that the decoder's loss is twice differentiable (the straight-through analysis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels // 2, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels // 2, channels, 1))

    def forward(self, h):
        return h + self.body(h)


def grid_encoder(channels: int, res_blocks: int, out_channels: int, in_channels: int = 1) -> nn.Sequential:
    """(B, in_channels, 28, 28) -> (B, out_channels, 7, 7)."""
    C = channels
    return nn.Sequential(nn.Conv2d(in_channels, C, 4, stride=2, padding=1), nn.SiLU(),  # 28 -> 14
                         nn.Conv2d(C, C, 4, stride=2, padding=1), nn.SiLU(),  # 14 -> 7
                         nn.Conv2d(C, C, 3, padding=1),
                         *[ResidualBlock(C) for _ in range(res_blocks)], nn.SiLU(),
                         nn.Conv2d(C, out_channels, 1))


def grid_decoder(channels: int, res_blocks: int, in_channels: int, out_channels: int = 1) -> nn.Sequential:
    """(B, in_channels, 7, 7) -> (B, out_channels, 28, 28), mirroring :func:`grid_encoder`."""
    C = channels
    return nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1),
                         *[ResidualBlock(C) for _ in range(res_blocks)], nn.SiLU(),
                         nn.ConvTranspose2d(C, C, 4, stride=2, padding=1), nn.SiLU(),  # 7 -> 14
                         nn.ConvTranspose2d(C, out_channels, 4, stride=2, padding=1))  # 14 -> 28
