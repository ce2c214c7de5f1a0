"""Sample grids drawn pixel for pixel (nearest-neighbour, never smoothed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid, save_image


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """``[N, 1, 28, 28]`` in [0, 1] -> one ``[H, W]`` image with a white frame between digits."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {list(images.shape)}")
    return make_grid(images.detach().cpu().float(), nrow=nrow, padding=padding, pad_value=1.0)[0]


def show_grid(images: torch.Tensor, nrow: int = 8, ax=None, title: str | None = None):
    """Draw a grid on ``ax`` (a new figure if None) without interpolation; return the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(nrow * 0.45 + 0.4, ((len(images) + nrow - 1) // nrow) * 0.45 + 0.4))
    ax.imshow(grid(images, nrow).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def save_grid(images: torch.Tensor, path: Path | str, nrow: int = 8) -> None:
    """Write a PNG grid at the images' native resolution."""
    save_image(images.detach().cpu().float(), str(path), nrow=nrow, padding=2, pad_value=1.0)


# Font Awesome icons of matplotlib's animation controls, replaced by plain characters so that the
# page loads nothing from another host (matplotlib links the icon font from a CDN).
_ICONS = {
    "fa fa-minus": "−", "fa fa-fast-backward": "⏮", "fa fa-step-backward": "⏴",
    "fa fa-play fa-flip-horizontal": "◀", "fa fa-pause": "⏸", "fa fa-play": "▶",
    "fa fa-step-forward": "⏵", "fa fa-fast-forward": "⏭", "fa fa-plus": "+",
}


def animation_html(anim, default_mode: str = "once") -> str:
    """A matplotlib animation as self-contained HTML: frames embedded, controls without web fonts."""
    import re

    html = anim.to_jshtml(default_mode=default_mode)
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)
    for cls, char in _ICONS.items():
        html = html.replace(f'<i class="{cls}"></i>', char)
    if "<link" in html or "fa fa-" in html:
        raise RuntimeError("unexpected external asset or icon left in the animation HTML")
    return html
