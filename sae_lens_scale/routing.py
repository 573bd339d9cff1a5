"""The conditional-compute engine shared by Scale SAE and Switch SAE.

Every function here works on a flat batch of tokens, ``[batch, d_in]``, and on the flat SAELens parameter layout
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``) with experts as contiguous blocks of ``m = d_sae / n_experts``
latents. Only the experts a token is routed to are ever multiplied: that is the whole point of these architectures,
and the reason a routed SAE trains an order of magnitude faster than a dense one of the same width.
"""

import itertools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Routing(NamedTuple):
    """Which experts each token uses, and with what weight."""

    probs: Tensor  # [batch, n_experts] router softmax
    experts: Tensor  # [batch, n_active_experts] chosen experts, int64
    gates: Tensor  # [batch, n_active_experts] their probabilities, probs.gather(experts)


class SparseCode(NamedTuple):
    """A token's k active latents, as global latent ids and gated activations."""

    latents: Tensor  # [batch, k] global latent ids, expert * m + local id
    acts: Tensor  # [batch, k] gate * ReLU(pre-activation)


class RoutedEncoding(NamedTuple):
    routing: Routing
    candidates: Tensor  # [batch, n_active_experts * m] pre-activations of the routed experts' latents, slot-major
    code: SparseCode


def router_probs(sae_in: Tensor, W_router: Tensor, b_router: Tensor) -> Tensor:
    """Softmax router on the input centred by its own bias, untied from b_dec: ``[batch, n_experts]``.

    Under autocast the router still runs in its parameters' dtype: Switch Transformer's "selective precision"
    (Fedus et al. 2021, section 2.4). bf16 logits round the softmax to ~3 significant digits, which decides near-tied
    top-e choices at random and makes the load-balancing loss noisy; the router is only d_in x n_experts, so full
    precision costs nothing next to the experts' matmul.
    """
    device_type = sae_in.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return router_probs(sae_in.to(W_router.dtype), W_router, b_router)
    return torch.softmax((sae_in - b_router) @ W_router, dim=-1)


def select_experts(probs: Tensor, n_active_experts: int) -> Routing:
    gates, experts = probs.topk(n_active_experts, dim=-1)
    return Routing(probs, experts, gates)


class ExpertGroups(NamedTuple):
    """The batch's (token, slot) assignments sorted by expert, so each expert's tokens are one contiguous block."""

    order: Tensor  # [batch * n_active_experts] assignment ids (token * n_active_experts + slot), sorted by expert
    unsort: Tensor  # inverse permutation of order
    counts: list[int]  # assignments per expert


def group_by_expert(experts: Tensor, n_experts: int) -> ExpertGroups:
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ExpertGroups(order, unsort, torch.bincount(flat, minlength=n_experts).tolist())


