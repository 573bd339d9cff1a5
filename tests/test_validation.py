"""Every input a user can get wrong: config fields, and weight files that do not fit their config."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_lens_scale import ScaleSAEConfig, ScaleTrainingSAEConfig, SwitchTrainingSAEConfig
from sae_lens_scale.hub import load_sae
from sae_lens_scale.validation import ConfigError, WeightsMismatchError
from tests.support.builders import scale_training_sae, switch_training_sae

WEIGHTS = "sae_weights.safetensors"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_sae": 100, "n_experts": 8}, "d_sae=100 is not divisible by n_experts=8"),
        ({"n_active_experts": 9}, "n_active_experts=9 exceeds n_experts=8"),
        ({"n_active_experts": 0}, "n_active_experts=0 must be >= 1"),
        ({"k": 17}, "k=17 exceeds the 16 latents a token can reach"),
        ({"k": 0}, "k=0 must be >= 1"),
        ({"k": 4.0}, "k=4.0 must be an int"),
        ({"n_experts": "8"}, "n_experts='8' must be an int"),
        ({"normalize_decoder_rows": "yes"}, "normalize_decoder_rows='yes' must be True or False"),
        ({"feature_scaling": "learned"}, "feature_scaling='learned' must be one of ('mean', 'none')"),
        ({"dtype": "float8"}, "dtype='float8' is not a torch dtype name"),
        ({"load_balance_coefficient": -1.0}, "load_balance_coefficient=-1.0 must be >= 0"),
        ({"aux_loss_coefficient": float("nan")}, "aux_loss_coefficient=nan must be a finite number"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' cannot be combined"),
        ({"router_collapse_fraction": 1.5}, "router_collapse_fraction=1.5 must be in (0, 1]"),
        ({"router_collapse_fraction": 0.0}, "router_collapse_fraction=0.0 must be in (0, 1]"),
        ({"router_collapse_window": 0}, "router_collapse_window=0 must be >= 1"),
        ({"bias_init": "median"}, "bias_init='median' must be one of ('geometric_median', 'mean', 'none')"),
        ({"decoder_init_norm": 0.0}, "decoder_init_norm=0.0 must be > 0, or None for Kaiming's initialisation"),
        ({"decoder_init_norm": -1.0}, "decoder_init_norm=-1.0 must be >= 0"),
    ],
)
def test_bad_training_config_names_field_value_and_fix(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"d_in": 16, "d_sae": 64, "n_experts": 8, "n_active_experts": 2, "k": 6}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        ScaleTrainingSAEConfig(**(base | fields))
    assert str(error.value).startswith("ScaleTrainingSAEConfig.")


def test_bad_inference_and_switch_configs_raise() -> None:
    with pytest.raises(ConfigError, match=r"ScaleSAEConfig.k=40 exceeds the 32 latents"):
        ScaleSAEConfig(d_in=16, d_sae=64, n_experts=4, n_active_experts=2, k=40)
    with pytest.raises(ConfigError, match=r"SwitchTrainingSAEConfig.k=9 exceeds the 8 latents .*n_active_experts=1"):
        SwitchTrainingSAEConfig(d_in=16, d_sae=64, n_experts=8, k=9)
    with pytest.raises(ConfigError, match=r"d_sae=60 is not divisible by n_experts=8; .* such as 56 or 64"):
        SwitchTrainingSAEConfig(d_in=16, d_sae=60, n_experts=8, k=4)


@pytest.fixture
def exported(tmp_path: Path) -> Callable[[str], Path]:
    """An exported SAE folder per architecture, for breaking in different ways."""

    def export(architecture: str) -> Path:
        folder = tmp_path / architecture / "good"
        if not folder.exists():
            make = scale_training_sae if architecture == "scale" else switch_training_sae
            make(d_in=32, d_sae=128, n_experts=8 if architecture == "scale" else 4).save_inference_model(folder)
        return folder

    return export


def broken_copy(folder: Path, name: str, edit: Callable[[Path], None]) -> Path:
    broken = folder.parent / name
    shutil.copytree(folder, broken)
    edit(broken)
    return broken


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps(cfg | changes))

    return edit


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state_dict = load_file(folder / WEIGHTS)
        change(state_dict)
        save_file(state_dict, folder / WEIGHTS)

    return edit


def poison(state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["W_enc"][0, :2] = float("nan")


def add_omega(state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["omega"] = torch.zeros(4, dtype=torch.float64)


def drop_router(state_dict: dict[str, torch.Tensor]) -> None:
    del state_dict["W_router"]


@pytest.mark.parametrize(("architecture", "n_experts"), [("scale", 8), ("switch", 4)])
def test_mismatched_weights_name_the_tensor_and_the_field(
    architecture: str, n_experts: int, exported: Callable[[str], Path]
) -> None:
    folder = exported(architecture)
    cases: list[tuple[str, Callable[[Path], None], str]] = [
        (
            "wrong_d_sae",
            edit_config(d_sae=256),
            r"W_enc has shape \(32, 128\), but d_in=32, d_sae=256 need \(32, 256\).*"
            r"saved with d_sae=128, but the config says d_sae=256",
        ),
        (
            "wrong_n_experts",
            edit_config(n_experts=2 * n_experts),
            rf"W_router has shape \(32, {n_experts}\), but d_in=32, n_experts={2 * n_experts} need "
            rf"\(32, {2 * n_experts}\).*saved with n_experts={n_experts}, "
            rf"but the config says n_experts={2 * n_experts}",
        ),
        ("missing_router", edit_weights(drop_router), rf"W_router is missing \(needs shape \(32, {n_experts}\)\)"),
        ("nan_weights", edit_weights(poison), r"W_enc has 2 NaN/inf values"),
        ("checkpoint", edit_weights(add_omega), r"omega is a training-only tensor.*TrainingSAE.load_from_disk"),
    ]
    for name, edit, message in cases:
        broken = broken_copy(folder, name, edit)
        expected = rf"(?s)These weights do not fit a '{architecture}' SAE.*{message}"
        with pytest.raises(WeightsMismatchError, match=expected):
            SAE.load_from_disk(broken)
        if name != "checkpoint":  # load_sae opens a file with omega as a training checkpoint
            with pytest.raises(WeightsMismatchError, match=rf"(?s)^{broken}: {expected[4:]}"):
                load_sae(broken)  # the plugin's loader knows the folder and names it


def test_config_errors_while_loading_name_the_field(exported: Callable[[str], Path]) -> None:
    broken = broken_copy(exported("scale"), "indivisible", edit_config(n_experts=5))
    message = r"ScaleSAEConfig.d_sae=128 is not divisible by n_experts=5"
    with pytest.raises(ConfigError, match=message):
        SAE.load_from_disk(broken)
    with pytest.raises(ConfigError, match=rf"^{broken}: {message}"):
        load_sae(broken)


def test_missing_and_truncated_files_are_refused(exported: Callable[[str], Path]) -> None:
    """SAELens reads these before the plugin runs: a missing file is named; a truncated one is refused, unnamed by
    SAELens and named by ``sae_lens_scale.hub.load_sae``."""
    folder = exported("switch")
    missing = broken_copy(folder, "missing", lambda f: (f / WEIGHTS).unlink())
    with pytest.raises(FileNotFoundError, match=rf"missing/{WEIGHTS}"):
        SAE.load_from_disk(missing)

    def truncate(folder: Path) -> None:
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])

    truncated = broken_copy(folder, "truncated", truncate)
    with pytest.raises(SafetensorError, match="incomplete metadata, file not fully covered"):
        SAE.load_from_disk(truncated)
    with pytest.raises(ValueError, match=rf"truncated/{WEIGHTS} is truncated or corrupt \(.*incomplete metadata"):
        load_sae(truncated)


def test_resuming_into_a_different_config_names_the_checkpoint(tmp_path: Path) -> None:
    scale_training_sae(d_in=32, d_sae=128, n_experts=8).save_model(tmp_path / "checkpoint")
    other = TrainingSAE.from_dict(ScaleTrainingSAEConfig(d_in=32, d_sae=128, n_experts=4, k=6).to_dict())
    with pytest.raises(
        WeightsMismatchError,
        match=r"(?s)checkpoint/sae_weights.safetensors: .*W_router has shape \(32, 8\).*"
        r"n_experts=8, but the config says n_experts=4.*the resumed run's sae config",
    ):
        other.load_weights_from_checkpoint(tmp_path / "checkpoint")
