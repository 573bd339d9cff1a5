"""SAELens base classes for mixture-of-experts SAEs: configs, validation, encode/decode, folds and the training pass.

Scale SAE and Switch SAE differ only in how many experts a token uses and in Feature Scaling, so everything that
touches SAELens lives here once; ``scale_sae.py`` and ``switch_sae.py`` only name the architectures.

Conventions (DESIGN.md section 2):
- The parameters stay in SAELens's flat layout so its trainer, evals and weight metrics work unchanged: W_enc
  [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus W_router [d_in, n_experts] and b_router [d_in].
- Feature activations are gated, ``a = p_expert * ReLU(f)``, so decoding stays linear: ``x_hat = a @ W_dec + b_dec``.
- Decoding uses decoder rows at unit norm by reparametrisation (``W_dec / ||W_dec||``, ``normalize_decoder_rows``),
  in training and inference alike; export folds the norms and Feature Scaling away, so the inference classes hold
  plain weights (unit rows) and reproduce the training outputs.
"""

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TypeVar

import sae_lens.saes.sae
import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import SparseHookPoint
from sae_lens.util import str_to_dtype
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_lens_scale.routing import (
    RoutedEncoding,
    auxk_code,
    dense_acts,
    expert_fractions,
    feature_scaled_encoder,
    global_topk,
    load_balance_loss,
    routed_preactivations,
    router_probs,
    row_norms,
    select_experts,
    sparse_acts,
    sparse_decode,
)

FEATURE_SCALING_MODES = ("mean", "none")
UNIT_NORM_TOLERANCE = 1e-4


@dataclass
class RoutedSAEConfig(SAEConfig):
    """Inference config shared by the routed architectures.

    Args:
        n_experts: number of experts; the d_sae latents are split into contiguous blocks of d_sae / n_experts.
        k: number of active latents per token after the global top-k.
        normalize_decoder_rows: decode with ``W_dec / ||W_dec||`` row-wise. Exports have unit rows, so it changes
            nothing for them, but it makes a training checkpoint loaded as an inference SAE decode exactly as it
            trained, and it makes ``fold_W_dec_norm`` exact. False after a whitening fold, whose decoder rows are not
            unit norm by design.
    """

    n_experts: int = 32
    k: int = 32
    normalize_decoder_rows: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_routed_config(self)


@dataclass(kw_only=True)
class RoutedTrainingSAEConfig(TrainingSAEConfig):
    """Training config shared by the routed architectures.

    Args:
        n_experts: number of experts; the d_sae latents are split into contiguous blocks of d_sae / n_experts.
        k: number of active latents per token after the global top-k.
        load_balance_coefficient: weight of the Switch load-balancing loss, per input dimension. The reconstruction
            loss is a per-token sum over d_in, so the balance loss is multiplied by ``load_balance_coefficient * d_in``;
            3.0 is the papers' 3 * d_in. The Switch repo found 1 to 30 equally good and 0 much worse.
        aux_loss_coefficient: weight of the AuxK loss that lets dead latents reconstruct the residual (0 turns it off).
        normalize_decoder_rows: train with decoder rows at unit norm by reparametrisation. Export folds the norms, so
            the saved W_dec has unit rows. SAELens sets it to False when it folds a whitening into the decoder.
        router_collapse_fraction: an expert that gets more than this fraction of a batch's tokens is "collapsed"
            routing (the others starve and their latents die). Only checked when n_active_experts / n_experts is
            below it, since otherwise a balanced router already exceeds it.
        router_collapse_window: consecutive training steps of collapsed routing after which a RuntimeWarning is
            raised (once per SAE); the streak is logged every logging step as ``routing/collapse_streak``.
    """

    n_experts: int = 32
    k: int = 32
    load_balance_coefficient: float = 3.0
    aux_loss_coefficient: float = 1.0
    normalize_decoder_rows: bool = True
    router_collapse_fraction: float = 0.9
    router_collapse_window: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_routed_config(self)
        _require_number(self, "load_balance_coefficient", minimum=0.0)
        _require_number(self, "aux_loss_coefficient", minimum=0.0)
        _require_number(self, "router_collapse_fraction", minimum=0.0)
        if not 0 < self.router_collapse_fraction <= 1:
            _fail(self, "router_collapse_fraction", "must be in (0, 1]: it is a fraction of the batch's tokens")
        _require_int(self, "router_collapse_window", minimum=1)
        if self.feature_scaling not in FEATURE_SCALING_MODES:
            _fail(self, "feature_scaling", f"must be one of {FEATURE_SCALING_MODES}")
        if self.aux_loss_coefficient > 0 and self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            _fail(
                self,
                "normalize_activations",
                "cannot be combined with the AuxK loss, whose residual lives in the unnormalised space; "
                "use 'none' or 'expected_average_only_in', or set aux_loss_coefficient=0",
            )


