"""The command line: every config field a flag of the same name, and a user's mistake one line with exit code 2."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sae_lens_scale.tools.analyze import AnalyzeConfig
from sae_lens_scale.tools.cli import main, parse
from sae_lens_scale.tools.demo import DemoConfig


@pytest.mark.parametrize("config_class", [DemoConfig, AnalyzeConfig])
def test_every_config_field_is_a_documented_flag(config_class: type, capsys: pytest.CaptureFixture[str]) -> None:
    command = "demo" if config_class is DemoConfig else "analyze"
    with pytest.raises(SystemExit) as exit_info:
        parse([command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for field in fields(config_class):
        if field.name != "path":  # the positional argument
            assert f"--{field.name} " in help_text
    assert "experts each token is routed to" in help_text or command == "analyze"


def test_flags_fill_the_demo_config() -> None:
    flags = {
        "--model": "gpt2",
        "--hook": "blocks.8.hook_resid_post",
        "--dataset": "Skylion007/openwebtext",
        "--architecture": "scale",
        "--n_experts": "32",
        "--n_active_experts": "4",
        "-k": "64",
        "--d_sae": "24576",
        "--feature_scaling": "none",
        "--training_tokens": "2048",
        "--lr": "0.0004",
        "--output": "out",
    }
    command, cfg = parse(["demo", *(part for flag in flags.items() for part in flag)])
    assert command == "demo"
    assert cfg == DemoConfig(
        model="gpt2",
        hook="blocks.8.hook_resid_post",
        dataset="Skylion007/openwebtext",
        architecture="scale",
        n_experts=32,
        n_active_experts=4,
        k=64,
        d_sae=24576,
        feature_scaling="none",
        training_tokens=2048,
        lr=4e-4,
        output="out",
    )
    assert parse(["analyze", "some/folder", "--tokens", "4096"])[1] == AnalyzeConfig(path="some/folder", tokens=4096)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("demo --architecture topk", "argument --architecture: invalid choice: 'topk'"),
        ("demo --k 0", "DemoConfig.k=0 must be >= 1."),
        ("demo --k four", "argument -k/--k: invalid int value: 'four'"),
        ("demo --architecture switch --n_active_experts 2", "n_active_experts=2 must be 1 with architecture='switch'"),
        ("demo --heldout_fraction 1.5", "DemoConfig.heldout_fraction=1.5 must lie strictly between 0 and 1"),
        ("demo --training_tokens 100", "DemoConfig.training_tokens=100 must be >= 1024"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_code_2(argv: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv.split())
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and error.startswith("sae-lens-scale")


def test_a_bad_path_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["analyze", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "AnalyzeConfig.path=" in error and "is not a folder; to load from the Hub, pass the repo id" in error


@pytest.mark.slow
def test_a_hub_model_fails_at_download_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_scale.tools.cli", "demo", "--model", "gpt2", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--model gpt2 downloads from the Hugging Face Hub" in result.stderr
    assert "Use --model smollm2-135m (the bundled SmolLM2-135M-Instruct)" in result.stderr
