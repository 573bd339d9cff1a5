"""Plots of the analysis metrics and of a training run, drawn with matplotlib (the ``demo`` extra)."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from sae_lens_scale.metrics import ExpertRedundancy, ExpertUsage, FeatureRedundancy


def plot_max_cosine_histogram(results: Mapping[str, FeatureRedundancy], path: str | Path, bins: int = 100) -> Path:
    """Overlaid histograms of each SAE's per-latent max cosine, as fractions of its latents, with the thresholds."""
    figure, axes = _new_figure(results, n_axes=1)
    lowest = min(min(result.max_cosine.min().item() for result in results.values()), 0.0)
    for name, result in results.items():
        weights = torch.full_like(result.max_cosine, 1 / result.n_latents)
        axes.hist(result.max_cosine, bins=bins, range=(lowest, 1.0), weights=weights, histtype="step", label=name)
    for threshold in sorted({t for result in results.values() for t in result.fraction_above}):
        axes.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlabel="max cosine to another latent's decoder row", ylabel="fraction of latents")
    axes.legend()
    return _save(figure, path)


def plot_expert_usage_cdf(results: Mapping[str, ExpertUsage], path: str | Path) -> Path:
    """Share of routing assignments taken by the most used experts; the diagonal is a perfectly balanced router.

    The x axis is the fraction of experts, so SAEs with different expert counts share one plot.
    """
    figure, axes = _new_figure(results, n_axes=1)
    for name, result in results.items():
        n_experts = result.cdf.numel()
        ranks = torch.arange(0, n_experts + 1) / n_experts
        axes.plot(ranks, torch.cat([result.cdf.new_zeros(1), result.cdf]), marker=".", label=name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="uniform")
    axes.set(
        xlabel="fraction of experts, most used first", ylabel="cumulative share of tokens", xlim=(0, 1), ylim=(0, 1)
    )
    axes.legend()
    return _save(figure, path)


def plot_intra_inter(results: Mapping[str, ExpertRedundancy], path: str | Path) -> Path:
    """Bars of intra-expert vs random-block redundancy per SAE: mean max cosine and fraction above threshold."""
    figure, (mean_axes, fraction_axes) = _new_figure(results, n_axes=2)
    positions = torch.arange(len(results), dtype=torch.float64)
    labels = [f"{name}\n(> {result.threshold})" for name, result in results.items()]
    for axes, metric in ((mean_axes, "mean_max_cosine"), (fraction_axes, "fraction_above")):
        intra = [getattr(result, f"intra_{metric}") for result in results.values()]
        inter = [getattr(result, f"inter_{metric}") for result in results.values()]
        axes.bar(positions - 0.2, intra, width=0.4, label="intra-expert")
        axes.bar(positions + 0.2, inter, width=0.4, label="random blocks")
        axes.set_xticks(positions, labels)
    mean_axes.set(ylabel="mean max cosine within block")
    fraction_axes.set(ylabel="fraction of latents above threshold")
    mean_axes.legend()
    return _save(figure, path)


def plot_loss_curve(losses: Sequence[float], path: str | Path) -> Path:
    """Per-step training loss on a log scale."""
    figure, axes = _new_figure({"loss": losses}, n_axes=1)
    axes.plot(range(1, len(losses) + 1), losses, linewidth=1)
    axes.set(xlabel="training step", ylabel="per-token SSE (normalised activations)", yscale="log")
    axes.set_title("Training reconstruction loss")
    return _save(figure, path)


def _new_figure(results: Mapping[str, Any], n_axes: int) -> tuple[Figure, Any]:
    """A matplotlib Figure not attached to pyplot: no display, no global backend switch in the caller's process."""
    if not results:
        raise ValueError("Nothing to plot: pass a mapping {label: result} with at least one result.")
    figure = Figure(figsize=(6 * n_axes, 4), layout="constrained")
    return figure, figure.subplots(1, n_axes)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return path