def validate_routed_config(cfg: RoutedSAEConfig | RoutedTrainingSAEConfig) -> None:
    """Reject every inconsistent shape at construction time, naming the field, the value and the fix."""
    _require_int(cfg, "d_in", minimum=1)
    _require_int(cfg, "d_sae", minimum=1)
    _require_int(cfg, "n_experts", minimum=1)
    _require_int(cfg, "n_active_experts", minimum=1)
    _require_int(cfg, "k", minimum=1)
    if not isinstance(cfg.normalize_decoder_rows, bool):
        _fail(cfg, "normalize_decoder_rows", "must be True or False")
    if cfg.d_sae % cfg.n_experts:
        lower = cfg.d_sae - cfg.d_sae % cfg.n_experts
        _fail(
            cfg,
            "d_sae",
            f"is not divisible by n_experts={cfg.n_experts}; experts are equal blocks of latents, "
            f"so use a multiple of n_experts such as {lower or cfg.n_experts} or {lower + cfg.n_experts}, "
            "or a n_experts that divides d_sae",
        )
    if cfg.n_active_experts > cfg.n_experts:
        _fail(cfg, "n_active_experts", f"exceeds n_experts={cfg.n_experts}; use 1 <= n_active_experts <= n_experts")
    candidates = cfg.n_active_experts * (cfg.d_sae // cfg.n_experts)
    if cfg.k > candidates:
        _fail(
            cfg,
            "k",
            f"exceeds the {candidates} latents a token can reach (n_active_experts={cfg.n_active_experts} experts "
            f"of d_sae / n_experts = {cfg.d_sae // cfg.n_experts} latents); lower k or raise n_active_experts or d_sae",
        )
    try:
        str_to_dtype(cfg.dtype)
    except ValueError:
        _fail(
            cfg, "dtype", "is not a torch dtype name SAELens knows; use 'float32', 'bfloat16', 'float16' or 'float64'"
        )


def _fail(cfg: Any, field: str, problem: str) -> None:
    source = _load_source()
    where = f" (while loading {source.config})" if source is not None else ""
    raise ValueError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r} {problem}{where}.")


def _require_int(cfg: Any, field: str, minimum: int) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(cfg, field, f"must be an int (got {type(value).__name__})")
    if value < minimum:
        _fail(cfg, field, f"must be >= {minimum}")


def _require_number(cfg: Any, field: str, minimum: float) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(cfg, field, "must be a finite number")
    if value < minimum:
        _fail(cfg, field, f"must be >= {minimum}")


class _LoadSource(NamedTuple):
    """What SAELens is loading, in words for an error message."""

    weights: str
    config: str


_SAE_MODULE_FILE = sae_lens.saes.sae.__file__


