"""SAELens's own training command line, with the routed architectures among its ``--architecture`` choices.

SAELens builds that parser from its registry of training SAEs each time it runs and reads no entry points, so an
architecture is a choice only once its package has been imported: this module imports the plugin first. The parser
is SAELens's private ``_parse_cfg_args``; it is reached only here, so a SAELens upgrade that changes it breaks one
test of this module, not its users.
"""

from collections.abc import Sequence
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, llm_sae_training_runner
from sae_lens.saes.sae import TrainingSAE

import sae_lens_scale  # noqa: F401  registers "scale" and "switch" with SAELens


def parse_training_args(args: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """The runner config SAELens's CLI builds from ``args``: every runner field a flag, plus ``--architecture``."""
    return llm_sae_training_runner._parse_cfg_args(list(args))


def train(args: Sequence[str]) -> tuple[LanguageModelSAERunnerConfig[Any], TrainingSAE[Any]]:
    """Train as ``python -m sae_lens.llm_sae_training_runner args`` does; the config and the trained SAE."""
    cfg = parse_training_args(args)
    return cfg, LanguageModelSAETrainingRunner(cfg).run()


def training_rows(result: tuple[LanguageModelSAERunnerConfig[Any], TrainingSAE[Any]]) -> list[tuple[str, str]]:
    cfg, sae = result
    return [
        ("architecture", sae.cfg.architecture()),
        ("d_in x d_sae", f"{sae.cfg.d_in} x {sae.cfg.d_sae}"),
        ("hook", cfg.hook_name),
        ("training tokens", f"{cfg.training_tokens:,}"),
        ("saved to", str(cfg.output_path)),
    ]
