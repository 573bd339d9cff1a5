"""Expert parallelism: each rank holds ``n_experts / world_size`` experts, and every token's routed assignments
travel to the ranks that own their experts.

A rank owns a contiguous range of experts: their ``W_enc`` columns, ``b_enc`` entries, ``W_dec`` rows and omega
entries, and so their Adam state. The router, ``b_router`` and ``b_dec`` are replicated. Each rank feeds its own
tokens, routes them with the replicated router and sends each (token, slot) assignment's centred input to the
expert's owner (``all_to_all_single``); the owner returns the expert's pre-activations, the token's rank takes the
global top-k and gates them exactly as on one device, sends each assignment's activations back to the owner, and
receives the owner's part of the reconstruction. The backward pass runs the same exchanges in reverse.

The math is the single-device math, term for term (tests/test_expert_parallel.py checks it to 1e-8 in float64); only
the decode differs in cost: an owner multiplies each assignment's m activations (mostly zeros) by the expert's
decoder block, where one device gathers k decoder rows per token.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from sae_lens_scale.routing import Routing, SparseCode, group_by_expert, routed_matmul, routed_preactivations
from sae_lens_scale.validation import ConfigError

# The parameters that hold experts, and the dimension along which each one is split into expert blocks.
SHARDED_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "omega": 0}


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
            "expert_parallel=True splits the experts over the ranks of a torch.distributed process group, and none "
            "is initialised: start the run with torchrun and train with sae_lens_scale.distributed's "
            "DistributedSAETrainingRunner (or call torch.distributed.init_process_group first). To open an "
            "expert-parallel checkpoint on one process, merge its ranks first: "
            "sae_lens_scale.expert_parallel.merge_checkpoint."
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if n_experts % world_size:
        raise ConfigError(
            f"expert_parallel=True: n_experts={n_experts} does not split evenly over the {world_size} ranks; set "
            f"n_experts to a multiple of {world_size} (d_sae must stay a multiple of n_experts), or start "
            "a number of ranks that divides it."
        )
    group = dist.group.WORLD
    assert group is not None  # initialised above
    return ExpertShard(group, rank, world_size, n_experts // world_size)


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


class GradientSync:
    """After each backward: every rank's gradients as one device's, then clipped to norm 1 as one device would.

    Each rank's loss is a mean over its own tokens, so one device's loss over all of them is the mean of the ranks'
    losses: the replicated parameters' gradients are averaged over the ranks, and the experts' gradients (which
    already hold every rank's contribution, brought back by the exchanges) are divided by the number of ranks. SAELens's
    trainer then clips each rank's parameters alone; the global clip here comes first, so that clip finds a norm
    already within 1 and changes nothing.
    """

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], shard: ExpertShard) -> None:
        self.shard = shard
        named = dict(parameters)
        self.sharded = [param for name, param in named.items() if name in SHARDED_DIMS]
        self.replicated = [param for name, param in named.items() if name not in SHARDED_DIMS]
        self.arrived: set[int] = set()
        for param in named.values():
            param.register_post_accumulate_grad_hook(self.on_gradient)

    def on_gradient(self, param: Tensor) -> None:
        self.arrived.add(id(param))
        if len(self.arrived) == len(self.sharded) + len(self.replicated):
            self.arrived.clear()
            self.synchronize()

    @torch.no_grad()
    def synchronize(self) -> None:
        grads = [param.grad for param in self.replicated if param.grad is not None]
        flat = torch.cat([grad.flatten() for grad in grads])
        dist.all_reduce(flat, group=self.shard.group)
        flat /= self.shard.world_size
        for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
            grad.copy_(averaged.view_as(grad))
        sharded = [param.grad for param in self.sharded if param.grad is not None]
        for grad in sharded:
            grad /= self.shard.world_size
        # The global norm: the experts' squared norms add up over the ranks, the replicated part counts once.
        squares = get_total_norm(sharded).pow(2)
        dist.all_reduce(squares, group=self.shard.group)
        total_norm = (squares + get_total_norm(grads).pow(2)).sqrt()
        clip_grads_with_norm_([*self.replicated, *self.sharded], max_norm=1.0, total_norm=total_norm)


def gathered_state_dict(state_dict: dict[str, Tensor], shard: ExpertShard) -> dict[str, Tensor] | None:
    """The whole SAE's state in rank 0's CPU memory, None on the other ranks (a collective: every rank calls it).

    The shards travel to rank 0 one at a time, so no device ever holds more than its own shard and one received
    shard: the gathered SAE may be wider than a device holds.
    """
    full: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        if name in SHARDED_DIMS:
            parts = [tensor.cpu()] if shard.rank == 0 else []
            for source in range(1, shard.world_size):
                if shard.rank == source:
                    dist.send(tensor, dst=0, group=shard.group)
                elif shard.rank == 0:
                    received = torch.empty_like(tensor)
                    dist.recv(received, src=source, group=shard.group)
                    parts.append(received.cpu())
            tensor = torch.cat(parts, dim=SHARDED_DIMS[name]) if parts else tensor
        if shard.rank == 0:
            full[name] = tensor.cpu()
    return full if shard.rank == 0 else None


def merge_checkpoint(rank_0_checkpoint: Path | str, output: Path | str) -> Path:
    """The whole training SAE of an expert-parallel checkpoint, merged from its per-rank folders for one process.

    ``rank_0_checkpoint`` is ``<checkpoint_path>/<run id>/rank-0/<checkpoint>``; every ``rank-<r>`` folder beside it
    holds that rank's experts under the same name. ``output`` gets the SAE's weights and config (with
    ``expert_parallel`` off), which ``TrainingSAE.load_from_disk`` and ``sae_lens_scale.hub.load_sae`` open. The
    optimizer and trainer state stay per rank, so a run resumes from the per-rank checkpoint, not from the merge; the
    weights are in the training parametrisation (omega and unit-norm decoder rows not folded), and a mid-run
    checkpoint's activation scale stays in its ``activation_scaler.json``. The final folder of a run needs no
    merging: the runner gathers it.
    """
    rank_0 = Path(rank_0_checkpoint)
    rank_folders = [folder / rank_0.name for folder in rank_0.parent.parent.glob("rank-*")]
    ranked = sorted(
        (int(folder.parent.name.removeprefix("rank-")), folder) for folder in rank_folders if folder.is_dir()
    )
    if [rank for rank, _ in ranked] != list(range(len(ranked))) or rank_0.parent.name != "rank-0":
        raise FileNotFoundError(
            f"{rank_0} is not rank 0's checkpoint of a complete expert-parallel run: found the ranks "
            f"{[rank for rank, _ in ranked]} beside it, and the checkpoint must be <run>/rank-0/<name> with "
            "rank-0 ... rank-<N-1> folders holding <name>."
        )
    shards = [load_file(folder / SAE_WEIGHTS_FILENAME) for _, folder in ranked]
    merged = {
        name: torch.cat([shard[name] for shard in shards], dim=SHARDED_DIMS[name]) if name in SHARDED_DIMS else tensor
        for name, tensor in shards[0].items()
    }
    config = json.loads((rank_0 / SAE_CFG_FILENAME).read_text()) | {"expert_parallel": False}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / SAE_WEIGHTS_FILENAME)
    (out / SAE_CFG_FILENAME).write_text(json.dumps(config))
    return out


def init_expert_shard(
    shard: ExpertShard, expert_width: int, d_in: int, norm: float | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """This rank's decoder rows ``[n_local_experts * expert_width, d_in]``, as SAELens initialises a decoder
    (Kaiming-uniform, then scaled to ``norm``), each expert drawn from its own generator.

    The generators are seeded from one number drawn on rank 0 plus the expert's global index, so every expert
    starts different and the initial SAE does not depend on how many ranks share it.
    """
    rows = torch.empty(shard.n_local_experts * expert_width, d_in, dtype=dtype, device=device)
    if device.type == "meta":
        return rows
    base_seed = torch.randint(2**62, (1,), device=device)
    dist.broadcast(base_seed, src=0, group=shard.group)
    seed = int(base_seed.item())
    for local, block in enumerate(rows.split(expert_width)):
        expert = shard.rank * shard.n_local_experts + local
        nn.init.kaiming_uniform_(block, generator=torch.Generator(device).manual_seed(seed + expert))
    if norm is not None:
        rows *= norm / rows.norm(dim=-1, keepdim=True)
    return rows
