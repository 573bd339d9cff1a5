"""The conditional-compute engine shared by Scale SAE and Switch SAE.

Every function here works on a flat batch of tokens, ``[batch, d_in]``, and on the flat SAELens parameter layout
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``) with experts as contiguous blocks of ``m = d_sae / n_experts``
latents. Only the experts a token is routed to are ever multiplied: that is the whole point of these architectures,
and the reason a routed SAE trains an order of magnitude faster than a dense one of the same width.
"""

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Routing(NamedTuple):
    """Which experts each token uses, and with what weight."""

    probs: Tensor  # [batch, n_experts] router softmax
    experts: Tensor  # [batch, n_active] chosen experts, int64
    gates: Tensor  # [batch, n_active] their probabilities, probs.gather(experts)


class SparseCode(NamedTuple):
    """A token's k active latents, as global latent ids and gated activations."""

    latents: Tensor  # [batch, k] global latent ids, expert * m + local id
    acts: Tensor  # [batch, k] gate * ReLU(pre-activation)


class RoutedEncoding(NamedTuple):
    routing: Routing
    candidates: Tensor  # [batch, n_active * m] pre-activations of the routed experts' latents, slot-major
    code: SparseCode


def router_probs(sae_in: Tensor, W_router: Tensor, b_router: Tensor) -> Tensor:
    """Softmax router on the input centred by its own bias, untied from b_dec: ``[batch, n_experts]``."""
    return torch.softmax((sae_in - b_router) @ W_router, dim=-1)


def select_experts(probs: Tensor, n_active: int) -> Routing:
    gates, experts = probs.topk(n_active, dim=-1)
    return Routing(probs, experts, gates)


class _GroupedExpertMatmul(torch.autograd.Function):
    """``x_sorted[rows of expert i] @ W_enc[:, block i]`` for every expert, in one autograd node.

    Slicing the flat W_enc per expert under autograd would make each slice's backward zero-fill a full-size
    gradient (the DESIGN.md speed trap). Here the backward writes each expert's block of the gradient exactly
    once into a single buffer, and experts that received no token get an explicit zero block.
    """

    @staticmethod
    def forward(ctx: Any, x_sorted: Tensor, W_enc: Tensor, counts: list[int]) -> Tensor:
        n_experts = len(counts)
        d_in, d_sae = W_enc.shape
        blocks = W_enc.view(d_in, n_experts, d_sae // n_experts).transpose(0, 1)
        out = x_sorted.new_empty(x_sorted.shape[0], d_sae // n_experts)
        for expert, rows in enumerate(_expert_row_slices(counts)):
            if rows.stop > rows.start:
                torch.mm(x_sorted[rows], blocks[expert], out=out[rows])
        ctx.save_for_backward(x_sorted, W_enc)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        x_sorted, W_enc = ctx.saved_tensors
        n_experts = len(ctx.counts)
        d_in, d_sae = W_enc.shape
        blocks = W_enc.view(d_in, n_experts, d_sae // n_experts).transpose(0, 1)
        grad_W = torch.empty_like(W_enc)
        grad_blocks = grad_W.view(d_in, n_experts, d_sae // n_experts).transpose(0, 1)
        grad_x = torch.empty_like(x_sorted)
        grad_out = grad_out.contiguous()
        for expert, rows in enumerate(_expert_row_slices(ctx.counts)):
            if rows.stop > rows.start:
                torch.mm(x_sorted[rows].t(), grad_out[rows], out=grad_blocks[expert])
                torch.mm(grad_out[rows], blocks[expert].t(), out=grad_x[rows])
            else:
                grad_blocks[expert].zero_()
        return grad_x, grad_W, None


def _expert_row_slices(counts: list[int]) -> list[slice]:
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [slice(end - count, end) for count, end in zip(counts, ends)]


def routed_preactivations(
    sae_in_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    experts: Tensor,
    n_experts: int,
    omega: Tensor | None = None,
) -> Tensor:
    """Pre-activations of the routed experts' latents only: ``[batch, n_active * m]``, slot-major.

    Feature Scaling (Scale SAE eq. 7) reparametrises expert i's encoder as ``mean_i + (1 + omega_i)(W_i - mean_i)``,
    where mean_i is the mean of its m columns. Because ``x @ mean_i`` is the mean of ``x @ W_i`` over the block, the
    scaled pre-activation is ``g + omega_i * (g - mean(g))`` with ``g = x @ W_i``: no full-size weight is ever built.
    """
    batch, n_active = experts.shape
    expert_width = W_enc.shape[1] // n_experts
    flat_experts = experts.flatten()
    order = flat_experts.argsort(stable=True)
    counts = torch.bincount(flat_experts, minlength=n_experts).tolist()
    x_sorted = sae_in_centered[order // n_active]
    weights = W_enc
    if torch.is_autocast_enabled(x_sorted.device.type):
        compute_dtype = torch.get_autocast_dtype(x_sorted.device.type)
        x_sorted, weights = x_sorted.to(compute_dtype), W_enc.to(compute_dtype)
    else:
        x_sorted = x_sorted.to(W_enc.dtype)
    sorted_preacts = _GroupedExpertMatmul.apply(x_sorted, weights, counts)
    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    preacts = sorted_preacts[unsort].view(batch, n_active, expert_width)
    if omega is not None:
        centred = preacts - preacts.mean(dim=-1, keepdim=True)
        preacts = preacts + omega[experts].unsqueeze(-1) * centred
    return (preacts + b_enc.view(n_experts, expert_width)[experts]).flatten(1)


def global_topk(candidates: Tensor, routing: Routing, k: int) -> SparseCode:
    """One top-k over the union of the routed experts' latents, ReLU, then gate by the expert's probability.

    ``candidates`` is ``[batch, n_active * m]``, slot-major in the order of ``routing.experts``.
    """
    expert_width = candidates.shape[-1] // routing.experts.shape[-1]
    values, flat_index = candidates.topk(k, dim=-1, sorted=False)
    slot = flat_index // expert_width
    latents = routing.experts.gather(1, slot) * expert_width + flat_index % expert_width
    return SparseCode(latents, routing.gates.gather(1, slot).to(values.dtype) * values.relu())


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
    """The same activations as a detached COO tensor: what the trainer needs for its firing statistics."""
    batch, k = code.latents.shape
    rows = torch.arange(batch, device=code.latents.device).repeat_interleave(k)
    indices = torch.stack([rows, code.latents.flatten()])
    return torch.sparse_coo_tensor(
        indices, code.acts.detach().flatten(), (batch, d_sae), is_coalesced=False, check_invariants=False
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
    batch, n_active = experts.shape
    expert_width = encoding.candidates.shape[1] // n_active
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
