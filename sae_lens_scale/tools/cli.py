"""``sae-lens-scale``: ``demo`` (the main job, see ``sae_lens_scale.tools.demo``), ``analyze``
(``sae_lens_scale.tools.analyze``) and ``train`` (SAELens's own training CLI, ``sae_lens_scale.tools.sae_lens_cli``).

The flags are built from the config dataclasses with simple_parsing, as SAELens and sparsify build theirs: every field
is a flag of the same name (``--n_active_experts``), typed and documented by the field itself. ``train`` hands every
argument after it to SAELens's parser unchanged.
"""

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import simple_parsing

from sae_lens_scale.hub import UnregisteredArchitectureError
from sae_lens_scale.tools.analyze import AnalyzeConfig, analysis_rows, run_analysis
from sae_lens_scale.tools.demo import DemoConfig, run_demo, summary_rows
from sae_lens_scale.tools.offline import MissingOfflineAsset
from sae_lens_scale.tools.sae_lens_cli import train, training_rows
from sae_lens_scale.tools.sources import HubUnavailable
from sae_lens_scale.validation import ConfigError, WeightsMismatchError

USAGE_EXIT_CODE = 2
COMMANDS: dict[str, tuple[type | None, Callable[[Any], list[tuple[str, str]]], str]] = {
    "demo": (
        DemoConfig,
        lambda cfg: summary_rows(run_demo(cfg)),
        "train, evaluate, save, reload and plot a Scale (or Switch) SAE on a real LM",
    ),
    "analyze": (
        AnalyzeConfig,
        lambda cfg: analysis_rows(run_analysis(cfg)),
        "redundancy, activation similarity and expert metrics of a saved SAE",
    ),
    "train": (
        None,  # no config class of its own: SAELens's parser reads the arguments
        lambda args: training_rows(train(args)),
        "SAELens's training CLI (python -m sae_lens.llm_sae_training_runner) with --architecture scale|switch",
    ),
}
# What a user can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, WeightsMismatchError, MissingOfflineAsset, HubUnavailable, UnregisteredArchitectureError)


class ArgumentParser(simple_parsing.ArgumentParser):
    """simple_parsing's parser, with argparse's usage dump replaced by one line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT_CODE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sae-lens-scale", description=__doc__, add_config_path_arg=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (config_class, _, help_text) in COMMANDS.items():
        if config_class is None:  # listed for --help; parse() hands its arguments on before argparse sees them
            commands.add_parser(name, help=help_text, add_help=False)
            continue
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_arguments(config_class, dest="config")
    return parser


def parse(argv: Sequence[str] | None) -> tuple[str, Any]:
    """The command and its config; a bad flag or field value exits with code 2 and one line on stderr.

    ``train``'s config is its arguments, unparsed: argparse cannot pass on arguments that look like flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return "train", argv[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as error:  # a field's own validation, run by simple_parsing when it builds the config
        parser.error(str(error))
    return args.command, args.config


def one_line(message: str) -> str:
    """A multi-line message (such as a weights file's list of bad tensors) as one line, bullets dropped."""
    lines = (re.sub(r"^\s*-\s+", "", line).strip() for line in message.splitlines())
    return "; ".join(line for line in lines if line)


def two_columns(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    command, cfg = parse(argv)
    try:
        rows = COMMANDS[command][1](cfg)
    except USER_ERRORS as error:
        print(f"sae-lens-scale {command}: error: {one_line(str(error))}", file=sys.stderr)
        return USAGE_EXIT_CODE
    print(two_columns(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
