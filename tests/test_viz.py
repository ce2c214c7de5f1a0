import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import animation  # noqa: E402

from agm.viz import animation_html, grid  # noqa: E402


def test_animation_html_is_self_contained():
    fig, ax = plt.subplots()
    shown = ax.imshow(torch.zeros(4, 4).numpy())
    anim = animation.FuncAnimation(fig, lambda i: shown.set_data(torch.full((4, 4), float(i)).numpy()), frames=3)
    html = animation_html(anim)
    plt.close(fig)
    assert "<script" in html and "data:image/png;base64" in html
    assert "http://" not in html and "https://" not in html and "fa fa-" not in html


def test_grid_shape_and_bad_input():
    assert grid(torch.zeros(10, 1, 28, 28), nrow=5).shape == (2 * 30 + 2, 5 * 30 + 2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        grid(torch.zeros(28, 28))
