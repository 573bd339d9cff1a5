"""``sae-lens-scale train``: SAELens's own training CLI, with the routed architectures among its choices."""

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

from sae_lens_scale import ScaleSAE, ScaleTrainingSAEConfig, SwitchTrainingSAEConfig
from sae_lens_scale.tools.cli import main
from sae_lens_scale.tools.offline import load_corpus, smollm2_hf_dir
from sae_lens_scale.tools.sae_lens_cli import parse_training_args

SHAPE = ["--d_in", "32", "--d_sae", "128", "-k", "8"]


@pytest.mark.parametrize(
    ("flags", "expected_sae"),
    [
        (
            ["--architecture", "switch", *SHAPE, "--n_experts", "4"],
            SwitchTrainingSAEConfig(d_in=32, d_sae=128, k=8, n_experts=4),
        ),
        (
            [
                "--architecture",
                "scale",
                *SHAPE,
                "--n_experts",
                "8",
                "--n_active_experts",
                "2",
                "--feature_scaling",
                "none",
            ],
            ScaleTrainingSAEConfig(d_in=32, d_sae=128, k=8, n_experts=8, n_active_experts=2, feature_scaling="none"),
        ),
        (["--architecture", "topk", *SHAPE], TopKTrainingSAEConfig(d_in=32, d_sae=128, k=8)),
    ],
)
def test_flags_build_the_config_sae_lens_python_api_would(flags: list[str], expected_sae: Any) -> None:
    runner_flags = ["--hook_name", "blocks.1.hook_resid_post", "--lr", "0.002", "--training_tokens", "4096"]
    cfg = parse_training_args([*flags, *runner_flags])
    expected = LanguageModelSAERunnerConfig(
        sae=expected_sae, hook_name="blocks.1.hook_resid_post", lr=0.002, training_tokens=4096
    )
    assert cfg.sae == expected_sae
    for name in ("hook_name", "lr", "training_tokens", "train_batch_size_tokens", "context_size", "dataset_path"):
        assert getattr(cfg, name) == getattr(expected, name), name


def test_a_bad_architecture_exits_2_naming_the_routed_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--architecture", "mixture"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'mixture'" in error and "'scale', 'switch'" in error


def cli_flags(data: Path, output: Path) -> list[str]:
    """A tiny Scale SAE on the bundled SmolLM2's second block, read as SAELens reads any HF model by path."""
    return [
        *("--architecture", "scale", "--d_in", "576", "--d_sae", "1152", "--n_experts", "8"),
        *("--n_active_experts", "2", "-k", "16", "--lr", "0.001"),
        *("--model_class_name", "AutoModelForCausalLM", "--model_name", str(smollm2_hf_dir())),
        *("--hook_name", "model.layers.1", "--dataset_path", str(data), "--is_dataset_tokenized", "False"),
        *("--streaming", "False", "--context_size", "64", "--training_tokens", "5120"),
        *("--train_batch_size_tokens", "512", "--store_batch_size_prompts", "16", "--n_batches_in_buffer", "8"),
        *("--n_batches_for_norm_estimate", "4", "--device", "cpu", "--log_to_wandb", "False", "--verbose", "False"),
        *("--output_path", str(output), "--checkpoint_path", str(output.parent / "checkpoints")),
    ]


@pytest.mark.slow
def test_train_trains_what_the_python_runner_trains_and_the_sae_reloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "text"
    data.mkdir()
    Dataset.from_dict({"text": load_corpus("shakespeare")[:3]}).to_parquet(data / "train.parquet")

    torch.manual_seed(0)
    assert main(["train", *cli_flags(data, tmp_path / "cli" / "sae")]) == 0
    assert f"saved to         {tmp_path / 'cli' / 'sae'}" in capsys.readouterr().out
    from_cli = SAE.load_from_disk(tmp_path / "cli" / "sae")

    torch.manual_seed(0)
    api_cfg = LanguageModelSAERunnerConfig(
        sae=ScaleTrainingSAEConfig(d_in=576, d_sae=1152, n_experts=8, n_active_experts=2, k=16),
        lr=0.001,
        model_class_name="AutoModelForCausalLM",
        model_name=str(smollm2_hf_dir()),
        hook_name="model.layers.1",
        dataset_path=str(data),
        is_dataset_tokenized=False,
        streaming=False,
        context_size=64,
        training_tokens=5120,
        train_batch_size_tokens=512,
        store_batch_size_prompts=16,
        n_batches_in_buffer=8,
        n_batches_for_norm_estimate=4,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
        output_path=str(tmp_path / "api" / "sae"),
        checkpoint_path=str(tmp_path / "api" / "checkpoints"),
    )
    LanguageModelSAETrainingRunner(api_cfg).run()
    from_api = SAE.load_from_disk(tmp_path / "api" / "sae")

    assert type(from_cli) is ScaleSAE
    assert from_cli.cfg.metadata.hook_name == "model.layers.1"
    # Same weights up to rounding (measured: at most 7.5e-9 apart; CPU kernels need not be bitwise repeatable)
    for name, tensor in from_api.state_dict().items():
        torch.testing.assert_close(from_cli.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
