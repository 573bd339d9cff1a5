"""Checks that turn a user's mistake into an error that names the field, the bad value and the fix.

Two kinds of input can be wrong: a config (checked when it is constructed, so a bad value never reaches a tensor) and
a weights file (checked against its config before torch copies anything, so a mismatch names the config field at
fault instead of only two shapes).
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import torch
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.util import str_to_dtype
from torch import Tensor


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field, the value and the fix."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the config it is loaded with; the message lists every tensor at fault."""


def fail(cfg: object, field: str, problem: str) -> NoReturn:
    raise ConfigError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r} {problem}.")


def require_int(cfg: object, field: str, minimum: int) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        fail(cfg, field, f"must be an int (got {type(value).__name__})")
    if value < minimum:
        fail(cfg, field, f"must be >= {minimum}")


def require_number(cfg: object, field: str, minimum: float) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(cfg, field, "must be a finite number")
    if value < minimum:
        fail(cfg, field, f"must be >= {minimum}")


def require_bool(cfg: object, field: str) -> None:
    if not isinstance(getattr(cfg, field), bool):
        fail(cfg, field, "must be True or False")


def require_choice(cfg: object, field: str, choices: Iterable[str]) -> None:
    """For ``Literal`` fields: a dataclass does not check them, and a JSON config can hold any string."""
    choices = tuple(choices)
    if getattr(cfg, field) not in choices:
        fail(cfg, field, f"must be one of {choices}")


def validate_routed_shape(cfg: Any) -> None:
    """Reject every inconsistent shape of a routed SAE: experts are equal blocks and k fits in the routed ones."""
    require_int(cfg, "d_in", minimum=1)
    require_int(cfg, "d_sae", minimum=1)
    require_int(cfg, "n_experts", minimum=1)
    require_int(cfg, "n_active_experts", minimum=1)
    require_int(cfg, "k", minimum=1)
    require_bool(cfg, "normalize_decoder_rows")
    if cfg.d_sae % cfg.n_experts:
        lower = cfg.d_sae - cfg.d_sae % cfg.n_experts
        fail(
            cfg,
            "d_sae",
            f"is not divisible by n_experts={cfg.n_experts}; experts are equal blocks of latents, "
            f"so use a multiple of n_experts such as {lower or cfg.n_experts} or {lower + cfg.n_experts}, "
            "or a n_experts that divides d_sae",
        )
    if cfg.n_active_experts > cfg.n_experts:
        fail(cfg, "n_active_experts", f"exceeds n_experts={cfg.n_experts}; use 1 <= n_active_experts <= n_experts")
    candidates = cfg.n_active_experts * (cfg.d_sae // cfg.n_experts)
    if cfg.k > candidates:
        fail(
            cfg,
            "k",
            f"exceeds the {candidates} latents a token can reach (n_active_experts={cfg.n_active_experts} experts "
            f"of d_sae / n_experts = {cfg.d_sae // cfg.n_experts} latents); lower k or raise n_active_experts or d_sae",
        )
    try:
        str_to_dtype(cfg.dtype)
    except ValueError:
        fail(cfg, "dtype", "is not a torch dtype name SAELens knows; use 'float32', 'bfloat16', 'float16' or 'float64'")


# The config fields that fix each tensor's dimensions, to say which field a mismatched file disagrees with.
TENSOR_DIMS: dict[str, tuple[str, ...]] = {
    "W_enc": ("d_in", "d_sae"),
    "b_enc": ("d_sae",),
    "W_dec": ("d_sae", "d_in"),
    "b_dec": ("d_in",),
    "W_router": ("d_in", "n_experts"),
    "b_router": ("d_in",),
    "omega": ("n_experts",),
}


def check_state_dict(state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], cfg: Any) -> None:
    """Raise :class:`WeightsMismatchError` naming every bad tensor, the config fields and the fix; pass a good file.

    torch's ``load_state_dict`` would also refuse a wrong shape, but without the config field at fault or the fix,
    and it would load NaN weights silently.
    """
    problems = _state_dict_problems(state_dict, expected, cfg)
    if not problems:
        return
    implied = _implied_config(state_dict)
    disagreeing = {field: size for field, size in implied.items() if getattr(cfg, field) != size}
    listing = "".join(f"\n  - {problem}" for problem in problems)
    hint = (
        f"\nThe tensors were saved with {_fields(disagreeing)}, but the config says "
        f"{_fields({field: getattr(cfg, field) for field in disagreeing})}: the weights and the config come from "
        "different SAEs. Load the weights with the config they were saved with."
        if disagreeing
        else "\nRe-save or re-download the SAE."
    )
    raise WeightsMismatchError(
        f"These weights do not fit a {cfg.architecture()!r} SAE ({type(cfg).__name__}):{listing}{hint}"
    )


def _state_dict_problems(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], cfg: Any
) -> list[str]:
    """Every missing, unexpected, wrongly shaped or non-finite tensor, one line each; empty when the file fits."""
    problems = [
        f"{name} is missing (needs shape {shape})" for name, shape in expected.items() if name not in state_dict
    ]
    for name, tensor in state_dict.items():
        if name not in expected:
            problems.append(_unexpected_tensor(name, cfg))
        elif tuple(tensor.shape) != expected[name]:
            fields = ", ".join(f"{field}={getattr(cfg, field)}" for field in TENSOR_DIMS.get(name, ()))
            problems.append(f"{name} has shape {tuple(tensor.shape)}, but {fields} need {expected[name]}")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{name} has {count} NaN/inf values (the run that saved it diverged)")
    return problems


def _unexpected_tensor(name: str, cfg: Any) -> str:
    if name == "omega" and not isinstance(cfg, TrainingSAEConfig):
        return (
            "omega is a training-only tensor: this is a training checkpoint, so load it with "
            "TrainingSAE.load_from_disk, or export it with save_inference_model for SAE.load_from_disk"
        )
    return f"{name} is not a tensor of a {cfg.architecture()!r} SAE with this config"


def _implied_config(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """The d_in, d_sae and n_experts the file's tensors were saved with, as far as their shapes tell."""
    implied: dict[str, int] = {}
    for name, tensor in state_dict.items():
        for field, size in zip(TENSOR_DIMS.get(name, ()), tensor.shape, strict=False):
            implied.setdefault(field, size)
    return implied


def _fields(values: Mapping[str, int]) -> str:
    return ", ".join(f"{field}={value}" for field, value in values.items())
