"""FLOP accounting per token, and the widths that make a dense TopK SAE cost the same as a routed one.

Counts multiply-adds as 2 FLOPs and only the matrix products, which dominate: elementwise work, the top-k and
the softmax are O(width) per token against O(d_in * width) for the products.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SaeFlops:
    """Forward FLOPs per token of one SAE; a training step costs about three times the forward."""

    encoder: int
    decoder: int

    @property
    def forward(self) -> int:
        return self.encoder + self.decoder

    @property
    def training_step(self) -> int:
        return 3 * self.forward


def routed_flops(d_in: int, d_sae: int, n_experts: int, n_active_experts: int, k: int) -> SaeFlops:
    """Router (d_in x n_experts), the routed experts' encoder blocks, and a sparse decode of k rows."""
    expert_width = d_sae // n_experts
    return SaeFlops(encoder=2 * d_in * (n_experts + n_active_experts * expert_width), decoder=2 * k * d_in)


def dense_routed_flops(d_in: int, d_sae: int, n_experts: int) -> SaeFlops:
    """The authors' implementations: every expert computed for every token and a dense decode."""
    return SaeFlops(encoder=2 * d_in * (n_experts + d_sae), decoder=2 * d_sae * d_in)


def topk_flops(d_in: int, d_sae: int, k: int, sparse_decode: bool = False) -> SaeFlops:
    """SAELens TopK: a dense encoder, and a dense decode unless ``use_sparse_activations`` is on."""
    return SaeFlops(encoder=2 * d_in * d_sae, decoder=2 * (k if sparse_decode else d_sae) * d_in)


def flops_matched_topk_width(d_sae: int, n_experts: int, n_active_experts: int) -> int:
    """TopK width with the same encoder FLOPs per token as a routed SAE: the router plus the routed experts."""
    return n_experts + n_active_experts * (d_sae // n_experts)
