"""SAELens base classes for mixture-of-experts SAEs: inference config, inference SAE, training config, training SAE.

Scale SAE and Switch SAE differ only in how many experts a token uses and in Feature Scaling, so everything that
touches SAELens lives here once; ``scale_sae.py`` and ``switch_sae.py`` name the architectures and add what is theirs.
The training classes extend the inference classes (as SAELens's ``TrainingSAE`` extends ``SAE``), so routing, the
folds and the weight-file checks are written once and a training SAE encodes exactly like its export.

Conventions (docs/architecture.md):
- The parameters stay in SAELens's flat layout so its trainer, evals and weight metrics work unchanged: W_enc
  [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus W_router [d_in, n_experts] and b_router [d_in].
- Feature activations are gated, ``a = p_expert * ReLU(f)``, so decoding stays linear: ``x_hat = a @ W_dec + b_dec``.
- Decoding uses decoder rows at unit norm by reparametrisation (``W_dec / ||W_dec||``, ``normalize_decoder_rows``),
  in training and inference alike; export folds the norms and Feature Scaling away, so the inference classes hold
  plain weights (unit rows) and reproduce the training outputs.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, get_args

import torch
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import SparseHookPoint, TopK
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_lens_scale.routing import (
    ExpertRoute,
    Experts,
    LocalExperts,
    RoutedEncoding,
    Routing,
    SparseCode,
    auxk_selection,
    dense_acts,
    expert_counts,
    feature_scaled_encoder,
    gated_code,
    global_topk,
    load_balance_loss,
    normalized_entropy,
    router_probs,
    row_norms,
    select_experts,
    selected_latents,
    selected_preactivations,
    sparse_acts,
    sparse_decode,
    unit_rows,
)
from sae_lens_scale.row_sparse_adam import RowGradients, gather_rows
from sae_lens_scale.training_guards import (
    BatchParts,
    BiasInit,
    CollapseMonitor,
    WholeBatch,
    batch_centre,
    non_finite_step_error,
)
from sae_lens_scale.validation import (
    WeightsMismatchError,
    check_state_dict,
    fail,
    require_choice,
    require_int,
    require_number,
    validate_routed_shape,
)

UNIT_NORM_TOLERANCE = 1e-4


class BatchStatistics(NamedTuple):
    """What a training step's losses need from the whole batch, every part of it (``BatchParts``)."""

    expert_fractions: Tensor  # [n_experts] share of the batch's (token, slot) assignments per expert
    dead: Tensor | None  # [d_sae] dead by the trainer's count on every part of the batch; None without its mask
    # read on the host, in one copy:
    loss_is_finite: bool
    n_dead: int
    max_expert_token_share: float  # largest fraction of the batch's tokens routed to one expert


class TrainingEncoding(NamedTuple):
    """A training batch's routing and candidates, what a step decodes its selections (main code, AuxK) from."""

    routing: Routing
    candidates: Tensor  # [batch, n_active_experts * m], slot-major
    route: ExpertRoute
    centered: Tensor  # [batch, d_in] the input the candidates were computed from
    decoder_row_norms: Tensor | None  # the decode's row norms over the whole decoder; None with row gradients


@dataclass
class RoutedSAEConfig(SAEConfig):
    """Inference config shared by the routed architectures.

    Args:
        n_experts: number of experts; the d_sae latents are split into contiguous blocks of d_sae / n_experts.
        n_active_experts: experts each token is routed to; the global top-k runs over their latents.
        k: number of active latents per token after the global top-k.
        normalize_decoder_rows: decode with ``W_dec / ||W_dec||`` row-wise. Exports have unit rows, so it changes
            nothing for them, but it makes a training checkpoint loaded as an inference SAE decode exactly as it
            trained, and it makes ``fold_W_dec_norm`` exact. False after a whitening fold, whose decoder rows are not
            unit norm by design.
    """

    n_experts: int = 32
    n_active_experts: int = 1
    k: int = 32
    normalize_decoder_rows: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_routed_shape(self)


T_ROUTED_CONFIG = TypeVar("T_ROUTED_CONFIG", bound=RoutedSAEConfig)


