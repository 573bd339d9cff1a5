"""Expert parallelism's compute: each rank holds ``n_experts / world_size`` experts, and every token's routed
assignments travel to the ranks that own their experts.

A rank owns a contiguous range of experts. Each rank feeds its own tokens, routes them with the replicated router and
sends each (token, slot) assignment's centred input to the expert's owner (``all_to_all_single``); the owner returns
the expert's pre-activations, the token's rank takes the global top-k and gates them exactly as on one device, sends
each assignment's activations back to the owner, and receives the owner's part of the reconstruction. The backward
pass runs the same exchanges in reverse.

The math is the single-device math, term for term; only the decode differs in cost: an owner multiplies each
assignment's m activations (mostly zeros) by the expert's decoder block, where one device gathers k decoder rows per
token.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lens_scale.parallel.process_group import world_group
from sae_lens_scale.routing import Routing, SparseCode, group_by_expert, routed_matmul, routed_preactivations
from sae_lens_scale.validation import ConfigError


class ExpertShard(NamedTuple):
    """This rank's experts: ``n_local_experts`` of them, from expert ``rank * n_local_experts`` on."""

    group: dist.ProcessGroup  # the process group the experts are split over
    rank: int
    world_size: int
    n_local_experts: int


def local_shard(n_experts: int) -> ExpertShard:
    """This rank's share of ``n_experts`` over the default process group (torchrun's)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "An expert-parallel SAE splits the experts over the ranks of a torch.distributed process group, and none "
            "is initialised: start the run with torchrun and train with "
            "sae_lens_scale.parallel.DistributedSAETrainingRunner(cfg, expert_parallel=True) (or call "
            "torch.distributed.init_process_group first). To open an expert-parallel checkpoint on one process, "
            "merge its ranks first: sae_lens_scale.parallel.merge_checkpoint."
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if n_experts % world_size:
        raise ConfigError(
            f"expert_parallel=True: n_experts={n_experts} does not split evenly over the {world_size} ranks; set "
            f"n_experts to a multiple of {world_size} (d_sae must stay a multiple of n_experts), or start "
            "a number of ranks that divides it."
        )
    return ExpertShard(world_group(), rank, world_size, n_experts // world_size)


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` of rows: ``send_splits[r]`` rows go to rank r, ``recv_splits[r]`` come from it. The
    backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(
        ctx: Any, rows: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        received = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group)
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return received

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, None, None, None]:
        (grad,) = grad_outputs
        send_splits, recv_splits = ctx.splits
        grad_rows = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_rows, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_rows, None, None, None


class Dispatch(NamedTuple):
    """Where a batch's (token, slot) assignments go, and which of them this rank computes."""

    order: Tensor  # assignment ids (token * n_active_experts + slot) sorted by expert, hence by owning rank
    unsort: Tensor  # the inverse permutation
    send_splits: list[int]  # assignments sent to each rank
    recv_splits: list[int]  # assignments received from each rank
    received_experts: Tensor  # [received, 1] the local expert of each received assignment
    shard: ExpertShard


def plan_dispatch(experts: Tensor, shard: ExpertShard) -> Dispatch:
    """Sort the assignments by owner and agree with the other ranks on how many go where.

    The exchange sizes are read on the host: ``all_to_all_single`` takes them as lists.
    """
    groups = group_by_expert(experts, shard.n_local_experts * shard.world_size)
    rank_ends = groups.offsets[shard.n_local_experts - 1 :: shard.n_local_experts].long()
    send_counts = rank_ends.diff(prepend=rank_ends.new_zeros(1))
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=shard.group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    local_experts = experts.flatten().index_select(0, groups.order) % shard.n_local_experts
    received = local_experts.new_empty(sum(recv_splits))
    dist.all_to_all_single(received, local_experts, recv_splits, send_splits, group=shard.group)
    return Dispatch(groups.order, groups.unsort, send_splits, recv_splits, received.view(-1, 1), shard)


def to_owners(sorted_rows: Tensor, dispatch: Dispatch) -> Tensor:
    """Rows in ``dispatch.order`` to the ranks that own their experts."""
    return _Exchange.apply(sorted_rows, dispatch.send_splits, dispatch.recv_splits, dispatch.shard.group)


