"""The conditional-compute engine shared by Scale SAE and Switch SAE.

Every function here works on a flat batch of tokens, ``[batch, d_in]``, and on the flat SAELens parameter layout
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``) with experts as contiguous blocks of ``m = d_sae / n_experts``
latents. Only the experts a token is routed to are ever multiplied: that is the whole point of these architectures,
and why a routed SAE's encoder costs n_active_experts / n_experts of a dense one of the same width.

Where the experts are computed is one object, ``Experts``: ``LocalExperts`` holds them all on this device; another
implementation may compute them elsewhere, and the SAE's code does not change.
"""

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

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


class ExpertRoute(Protocol):
    """How one batch reached its experts; it decodes any code over the same routing (the main code and AuxK's)."""

    def decode(self, code: SparseCode, W_dec: Tensor, decoder_row_norms: Tensor | None) -> Tensor: ...


class Experts(Protocol):
    """Where an SAE's experts are computed, chosen when the SAE is built. The SAE hands over the expert parameters
    it holds: every expert's block, or only ``n_local_experts`` of them."""

    @property
    def n_local_experts(self) -> int: ...

    def candidates(
        self, centered: Tensor, routing: Routing, W_enc: Tensor, b_enc: Tensor, omega: Tensor | None
    ) -> tuple[Tensor, ExpertRoute]: ...


class RoutedEncoding(NamedTuple):
    routing: Routing
    candidates: Tensor  # [batch, n_active_experts * m] pre-activations of the routed experts' latents, slot-major
    code: SparseCode
    route: ExpertRoute


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
    offsets: Tensor  # [n_experts] int32 end of each expert's block in the sorted order, on the device


def group_by_expert(experts: Tensor, n_experts: int) -> ExpertGroups:
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    offsets = torch.bincount(flat, minlength=n_experts).cumsum(0, dtype=torch.int32)
    return ExpertGroups(order, unsort, offsets)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def uses_grouped_mm(dtype: torch.dtype, d_in: int, expert_width: int) -> bool:
    """Whether the experts run as torch's grouped GEMM (``F.grouped_mm``, torch 2.9 and later).

    It takes float32 and 16-bit operands whose rows are 16-byte aligned, and keeps the group offsets on the device
    (on CUDA in bf16 it is a single CUTLASS kernel). Anything else, such as float64 or an odd expert width, runs
    one matmul per expert, which reads the group sizes on the host.
    """
    if not hasattr(F, "grouped_mm") or dtype not in GROUPED_MM_DTYPES:
        return False
    alignment = 16 // dtype.itemsize  # elements per 16 bytes
    return d_in % alignment == 0 and expert_width % alignment == 0


