"""``sae-lens-scale``: the command line. ``demo`` is the main job (see ``sae_lens_scale.demo``)."""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from sae_lens_scale.demo import DemoConfig, HubUnavailable, format_summary, run_demo
from sae_lens_scale.offline import MissingOfflineAsset

DEMO_FLAGS = {
    "model": ("--model", "TransformerLens model name; the default is bundled and offline"),
    "hook": ("--hook", "hook point whose activations the SAE reconstructs"),
    "dataset": ("--dataset", "a bundled corpus (shakespeare, python-docs) or a Hugging Face dataset path"),
    "architecture": ("--architecture", "scale or switch"),
    "n_experts": ("--n-experts", "experts"),
    "active_experts": ("--active-experts", "experts per token (scale only)"),
    "k": ("-k", "active latents per token"),
    "d_sae": ("--d-sae", "total latents"),
    "training_tokens": ("--training-tokens", "tokens to train on"),
    "output": ("--output", "folder for the SAE, summary.json and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-lens-scale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train, evaluate, save, reload and plot a Scale SAE on a real LM")
    defaults = DemoConfig()
    for field in fields(DemoConfig):
        if field.name in DEMO_FLAGS:
            flag, help_text = DEMO_FLAGS[field.name]
            default = getattr(defaults, field.name)
            choices = ("scale", "switch") if field.name == "architecture" else None
            demo.add_argument(
                flag,
                dest=field.name,
                type=type(default),
                default=default,
                choices=choices,
                help=f"{help_text} (default: {default})",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(**{name: value for name, value in vars(args).items() if name != "command"})
    try:
        summary = run_demo(config)
    except (MissingOfflineAsset, HubUnavailable, ValueError) as error:
        print(f"sae-lens-scale demo: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
