"""The main job: train, evaluate, save, reload and plot a Scale (or Switch) SAE on a real LM's activations.

Everything goes through SAELens's unchanged path (``LanguageModelSAETrainingRunner``, ``run_evals``,
``SAE.load_from_disk``), so the demo doubles as an end-to-end check of the plugin. The default model and text
install from package registries (``sae_lens_scale.offline``); any TransformerLens model name and Hugging Face dataset
path work too for users who can reach the Hub.

Why a TransformerLens ``HookedTransformer`` built from the GGUF weights rather than SAELens's
``AutoModelForCausalLM`` path: its hooks and ``stop_at_layer`` are what SAELens's activation store and evals were
written against, its loss matches the HF model (tested in tests/test_offline.py), and harvesting stops at the hooked
block instead of running all 30.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens.hook_points import HookedRootModule, HookPoint

from sae_lens_scale import metrics
from sae_lens_scale.offline import SMOLLM2_MODEL_NAME
from sae_lens_scale.routed_sae import RoutedTrainingSAEConfig
from sae_lens_scale.scale_sae import ScaleTrainingSAEConfig
from sae_lens_scale.sources import BUNDLED_MODEL, hook_activations, load_model, token_splits
from sae_lens_scale.switch_sae import SwitchTrainingSAEConfig


@dataclass
class DemoConfig:
    """What ``sae-lens-scale demo`` trains. The defaults finish in about 5 minutes on a 2-core CPU.

    ``hook`` is early in SmolLM2's 30 blocks so that harvesting runs 7 blocks per token; its residual stream still
    carries the model's massive-activation dimensions, hence the activation normalisation.
    """

    model: str = BUNDLED_MODEL
    hook: str = "blocks.6.hook_resid_post"
    dataset: str = "shakespeare"
    architecture: str = "scale"
    n_experts: int = 16
    active_experts: int = 2
    k: int = 32
    d_sae: int = 4608
    training_tokens: int = 300_000
    context_size: int = 128
    batch_size_tokens: int = 1024
    lr: float = 1e-3
    heldout_fraction: float = 0.1
    eval_batches: int = 4
    seed: int = 0
    output: str = "sae-lens-scale-demo"


def sae_config(cfg: DemoConfig, d_in: int) -> RoutedTrainingSAEConfig:
    common: dict[str, Any] = dict(
        d_in=d_in, d_sae=cfg.d_sae, n_experts=cfg.n_experts, k=cfg.k, normalize_activations="expected_average_only_in"
    )
    if cfg.architecture == "scale":
        return ScaleTrainingSAEConfig(n_active_experts=cfg.active_experts, **common)
    if cfg.architecture == "switch":
        return SwitchTrainingSAEConfig(**common)
    raise ValueError(f"architecture={cfg.architecture!r} is not 'scale' or 'switch'.")


def runner_config(cfg: DemoConfig, d_in: int, output: Path) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig(
        sae=sae_config(cfg, d_in),
        model_name=cfg.model,
        hook_name=cfg.hook,
        dataset_path=cfg.dataset,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=cfg.context_size,
        prepend_bos=False,
        sequence_separator_token=None,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_size_tokens,
        store_batch_size_prompts=16,
        n_batches_in_buffer=64,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.training_tokens // cfg.batch_size_tokens // 20,
        lr_decay_steps=cfg.training_tokens // cfg.batch_size_tokens // 5,
        feature_sampling_window=max(1, cfg.training_tokens // cfg.batch_size_tokens // 2),
        dead_feature_window=max(1, cfg.training_tokens // cfg.batch_size_tokens // 4),
        n_batches_for_norm_estimate=10,
        device="cpu",
        seed=cfg.seed,
        checkpoint_path=str(output / "checkpoints"),
        output_path=str(output / "sae"),
        logger=LoggingConfig(log_to_wandb=False),
    )


class LossRecorder:
    """Per-step reconstruction loss of the SAE while it trains, read through its hook points.

    SAELens's trainer keeps no loss history without wandb; hooking ``hook_sae_input`` and ``hook_sae_recons`` sees
    every training batch without touching the runner. Hook points follow the SAE's train/eval mode, so evaluation
    passes are not recorded.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self._sae_in: torch.Tensor | None = None

    @property
    def fwd_hooks(self) -> list[tuple[str, Callable[..., None]]]:
        return [("hook_sae_input", self._keep_input), ("hook_sae_recons", self._record)]

    def _keep_input(self, sae_in: torch.Tensor, hook: HookPoint) -> None:
        self._sae_in = sae_in.detach()

    def _record(self, recons: torch.Tensor, hook: HookPoint) -> None:
        if hook.training and self._sae_in is not None:
            self.losses.append((recons.detach() - self._sae_in).pow(2).sum(-1).mean().item())