class _RoutedExpertMatmul(torch.autograd.Function):
    """``x[token] @ W_enc[:, block of expert]`` for every (token, slot) assignment, in one autograd node.

    Slicing the flat W_enc per expert under autograd would make each slice's backward zero-fill a full-size gradient,
    once per expert per step. Here one matmul per expert runs on its contiguous block of sorted assignments, and the
    backward writes each expert's gradient block exactly once into a single buffer (unrouted experts get an explicit
    zero block). Every permutation is a gather, including the input gradient: each token has exactly n_active_experts
    assignments, so its gradient is a sum over its slots rather than a scatter-add.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, groups: ExpertGroups) -> Tensor:
        n_active_experts = groups.order.numel() // x.shape[0]
        x_sorted = x.index_select(0, groups.order // n_active_experts)
        blocks = _expert_blocks(W_enc, len(groups.counts))
        out_sorted = x.new_empty(x_sorted.shape[0], blocks.shape[-1])
        for expert, rows in enumerate(_expert_row_slices(groups.counts)):
            if rows.stop > rows.start:
                torch.mm(x_sorted[rows], blocks[expert], out=out_sorted[rows])
        ctx.save_for_backward(x_sorted, W_enc)
        ctx.groups, ctx.batch = groups, x.shape[0]
        return out_sorted.index_select(0, groups.unsort)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, Tensor, None]:
        (grad_out,) = grad_outputs
        x_sorted, W_enc = ctx.saved_tensors
        groups: ExpertGroups = ctx.groups
        blocks = _expert_blocks(W_enc, len(groups.counts))
        grad_sorted = grad_out.index_select(0, groups.order)
        grad_W = torch.empty_like(W_enc)
        grad_blocks = _expert_blocks(grad_W, len(groups.counts))
        grad_x_sorted = torch.empty_like(x_sorted)
        for expert, rows in enumerate(_expert_row_slices(groups.counts)):
            if rows.stop > rows.start:
                torch.mm(x_sorted[rows].t(), grad_sorted[rows], out=grad_blocks[expert])
                torch.mm(grad_sorted[rows], blocks[expert].t(), out=grad_x_sorted[rows])
            else:
                grad_blocks[expert].zero_()
        grad_x = grad_x_sorted.index_select(0, groups.unsort).view(ctx.batch, -1, x_sorted.shape[1]).sum(1)
        return grad_x, grad_W, None


def _expert_blocks(W: Tensor, n_experts: int) -> Tensor:
    """View a flat [d_in, d_sae] encoder as [n_experts, d_in, m] without copying."""
    d_in, d_sae = W.shape
    return W.view(d_in, n_experts, d_sae // n_experts).transpose(0, 1)


def _expert_row_slices(counts: list[int]) -> list[slice]:
    return [slice(end - count, end) for count, end in zip(counts, itertools.accumulate(counts), strict=True)]


def routed_preactivations(
    sae_in_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    experts: Tensor,
    n_experts: int,
    omega: Tensor | None = None,
) -> Tensor:
    """Pre-activations of the routed experts' latents only: ``[batch, n_active_experts * m]``, slot-major.

    Feature Scaling (docs/architecture.md, "Feature Scaling") reparametrises expert i's encoder as
    ``mean_i + (1 + omega_i)(W_i - mean_i)``, where mean_i is the mean of its m columns. Because ``x @ mean_i`` is
    the mean of ``x @ W_i`` over the block, the scaled pre-activation is ``g + omega_i * (g - mean(g))`` with
    ``g = x @ W_i``: no full-size weight is ever built.
    """
    batch, n_active_experts = experts.shape
    expert_width = W_enc.shape[1] // n_experts
    x, weights = sae_in_centered.to(W_enc.dtype), W_enc
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(compute_dtype), W_enc.to(compute_dtype)
    preacts = _RoutedExpertMatmul.apply(x, weights, group_by_expert(experts, n_experts))
    preacts = preacts.view(batch, n_active_experts, expert_width)
    if omega is not None:
        centred = preacts - preacts.mean(dim=-1, keepdim=True)
        preacts = preacts + omega[experts].unsqueeze(-1) * centred
    return (preacts + b_enc.view(n_experts, expert_width)[experts]).flatten(1)


def global_topk(candidates: Tensor, routing: Routing, k: int) -> SparseCode:
    """One top-k over the union of the routed experts' latents, ReLU, then gate by the expert's probability.

    ``candidates`` is ``[batch, n_active_experts * m]``, slot-major in the order of ``routing.experts``.
    """
    expert_width = candidates.shape[-1] // routing.experts.shape[-1]
    values, flat_index = candidates.topk(k, dim=-1, sorted=False)
    slot = flat_index // expert_width
    latents = routing.experts.gather(1, slot) * expert_width + flat_index % expert_width
    return SparseCode(latents, routing.gates.gather(1, slot).to(values.dtype) * values.relu())


MIN_ROW_NORM = 1e-8  # SAELens's clamp for decoder row norms: a zero row divides to zero instead of NaN


class _RowNorms(torch.autograd.Function):
    """Euclidean norm of each row, clamped below at MIN_ROW_NORM, with a one-pass backward.

    torch's generic norm backward makes several full passes over the [d_sae, d_in] decoder (it rescales and masks the
    whole matrix), which cost more than the sparse decode itself. Here the backward is one broadcast multiply. Where
    the clamp holds the norm constant its gradient is zero, so a zero row stays finite in both passes.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(W, dim=1)
        ctx.save_for_backward(W, norms)
        return norms.clamp_min(MIN_ROW_NORM)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> Tensor:
        (grad_norms,) = grad_outputs
        W, norms = ctx.saved_tensors
        scale = torch.where(norms > MIN_ROW_NORM, grad_norms / norms, torch.zeros_like(norms))
        return W * scale.unsqueeze(1)


