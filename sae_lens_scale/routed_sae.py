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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import torch
import torch.distributed as dist
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
from sae_lens.saes.topk_sae import SparseHookPoint
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_lens_scale.expert_parallel import (
    Dispatch,
    ExpertShard,
    GradientSync,
    init_expert_shard,
    local_shard,
    plan_dispatch,
    remote_candidates,
    remote_decode,
)
from sae_lens_scale.routing import (
    RoutedEncoding,
    Routing,
    SparseCode,
    auxk_code,
    dense_acts,
    feature_scaled_encoder,
    global_topk,
    load_balance_loss,
    routed_preactivations,
    router_probs,
    row_norms,
    select_experts,
    sparse_acts,
    sparse_decode,
    unit_rows,
)
from sae_lens_scale.validation import (
    WeightsMismatchError,
    check_state_dict,
    fail,
    require_bool,
    require_choice,
    require_int,
    require_number,
    validate_routed_shape,
)

UNIT_NORM_TOLERANCE = 1e-4
BiasInit = Literal["geometric_median", "mean", "none"]


class BatchStatistics(NamedTuple):
    """What a training step's losses need from the whole batch: every data-parallel replica's part of it."""

    expert_fractions: Tensor  # [n_experts] share of the batch's (token, slot) assignments per expert
    dead: Tensor | None  # [d_sae] dead by the trainer's count on every replica; None without its mask
    # read on the host, in one copy:
    loss_is_finite: bool
    n_dead: int
    max_expert_token_share: float  # largest fraction of the batch's tokens routed to one expert


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
    contract for evals and hooks.
    """

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter

    def __init__(self, cfg: T_ROUTED_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.hook_router_probs = HookPoint()
        self.setup()

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        d_in, n_experts = self.cfg.d_in, self.cfg.n_experts
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        bound = 1 / math.sqrt(d_in)
        router = torch.empty(d_in, n_experts, dtype=self.dtype, device=self.device).uniform_(-bound, bound)
        self.W_router = nn.Parameter(router)
        self.b_router = nn.Parameter(torch.zeros(d_in, dtype=self.dtype, device=self.device))

    def feature_scaling_omega(self) -> Tensor | None:
        """Feature Scaling's per-expert factor, or None when the encoder is used as stored (every export)."""
        return None

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the file against the config before torch copies it, so a mismatch names the tensor and field."""
        check_state_dict(state_dict, {name: tuple(t.shape) for name, t in self.state_dict().items()}, self.cfg)

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
        candidates, dispatch = self.routed_candidates(centered, routing)
        candidates = _hooked(self.hook_sae_acts_pre, candidates, leading)
        return RoutedEncoding(routing, candidates, global_topk(candidates, routing, self.cfg.k), dispatch)

    def routed_candidates(self, centered: Tensor, routing: Routing) -> tuple[Tensor, Dispatch | None]:
        """The routed experts' pre-activations ``[batch, n_active_experts * m]``, and how they were computed across
        ranks (None here: every expert is on this device)."""
        omega = self.feature_scaling_omega()
        return routed_preactivations(centered, self.W_enc, self.b_enc, routing.experts, self.cfg.n_experts, omega), None

    def decode_code(self, code: SparseCode, encoding: RoutedEncoding, decoder_row_norms: Tensor | None) -> Tensor:
        """``sum_j acts_j * W_dec[latents_j]`` for the k latents of each token, without a [batch, d_sae] matrix."""
        if encoding.dispatch is not None:
            return remote_decode(code, encoding.routing, encoding.dispatch, self.W_dec, decoder_row_norms)
        return sparse_decode(code, self.W_dec, decoder_row_norms)

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

        Without it (after a whitening fold), rescaling latents would change which k win the top-k, so only a
        decoder whose rows are already unit norm (or zero: a latent that never decodes) is accepted.
        """
        if self.cfg.normalize_decoder_rows:
            self.W_dec.data.copy_(unit_rows(self.W_dec.data))
            return
        norms = self.W_dec.norm(dim=-1)
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
        bias_init: how ``b_dec`` and ``b_router`` are set from the first batch the trainer hands over (training
            step 0; a resumed run starts later and keeps its biases): "geometric_median" (as both papers' trainers),
            "mean", or "none" to keep them at zero. Both biases centre the input; at zero, the router and the
            encoder see the activations' large mean direction. Use "none" to continue training loaded weights.
        decoder_init_norm: SAELens's initial decoder row norm; the encoder starts as the decoder's transpose, so
            this is the initial norm of every encoder column (None: Kaiming's, about 1.4). The decode normalises the
            rows, so here it only sets the encoder's scale: 1 gives unit-scale pre-activations for inputs of norm
            sqrt(d_in) (``normalize_activations="expected_average_only_in"``). SAELens's 0.1 leaves most latents
            dead in a routed SAE (docs/dead-latents.md).
        expert_parallel: split the experts over the ranks of the torch.distributed process group (torchrun's): each
            rank holds n_experts / world_size experts and their optimizer state, so the SAE can be wider than one
            device holds. Train with ``sae_lens_scale.distributed.DistributedSAETrainingRunner``.
    """

    load_balance_coefficient: float = 3.0
    aux_loss_coefficient: float = 1.0
    router_collapse_fraction: float = 0.9
    router_collapse_window: int = 100
    bias_init: BiasInit = "geometric_median"
    decoder_init_norm: float | None = 1.0
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "load_balance_coefficient", minimum=0.0)
        require_number(self, "aux_loss_coefficient", minimum=0.0)
        require_number(self, "router_collapse_fraction", minimum=0.0)
        if not 0 < self.router_collapse_fraction <= 1:
            fail(self, "router_collapse_fraction", "must be in (0, 1]: it is a fraction of the batch's tokens")
        require_int(self, "router_collapse_window", minimum=1)
        require_choice(self, "bias_init", get_args(BiasInit))
        require_bool(self, "expert_parallel")
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
    statistics. With ``expert_parallel`` this rank holds only its share of the experts (``expert_shard``).
    """

    expert_shard: ExpertShard | None

    def __init__(self, cfg: T_ROUTED_TRAINING_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.hook_sae_acts_post = SparseHookPoint(self.cfg.d_sae)
        self.setup()
        # Router-collapse monitor: plain attributes, not state, so checkpoints and exports are unchanged; a resumed
        # run starts a new streak.
        self.collapse_streak = 0
        self._warned_collapse = False
        # Set when this SAE is one of several data-parallel replicas (sae_lens_scale.distributed), or holds a share
        # of the experts: the batch statistics the losses need, and the first batch that sets the biases, then span
        # every rank's batch.
        self.data_parallel_group: dist.ProcessGroup | None = None
        if self.expert_shard is not None:
            self.data_parallel_group = self.expert_shard.group
            self.gradient_sync = GradientSync(self.named_parameters(), self.expert_shard)

    @property
    def n_local_experts(self) -> int:
        """The experts this SAE holds: all of them, or its rank's share with ``expert_parallel``."""
        return self.cfg.n_experts if self.expert_shard is None else self.expert_shard.n_local_experts

    @override
    def initialize_weights(self) -> None:
        """The whole SAE, or with ``expert_parallel`` this rank's experts and the replicated router and biases."""
        self.expert_shard = local_shard(self.cfg.n_experts) if self.cfg.expert_parallel else None
        if self.expert_shard is None:
            super().initialize_weights()
            return
        cfg = self.cfg
        expert_width = cfg.d_sae // cfg.n_experts
        W_dec = init_expert_shard(
            self.expert_shard, expert_width, cfg.d_in, cfg.decoder_init_norm, self.dtype, self.device
        )
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(W_dec.shape[0], dtype=self.dtype, device=self.device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=self.dtype, device=self.device))
        bound = 1 / math.sqrt(cfg.d_in)
        router = torch.empty(cfg.d_in, cfg.n_experts, dtype=self.dtype, device=self.device).uniform_(-bound, bound)
        if self.device.type != "meta":
            dist.broadcast(router, src=0, group=self.expert_shard.group)  # one router for all ranks
        self.W_router = nn.Parameter(router)
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in, dtype=self.dtype, device=self.device))

    @override
    def routed_candidates(self, centered: Tensor, routing: Routing) -> tuple[Tensor, Dispatch | None]:
        if self.expert_shard is None:
            return super().routed_candidates(centered, routing)
        dispatch = plan_dispatch(routing.experts, self.expert_shard)
        omega = self.feature_scaling_omega()
        return remote_candidates(centered, dispatch, self.W_enc, self.b_enc, omega), dispatch

    @override
    def decode(self, feature_acts: Tensor) -> Tensor:
        if self.expert_shard is not None:
            raise RuntimeError(
                "An expert-parallel SAE holds only its rank's experts, so it decodes only inside its training pass. "
                "Gather it first: DistributedSAETrainingRunner saves the whole SAE, which SAE.load_from_disk opens."
            )
        return super().decode(feature_acts)

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

    def auxk_loss(
        self,
        sae_in: Tensor,
        encoding: RoutedEncoding,
        sae_out: Tensor,
        decoder_row_norms: Tensor | None,
        dead: Tensor | None,
        n_dead: int,
    ) -> Tensor:
        """AuxK (Gao et al. 2024) over the computed candidates: dead latents reconstruct the main residual.

        ``dead`` and ``n_dead`` come from the step's batch statistics; with none dead the loss is zero and nothing is
        computed. ``decoder_row_norms`` are the main decode's, so the step computes (and backpropagates) them once.
        """
        if dead is None or n_dead == 0 or self.cfg.aux_loss_coefficient == 0:
            return sae_out.new_zeros(())
        k_aux = self.cfg.d_in // 2
        residual = (sae_in - sae_out).detach()
        aux_recons = self.decode_code(auxk_code(encoding, dead, min(k_aux, n_dead)), encoding, decoder_row_norms)
        scale = min(n_dead / k_aux, 1.0)
        return self.cfg.aux_loss_coefficient * scale * (aux_recons - residual).pow(2).sum(dim=-1).mean()

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One routed training step; raises FloatingPointError instead of returning a loss that is not finite.

        A NaN or inf loss would reach every weight through backward, gradient clipping and Adam, silently. Skipping
        the step instead is not possible from here: the trainer calls Adam after this returns, and Adam moves the
        weights by its momentum even with zero gradients. So the step fails before backward, with the weights and
        optimizer state untouched, and the error says where the bad values are.

        The step reads the device once (``_batch_statistics``), for that guard and two other scalars; nothing else
        in it waits for the device, except on logging steps, in the per-expert fallback of ``routing.expert_matmul``
        and, with ``expert_parallel``, for the exchange sizes. The first step (``n_training_steps == 0``) first sets the
        biases from its batch (``bias_init``): SAELens's trainer has no other hook that sees data before training.
        A refused first step puts them back.
        """
        biases_before = None
        if step_input.n_training_steps == 0 and self.cfg.bias_init != "none":
            biases_before = (self.b_dec.detach().clone(), self.b_router.detach().clone())
            self.initialize_biases_from_data(self._whole_batch(step_input.sae_in))
        encoding = self.encode_routed(step_input.sae_in)
        feature_acts = self.hook_sae_acts_post(sparse_acts(encoding.code, self.cfg.d_sae))
        norms = self.decoder_row_norms()
        decoded = self.decode_code(encoding.code, encoding, norms) + self.b_dec
        sae_out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(decoded))
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        stats = self._batch_statistics(encoding, mse_loss, step_input.dead_neuron_mask)
        balance = load_balance_loss(encoding.routing.probs, stats.expert_fractions)
        losses = {
            "mse_loss": mse_loss,
            "load_balance_loss": self.cfg.load_balance_coefficient * self.cfg.d_in * balance,  # d_in: MSE is a sum
        }
        if not stats.loss_is_finite:
            if biases_before is not None:
                with torch.no_grad():
                    self.b_dec.copy_(biases_before[0])
                    self.b_router.copy_(biases_before[1])
            raise self._non_finite_loss_error(step_input, losses)
        self._count_router_collapse(stats.max_expert_token_share)
        aux_loss = self.auxk_loss(step_input.sae_in, encoding, sae_out, norms, stats.dead, stats.n_dead)
        losses["auxiliary_reconstruction_loss"] = aux_loss
        loss = torch.stack(list(losses.values())).sum()
        metrics = self._routing_metrics(encoding, stats) if step_input.is_logging_step else {}
        # hidden_pre: the routed candidates, the only pre-activations that exist
        return TrainStepOutput(step_input.sae_in, sae_out, feature_acts, encoding.candidates, loss, losses, metrics)

    def _batch_statistics(self, encoding: RoutedEncoding, mse_loss: Tensor, dead: Tensor | None) -> BatchStatistics:
        """The expert fractions, the dead latents and the loss guard over the whole batch, and the step's one read
        of the device.

        Data-parallel replicas add up their expert counts, their trainers' alive latents and their non-finite flags
        in one all-reduce, so every replica makes the same decisions as one process with the whole batch: a latent is
        dead when no replica saw it fire within the trainer's window. The guard, the dead count and the router share
        then reach the host in one copy (on a GPU every separate read would stall the step again).
        """
        n_experts = self.cfg.n_experts
        counts = torch.bincount(encoding.routing.experts.flatten(), minlength=n_experts)
        alive = (~dead).long() if dead is not None else counts.new_zeros(0)
        not_finite = ~torch.isfinite(mse_loss) | ~torch.isfinite(encoding.routing.probs).all()
        packed = torch.cat([counts, alive, not_finite.long().view(1)])
        if self.data_parallel_group is not None:
            dist.all_reduce(packed, group=self.data_parallel_group)
        counts, alive, not_finite = packed.split([n_experts, alive.numel(), 1])
        fractions = counts.double() / counts.sum()
        dead = alive == 0 if dead is not None else None
        n_dead = dead.sum() if dead is not None else counts.new_zeros(())
        share = fractions.max() * self.cfg.n_active_experts
        flag, dead_count, max_share = torch.stack([t.double() for t in (not_finite[0], n_dead, share)]).tolist()
        return BatchStatistics(fractions, dead, flag == 0, int(dead_count), max_share)

    def _whole_batch(self, sae_in: Tensor) -> Tensor:
        """``sae_in``, or with data-parallel replicas every replica's batch in rank order (the first step only)."""
        if self.data_parallel_group is None:
            return sae_in
        parts = [torch.empty_like(sae_in) for _ in range(dist.get_world_size(self.data_parallel_group))]
        dist.all_gather(parts, sae_in.contiguous(), group=self.data_parallel_group)
        return torch.cat(parts)

    @torch.no_grad()
    def initialize_biases_from_data(self, sae_in: Tensor) -> None:
        """Set ``b_dec`` and ``b_router`` to the ``bias_init`` centre of a batch ``[batch, d_in]``.

        Computed in float64, once: squared distances of float32 activations can overflow.
        """
        points = sae_in.detach().reshape(-1, self.cfg.d_in).double()
        centre = geometric_median(points) if self.cfg.bias_init == "geometric_median" else points.mean(0)
        self.b_dec.copy_(centre)
        self.b_router.copy_(centre)

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

    def _count_router_collapse(self, max_expert_token_share: float) -> None:
        """Count consecutive steps where one expert takes more than router_collapse_fraction of the tokens.

        One batch can be lopsided by chance; a streak of router_collapse_window steps means the load balancing lost,
        so it warns (once per SAE). The streak counts steps, not logging steps, so it runs every step.
        """
        cfg = self.cfg
        if cfg.n_active_experts / cfg.n_experts >= cfg.router_collapse_fraction:
            return
        collapsed = max_expert_token_share > cfg.router_collapse_fraction
        self.collapse_streak = self.collapse_streak + 1 if collapsed else 0
        if self.collapse_streak >= cfg.router_collapse_window and not self._warned_collapse:
            self._warned_collapse = True
            warnings.warn(
                f"Router collapse: for {self.collapse_streak} consecutive training steps one expert took more than "
                f"router_collapse_fraction={cfg.router_collapse_fraction} of the tokens (last step: "
                f"{max_expert_token_share:.1%}; balanced is {cfg.n_active_experts / cfg.n_experts:.1%}). The other "
                f"experts' latents are starving. Raise load_balance_coefficient (now {cfg.load_balance_coefficient}) "
                "or lower the learning rate; watch metrics/routing/max_expert_token_share.",
                RuntimeWarning,
                stacklevel=3,  # the caller of training_forward_pass
            )

    @torch.no_grad()
    def _routing_metrics(self, encoding: RoutedEncoding, stats: BatchStatistics) -> dict[str, Any]:
        """The router's balance over the whole batch (every replica's), for SAELens's logger."""
        fractions = stats.expert_fractions
        entropy = -(fractions * fractions.clamp_min(1e-12).log()).sum()
        metrics: dict[str, Any] = {
            "routing/expert_usage_entropy": entropy / math.log(self.cfg.n_experts) if self.cfg.n_experts > 1 else 1.0,
            "routing/max_expert_fraction": fractions.max(),
            "routing/max_expert_token_share": fractions.max() * self.cfg.n_active_experts,
            "routing/load_balance": load_balance_loss(encoding.routing.probs, fractions),
            "routing/collapse_streak": float(self.collapse_streak),
            "routing/collapse_warning": float(self.collapse_streak >= self.cfg.router_collapse_window),
        }
        omega = self.feature_scaling_omega()
        if omega is not None:
            metrics["routing/omega_mean"] = omega.mean()
        return metrics

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold Feature Scaling into W_enc and the decoder norms into W_dec; drop training-only tensors."""
        if self.expert_shard is not None:
            raise RuntimeError(
                f"This expert-parallel SAE holds only rank {self.expert_shard.rank}'s experts, and an inference folder "
                "needs all of them: train it with sae_lens_scale.distributed's DistributedSAETrainingRunner, which "
                "gathers the experts and saves the whole SAE."
            )
        super().process_state_dict_for_saving_inference(state_dict)
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


def geometric_median(points: Tensor, n_iterations: int = 100) -> Tensor:
    """The point of least summed Euclidean distance to the rows of ``points [n, d]`` (Weiszfeld's iteration).

    Unlike the mean, it is not pulled towards the few activations of very large norm. A fixed number of iterations,
    started at the mean, keeps it free of data-dependent host synchronisation; each one is a weighted mean.
    """
    median = points.mean(0)
    for _ in range(n_iterations):
        weights = 1 / torch.linalg.vector_norm(points - median, dim=1).clamp_min(1e-8)
        median = weights @ points / weights.sum()
    return median


def _hooked(hook: HookPoint, flat: Tensor, leading: torch.Size) -> Tensor:
    """Run a hook on the tensor with the caller's leading dims, then flatten back."""
    return hook(flat.view(*leading, flat.shape[-1])).reshape(flat.shape)
