"""``sae-lens-scale``: ``demo`` (the main job, see ``sae_lens_scale.demo``) and ``analyze`` (``sae_lens_scale.analyze``)."""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from sae_lens_scale.analyze import AnalyzeConfig, analysis_rows, run_analysis
from sae_lens_scale.demo import DemoConfig, run_demo, summary_rows
from sae_lens_scale.offline import MissingOfflineAsset
from sae_lens_scale.sources import HubUnavailable

MODEL_HELP = "TransformerLens model name; smollm2-135m is bundled and offline"
DATASET_HELP = "a bundled corpus (shakespeare, python-docs) or a Hugging Face dataset path"
DEMO_FLAGS = {
    "model": ("--model", MODEL_HELP),
    "hook": ("--hook", "hook point whose activations the SAE reconstructs"),
    "dataset": ("--dataset", DATASET_HELP),
    "architecture": ("--architecture", "scale or switch"),
    "n_experts": ("--n-experts", "experts"),
    "active_experts": ("--active-experts", "experts per token (scale only)"),
    "k": ("-k", "active latents per token"),
    "d_sae": ("--d-sae", "total latents"),
    "training_tokens": ("--training-tokens", "tokens to train on"),
    "output": ("--output", "folder for the SAE, summary.json and plots"),
}
ANALYZE_FLAGS = {
    "path": ("path", "SAE folder, or a Hub repo id together with --sae-id"),
    "sae_id": ("--sae-id", "SAE id inside a Hub repo"),
    "model": ("--model", f"{MODEL_HELP} (default: the SAE's own model)"),
    "hook": ("--hook", "hook point (default: the SAE's own hook)"),
    "dataset": ("--dataset", DATASET_HELP + "; its held-out split is used"),
    "tokens": ("--tokens", "held-out tokens to encode"),
    "output": ("--output", "folder for analysis.json and plots"),
}


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, flags: dict[str, tuple[str, str]]
) -> None:
    """One argument per dataclass field named in ``flags``, typed and defaulted from the dataclass."""
    for field in fields(config_class):
        if field.name not in flags:
            continue
        flag, help_text = flags[field.name]
        if field.default is MISSING:
            parser.add_argument(flag, help=help_text)
            continue
        value_type = type(field.default) if field.default is not None else str
        choices = ("scale", "switch") if field.name == "architecture" else None
        parser.add_argument(
            flag,
            dest=field.name,
            type=value_type,
            default=field.default,
            choices=choices,
            help=f"{help_text} (default: {field.default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-lens-scale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train, evaluate, save, reload and plot a Scale SAE on a real LM")
    add_config_arguments(demo, DemoConfig, DEMO_FLAGS)
    analyze = commands.add_parser("analyze", help="redundancy, activation similarity and expert metrics of an SAE")
    add_config_arguments(analyze, AnalyzeConfig, ANALYZE_FLAGS)
    return parser


def two_columns(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    run: Any = {
        "demo": lambda: summary_rows(run_demo(DemoConfig(**args))),
        "analyze": lambda: analysis_rows(run_analysis(AnalyzeConfig(**args))),
    }[command]
    try:
        rows = run()
    except (MissingOfflineAsset, HubUnavailable, ValueError) as error:
        print(f"sae-lens-scale {command}: {error}", file=sys.stderr)
        return 1
    print(two_columns(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
