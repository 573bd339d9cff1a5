"""SAELens's own runner, loaders, evals and HookedSAETransformer on the routed architectures, offline."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from sae_lens_scale import ScaleSAE, ScaleTrainingSAEConfig, SwitchSAE, SwitchTrainingSAEConfig
from tests.conftest import CONTEXT, D_MODEL

HOOK = "blocks.1.hook_resid_pre"
D_SAE = 128


def runner_config(sae_cfg: Any, output: Path) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny",
        hook_name=HOOK,
        dataset_path="in-memory",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=False,
        sequence_separator_token=None,
        training_tokens=60 * 256,
        train_batch_size_tokens=256,
        store_batch_size_prompts=32,
        n_batches_in_buffer=32,
        lr=3e-3,
        device="cpu",
        seed=0,
        checkpoint_path=str(output / "checkpoints"),
        output_path=str(output / "final"),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )


SAE_CONFIGS = {
    "scale": lambda: ScaleTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, n_experts=8, n_active_experts=2, k=8),
    "switch": lambda: SwitchTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, n_experts=4, k=8),
}


def heldout_activations(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK].reshape(-1, D_MODEL)


def mse(sae: Any, acts: torch.Tensor) -> float:
    with torch.no_grad():
        return (sae(acts) - acts).pow(2).sum(-1).mean().item()


@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_runner_trains_saves_reloads_evals_and_hooks(
    architecture: str, tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    cfg = runner_config(SAE_CONFIGS[architecture](), tmp_path)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=tiny_model)
    heldout = heldout_activations(tiny_model, torch.as_tensor(token_dataset[-40:]["input_ids"]))
    mse_before = mse(runner.sae, heldout)
    trained = runner.run()
    mse_after = mse(trained, heldout)
    assert mse_after < 0.5 * mse_before

    loaded = SAE.load_from_disk(tmp_path / "final")
    assert type(loaded) is {"scale": ScaleSAE, "switch": SwitchSAE}[architecture]
    torch.testing.assert_close(loaded(heldout), trained(heldout), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.encode(heldout), trained.encode(heldout), rtol=1e-5, atol=1e-5)
    assert loaded.cfg.metadata.hook_name == HOOK

    eval_config = EvalConfig(
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(
        loaded, runner.activations_store, tiny_model, ActivationScaler(), eval_config, exclude_special_tokens=False
    )
    assert metrics["sparsity"]["l0"] == pytest.approx(8, abs=0.5)
    assert metrics["reconstruction_quality"]["explained_variance"] > 0.45
    assert metrics["model_performance_preservation"]["ce_loss_score"] > 0

    hooked = HookedSAETransformer(tiny_model.cfg)
    hooked.load_state_dict(tiny_model.state_dict(), strict=False)
    tokens = torch.as_tensor(token_dataset[:4]["input_ids"])
    clean = hooked(tokens)
    with_sae, cache = hooked.run_with_cache_with_saes(tokens, saes=[loaded])
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (4, CONTEXT, D_SAE)
    assert (cache[f"{HOOK}.hook_sae_acts_post"] != 0).sum(-1).max() <= 8
    assert not torch.allclose(with_sae, clean)
    sae_logits = hooked.run_with_saes(tokens, saes=[loaded])
    torch.testing.assert_close(sae_logits, with_sae)