def _load_source() -> _LoadSource | None:
    """The file SAELens is loading right now, read from its loader's arguments; None outside a load.

    SAELens hands ``process_state_dict_for_loading`` and config classes tensors and dicts, never the path, yet an error
    about a mismatched file is little use without it. Its loaders have the path as an argument, so it is read from
    their frame; if SAELens ever renames those, the messages just lose the path.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_filename == _SAE_MODULE_FILE:
                source = _source_from_loader_frame(frame)
                if source is not None:
                    return source
            frame = frame.f_back
        return None
    finally:
        del frame


def _source_from_loader_frame(frame: FrameType) -> _LoadSource | None:
    arguments, loader = frame.f_locals, frame.f_code.co_name
    if loader == "load_from_disk" and "path" in arguments:
        folder = Path(arguments["path"])
        return _LoadSource(str(folder / SAE_WEIGHTS_FILENAME), str(folder / SAE_CFG_FILENAME))
    if loader == "load_weights_from_checkpoint" and "checkpoint_path" in arguments:
        weights = str(Path(arguments["checkpoint_path"]) / SAE_WEIGHTS_FILENAME)
        return _LoadSource(weights, "the SAE config of the resumed run (LanguageModelSAERunnerConfig.sae)")
    if loader == "from_pretrained_with_cfg_and_sparsity" and "sae_id" in arguments:
        where = f"of release {arguments['release']!r}, sae_id {arguments['sae_id']!r}"
        return _LoadSource(f"{SAE_WEIGHTS_FILENAME} {where}", f"{SAE_CFG_FILENAME} {where}")
    return None


# The config fields that fix each tensor's dimensions, to say which field a mismatched file disagrees with.
_TENSOR_DIMS: dict[str, tuple[str, ...]] = {
    "W_enc": ("d_in", "d_sae"),
    "b_enc": ("d_sae",),
    "W_dec": ("d_sae", "d_in"),
    "b_dec": ("d_in",),
    "W_router": ("d_in", "n_experts"),
    "b_router": ("d_in",),
    "omega": ("n_experts",),
}


def _state_dict_problems(state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]], cfg: Any) -> list[str]:
    """Every missing, unexpected, wrongly shaped or non-finite tensor, one line each; empty when the file fits."""
    problems = [
        f"{name} is missing (needs shape {shape})" for name, shape in expected.items() if name not in state_dict
    ]
    for name, tensor in state_dict.items():
        if name not in expected:
            problems.append(_unexpected_tensor(name, cfg))
        elif tuple(tensor.shape) != expected[name]:
            fields = ", ".join(f"{field}={getattr(cfg, field)}" for field in _TENSOR_DIMS.get(name, ()))
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


def _implied_config(state_dict: dict[str, Tensor]) -> dict[str, int]:
    """The d_in, d_sae and n_experts the file's tensors were saved with, as far as their shapes tell."""
    implied: dict[str, int] = {}
    for name, tensor in state_dict.items():
        for field, size in zip(_TENSOR_DIMS.get(name, ()), tensor.shape, strict=False):
            implied.setdefault(field, size)
    return implied


def _raise_if_state_dict_mismatches(
    state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]], cfg: Any
) -> None:
    """Fail before torch copies anything, naming the file, every bad tensor, the config fields and the fix."""
    problems = _state_dict_problems(state_dict, expected, cfg)
    if not problems:
        return
    source = _load_source() or _LoadSource("the state dict", "the config")
    implied = _implied_config(state_dict)
    disagreeing = {field: size for field, size in implied.items() if getattr(cfg, field) != size}
    listing = "".join(f"\n  - {problem}" for problem in problems)
    hint = (
        f"\nThe tensors were saved with {_fields(disagreeing)}, but {source.config} says "
        f"{_fields({field: getattr(cfg, field) for field in disagreeing})}: the weights and the config come from "
        "different SAEs. Load the weights with the config they were saved with."
        if disagreeing
        else "\nRe-save or re-download the SAE."
    )
    raise ValueError(
        f"Cannot load {source.weights} into a {cfg.architecture()!r} SAE ({type(cfg).__name__}):{listing}{hint}"
    )


def _fields(values: dict[str, int]) -> str:
    return ", ".join(f"{field}={value}" for field, value in values.items())