def row_norms(W: Tensor) -> Tensor:
    """``[d_sae]`` decoder row norms, never below MIN_ROW_NORM, so dividing by them is always finite."""
    return _RowNorms.apply(W)


def unit_rows(W: Tensor) -> Tensor:
    """``W`` with every row scaled to unit norm; a zero row stays zero."""
    return W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(MIN_ROW_NORM)


def sparse_decode(code: SparseCode, W_dec: Tensor, decoder_row_norms: Tensor | None = None) -> Tensor:
    """``sum_j acts_j * W_dec[latents_j]`` without a dense [batch, d_sae] matrix (no bias).

    With ``decoder_row_norms`` the rows are used at unit norm, ``W_dec[j] / ||W_dec[j]||``: the training-time
    reparametrisation that keeps the decoder unit-norm without a post-step hook.
    """
    weights = code.acts if decoder_row_norms is None else code.acts / decoder_row_norms[code.latents]
    return F.embedding_bag(code.latents, W_dec, per_sample_weights=weights.to(W_dec.dtype), mode="sum")


def dense_acts(code: SparseCode, d_sae: int) -> Tensor:
    """The [batch, d_sae] feature activations SAELens's encode contract asks for."""
    return code.acts.new_zeros(code.acts.shape[0], d_sae).scatter(1, code.latents, code.acts)


def sparse_acts(code: SparseCode, d_sae: int) -> Tensor:
    """The same activations as a detached, coalesced COO tensor: what the trainer needs for its firing statistics.

    Sorting each token's k latents makes the indices lexicographically ordered and unique, so the tensor can be
    declared coalesced and the trainer's reductions skip a full coalesce of batch * k entries.
    """
    batch, k = code.latents.shape
    latents, order = code.latents.sort(dim=1)
    rows = torch.arange(batch, device=latents.device).repeat_interleave(k)
    values = code.acts.detach().gather(1, order).flatten()
    return torch.sparse_coo_tensor(
        torch.stack([rows, latents.flatten()]), values, (batch, d_sae), is_coalesced=True, check_invariants=False
    )


def expert_fractions(routing: Routing, n_experts: int) -> Tensor:
    """Fraction of the batch's (token, slot) assignments that went to each expert; sums to 1."""
    counts = torch.bincount(routing.experts.flatten(), minlength=n_experts)
    return counts.to(routing.probs.dtype) / routing.experts.numel()


def load_balance_loss(routing: Routing) -> Tensor:
    """Switch Transformer balance loss ``N * sum_i f_i P_i``: 1 when balanced, up to N when collapsed."""
    n_experts = routing.probs.shape[-1]
    return n_experts * (expert_fractions(routing, n_experts) * routing.probs.mean(0)).sum()


def auxk_code(encoding: RoutedEncoding, dead_latents: Tensor, k_aux: int) -> SparseCode:
    """The top-k_aux dead latents among each token's computed candidates (AuxK, Gao et al. 2024).

    Only the routed experts' candidates exist, so a dead latent is revived by the tokens routed to its expert,
    which is what the load-balancing loss already encourages.
    """
    experts = encoding.routing.experts
    n_active_experts = experts.shape[1]
    expert_width = encoding.candidates.shape[1] // n_active_experts
    local = torch.arange(expert_width, device=experts.device)
    candidate_latents = (experts.unsqueeze(-1) * expert_width + local).flatten(1)
    masked = torch.where(dead_latents[candidate_latents], encoding.candidates, -torch.inf)
    values, flat_index = masked.topk(min(k_aux, masked.shape[1]), dim=-1, sorted=False)
    gates = encoding.routing.gates.gather(1, flat_index // expert_width)
    return SparseCode(candidate_latents.gather(1, flat_index), gates.to(values.dtype) * values.relu())


def feature_scaled_encoder(W_enc: Tensor, omega: Tensor) -> Tensor:
    """Fold Feature Scaling into a plain encoder: ``mean_i + (1 + omega_i)(W_i - mean_i)`` per expert block."""
    n_experts = omega.shape[0]
    d_in, d_sae = W_enc.shape
    blocks = W_enc.view(d_in, n_experts, d_sae // n_experts)
    mean = blocks.mean(dim=-1, keepdim=True)
    scaled = mean + (1 + omega.view(1, n_experts, 1)) * (blocks - mean)
    return scaled.reshape(d_in, d_sae)
