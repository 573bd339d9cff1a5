"""The plots are written as PNG files of the intended size, with something drawn on them."""

from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from sae_lens import TopKSAE, TopKSAEConfig

from sae_lens_scale import ScaleSAE, ScaleSAEConfig
from sae_lens_scale.metrics import expert_redundancy, expert_usage, feature_redundancy
from sae_lens_scale.tools.plots import (
    plot_expert_usage_cdf,
    plot_intra_inter,
    plot_loss_curve,
    plot_max_cosine_histogram,
)

DPI, HEIGHT_INCHES, WIDTH_INCHES_PER_AXES = 150, 4, 6


def test_plots_write_png_files_of_the_figure_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = ScaleSAE(ScaleSAEConfig(d_in=32, d_sae=64, n_experts=8, n_active_experts=2, k=4))
    dense = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
    x = torch.randn(50, 32)
    plots = {
        plot_max_cosine_histogram(
            {"scale": feature_redundancy(sae), "topk": feature_redundancy(dense)}, tmp_path / "hist.png"
        ): 1,
        plot_expert_usage_cdf({"scale": expert_usage(sae, x)}, tmp_path / "cdf.png"): 1,
        plot_intra_inter({"scale": expert_redundancy(sae)}, tmp_path / "sub" / "bars.png"): 2,
        plot_loss_curve([5.0, 3.0, 2.0, 1.5], tmp_path / "loss.png"): 1,
    }
    for path, n_axes in plots.items():
        image = imread(path)
        assert image.shape[:2] == (HEIGHT_INCHES * DPI, n_axes * WIDTH_INCHES_PER_AXES * DPI)
        assert image[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_intra_inter({}, tmp_path / "empty.png")
