"""Builders the test modules share: SAEs moved off their init, and a short SAELens run on the tiny offline model."""

from pathlib import Path
from typing import Any, TypeVar

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from transformer_lens import HookedTransformer

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from tests.conftest import CONTEXT, D_MODEL

TINY_HOOK = "blocks.1.hook_resid_pre"
T_MODULE = TypeVar("T_MODULE", bound=torch.nn.Module)


def perturbed(sae: T_MODULE, seed: int = 0, scale: float = 0.2) -> T_MODULE:
    """Move every parameter (biases, router, omega included) off its init, as training would, so each term of the
    math matters in a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return sae


def scale_training_sae(seed: int = 0, **fields: Any) -> ScaleTrainingSAE:
    """A perturbed float64 Scale SAE: d_in 16, 64 latents in 8 experts, e = 2, k = 6, unless ``fields`` say else."""
    torch.manual_seed(seed)
    defaults: dict[str, Any] = {"d_in": 16, "d_sae": 64, "n_experts": 8, "n_active_experts": 2, "k": 6}
    cfg = ScaleTrainingSAEConfig(**{"dtype": "float64", **defaults, **fields})
    return perturbed(ScaleTrainingSAE(cfg), seed)


def switch_training_sae(seed: int = 0, **fields: Any) -> SwitchTrainingSAE:
    """A perturbed float64 Switch SAE: d_in 16, 64 latents in 8 experts, k = 4, unless ``fields`` say else."""
    torch.manual_seed(seed)
    defaults: dict[str, Any] = {"d_in": 16, "d_sae": 64, "n_experts": 8, "k": 4}
    return perturbed(SwitchTrainingSAE(SwitchTrainingSAEConfig(**{"dtype": "float64", **defaults, **fields})), seed)


def tiny_sae_config(architecture: str, **fields: Any) -> ScaleTrainingSAEConfig | SwitchTrainingSAEConfig:
    """The SAE config of the tiny-model runs: d_in = the tiny model's width, 128 latents, k = 8."""
    shape = {"d_in": D_MODEL, "d_sae": 128, "k": 8}
    if architecture == "scale":
        return ScaleTrainingSAEConfig(**{"n_experts": 8, "n_active_experts": 2, **shape, **fields})
    return SwitchTrainingSAEConfig(**{"n_experts": 4, **shape, **fields})


def tiny_runner_config(sae_cfg: Any, output: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """A short SAELens run on the tiny model's TINY_HOOK, offline (the dataset and model are passed to the runner)."""
    settings: dict[str, Any] = {
        "sae": sae_cfg,
        "model_name": "tiny",
        "hook_name": TINY_HOOK,
        "dataset_path": "in-memory",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "prepend_bos": False,
        "sequence_separator_token": None,
        "training_tokens": 60 * 256,
        "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 32,
        "n_batches_in_buffer": 32,
        "lr": 3e-3,
        "device": "cpu",
        "seed": 0,
        "checkpoint_path": str(output / "checkpoints"),
        "output_path": str(output / "final"),
        "logger": LoggingConfig(log_to_wandb=False),
        "verbose": False,
    }
    return LanguageModelSAERunnerConfig(**(settings | overrides))


def make_runner(cfg: LanguageModelSAERunnerConfig[Any], model: HookedTransformer, dataset: Any) -> Any:
    torch.manual_seed(0)  # SAELens does not seed the SAE's initialisation from cfg.seed
    return LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


def tiny_activations(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """``[n_tokens, D_MODEL]`` activations at TINY_HOOK."""
    _, cache = model.run_with_cache(tokens, names_filter=TINY_HOOK)
    return cache[TINY_HOOK].reshape(-1, D_MODEL)


def reconstruction_mse(sae: Any, acts: torch.Tensor) -> float:
    """Per-token sum of squared error, averaged over tokens."""
    with torch.no_grad():
        return (sae(acts).float() - acts).pow(2).sum(-1).mean().item()