def from_owners(rows: Tensor, dispatch: Dispatch) -> Tensor:
    """The owners' rows back to the assignments' ranks, in assignment order."""
    back = _Exchange.apply(rows, dispatch.recv_splits, dispatch.send_splits, dispatch.shard.group)
    return back.index_select(0, dispatch.unsort)


def remote_candidates(
    centered: Tensor,
    dispatch: Dispatch,
    W_enc: Tensor,
    b_enc: Tensor,
    omega: Tensor | None,
) -> Tensor:
    """The routed experts' pre-activations of ``centered [batch, d_in]``, each computed by the expert's owner:
    ``[batch, n_active_experts * m]``, slot-major, as ``routing.routed_preactivations`` on one device."""
    batch = centered.shape[0]
    n_active_experts = dispatch.order.numel() // batch
    received = to_owners(centered.index_select(0, dispatch.order // n_active_experts), dispatch)
    owned = routed_preactivations(
        received, W_enc, b_enc, dispatch.received_experts, dispatch.shard.n_local_experts, omega
    )
    return from_owners(owned, dispatch).view(batch, -1)


def assignment_acts(code: SparseCode, routing: Routing, expert_width: int) -> Tensor:
    """The k activations of each token laid out per (token, slot) assignment: ``[batch * n_active_experts, m]``."""
    batch, n_active_experts = routing.experts.shape
    expert = code.latents // expert_width
    slot = (routing.experts.unsqueeze(1) == expert.unsqueeze(2)).int().argmax(-1)
    position = slot * expert_width + code.latents % expert_width
    dense = code.acts.new_zeros(batch, n_active_experts * expert_width).scatter(1, position, code.acts)
    return dense.view(batch * n_active_experts, expert_width)


def remote_decode(
    code: SparseCode, routing: Routing, dispatch: Dispatch, W_dec: Tensor, decoder_row_norms: Tensor | None
) -> Tensor:
    """``sum_j acts_j * W_dec[latents_j]`` (rows at unit norm with ``decoder_row_norms``), each expert's part computed
    by its owner: ``[batch, d_in]`` (no bias)."""
    n_local_experts = dispatch.shard.n_local_experts
    expert_width = W_dec.shape[0] // n_local_experts
    acts = assignment_acts(code, routing, expert_width)
    received = to_owners(acts.index_select(0, dispatch.order), dispatch)
    local = dispatch.received_experts[:, 0]
    if decoder_row_norms is not None:
        received = received / decoder_row_norms.view(n_local_experts, expert_width)[local].to(received.dtype)
    blocks = W_dec.view(n_local_experts, expert_width, -1)
    owned = routed_matmul(received.to(W_dec.dtype), blocks, dispatch.received_experts).flatten(1)
    batch, n_active_experts = routing.experts.shape
    return from_owners(owned, dispatch).view(batch, n_active_experts, -1).sum(1)


@dataclass(frozen=True)
class ShardedExperts:
    """This rank's share of the experts (``Experts``): each batch's assignments travel to their experts' owners."""

    shard: ExpertShard

    @property
    def n_local_experts(self) -> int:
        return self.shard.n_local_experts

    def candidates(
        self, centered: Tensor, routing: Routing, W_enc: Tensor, b_enc: Tensor, omega: Tensor | None
    ) -> tuple[Tensor, "ShardedRoute"]:
        dispatch = plan_dispatch(routing.experts, self.shard)
        return remote_candidates(centered, dispatch, W_enc, b_enc, omega), ShardedRoute(routing, dispatch)


@dataclass(frozen=True, eq=False)
class ShardedRoute:
    """How one batch's assignments reached their owners: a decode sends the activations the same way."""

    routing: Routing
    dispatch: Dispatch

    def decode(self, code: SparseCode, W_dec: Tensor, decoder_row_norms: Tensor | None) -> Tensor:
        return remote_decode(code, self.routing, self.dispatch, W_dec, decoder_row_norms)