T_ROUTED_CONFIG = TypeVar("T_ROUTED_CONFIG", bound=RoutedSAEConfig)
T_ROUTED_TRAINING_CONFIG = TypeVar("T_ROUTED_TRAINING_CONFIG", bound=RoutedTrainingSAEConfig)


class _RoutedMixin:
    """What the inference and the training SAE share: parameters, the routed encode and the router-aware folds."""

    cfg: Any
    dtype: torch.dtype
    device: torch.device
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter
    hook_router_probs: HookPoint

    def _init_routed_weights(self) -> None:
        d_in, n_experts = self.cfg.d_in, self.cfg.n_experts
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        bound = 1 / math.sqrt(d_in)
        router = torch.empty(d_in, n_experts, dtype=self.dtype, device=self.device).uniform_(-bound, bound)
        self.W_router = nn.Parameter(router)
        self.b_router = nn.Parameter(torch.zeros(d_in, dtype=self.dtype, device=self.device))

    def _omega(self) -> Tensor | None:
        return None

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the file against the config before torch copies it, so a mismatch names the file, tensor and field.

        (SAE's own hook is a no-op.) torch's load_state_dict would also refuse a wrong shape, but without the file, the
        config field at fault or the fix, and it would load NaN weights silently.
        """
        expected = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        _raise_if_state_dict_mismatches(state_dict, expected, self.cfg)

    def encode_routed(self, x: Tensor) -> RoutedEncoding:
        """The sparse encoding of ``x [..., d_in]`` on a flat batch: routing, candidates and the k active latents.

        This is the fast path: no [batch, d_sae] tensor is built. Hooks see tensors with x's leading dims.
        """
        sae_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype))))
        leading = sae_in.shape[:-1]
        sae_in = sae_in.reshape(-1, self.cfg.d_in)
        centered = sae_in - self.b_dec * self.cfg.apply_b_dec_to_input
        probs = router_probs(sae_in, self.W_router, self.b_router)
        routing = select_experts(_hooked(self.hook_router_probs, probs, leading), self.cfg.n_active_experts)
        candidates = routed_preactivations(
            centered, self.W_enc, self.b_enc, routing.experts, self.cfg.n_experts, self._omega()
        )
        candidates = _hooked(self.hook_sae_acts_pre, candidates, leading)
        return RoutedEncoding(routing, candidates, global_topk(candidates, routing, self.cfg.k))

    def _encode_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """SAELens's encode contract: ``[..., d_sae]`` activations (and ``[..., n_active * m]`` candidates)."""
        encoding = self.encode_routed(x)
        leading = x.shape[:-2] if self.hook_z_reshaping_mode else x.shape[:-1]
        acts = dense_acts(encoding.code, self.cfg.d_sae).view(*leading, self.cfg.d_sae)
        return self.hook_sae_acts_post(acts), encoding.candidates.view(*leading, -1)

    def decoder_row_norms(self) -> Tensor | None:
        """Row norms the decode divides by, or None when the decoder is used as stored."""
        return row_norms(self.W_dec) if self.cfg.normalize_decoder_rows else None

    def effective_W_dec(self) -> Tensor:
        norms = self.decoder_row_norms()
        return self.W_dec if norms is None else self.W_dec / norms.unsqueeze(-1)

    def decode(self, feature_acts: Tensor) -> Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.effective_W_dec() + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold SAELens's input scaling ``x * s`` so the SAE takes raw x and returns raw reconstructions.

        Every pre-activation is linear in the centred input, so dividing the biases by s divides the
        pre-activations, the activations and the reconstruction by s: the top-k and the routing are unchanged, and
        the decoder keeps its unit-norm rows. The router sees ``(x * s - b_router) @ W = (x - b_router / s) @ (s W)``.
        """
        self.b_enc.data /= scaling_factor
        self.b_dec.data /= scaling_factor
        self.b_router.data /= scaling_factor
        self.W_router.data *= scaling_factor
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor) -> None:
        """Fold a whitening exactly: decoder norms first, then the router and SAELens's affine maps.

        Unwhitening gives the decoder rows non-unit norms that must be kept, so the decode stops normalising them
        (``normalize_decoder_rows=False``), as SAELens's TopK does with ``rescale_acts_by_decoder_norm``. The router
        sees ``(x - mean) @ M - b_router``, which is ``x - (mean + b_router @ M^-1)`` times M.
        """
        self.fold_W_dec_norm()
        self.cfg.normalize_decoder_rows = False
        dtype = torch.promote_types(self.W_router.dtype, whitening_matrix.dtype)
        self.W_router.data.copy_(whitening_matrix.to(self.device, dtype) @ self.W_router.data.to(dtype))
        shift = self.b_router.data.to(dtype) @ unwhitening_matrix.to(self.device, dtype) + mean.to(self.device, dtype)
        self.b_router.data.copy_(shift)
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Exact: with normalised decoding the stored row norms do not affect outputs, so they are set to 1.

        Without it (after a whitening fold), rescaling latents would change which k win the top-k, so only a
        decoder that already has unit rows is accepted.
        """
        if self.cfg.normalize_decoder_rows:
            self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True)
            return
        worst = (self.W_dec.norm(dim=-1) - 1).abs().max().item()
        if worst > UNIT_NORM_TOLERANCE:
            raise NotImplementedError(
                f"fold_W_dec_norm on a {self.cfg.architecture()!r} SAE with normalize_decoder_rows=False needs "
                f"unit-norm W_dec rows (max |norm - 1| is {worst:.3g}): rescaling latents would change which k win "
                "the top-k, so the fold could not be exact."
            )