class RoutedSAE(SAE[T_ROUTED_CONFIG]):
    """Inference SAE of a routed architecture: only routed experts computed, linear decode.

    ``encode_routed`` is the sparse fast path; ``encode`` and ``decode`` keep SAELens's dense ``[..., d_sae]``
    contract for evals and hooks. ``experts`` says where the experts are computed: all on this device unless
    whoever built the SAE chose otherwise.
    """

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter

    def __init__(self, cfg: T_ROUTED_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.experts: Experts = LocalExperts(cfg.n_experts)
        self.hook_router_probs = HookPoint()
        self.setup()

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        self.W_router = nn.Parameter(init_router(self.cfg.d_in, self.cfg.n_experts, self.dtype, self.device))
        self.b_router = nn.Parameter(torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device))

    def feature_scaling_omega(self) -> Tensor | None:
        """Feature Scaling's per-expert factor, or None when the encoder is used as stored (every export)."""
        return None

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the file against the config before torch copies it, so a mismatch names the tensor and field.

        A training checkpoint's ``bias_init_done`` flag changes no output, so an inference SAE drops it."""
        expected = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        if "bias_init_done" not in expected:
            state_dict.pop("bias_init_done", None)
        check_state_dict(state_dict, expected, self.cfg)

    def encode_routed(self, x: Tensor) -> RoutedEncoding:
        """The sparse encoding of ``x [..., d_in]`` on a flat batch: routing, candidates and the k active latents.

        This is the fast path: no [batch, d_sae] tensor is built. Hooks see tensors with x's leading dims.
        """
        routing, candidates, route, _ = self.routed_candidates(x, self.b_enc)
        return RoutedEncoding(routing, candidates, global_topk(candidates, routing, self.cfg.k), route)

    def routed_candidates(
        self, x: Tensor, b_enc: Tensor, encoder_grad: bool = True
    ) -> tuple[Routing, Tensor, ExpertRoute, Tensor]:
        """The routing, the routed experts' candidates with bias ``b_enc``, their route, and the flat centred input
        they were computed from. ``encoder_grad=False`` computes the candidates without a gradient (the router's
        probabilities keep theirs)."""
        sae_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype))))
        leading = sae_in.shape[:-1]
        sae_in = sae_in.reshape(-1, self.cfg.d_in)
        centered = sae_in - self.b_dec * self.cfg.apply_b_dec_to_input
        probs = router_probs(sae_in, self.W_router, self.b_router)
        routing = select_experts(_hooked(self.hook_router_probs, probs, leading), self.cfg.n_active_experts)
        omega = self.feature_scaling_omega()
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            candidates, route = self.experts.candidates(centered, routing, self.W_enc, b_enc, omega)
        return routing, _hooked(self.hook_sae_acts_pre, candidates, leading), route, centered

    def require_every_expert(self, action: str) -> None:
        """Refuse ``action`` on an SAE that holds only some of its experts' weights."""
        held = self.experts.n_local_experts
        if held != self.cfg.n_experts:
            raise RuntimeError(
                f"This SAE holds the weights of {held} of its {self.cfg.n_experts} experts, and {action} needs all "
                "of them: save the SAE with the runner that split its experts, which gathers them into one folder "
                "that SAE.load_from_disk opens."
            )

    def encode_with_candidates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """SAELens's encode contract: ``[..., d_sae]`` activations, and the ``[..., n_active_experts * m]`` candidates
        (the only pre-activations that exist)."""
        encoding = self.encode_routed(x)
        leading = x.shape[:-2] if self.hook_z_reshaping_mode else x.shape[:-1]
        acts = dense_acts(encoding.code, self.cfg.d_sae).view(*leading, self.cfg.d_sae)
        return self.hook_sae_acts_post(acts), encoding.candidates.view(*leading, -1)

    @override
    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_candidates(x)[0]

    @override
    def get_activation_fn(self) -> TopK:
        """The non-linearity over a token's routed candidates: SAELens's top-k, then ReLU (before the gate).

        ``global_topk`` computes the same selection and keeps the winners' indices; holding it as ``activation_fn``
        tells tools that dispatch on it (sae-dashboard) that the latents compete, so they must encode every latent
        and slice, never mask the encoder to the few they show.
        """
        return TopK(self.cfg.k)

    def effective_W_enc(self) -> Tensor:
        """The encoder as it acts, Feature Scaling applied: what export writes."""
        omega = self.feature_scaling_omega()
        return self.W_enc if omega is None else feature_scaled_encoder(self.W_enc, omega)

    def decoder_row_norms(self) -> Tensor | None:
        """Row norms the decode divides by, or None when the decoder is used as stored."""
        return row_norms(self.W_dec) if self.cfg.normalize_decoder_rows else None

    def effective_W_dec(self) -> Tensor:
        norms = self.decoder_row_norms()
        return self.W_dec if norms is None else self.W_dec / norms.unsqueeze(-1)

    @override
    def decode(self, feature_acts: Tensor) -> Tensor:
        self.require_every_expert("a dense decode")
        sae_out = self.hook_sae_recons(feature_acts @ self.effective_W_dec() + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
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

    @override
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
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Exact: with normalised decoding the stored row norms do not affect outputs, so they are set to 1.

        Rows already at unit norm are left as stored, so folding an exported SAE (tools such as sae-dashboard and
        SAEBench fold every SAE they are given) changes none of its tensors. Without normalised decoding (after a
        whitening fold), rescaling latents would change which k win the top-k, so only a decoder whose rows are
        already unit norm (or zero: a latent that never decodes) is accepted.
        """
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        off_unit = (norms - 1).abs() > UNIT_NORM_TOLERANCE
        if self.cfg.normalize_decoder_rows:
            self.W_dec.data.copy_(torch.where(off_unit, unit_rows(self.W_dec.data), self.W_dec.data))
            return
        worst = ((norms - 1).abs() * (norms > 0)).max().item()
        if worst > UNIT_NORM_TOLERANCE:
            raise NotImplementedError(
                f"fold_W_dec_norm on a {self.cfg.architecture()!r} SAE with normalize_decoder_rows=False needs "
                f"unit-norm W_dec rows (max |norm - 1| is {worst:.3g}): rescaling latents would change which k win "
                "the top-k, so the fold could not be exact."
            )


@dataclass(kw_only=True)
class RoutedTrainingSAEConfig(RoutedSAEConfig, TrainingSAEConfig):
    """Training config shared by the routed architectures: the inference fields plus the training losses.

    Args:
        load_balance_coefficient: weight of the Switch load-balancing loss, per input dimension. The reconstruction
            loss is a per-token sum over d_in, so the balance loss is multiplied by ``load_balance_coefficient * d_in``;
            3.0 is the papers' 3 * d_in. The Switch repo found 1 to 30 equally good and 0 much worse.
        aux_loss_coefficient: weight of the AuxK loss that lets dead latents reconstruct the residual (0 turns it off).
        router_collapse_fraction: an expert that gets more than this fraction of a batch's tokens is "collapsed"
            routing (the others starve and their latents die). Only checked when n_active_experts / n_experts is
            below it, since otherwise a balanced router already exceeds it.
        router_collapse_window: consecutive training steps of collapsed routing after which a RuntimeWarning is
            raised (once per SAE); the streak is logged every logging step as ``routing/collapse_streak``.
        bias_init: how ``b_dec`` and ``b_router`` are set from data, once in the SAE's life, from the first batch the
            trainer hands over: "geometric_median" (as both papers' trainers), "mean", or "none" to keep them at zero.
            Both biases centre the input; at zero, the router and the encoder see the activations' large mean
            direction. The first training step settles the biases, whatever the choice, and sets the saved
            ``bias_init_done`` flag: a trained, loaded or resumed SAE keeps its biases.
        decoder_init_norm: SAELens's initial decoder row norm; the encoder starts as the decoder's transpose, so
            this is the initial norm of every encoder column (None: Kaiming's, about 1.4). The decode normalises the
            rows, so here it only sets the encoder's scale: 1 gives unit-scale pre-activations for inputs of norm
            sqrt(d_in) (``normalize_activations="expected_average_only_in"``). SAELens's 0.1 leaves most latents
            dead in a routed SAE (docs/dead-latents.md).
    """

    load_balance_coefficient: float = 3.0
    aux_loss_coefficient: float = 1.0
    router_collapse_fraction: float = 0.9
    router_collapse_window: int = 100
    bias_init: BiasInit = "geometric_median"
    decoder_init_norm: float | None = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "load_balance_coefficient", minimum=0.0)
        require_number(self, "aux_loss_coefficient", minimum=0.0)
        require_number(self, "router_collapse_fraction", minimum=0.0)
        if not 0 < self.router_collapse_fraction <= 1:
            fail(self, "router_collapse_fraction", "must be in (0, 1]: it is a fraction of the batch's tokens")
        require_int(self, "router_collapse_window", minimum=1)
        require_choice(self, "bias_init", get_args(BiasInit))
        if self.decoder_init_norm is not None:
            require_number(self, "decoder_init_norm", minimum=0.0)
            if self.decoder_init_norm == 0:
                fail(self, "decoder_init_norm", "must be > 0, or None for Kaiming's initialisation")
        if self.aux_loss_coefficient > 0 and self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            fail(
                self,
                "normalize_activations",
                "cannot be combined with the AuxK loss, whose residual lives in the unnormalised space; "
                "use 'none' or 'expected_average_only_in', or set aux_loss_coefficient=0",
            )
        if self.bias_init != "none" and self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            fail(
                self,
                "normalize_activations",
                "normalises inside the SAE, so biases estimated from the raw batch would not centre what it encodes; "
                "use 'none' or 'expected_average_only_in', or set bias_init='none'",
            )


T_ROUTED_TRAINING_CONFIG = TypeVar("T_ROUTED_TRAINING_CONFIG", bound=RoutedTrainingSAEConfig)


class RoutedTrainingSAE(RoutedSAE[T_ROUTED_TRAINING_CONFIG], TrainingSAE[T_ROUTED_TRAINING_CONFIG]):
    """Training SAE of a routed architecture.

    ``training_forward_pass`` is the fast path: only routed experts are multiplied, the decode gathers k decoder rows
    per token, and the trainer gets its feature activations as a detached sparse COO tensor for its firing
    statistics. ``batch_parts`` says what the step's batch statistics span: this batch unless whoever built the SAE
    chose otherwise. ``row_gradients``, set by whoever steps the SAE with ``RowSparseAdam``, is where the backward
    leaves the gradients of the selected latents' rows instead of dictionary-sized ones.
    """

    bias_init_done: Tensor

    def __init__(self, cfg: T_ROUTED_TRAINING_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.hook_sae_acts_post = SparseHookPoint(self.cfg.d_sae)
        self.setup()
        self.batch_parts: BatchParts = WholeBatch()
        self.row_gradients: RowGradients | None = None
        self.collapse_monitor = CollapseMonitor(
            cfg.n_experts,
            cfg.n_active_experts,
            cfg.router_collapse_fraction,
            cfg.router_collapse_window,
            cfg.load_balance_coefficient,
        )

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        # 1 once the first training step settled b_dec and b_router: saved, so a loaded or resumed SAE keeps them.
        self.register_buffer("bias_init_done", torch.zeros((), dtype=self.dtype, device=self.device))

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Weights saved without the flag (an inference folder, or an older checkpoint) are trained: keep their
        biases."""
        state_dict.setdefault("bias_init_done", torch.ones((), dtype=self.dtype))
        super().process_state_dict_for_loading(state_dict)

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_with_candidates(x)

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
        """SAELens's hook for a dense pass; the routed losses need the routing and live in the training pass."""
        return {}

    def row_sparse_dims(self) -> dict[str, int]:
        """The parameters a step gives a gradient only in the rows of the latents it selected, each with the
        dimension its rows run along. ``W_enc``'s columns only without Feature Scaling, whose expert mean couples
        every column of a routed expert."""
        dims = {"W_dec": 0, "b_enc": 0}
        if self.feature_scaling_omega() is None:
            dims["W_enc"] = 1
        return dims

    def training_encoding(self, sae_in: Tensor) -> TrainingEncoding:
        """What a training step decodes its selections from. With ``row_gradients`` the encoder and ``b_enc``
        reach a selection's pre-activations through its rows only (``decode_selection``)."""
        row_sparse = self.row_gradients is not None
        b_enc = self.b_enc.detach() if row_sparse else self.b_enc
        encoder_grad = not row_sparse or "W_enc" not in self.row_sparse_dims()
        routing, candidates, route, centered = self.routed_candidates(sae_in, b_enc, encoder_grad)
        norms = None if row_sparse else self.decoder_row_norms()
        return TrainingEncoding(routing, candidates, route, centered, norms)

    def decode_selection(self, values: Tensor, index: Tensor, encoding: TrainingEncoding) -> tuple[SparseCode, Tensor]:
        """The code of the candidates at ``index`` with pre-activations ``values``, and its decode (no bias).

        With ``row_gradients`` set, the selected latents' rows of ``W_dec``, ``b_enc`` and (``row_sparse_dims``)
        ``W_enc`` are gathered once and only they are differentiated: their gradients go to ``row_gradients`` as
        row lists, and no gradient the size of the dictionary exists.
        """
        expert_width = self.cfg.d_sae // self.cfg.n_experts
        gradients = self.row_gradients
        if gradients is None:
            code = gated_code(values, index, encoding.routing, expert_width)
            return code, encoding.route.decode(code, self.W_dec, encoding.decoder_row_norms)
        latents = selected_latents(index, encoding.routing, expert_width)
        rows, inverse = torch.unique(latents, return_inverse=True)
        # Without Feature Scaling the candidates carry no encoder gradient: the encoder's rows give it here.
        encoder_rows = gather_rows(self.W_enc, rows, 1, gradients) if "W_enc" in self.row_sparse_dims() else None
        bias_rows = gather_rows(self.b_enc, rows, 0, gradients)
        values = selected_preactivations(values, encoding.centered, encoder_rows, bias_rows, inverse)
        code = gated_code(values, index, encoding.routing, expert_width)
        decoder_rows = gather_rows(self.W_dec, rows, 0, gradients)
        norms = row_norms(decoder_rows) if self.cfg.normalize_decoder_rows else None
        return code, sparse_decode(SparseCode(inverse, code.acts), decoder_rows, norms)

    def auxk_loss(self, sae_in: Tensor, encoding: TrainingEncoding, sae_out: Tensor, stats: BatchStatistics) -> Tensor:
        """AuxK (Gao et al. 2024) over the computed candidates: dead latents reconstruct the main residual.

        The dead latents come from the step's batch statistics; with none dead the loss is zero and nothing is
        computed.
        """
        if stats.dead is None or stats.n_dead == 0 or self.cfg.aux_loss_coefficient == 0:
            return sae_out.new_zeros(())
        k_aux = self.cfg.d_in // 2
        residual = (sae_in - sae_out).detach()
        values, index = auxk_selection(encoding.candidates, encoding.routing, stats.dead, min(k_aux, stats.n_dead))
        _, aux_recons = self.decode_selection(values, index, encoding)
        scale = min(stats.n_dead / k_aux, 1.0)
        return self.cfg.aux_loss_coefficient * scale * (aux_recons - residual).pow(2).sum(dim=-1).mean()

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One routed training step: encode, decode, losses. It raises FloatingPointError instead of returning a loss
        that is not finite: the trainer would pass it through backward, clipping and Adam, and Adam moves the weights
        by its momentum even with zero gradients, so the step fails before backward with everything untouched.

        The step reads the device once (``_batch_statistics``). SAELens's trainer has no hook that sees data before
        training, so its first step (``n_training_steps == 0``) settles the biases (``bias_init``) unless an earlier
        step of this SAE's life did.
        """
        if step_input.n_training_steps == 0 and not self.bias_init_done:
            self.initialize_biases_from_data(step_input.sae_in)
        encoding = self.training_encoding(step_input.sae_in)
        values, index = encoding.candidates.topk(self.cfg.k, dim=-1, sorted=False)
        code, decoded = self.decode_selection(values, index, encoding)
        feature_acts = self.hook_sae_acts_post(sparse_acts(code, self.cfg.d_sae))
        sae_out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(decoded + self.b_dec))
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        stats = self._batch_statistics(encoding.routing, mse_loss, step_input.dead_neuron_mask)
        balance = load_balance_loss(encoding.routing.probs, stats.expert_fractions)
        losses = {
            "mse_loss": mse_loss,
            "load_balance_loss": self.cfg.load_balance_coefficient * self.cfg.d_in * balance,  # d_in: MSE is a sum
        }
        if not stats.loss_is_finite:
            parameters = self.named_parameters()
            raise non_finite_step_error(
                step_input.n_training_steps, step_input.sae_in, losses, parameters, self.batch_parts
            )
        self.collapse_monitor.update(stats.max_expert_token_share)
        losses["auxiliary_reconstruction_loss"] = self.auxk_loss(step_input.sae_in, encoding, sae_out, stats)
        loss = torch.stack(list(losses.values())).sum()
        metrics = self._routing_metrics(encoding.routing, stats) if step_input.is_logging_step else {}
        # hidden_pre: the routed candidates, the only pre-activations that exist
        return TrainStepOutput(step_input.sae_in, sae_out, feature_acts, encoding.candidates, loss, losses, metrics)

    def _batch_statistics(self, routing: Routing, mse_loss: Tensor, dead: Tensor | None) -> BatchStatistics:
        """The expert fractions, the dead latents and the loss guard over every part of the batch, and the step's
        one read of the device.

        The parts add up their expert counts, their trainers' alive latents and their non-finite flags in one sum,
        so every part makes the decisions one process with the whole batch makes: a latent is dead when no part saw
        it fire within the trainer's window. The guard, the dead count and the router share then reach the host in
        one copy (on a GPU every separate read would stall the step again).
        """
        n_experts = self.cfg.n_experts
        counts = expert_counts(routing.experts, n_experts)
        alive = (~dead).long() if dead is not None else counts.new_zeros(0)
        not_finite = ~torch.isfinite(mse_loss) | ~torch.isfinite(routing.probs).all()
        packed = self.batch_parts.sum(torch.cat([counts, alive, not_finite.long().view(1)]))
        counts, alive, not_finite = packed.split([n_experts, alive.numel(), 1])
        fractions = counts.double() / counts.sum()
        dead = alive == 0 if dead is not None else None
        n_dead = dead.sum() if dead is not None else counts.new_zeros(())
        share = fractions.max() * self.cfg.n_active_experts
        flag, dead_count, max_share = torch.stack([t.double() for t in (not_finite[0], n_dead, share)]).tolist()
        return BatchStatistics(fractions, dead, flag == 0, int(dead_count), max_share)

    @torch.no_grad()
    def initialize_biases_from_data(self, sae_in: Tensor) -> None:
        """Set ``b_dec`` and ``b_router`` to the ``bias_init`` centre of a batch ``[..., d_in]`` (every part of it; a
        collective), and mark the biases settled; ``bias_init="none"`` keeps them and only marks them. A batch that
        is not finite changes nothing: the step's guard then names it."""
        if self.cfg.bias_init == "none":
            self.bias_init_done.fill_(1)
            return
        whole = self.batch_parts.concat(sae_in.reshape(-1, self.cfg.d_in).contiguous())
        centre = batch_centre(whole, self.cfg.bias_init)
        finite = torch.isfinite(centre).all()
        for bias in (self.b_dec, self.b_router):
            bias.copy_(torch.where(finite, centre, bias))
        self.bias_init_done.copy_(finite)

    @torch.no_grad()
    def _routing_metrics(self, routing: Routing, stats: BatchStatistics) -> dict[str, Any]:
        """The router's balance over every part of the batch, for SAELens's logger."""
        fractions = stats.expert_fractions
        metrics: dict[str, Any] = {
            "routing/expert_usage_entropy": normalized_entropy(fractions),
            "routing/max_expert_fraction": fractions.max(),
            "routing/max_expert_token_share": stats.max_expert_token_share,
            "routing/load_balance": load_balance_loss(routing.probs, fractions),
            **self.collapse_monitor.metrics(),
        }
        omega = self.feature_scaling_omega()
        if omega is not None:
            metrics["routing/omega_mean"] = omega.mean()
        return metrics

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold Feature Scaling into W_enc and the decoder norms into W_dec; drop training-only tensors."""
        self.require_every_expert("an inference folder")
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop("bias_init_done", None)
        omega = state_dict.pop("omega", None)
        if omega is not None:
            state_dict["W_enc"] = feature_scaled_encoder(state_dict["W_enc"], omega).contiguous()
        if self.cfg.normalize_decoder_rows:
            state_dict["W_dec"] = unit_rows(state_dict["W_dec"]).contiguous()

    @torch.no_grad()
    def fold_feature_scaling(self) -> None:
        """Write Feature Scaling into W_enc and reset omega to 0: same outputs, plain encoder."""
        omega = self.feature_scaling_omega()
        if omega is not None:
            self.W_enc.data.copy_(self.effective_W_enc())
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
        omega = self.feature_scaling_omega()
        if omega is not None:
            histograms["weights/omega"] = omega.detach().float().cpu().numpy()
        return histograms

    @override
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        """SAELens's resume, with the checkpoint's file named when its weights do not fit this config."""
        try:
            super().load_weights_from_checkpoint(checkpoint_path)
        except WeightsMismatchError as error:
            weights = Path(checkpoint_path) / SAE_WEIGHTS_FILENAME
            raise WeightsMismatchError(f"{weights}: {error} (the config is the resumed run's sae config)") from error


def init_router(d_in: int, n_experts: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fresh router ``[d_in, n_experts]``, uniform within 1 / sqrt(d_in) like a linear layer's."""
    bound = 1 / math.sqrt(d_in)
    return torch.empty(d_in, n_experts, dtype=dtype, device=device).uniform_(-bound, bound)


def _hooked(hook: HookPoint, flat: Tensor, leading: torch.Size) -> Tensor:
    """Run a hook on the tensor with the caller's leading dims, then flatten back."""
    return hook(flat.view(*leading, flat.shape[-1])).reshape(flat.shape)