def expert_matmul(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """``rows[block of expert i] @ weights[i]`` for every expert: ``[n, K] x [n_experts, K, N] -> [n, N]``."""
    if uses_grouped_mm(rows.dtype, rows.shape[1], weights.shape[2]):
        return F.grouped_mm(rows, weights, offs=offsets)
    out = rows.new_empty(rows.shape[0], weights.shape[2])
    for expert, block in enumerate(_blocks(offsets)):
        torch.mm(rows[block], weights[expert], out=out[block])
    return out


def expert_weight_grad(rows: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """``rows[block of i].T @ grad[block of i]`` for every expert, zero where it has no rows: ``[n_experts, K, N]``.

    The weight gradient is a grouped product over the token dimension.
    """
    if uses_grouped_mm(rows.dtype, rows.shape[1], grad.shape[1]):
        return F.grouped_mm(rows.t(), grad, offs=offsets)
    out = rows.new_zeros(offsets.shape[0], rows.shape[1], grad.shape[1])
    for expert, block in enumerate(_blocks(offsets)):
        torch.mm(rows[block].t(), grad[block], out=out[expert])
    return out


def _blocks(offsets: Tensor) -> list[slice]:
    """Each expert's slice of the sorted rows, read on the host (the per-expert loop needs them there)."""
    ends = offsets.tolist()
    return [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


class _RoutedExpertMatmul(torch.autograd.Function):
    """``x[token] @ blocks[expert]`` for every (token, slot) assignment, in one autograd node.

    ``blocks`` is a ``[n_experts, K, N]`` view of a flat parameter (``expert_blocks`` for the encoder). Slicing the
    flat parameter per expert under autograd would make each slice's backward zero-fill a full-size gradient, once
    per expert per step. Here the forward and both gradients are grouped products over the assignments sorted by
    expert (``expert_matmul``, ``expert_weight_grad``), and the weight gradient is written once. Every permutation is
    a gather, including the input gradient: each token has exactly n_active_experts assignments, so its gradient is
    a sum over its slots rather than a scatter-add.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor, groups: ExpertGroups) -> Tensor:
        n_active_experts = groups.order.numel() // x.shape[0]
        x_sorted = x.index_select(0, groups.order // n_active_experts)
        out_sorted = expert_matmul(x_sorted, blocks, groups.offsets)
        ctx.save_for_backward(x_sorted, blocks)
        ctx.groups, ctx.batch = groups, x.shape[0]
        return out_sorted.index_select(0, groups.unsort)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, Tensor, None]:
        (grad_out,) = grad_outputs
        x_sorted, blocks = ctx.saved_tensors
        groups: ExpertGroups = ctx.groups
        grad_sorted = grad_out.index_select(0, groups.order)
        grad_blocks = expert_weight_grad(x_sorted, grad_sorted, groups.offsets)
        grad_x_sorted = expert_matmul(grad_sorted, blocks.transpose(1, 2), groups.offsets)
        grad_x = grad_x_sorted.index_select(0, groups.unsort).view(ctx.batch, -1, x_sorted.shape[1]).sum(1)
        return grad_x, grad_blocks, None


def expert_blocks(W_enc: Tensor, n_experts: int) -> Tensor:
    """View a flat [d_in, d_sae] encoder as [n_experts, d_in, m] without copying."""
    d_in, d_sae = W_enc.shape
    return W_enc.view(d_in, n_experts, d_sae // n_experts).transpose(0, 1)


def routed_matmul(x: Tensor, blocks: Tensor, experts: Tensor) -> Tensor:
    """``x[token] @ blocks[expert]`` for each of the token's routed experts: ``[batch, n_active_experts, N]``."""
    out = _RoutedExpertMatmul.apply(x, blocks, group_by_expert(experts, blocks.shape[0]))
    return out.view(x.shape[0], experts.shape[1], blocks.shape[2])


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
    expert_width = W_enc.shape[1] // n_experts
    x, weights = sae_in_centered.to(W_enc.dtype), W_enc
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(compute_dtype), W_enc.to(compute_dtype)
    preacts = routed_matmul(x, expert_blocks(weights, n_experts), experts)
    if omega is not None:
        centred = preacts - preacts.mean(dim=-1, keepdim=True)
        preacts = preacts + omega[experts].unsqueeze(-1) * centred
    return (preacts + b_enc.view(n_experts, expert_width)[experts]).flatten(1)


def global_topk(candidates: Tensor, routing: Routing, k: int) -> SparseCode:
    """One top-k over the union of the routed experts' latents, ReLU, then gate by the expert's probability.

    ``candidates`` is ``[batch, n_active_experts * m]``, slot-major in the order of ``routing.experts``.
    """
    values, index = candidates.topk(k, dim=-1, sorted=False)
    return gated_code(values, index, routing, candidates.shape[-1] // routing.experts.shape[-1])


def gated_code(values: Tensor, index: Tensor, routing: Routing, expert_width: int) -> SparseCode:
    """The code of the candidates at ``index [batch, k]`` (positions in the slot-major candidates), whose
    pre-activations are ``values``: global latent ids, and ``gate * ReLU(values)``."""
    gates = routing.gates.gather(1, index // expert_width)
    return SparseCode(selected_latents(index, routing, expert_width), gates.to(values.dtype) * values.relu())


def selected_latents(index: Tensor, routing: Routing, expert_width: int) -> Tensor:
    """Global latent ids of the candidates at ``index``: ``expert * m + local id``."""
    return routing.experts.gather(1, index // expert_width) * expert_width + index % expert_width


class _SelectedPreactivations(torch.autograd.Function):
    """The pre-activations ``x_t . C[rows_tj] + b[rows_tj]`` of each token's selected latents, given as ``values``
    (the routed product already computed them), with the backward of that formula.

    ``C`` and ``b`` hold only the step's latents, so their gradients are the rows' own, and no ``[batch * k, d_in]``
    product is built: both gradients of the weighted row sum are those of an ``embedding_bag``. Without ``C`` the
    values carry their own gradient to the encoder, and only ``b``'s is added here.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, x: Tensor, C: Tensor | None, b: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(x, C, rows)
        ctx.n_rows, ctx.dtype = b.shape[0], b.dtype
        return values.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = grad_outputs
        x, C, rows = ctx.saved_tensors
        grad_values = grad if ctx.needs_input_grad[0] else None
        grad = grad.to(ctx.dtype)  # under autocast the values are 16-bit; the rows' gradients are the parameters'
        grad_b = grad.new_zeros(ctx.n_rows).index_add_(0, rows.flatten(), grad.flatten())
        grad_x = grad_C = None
        if C is not None:
            grad_x = F.embedding_bag(rows, C, per_sample_weights=grad, mode="sum").to(x.dtype)
            with torch.enable_grad():
                leaf = C.detach().requires_grad_()
                summed = F.embedding_bag(rows, leaf, per_sample_weights=grad.detach(), mode="sum")
                (grad_C,) = torch.autograd.grad(summed, leaf, x.to(summed.dtype))
        return grad_values, grad_x, grad_C, grad_b, None


def selected_preactivations(values: Tensor, x: Tensor, C: Tensor | None, b: Tensor, rows: Tensor) -> Tensor:
    """``values [batch, k]`` as a function of the selected latents' encoder rows ``C [n, d_in]`` (or None: the
    values carry their own encoder gradient) and biases ``b [n]``; ``rows [batch, k]`` index both."""
    return _SelectedPreactivations.apply(values, x, C, b, rows)


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


@dataclass(frozen=True)
class LocalExperts:
    """Every expert on this device: the candidates are one grouped product, and the decode gathers k rows a token."""

    n_experts: int

    @property
    def n_local_experts(self) -> int:
        return self.n_experts

    def candidates(
        self, centered: Tensor, routing: Routing, W_enc: Tensor, b_enc: Tensor, omega: Tensor | None
    ) -> tuple[Tensor, "LocalExperts"]:
        return routed_preactivations(centered, W_enc, b_enc, routing.experts, self.n_experts, omega), self

    def decode(self, code: SparseCode, W_dec: Tensor, decoder_row_norms: Tensor | None) -> Tensor:
        return sparse_decode(code, W_dec, decoder_row_norms)


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


def expert_counts(experts: Tensor, n_experts: int) -> Tensor:
    """How many (token, slot) assignments went to each expert: ``[n_experts]`` int64."""
    return torch.bincount(experts.flatten(), minlength=n_experts)


def normalized_entropy(fractions: Tensor) -> Tensor:
    """Entropy of the experts' shares over log(n_experts): 1 is perfectly balanced, 0 is one expert."""
    n_experts = fractions.shape[-1]
    entropy = torch.special.entr(fractions).sum(-1)
    return entropy / math.log(n_experts) if n_experts > 1 else torch.ones_like(entropy)


def load_balance_loss(probs: Tensor, fractions: Tensor) -> Tensor:
    """Switch Transformer balance loss ``N * sum_i f_i P_i``: 1 when balanced, up to N when collapsed.

    ``fractions`` (f, ``expert_counts`` over their sum) carries no gradient; ``probs [batch, n_experts]`` gives P,
    the mean router probability. The parts of a split batch pass the whole batch's f with their own probs: their
    averaged gradients are then those of the whole batch's loss.
    """
    return probs.shape[-1] * (fractions.to(probs.dtype) * probs.mean(0)).sum()


def auxk_selection(candidates: Tensor, routing: Routing, dead_latents: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The pre-activations and candidate positions of the top-k_aux dead latents among each token's computed
    candidates (AuxK, Gao et al. 2024).

    Only the routed experts' candidates exist, so a dead latent is revived by the tokens routed to its expert,
    which is what the load-balancing loss already encourages.
    """
    expert_width = candidates.shape[-1] // routing.experts.shape[-1]
    local = torch.arange(expert_width, device=candidates.device)
    candidate_latents = (routing.experts.unsqueeze(-1) * expert_width + local).flatten(1)
    masked = torch.where(dead_latents[candidate_latents], candidates, -torch.inf)
    values, index = masked.topk(min(k_aux, masked.shape[1]), dim=-1, sorted=False)
    return values, index


def auxk_code(encoding: RoutedEncoding, dead_latents: Tensor, k_aux: int) -> SparseCode:
    """AuxK's code: the top-k_aux dead candidates of each token (``auxk_selection``), gated like the main code."""
    routing, candidates = encoding.routing, encoding.candidates
    values, index = auxk_selection(candidates, routing, dead_latents, k_aux)
    return gated_code(values, index, routing, candidates.shape[-1] // routing.experts.shape[-1])


def feature_scaled_encoder(W_enc: Tensor, omega: Tensor) -> Tensor:
    """Fold Feature Scaling into a plain encoder: ``mean_i + (1 + omega_i)(W_i - mean_i)`` per expert block."""
    n_experts = omega.shape[0]
    d_in, d_sae = W_enc.shape
    blocks = W_enc.view(d_in, n_experts, d_sae // n_experts)
    mean = blocks.mean(dim=-1, keepdim=True)
    scaled = mean + (1 + omega.view(1, n_experts, 1)) * (blocks - mean)
    return scaled.reshape(d_in, d_sae)