def _hooked(hook: HookPoint, flat: Tensor, leading: torch.Size) -> Tensor:
    """Run a hook on the tensor with the caller's leading dims, then flatten back."""
    return hook(flat.view(*leading, flat.shape[-1])).reshape(flat.shape)


class RoutedSAE(_RoutedMixin, SAE[T_ROUTED_CONFIG]):
    """Inference SAE of a routed architecture: plain weights, only routed experts computed, linear decode."""

    def __init__(self, cfg: T_ROUTED_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.hook_router_probs = HookPoint()
        self.setup()

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_routed_weights()

    @override
    def encode(self, x: Tensor) -> Tensor:
        return self._encode_dense(x)[0]


class RoutedTrainingSAE(_RoutedMixin, TrainingSAE[T_ROUTED_TRAINING_CONFIG]):
    """Training SAE of a routed architecture.

    ``training_forward_pass`` is the fast path: only routed experts are multiplied, the decode gathers k decoder rows
    per token, and the trainer gets its feature activations as a detached sparse COO tensor for its firing
    statistics. ``encode``/``decode``/``forward`` keep SAELens's dense contract for evals and hooks.
    """

    def __init__(self, cfg: T_ROUTED_TRAINING_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.hook_router_probs = HookPoint()
        self.hook_sae_acts_post = SparseHookPoint(self.cfg.d_sae)
        self.setup()
        # Router-collapse monitor: plain attributes, not state, so checkpoints and exports are unchanged; a resumed
        # run starts a new streak.
        self.collapse_streak = 0
        self._warned_collapse = False

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_routed_weights()
        if self.cfg.feature_scaling == "mean":
            self.omega = nn.Parameter(torch.zeros(self.cfg.n_experts, dtype=self.dtype, device=self.device))

    @override
    def _omega(self) -> Tensor | None:
        return self.omega if self.cfg.feature_scaling == "mean" else None

    def effective_W_enc(self) -> Tensor:
        omega = self._omega()
        return self.W_enc if omega is None else feature_scaled_encoder(self.W_enc, omega)

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dense activations and the routed candidates' pre-activations (not a full [..., d_sae] hidden_pre)."""
        return self._encode_dense(x)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """SAELens's hook for a dense pass; the routed losses need the routing and live in ``routed_losses``."""
        return {}

    def routed_losses(
        self, step_input: TrainStepInput, encoding: RoutedEncoding, sae_out: Tensor, decoder_row_norms: Tensor | None
    ) -> dict[str, Tensor]:
        """Load balancing (times d_in, to match the per-token-sum MSE) and AuxK over the computed candidates.

        ``decoder_row_norms`` are the main decode's, so the step computes (and backpropagates) them once.
        """
        losses = {
            "load_balance_loss": self.cfg.load_balance_coefficient * self.cfg.d_in * load_balance_loss(encoding.routing)
        }
        dead = step_input.dead_neuron_mask
        num_dead = 0 if dead is None or self.cfg.aux_loss_coefficient == 0 else int(dead.sum())
        if num_dead == 0:
            losses["auxiliary_reconstruction_loss"] = sae_out.new_zeros(())
            return losses
        k_aux = self.cfg.d_in // 2
        residual = (step_input.sae_in - sae_out).detach()
        aux_recons = sparse_decode(auxk_code(encoding, dead, min(k_aux, num_dead)), self.W_dec, decoder_row_norms)
        scale = min(num_dead / k_aux, 1.0)
        aux_loss = (aux_recons - residual).pow(2).sum(dim=-1).mean()
        losses["auxiliary_reconstruction_loss"] = self.cfg.aux_loss_coefficient * scale * aux_loss
        return losses

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One routed training step; raises FloatingPointError instead of returning a loss that is not finite.

        A NaN or inf loss would reach every weight through backward, gradient clipping and Adam, silently. Skipping
        the step instead is not possible from here: the trainer calls Adam after this returns, and Adam moves the
        weights by its momentum even with zero gradients. So the step fails before backward, with the weights and
        optimizer state untouched, and the error says where the bad values are.
        """
        encoding = self.encode_routed(step_input.sae_in)
        feature_acts = self.hook_sae_acts_post(sparse_acts(encoding.code, self.cfg.d_sae))
        norms = self.decoder_row_norms()
        decoded = sparse_decode(encoding.code, self.W_dec, norms) + self.b_dec
        sae_out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(decoded))
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss, **self.routed_losses(step_input, encoding, sae_out, norms)}
        loss = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(loss):
            raise self._non_finite_loss_error(step_input, losses)
        self._track_router_collapse(encoding)
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=encoding.candidates,
            loss=loss,
            losses=losses,
            metrics=self._routing_metrics(encoding) if step_input.is_logging_step else {},
        )

    @torch.no_grad()
    def _non_finite_loss_error(self, step_input: TrainStepInput, losses: dict[str, Tensor]) -> FloatingPointError:
        """Name the step and the culprit: bad input activations (the usual case) or an overflow inside the SAE."""
        sae_in = step_input.sae_in
        step = f"Training step {step_input.n_training_steps} (0-based trainer.n_training_steps)"
        untouched = "The step was not applied: weights and optimizer state are as before it."
        n_nan, n_inf = int(sae_in.isnan().sum()), int(sae_in.isinf().sum())
        if n_nan or n_inf:
            bad_rows = int((~torch.isfinite(sae_in)).flatten(1).any(dim=1).sum())
            return FloatingPointError(
                f"{step}: the input activations contain {n_nan} NaN and {n_inf} inf values, in {bad_rows} of the "
                f"batch's {sae_in.shape[0]} rows. {untouched} They come from the model or the activation cache, not "
                "the SAE: check the hooked model's dtype (float16 overflows; try a float32 model or autocast_lm=False) "
                "and the cached activations. Resuming from a checkpoint replays the same batch."
            )
        values = ", ".join(f"{name}={float(value):.4g}" for name, value in losses.items())
        bad_weights = [name for name, param in self.named_parameters() if not torch.isfinite(param).all()]
        weights = f"non-finite parameters: {bad_weights}" if bad_weights else "all parameters are finite"
        return FloatingPointError(
            f"{step}: the loss is not finite ({values}) although the input activations are finite (largest |x| = "
            f"{float(sae_in.abs().max()):.4g}; {weights}). {untouched} If |x| is that large, its squared error "
            f"overflows {sae_in.dtype}: set normalize_activations='expected_average_only_in'. If parameters are "
            "non-finite, resume from an earlier checkpoint with a lower lr."
        )

    def _track_router_collapse(self, encoding: RoutedEncoding) -> None:
        """Count consecutive steps where one expert takes more than router_collapse_fraction of the tokens.

        One batch can be lopsided by chance; a streak of router_collapse_window steps means the load balancing lost,
        so it warns (once per SAE). The streak counts steps, not logging steps, so it runs every step.
        """
        cfg = self.cfg
        if cfg.n_active_experts / cfg.n_experts >= cfg.router_collapse_fraction:
            return
        share = self._max_expert_token_share(encoding)
        self.collapse_streak = self.collapse_streak + 1 if share > cfg.router_collapse_fraction else 0
        if self.collapse_streak >= cfg.router_collapse_window and not self._warned_collapse:
            self._warned_collapse = True
            warnings.warn(
                f"Router collapse: for {self.collapse_streak} consecutive training steps one expert took more than "
                f"router_collapse_fraction={cfg.router_collapse_fraction} of the tokens (last step: {share:.1%}; "
                f"balanced is {cfg.n_active_experts / cfg.n_experts:.1%}). The other experts' latents are starving. "
                f"Raise load_balance_coefficient (now {cfg.load_balance_coefficient}) or lower the learning rate; "
                "watch metrics/routing/max_expert_token_share.",
                RuntimeWarning,
                stacklevel=3,  # the trainer's call of training_forward_pass
            )

    def _max_expert_token_share(self, encoding: RoutedEncoding) -> float:
        """Largest fraction of the batch's tokens routed to one expert (each token counts once per expert)."""
        return expert_fractions(encoding.routing, self.cfg.n_experts).max().item() * self.cfg.n_active_experts

    @torch.no_grad()
    def _routing_metrics(self, encoding: RoutedEncoding) -> dict[str, Tensor | float]:
        fractions = expert_fractions(encoding.routing, self.cfg.n_experts)
        entropy = -(fractions * fractions.clamp_min(1e-12).log()).sum()
        metrics: dict[str, Tensor | float] = {
            "routing/expert_usage_entropy": entropy / math.log(self.cfg.n_experts) if self.cfg.n_experts > 1 else 1.0,
            "routing/max_expert_fraction": fractions.max(),
            "routing/max_expert_token_share": fractions.max() * self.cfg.n_active_experts,
            "routing/load_balance": load_balance_loss(encoding.routing),
            "routing/collapse_streak": float(self.collapse_streak),
            "routing/collapse_warning": float(self.collapse_streak >= self.cfg.router_collapse_window),
        }
        omega = self._omega()
        if omega is not None:
            metrics["routing/omega_mean"] = omega.mean()
        return metrics

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold Feature Scaling into W_enc and the decoder norms into W_dec; drop training-only tensors."""
        super().process_state_dict_for_saving_inference(state_dict)
        omega = state_dict.pop("omega", None)
        if omega is not None:
            state_dict["W_enc"] = feature_scaled_encoder(state_dict["W_enc"], omega).contiguous()
        if self.cfg.normalize_decoder_rows:
            W_dec = state_dict["W_dec"]
            state_dict["W_dec"] = (W_dec / W_dec.norm(dim=-1, keepdim=True)).contiguous()

    @torch.no_grad()
    def fold_feature_scaling(self) -> None:
        """Write Feature Scaling into W_enc and reset omega to 0: same outputs, plain encoder."""
        omega = self._omega()
        if omega is not None:
            self.W_enc.data.copy_(feature_scaled_encoder(self.W_enc.data, omega.data))
            omega.data.zero_()

    @override
    @torch.no_grad()
    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor) -> None:
        """Feature Scaling is folded first: SAELens's b_enc shift reads the plain W_enc."""
        self.fold_feature_scaling()
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        histograms = super().log_histograms()
        omega = self._omega()
        if omega is not None:
            histograms["weights/omega"] = omega.detach().float().cpu().numpy()
        return histograms
