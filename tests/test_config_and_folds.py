"""Configs, registration, export and SAELens's folds on the routed architectures."""

import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

import sae_lens_scale
from sae_lens_scale import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

D_IN, D_SAE = 16, 64


def trained_looking(sae: Any, seed: int = 0) -> Any:
    """Perturb every parameter so that omega, biases, router and decoder norms all matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return sae


def scale_training(**overrides: Any) -> ScaleTrainingSAE:
    fields = dict(d_in=D_IN, d_sae=D_SAE, n_experts=8, n_active_experts=2, k=6, dtype="float64") | overrides
    return trained_looking(ScaleTrainingSAE(ScaleTrainingSAEConfig(**fields)))


def switch_training(**overrides: Any) -> SwitchTrainingSAE:
    fields = dict(d_in=D_IN, d_sae=D_SAE, n_experts=8, k=4, dtype="float64") | overrides
    return trained_looking(SwitchTrainingSAE(SwitchTrainingSAEConfig(**fields)))


def test_registration_is_idempotent_and_inference_first() -> None:
    assert SAE_CLASS_REGISTRY["scale"] == (ScaleSAE, ScaleSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["switch"] == (SwitchTrainingSAE, SwitchTrainingSAEConfig)
    before = (dict(SAE_CLASS_REGISTRY), dict(SAE_TRAINING_CLASS_REGISTRY))
    sae_lens_scale.register()
    sae_lens_scale.register()
    assert (SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY) == before


@pytest.mark.parametrize("make", [scale_training, switch_training])
def test_config_round_trips_through_dict(make: Any) -> None:
    sae = make(load_balance_coefficient=7.5, aux_loss_coefficient=0.25)
    as_dict = sae.cfg.to_dict()
    restored = TrainingSAEConfig.from_dict(as_dict)
    assert type(restored) is type(sae.cfg)
    assert restored.to_dict() == as_dict
    inference_dict = sae.cfg.get_inference_sae_cfg_dict()
    inference_cfg = SAE.get_sae_config_class_for_architecture(inference_dict["architecture"]).from_dict(inference_dict)
    assert inference_cfg.n_experts == 8 and inference_cfg.k == sae.cfg.k
    assert inference_cfg.n_active_experts == sae.cfg.n_active_experts


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_sae=100, n_experts=8), "d_sae=100 is not divisible by n_experts=8"),
        (dict(n_active_experts=9), "n_active_experts=9 exceeds n_experts=8"),
        (dict(n_active_experts=0), "n_active_experts=0 must be >= 1"),
        (dict(k=17), "k=17 exceeds the 16 latents a token can reach"),
        (dict(k=0), "k=0 must be >= 1"),
        (dict(k=4.0), "k=4.0 must be an int"),
        (dict(n_experts="8"), "n_experts='8' must be an int"),
        (dict(feature_scaling="learned"), "feature_scaling='learned' must be one of ('mean', 'none')"),
        (dict(dtype="float8"), "dtype='float8' is not a torch dtype name"),
        (dict(load_balance_coefficient=-1.0), "load_balance_coefficient=-1.0 must be >= 0"),
        (dict(aux_loss_coefficient=float("nan")), "aux_loss_coefficient=nan must be a finite number"),
        (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm' cannot be combined"),
    ],
)
def test_bad_training_config_names_field_value_and_fix(fields: dict[str, Any], message: str) -> None:
    base = dict(d_in=D_IN, d_sae=64, n_experts=8, n_active_experts=2, k=6)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        ScaleTrainingSAEConfig(**(base | fields))
    assert "ScaleTrainingSAEConfig." in str(error.value)


def test_bad_inference_and_switch_configs_raise() -> None:
    with pytest.raises(ValueError, match=r"ScaleSAEConfig.k=40 exceeds the 32 latents"):
        ScaleSAEConfig(d_in=D_IN, d_sae=64, n_experts=4, n_active_experts=2, k=40)
    with pytest.raises(ValueError, match=r"SwitchTrainingSAEConfig.k=9 exceeds the 8 latents .*n_active_experts=1"):
        SwitchTrainingSAEConfig(d_in=D_IN, d_sae=64, n_experts=8, k=9)
    with pytest.raises(ValueError, match=r"d_sae=60 is not divisible by n_experts=8; .* such as 56 or 64"):
        SwitchTrainingSAEConfig(d_in=D_IN, d_sae=60, n_experts=8, k=4)


@pytest.mark.parametrize("make", [scale_training, switch_training])
def test_export_reproduces_training_outputs(make: Any, tmp_path: Any) -> None:
    sae = make()
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 0.01  # the fold below has something to do
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is {"scale": ScaleSAE, "switch": SwitchSAE}[sae.cfg.architecture()]
    assert set(loaded.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router"}
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))
    x = torch.randn(4, 5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-12, atol=1e-12)


def test_training_checkpoint_keeps_omega(tmp_path: Any) -> None:
    sae = scale_training()
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    torch.testing.assert_close(loaded.omega, sae.omega, rtol=0, atol=0)
    x = torch.randn(9, D_IN, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


def exported(sae: Any, tmp_path: Any) -> Any:
    sae.save_inference_model(tmp_path)
    return SAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_norm_scaling_fold_is_exact(apply_b_dec_to_input: bool, inference: bool, tmp_path: Any) -> None:
    sae = scale_training(apply_b_dec_to_input=apply_b_dec_to_input, normalize_activations="expected_average_only_in")
    if inference:
        sae = exported(sae, tmp_path)
    x = 40 * torch.randn(30, D_IN, dtype=torch.float64)
    s = 0.037
    before_acts, before_out, before_W_dec = sae.encode(x * s), sae(x * s), sae.W_dec.detach().clone()
    sae.fold_activation_norm_scaling_factor(s)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(before_out, s * sae(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(before_acts, s * sae.encode(x), rtol=1e-10, atol=1e-10)
    assert torch.equal(sae.W_dec, before_W_dec)  # exported decoders keep their unit-norm rows


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_whitening_fold_is_exact(apply_b_dec_to_input: bool, inference: bool, tmp_path: Any) -> None:
    sae = scale_training(apply_b_dec_to_input=apply_b_dec_to_input)
    if inference:
        sae = exported(sae, tmp_path)
    torch.manual_seed(5)
    mean = torch.randn(D_IN, dtype=torch.float64)
    whitening = torch.randn(D_IN, D_IN, dtype=torch.float64) / D_IN**0.5 + torch.eye(D_IN, dtype=torch.float64)
    unwhitening = torch.linalg.inv(whitening)
    x = torch.randn(30, D_IN, dtype=torch.float64) + mean
    z = (x - mean) @ whitening
    expected_out = sae(z) @ unwhitening + mean
    expected_acts = sae.encode(z)
    sae.fold_activation_whitening(mean, whitening, unwhitening)
    torch.testing.assert_close(sae(x), expected_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sae.encode(x), expected_acts, rtol=1e-9, atol=1e-9)
    if not inference:
        assert sae.cfg.normalize_decoder_rows is False
        torch.testing.assert_close(exported(sae, tmp_path / "after")(x), expected_out, rtol=1e-9, atol=1e-9)


def test_w_dec_norm_fold_is_exact_or_refused(tmp_path: Any) -> None:
    sae = scale_training()
    x = torch.randn(30, D_IN, dtype=torch.float64)
    expected = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))
    torch.testing.assert_close(sae(x), expected, rtol=1e-12, atol=1e-12)

    inference = exported(sae, tmp_path)
    folded = SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        inference.W_dec[3] *= 2  # normalised decoding ignores the row norm, so the fold stays exact
    torch.testing.assert_close(inference(x), expected, rtol=1e-12, atol=1e-12)
    inference.fold_W_dec_norm()
    torch.testing.assert_close(inference(x), expected, rtol=1e-12, atol=1e-12)
    inference.cfg.normalize_decoder_rows = False
    with torch.no_grad():
        inference.W_dec[3] *= 2
    with pytest.raises(NotImplementedError, match="needs unit-norm W_dec rows"):
        inference.fold_W_dec_norm()


@pytest.mark.parametrize("make", [scale_training, switch_training])
def test_training_checkpoint_loaded_for_inference_decodes_as_trained(make: Any, tmp_path: Any) -> None:
    sae = make(feature_scaling="none") if make is scale_training else make()
    sae.save_model(tmp_path)  # a checkpoint: W_dec rows are not unit norm
    loaded = SAE.load_from_disk(tmp_path)
    assert not isinstance(loaded, TrainingSAE)
    x = torch.randn(12, D_IN, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-12, atol=1e-12)


def test_paper_example_builds_its_config() -> None:
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "train_gpt2_scale.py"))
    cfg = example["paper_config"](819_200_000, "runs/x", "cpu", False)
    assert (cfg.sae.d_sae, cfg.sae.n_experts, cfg.sae.n_active_experts, cfg.sae.k) == (24576, 64, 2, 32)
    assert cfg.hook_name == "blocks.8.hook_resid_post" and cfg.dataset_path == "Skylion007/openwebtext"
    assert cfg.get_training_sae_cfg_dict()["architecture"] == "scale"
