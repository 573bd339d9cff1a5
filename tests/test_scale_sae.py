"""What only Scale SAE has: Feature Scaling's omega, trained, checkpointed and folded away on export."""

import runpy
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

from sae_lens_scale import ScaleSAE, ScaleTrainingSAE
from sae_lens_scale.validation import ConfigError
from tests.support.builders import scale_training_sae


def test_training_checkpoint_keeps_omega(tmp_path: Path) -> None:
    sae = scale_training_sae()
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(loaded, ScaleTrainingSAE)
    torch.testing.assert_close(loaded.omega, sae.omega, rtol=0, atol=0)
    x = torch.randn(9, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


def test_export_folds_omega_into_the_encoder(tmp_path: Path) -> None:
    sae = scale_training_sae()
    assert sae.omega.abs().min() > 0
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, ScaleSAE) and "omega" not in loaded.state_dict()
    x = torch.randn(9, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-12, atol=1e-12)


def test_fold_feature_scaling_keeps_outputs_and_zeroes_omega() -> None:
    sae = scale_training_sae()
    x = torch.randn(9, 16, dtype=torch.float64)
    before = sae(x)
    sae.fold_feature_scaling()
    assert torch.count_nonzero(sae.omega) == 0
    torch.testing.assert_close(sae(x), before, rtol=1e-12, atol=1e-12)


def test_no_feature_scaling_means_no_omega() -> None:
    sae = scale_training_sae(feature_scaling="none")
    assert "omega" not in dict(sae.named_parameters()) and sae.feature_scaling_omega() is None


def test_bad_feature_scaling_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"ScaleTrainingSAEConfig.feature_scaling='learned' must be one of"):
        scale_training_sae(feature_scaling="learned")


def test_paper_example_builds_its_config() -> None:
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "train_gpt2_scale.py"))
    cfg = example["paper_config"](819_200_000, "runs/x", "cpu", False)
    assert (cfg.sae.d_sae, cfg.sae.n_experts, cfg.sae.n_active_experts, cfg.sae.k) == (24576, 64, 2, 32)
    assert cfg.hook_name == "blocks.8.hook_resid_post" and cfg.dataset_path == "Skylion007/openwebtext"
    assert cfg.get_training_sae_cfg_dict()["architecture"] == "scale"