def evaluate(
    sae: SAE[Any],
    model: HookedRootModule,
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    heldout: Dataset,
    batches: int,
) -> dict[str, Any]:
    """SAELens ``run_evals`` on the held-out split: MSE, explained variance, CE loss score, L0, feature density."""
    store = ActivationsStore.from_config(model, runner_cfg, override_dataset=heldout)
    eval_cfg = EvalConfig(
        batch_size_prompts=8,
        n_eval_reconstruction_batches=batches,
        n_eval_sparsity_variance_batches=batches,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    scalars, featurewise = run_evals(sae, store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=False)
    density = torch.tensor(featurewise["feature_density"])
    scalars["dead_latents"] = int((density == 0).sum())
    return scalars


def plot_loss_curve(losses: list[float], path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses, linewidth=1)
    axes.set(xlabel="training step", ylabel="per-token SSE (normalised activations)", yscale="log")
    axes.set_title("Training reconstruction loss")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train, evaluate, save, reload and plot; returns the summary it also writes to ``summary.json``."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model)
    loaded_at = time.perf_counter()
    heldout_tokens = cfg.eval_batches * 8 * cfg.context_size * 4  # run_evals reads 8-prompt batches, 4 times
    train, heldout = token_splits(
        tokenizer,
        cfg.dataset,
        cfg.context_size,
        cfg.heldout_fraction,
        seed=cfg.seed,
        max_tokens=max(cfg.training_tokens, heldout_tokens),
    )
    runner_cfg = runner_config(cfg, model.cfg.d_model, output)
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=train, override_model=model)
    recorder = LossRecorder()
    with runner.sae.hooks(fwd_hooks=recorder.fwd_hooks):
        sae = runner.run()
    trained_at = time.perf_counter()

    sae.eval()
    reloaded = SAE.load_from_disk(output / "sae")
    activations = hook_activations(model, heldout.select(range(32)), cfg.hook)
    with torch.no_grad():
        reload_error = (reloaded(activations) - sae(activations)).abs().max().item()
    evals = evaluate(reloaded, model, runner_cfg, heldout, cfg.eval_batches)
    redundancy = metrics.feature_redundancy(reloaded)
    similarity = metrics.activation_similarity(reloaded, activations)
    usage = metrics.expert_usage(reloaded, activations)
    plots = [
        plot_loss_curve(recorder.losses, output / "loss_curve.png"),
        metrics.plot_expert_usage_cdf({cfg.architecture: usage}, output / "expert_usage.png"),
        metrics.plot_max_cosine_histogram({cfg.architecture: redundancy}, output / "max_cosine.png"),
    ]
    summary = dict(
        config=asdict(cfg),
        model=SMOLLM2_MODEL_NAME if cfg.model == BUNDLED_MODEL else cfg.model,
        train_rows=len(train),
        heldout_rows=len(heldout),
        training_steps=len(recorder.losses),
        first_loss=recorder.losses[0],
        last_loss=recorder.losses[-1],
        mse=evals["reconstruction_quality"]["mse"],
        explained_variance=evals["reconstruction_quality"]["explained_variance"],
        ce_loss_score=evals["model_performance_preservation"]["ce_loss_score"],
        ce_loss_without_sae=evals["model_performance_preservation"]["ce_loss_without_sae"],
        ce_loss_with_sae=evals["model_performance_preservation"]["ce_loss_with_sae"],
        ce_loss_with_ablation=evals["model_performance_preservation"]["ce_loss_with_ablation"],
        l0=evals["sparsity"]["l0"],
        dead_latents=evals["dead_latents"],
        dead_latents_in_training=int(reloaded.cfg.metadata.num_dead_features or 0),
        redundancy_above_0_9=redundancy.fraction_above[0.9],
        mean_max_cosine=redundancy.mean_max_cosine,
        activation_similarity=similarity.similarity,
        expert_usage_entropy=usage.normalized_entropy,
        dead_experts=usage.dead_fraction,
        reload_max_abs_error=reload_error,
        model_load_s=loaded_at - started,
        training_s=trained_at - loaded_at,
        total_s=time.perf_counter() - started,
        saved_to=str(output / "sae"),
        plots=[str(path) for path in plots],
    )
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers a reader checks first, as (label, value) rows."""
    rows = [
        ("model / hook", f"{summary['model']} / {summary['config']['hook']}"),
        ("SAE", _describe(summary["config"])),
        (
            "train / held-out rows",
            f"{summary['train_rows']} / {summary['heldout_rows']} x {summary['config']['context_size']} tokens",
        ),
        (
            "training loss, first -> last",
            f"{summary['first_loss']:.4g} -> {summary['last_loss']:.4g} ({summary['training_steps']} steps)",
        ),
        ("held-out MSE (per token, raw)", f"{summary['mse']:.4g}"),
        ("explained variance", f"{summary['explained_variance']:.3f}"),
        (
            "CE loss clean / SAE / zero-ablated",
            f"{summary['ce_loss_without_sae']:.3f} / {summary['ce_loss_with_sae']:.3f} / {summary['ce_loss_with_ablation']:.3f}",
        ),
        ("loss recovered (CE score)", f"{summary['ce_loss_score']:.3f}"),
        ("L0", f"{summary['l0']:.1f}"),
        (
            "dead latents: held-out / trainer window",
            f"{summary['dead_latents']} / {summary['dead_latents_in_training']} of {summary['config']['d_sae']}",
        ),
        (
            "redundancy (> 0.9 max cosine)",
            f"{summary['redundancy_above_0_9']:.4f} (mean max cos {summary['mean_max_cosine']:.3f})",
        ),
        ("activation similarity", f"{summary['activation_similarity']:.4f}"),
        (
            "expert usage entropy / dead experts",
            f"{summary['expert_usage_entropy']:.3f} / {summary['dead_experts']:.3f}",
        ),
        ("reload max |difference|", f"{summary['reload_max_abs_error']:.2e}"),
        (
            "time: model load / training / total",
            f"{summary['model_load_s']:.0f} s / {summary['training_s']:.0f} s / {summary['total_s']:.0f} s",
        ),
        ("saved to", summary["saved_to"]),
        ("plots", ", ".join(summary["plots"])),
    ]
    return rows


def _describe(cfg: dict[str, Any]) -> str:
    experts = f"{cfg['n_experts']} experts" + (f", e={cfg['active_experts']}" if cfg["architecture"] == "scale" else "")
    return f"{cfg['architecture']} d_sae={cfg['d_sae']}, {experts}, k={cfg['k']}"
