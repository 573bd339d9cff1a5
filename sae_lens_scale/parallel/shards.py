"""Building an expert-parallel SAE, and keeping its gradients those of one device.

Each rank holds its experts' ``W_enc`` columns, ``b_enc`` entries, ``W_dec`` rows and omega entries, and so their Adam
state; the router, ``b_router`` and ``b_dec`` are replicated.
"""

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from sae_lens_scale.parallel.experts import ExpertShard, ShardedExperts, local_shard
from sae_lens_scale.parallel.process_group import ReplicaParts
from sae_lens_scale.routed_sae import RoutedTrainingSAE, RoutedTrainingSAEConfig, init_router
from sae_lens_scale.validation import ConfigError

# The tensors that hold experts, and the dimension along which each one is split into expert blocks.
SHARDED_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "omega": 0}


def expert_parallel_sae(cfg: TrainingSAEConfig) -> RoutedTrainingSAE[Any]:
    """A routed training SAE that holds only this rank's experts (torchrun's process group), built without ever
    holding the others'.

    It is built on the meta device, then given this rank's tensors: its experts' decoder rows (``init_expert_shard``),
    the encoder as their transpose like SAELens's, rank 0's router, and zeros for every other tensor, as a fresh SAE
    starts them. The initial SAE does not depend on the number of ranks, but it is not the one a single process
    draws after the same ``torch.manual_seed``: each expert has its own generator.
    """
    if not isinstance(cfg, RoutedTrainingSAEConfig):
        raise ConfigError(
            f"expert_parallel=True splits the experts of a routed SAE ('scale' or 'switch'), and the SAE config is a "
            f"{type(cfg).__name__} ({cfg.architecture()!r}): use ScaleTrainingSAEConfig or SwitchTrainingSAEConfig, "
            "or train without expert_parallel."
        )
    shard = local_shard(cfg.n_experts)
    sae_class, _ = get_sae_training_class(cfg.architecture())
    sae = sae_class(replace(cfg, device="meta"))
    if not isinstance(sae, RoutedTrainingSAE):
        raise TypeError(
            f"SAELens registers {type(sae).__name__} for {cfg.architecture()!r}: not a routed training SAE."
        )
    device = torch.device(cfg.device)
    sae.cfg, sae.device = cfg, device
    W_dec = init_expert_shard(shard, cfg.d_sae // cfg.n_experts, cfg.d_in, cfg.decoder_init_norm, sae.dtype, device)
    router = init_router(cfg.d_in, cfg.n_experts, sae.dtype, device)
    dist.broadcast(router, src=0, group=shard.group)  # one router for all ranks
    drawn = {"W_dec": W_dec, "W_enc": W_dec.T.contiguous(), "W_router": router}
    for name, meta in [*sae.named_parameters(), *sae.named_buffers()]:
        shape = list(meta.shape)
        if name in SHARDED_DIMS:
            shape[SHARDED_DIMS[name]] //= shard.world_size
        value = drawn[name] if name in drawn else torch.zeros(shape, dtype=meta.dtype, device=device)
        setattr(sae, name, nn.Parameter(value) if isinstance(meta, nn.Parameter) else value)
    sae.experts = ShardedExperts(shard)
    sae.batch_parts = ReplicaParts(shard.group)
    GradientSync(sae.named_parameters(), shard)
    return sae


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


class GradientSync:
    """After each backward: every rank's gradients as one device's, then clipped to norm 1 as one device would.

    Each rank's loss is a mean over its own tokens, so one device's loss over all of them is the mean of the ranks'
    losses: the replicated parameters' gradients are averaged over the ranks, and the experts' gradients (which
    already hold every rank's contribution, brought back by the exchanges) are divided by the number of ranks. SAELens's
    trainer then clips each rank's parameters alone, which would clip by the wrong norm; so the global clip happens
    here, and when ``backward()`` returns the gradients are already clipped (on one process they are clipped only
    later, by the trainer). The trainer's clip then finds a norm within 1 and changes nothing. It registers itself on
    the parameters' post-accumulate-grad hooks.
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
