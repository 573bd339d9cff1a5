"""SAELens's MultiSAETrainingRunner trains routed and TopK SAEs side by side from one pass of the model, offline."""

from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, LoggingConfig
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAEConfig
from transformer_lens import HookedTransformer

from sae_lens_scale import ScaleSAE, SwitchSAE
from tests.support.builders import TINY_HOOK, reconstruction_mse, tiny_activations, tiny_sae_config
from tests.support.models import CONTEXT, D_MODEL

STEPS = 30
BATCH = 256


def test_routed_and_topk_saes_train_from_one_model_pass_and_reload(
    tiny_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    saes = {
        "scale": tiny_sae_config("scale"),
        "switch": tiny_sae_config("switch"),
        "topk": TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=128, k=8),
    }
    cfg = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=TINY_HOOK,
        model_name="tiny",
        dataset_path="in-memory",
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=False,
        sequence_separator_token=None,
        training_tokens=STEPS * BATCH,
        train_batch_size_tokens=BATCH,
        store_batch_size_prompts=32,
        n_batches_in_buffer=32,
        lr=3e-3,
        seed=0,
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "final"),
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(0)
    runner = MultiSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=tiny_model)
    heldout = tiny_activations(tiny_model, torch.as_tensor(token_dataset[-40:]["input_ids"]))
    mse_before = {name: reconstruction_mse(sae, heldout) for name, sae in runner.saes.items()}
    trained = runner.run()

    expected_classes = {"scale": ScaleSAE, "switch": SwitchSAE, "topk": TopKSAE}
    for name, sae in trained.items():
        assert sae.cfg.metadata.hook_name == TINY_HOOK
        assert reconstruction_mse(sae, heldout) < 0.5 * mse_before[name], name
        reloaded = SAE.load_from_disk(tmp_path / "final" / name)
        assert type(reloaded) is expected_classes[name]
        with torch.no_grad():
            torch.testing.assert_close(reloaded(heldout), sae(heldout), rtol=1e-4, atol=1e-4)
