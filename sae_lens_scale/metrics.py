"""The papers' analysis metrics, as tensor functions (their plots are in ``sae_lens_scale.tools.plots``).

- Feature redundancy: how many latents have a near-copy elsewhere in the decoder (Scale paper's headline claim is
  that Feature Scaling and multi-expert routing lower it).
- Expert specialisation: the same statistic inside each expert's block against random blocks of the same size; a
  specialised expert holds related directions, so its intra-expert redundancy is higher than chance.
- Activation similarity (Scale paper, Appendix A.3): how much two tokens' sets of active latents overlap.
- Expert usage: how evenly the router spreads tokens, and omega, the per-expert Feature Scaling factor.

Every function takes a SAELens ``SAE`` (any architecture with ``W_dec``; the expert metrics also need
``cfg.n_experts``), runs under ``torch.no_grad`` on the SAE's device, and returns a frozen dataclass whose
``to_dict()`` is ready for ``json.dump``.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE
from torch import Tensor

from sae_lens_scale.routed_sae import RoutedSAE
from sae_lens_scale.routing import expert_counts, normalized_entropy

DEFAULT_CHUNK_SIZE = 2048  # a 2048 x 2048 float32 similarity tile is 16 MiB: large GEMMs, bounded memory
DEFAULT_BATCH_SIZE = 4096
DEFAULT_THRESHOLDS = (0.7, 0.8, 0.9)


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields: tensors become lists; per-latent tensors (``metadata={"json": False}``) are left out,
        because a report should not carry d_sae numbers per SAE."""
        return {
            item.name: _jsonable(getattr(self, item.name)) for item in fields(self) if item.metadata.get("json", True)
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


@dataclass(frozen=True, eq=False)  # tensor fields have no boolean ==
class FeatureRedundancy(_Result):
    """Decoder redundancy of a whole dictionary.

    Attributes:
        n_latents: d_sae.
        fraction_above: threshold -> fraction of latents whose max cosine to another latent is strictly above it.
        mean_max_cosine: mean over latents of that max cosine.
        max_cosine: ``[d_sae]`` per-latent max cosine (float, CPU), for histograms; not in ``to_dict()``.
    """

    n_latents: int
    fraction_above: dict[float, float]
    mean_max_cosine: float
    max_cosine: Tensor = field(repr=False, metadata={"json": False})


@dataclass(frozen=True, eq=False)  # tensor fields have no boolean ==
class ExpertRedundancy(_Result):
    """Max cosine to the nearest other latent of the same expert (intra) vs of the same random block (inter).

    Attributes:
        threshold: the cosine the ``*_fraction_above`` fields count latents above (strictly).
        n_random: how many random partitions of the latents into blocks of the expert width the inter values average.
        intra_mean_max_cosine, intra_fraction_above: over all latents, neighbours restricted to their own expert.
        inter_mean_max_cosine, inter_fraction_above: over all latents and partitions, neighbours restricted to the
            latent's random block.
        per_expert_mean_max_cosine, per_expert_fraction_above: ``[n_experts]`` intra values per expert.
    """

    threshold: float
    n_random: int
    intra_mean_max_cosine: float
    intra_fraction_above: float
    inter_mean_max_cosine: float
    inter_fraction_above: float
    per_expert_mean_max_cosine: Tensor
    per_expert_fraction_above: Tensor


@dataclass(frozen=True)
class ActivationSimilarity(_Result):
    """Scale paper A.3: mean over ordered token pairs i != j of ``|S_i & S_j| / k``.

    Attributes:
        similarity: the statistic; 1 when every token uses the same k latents, 0 when no two tokens share one.
        n_tokens: N.
        k: the normaliser used.
        mean_l0: mean number of active latents per token actually observed.
    """

    similarity: float
    n_tokens: int
    k: float
    mean_l0: float


@dataclass(frozen=True, eq=False)  # tensor fields have no boolean ==
class ExpertUsage(_Result):
    """How the router spreads tokens over experts, counting every one of a token's ``n_active_experts`` slots.

    Attributes:
        n_tokens: tokens encoded.
        n_active_experts: slots per token; ``counts`` sums to ``n_tokens * n_active_experts``.
        counts: ``[n_experts]`` tokens routed to each expert (int64).
        fractions: ``[n_experts]`` share of all routing assignments per expert; sums to 1.
        normalized_entropy: entropy of ``fractions`` over log(n_experts): 1 is perfectly balanced, 0 is one expert.
        cdf: ``[n_experts]`` cumulative share of assignments taken by the 1, 2, ... most used experts.
        dead_fraction: fraction of experts that received no token.
    """

    n_tokens: int
    n_active_experts: int
    counts: Tensor
    fractions: Tensor
    normalized_entropy: float
    cdf: Tensor
    dead_fraction: float


@torch.no_grad()
def max_cosine_to_others(vectors: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """For each row of ``vectors [n, d]``, the max cosine similarity to any OTHER row: ``[n]``.

    Exact and memory-bounded: the n x n similarity matrix is visited in ``chunk_size``-square tiles of its upper
    triangle only (it is symmetric), each tile updating the row maxima of its rows and the column maxima of its
    columns, so the work is half a full Gram matrix and memory is one tile. The diagonal is masked exactly (never by
    a "cos < 1" test), so exact duplicate rows count with cosine 1. A zero row has cosine 0 to everything.
    """
    _require_positive_int("chunk_size", chunk_size)
    n_rows = vectors.shape[0]
    if n_rows < 2:
        raise ValueError(f"The max cosine to other latents needs at least 2 latents, got {n_rows}.")
    unit = F.normalize(vectors.detach().to(torch.promote_types(vectors.dtype, torch.float32)), dim=1)
    unit_t = unit.T.contiguous()  # one copy up front, so no chunk's GEMM reads a transposed operand
    best = unit.new_full((n_rows,), -torch.inf)
    for row_start in range(0, n_rows, chunk_size):
        rows = slice(row_start, min(row_start + chunk_size, n_rows))
        for col_start in range(row_start, n_rows, chunk_size):
            cols = slice(col_start, min(col_start + chunk_size, n_rows))
            sims = unit[rows] @ unit_t[:, cols]
            if col_start == row_start:
                sims.fill_diagonal_(-torch.inf)
            torch.maximum(best[rows], sims.amax(dim=1), out=best[rows])
            torch.maximum(best[cols], sims.amax(dim=0), out=best[cols])
    return best


@torch.no_grad()
def feature_redundancy(
    sae: SAE[Any], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> FeatureRedundancy:
    """Fraction of latents whose decoder row has cosine above each threshold to some other latent's row.

    Cosines are signed: a latent pointing opposite to another is not a copy of it. Decoder row norms do not matter.
    """
    max_cosine = max_cosine_to_others(_decoder(sae), chunk_size).cpu()
    return FeatureRedundancy(
        n_latents=max_cosine.numel(),
        fraction_above={threshold: _fraction_above(max_cosine, threshold) for threshold in thresholds},
        mean_max_cosine=max_cosine.double().mean().item(),
        max_cosine=max_cosine,
    )


@torch.no_grad()
def expert_redundancy(
    sae: SAE[Any],
    threshold: float = 0.9,
    n_random: int = 5,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ExpertRedundancy:
    """Max cosine to the nearest latent of the same expert, against the same statistic inside random blocks.

    A block of m latents has fewer candidate neighbours than the whole dictionary, so its max cosine is lower for
    reasons that have nothing to do with specialisation; random blocks of the same size give the chance level to
    compare with. Intra above inter means experts group related directions.
    """
    n_experts = _routed(sae, "expert_redundancy").cfg.n_experts
    _require_positive_int("n_random", n_random)
    W_dec = _decoder(sae)
    d_sae = W_dec.shape[0]
    width = d_sae // n_experts
    if width < 2:
        raise ValueError(
            f"expert_redundancy needs at least 2 latents per expert to find a neighbour, but d_sae={d_sae} / "
            f"n_experts={n_experts} gives {width}; it is undefined for this SAE."
        )
    intra = _block_max_cosine(W_dec, torch.arange(d_sae).view(n_experts, width), chunk_size)
    generator = torch.Generator().manual_seed(seed)
    inter = torch.stack(
        [
            _block_max_cosine(W_dec, torch.randperm(d_sae, generator=generator).view(n_experts, width), chunk_size)
            for _ in range(n_random)
        ]
    )
    return ExpertRedundancy(
        threshold=threshold,
        n_random=n_random,
        intra_mean_max_cosine=intra.double().mean().item(),
        intra_fraction_above=_fraction_above(intra, threshold),
        inter_mean_max_cosine=inter.double().mean().item(),
        inter_fraction_above=_fraction_above(inter, threshold),
        per_expert_mean_max_cosine=intra.double().mean(dim=1),
        per_expert_fraction_above=(intra > threshold).double().mean(dim=1),
    )


def _block_max_cosine(W_dec: Tensor, blocks: Tensor, chunk_size: int) -> Tensor:
    """``[n_blocks, width]``: each latent's max cosine to the other latents of its block (rows of ``blocks``)."""
    blocks = blocks.to(W_dec.device)
    return torch.stack([max_cosine_to_others(W_dec[block], chunk_size) for block in blocks]).cpu()


@torch.no_grad()
def activation_similarity(
    sae_or_acts: SAE[Any] | Tensor,
    activations: Tensor | None = None,
    k: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ActivationSimilarity:
    """Scale paper A.3: the mean over ordered token pairs i != j of ``|S_i & S_j| / k``, S = the active latents.

    Pass an SAE and its input activations ``[..., d_in]`` (encoded in batches), or precomputed feature activations
    ``[..., d_sae]`` alone. ``k`` defaults to the SAE's ``cfg.k``, else to the observed mean L0.

    No pair loop: a latent used by c tokens is shared by c(c - 1) ordered pairs, so summing c(c - 1) over latents
    gives the sum over pairs of ``|S_i & S_j|`` from one count per latent.
    """
    if isinstance(sae_or_acts, Tensor):
        if activations is not None:
            raise ValueError(
                "activation_similarity got feature activations AND input activations; pass either "
                "(sae, activations [n_tokens, d_in]) or the feature activations [n_tokens, d_sae] alone."
            )
        feature_acts = sae_or_acts.reshape(-1, sae_or_acts.shape[-1])
        counts = (feature_acts != 0).sum(dim=0).cpu()
        n_tokens = feature_acts.shape[0]
    else:
        if activations is None:
            raise ValueError(
                "activation_similarity(sae, activations) needs the SAE's input activations [n_tokens, d_in] to "
                "encode; pass them, or pass precomputed feature activations [n_tokens, d_sae] instead of the SAE."
            )
        inputs = _flat_inputs(sae_or_acts, activations)
        counts = _firing_counts(sae_or_acts, inputs, batch_size)
        n_tokens = inputs.shape[0]
        if k is None:
            k = getattr(sae_or_acts.cfg, "k", None)
    if n_tokens < 2:
        raise ValueError(
            f"activation_similarity averages over token pairs and needs at least 2 tokens, got {n_tokens}."
        )
    mean_l0 = counts.sum().item() / n_tokens
    k = float(mean_l0 if k is None else k)
    if k <= 0:
        raise ValueError(f"activation_similarity needs k > 0, got k={k} (is no latent active on any token?).")
    counts = counts.to(torch.int64)
    shared = (counts * (counts - 1)).sum().item()
    return ActivationSimilarity(
        similarity=shared / (n_tokens * (n_tokens - 1) * k),
        n_tokens=n_tokens,
        k=k,
        mean_l0=mean_l0,
    )


def _firing_counts(sae: SAE[Any], inputs: Tensor, batch_size: int) -> Tensor:
    """``[d_sae]`` int64: on how many tokens each latent is active (non-zero).

    Routed SAEs count their k (latent, activation) pairs directly, which never builds a [batch, d_sae] tensor.
    """
    _require_positive_int("batch_size", batch_size)
    device = sae.W_dec.device
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
    for batch in inputs.split(batch_size):
        batch = batch.to(device)
        if isinstance(sae, RoutedSAE):
            code = sae.encode_routed(batch).code
            counts += torch.bincount(code.latents[code.acts != 0], minlength=sae.cfg.d_sae)
        else:
            counts += (sae.encode(batch) != 0).sum(dim=0)
    return counts.cpu()


@torch.no_grad()
def expert_usage(sae: SAE[Any], activations: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> ExpertUsage:
    """Tokens per expert over ``activations [..., d_in]``, their shares, the normalised entropy, the CDF over experts
    sorted by usage and the fraction of dead experts (the Switch paper's balance diagnostics)."""
    routed = _routed(sae, "expert_usage")
    n_experts = routed.cfg.n_experts
    _require_positive_int("batch_size", batch_size)
    inputs = _flat_inputs(sae, activations)
    if inputs.shape[0] == 0:
        raise ValueError("expert_usage got no tokens; pass activations [n_tokens, d_in] with n_tokens >= 1.")
    device = sae.W_dec.device
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    for batch in inputs.split(batch_size):
        counts += expert_counts(routed.encode_routed(batch.to(device)).routing.experts, n_experts)
    counts = counts.cpu()
    fractions = counts.double() / counts.sum()
    return ExpertUsage(
        n_tokens=inputs.shape[0],
        n_active_experts=routed.cfg.n_active_experts,
        counts=counts,
        fractions=fractions,
        normalized_entropy=normalized_entropy(fractions).item(),
        cdf=fractions.sort(descending=True).values.cumsum(dim=0),
        dead_fraction=(counts == 0).double().mean().item(),
    )


def omega_per_expert(sae: SAE[Any]) -> Tensor:
    """The trained Feature Scaling factor of each expert, ``[n_experts]`` (float, CPU).

    The paper reports omega converging to positive values, larger for more active experts.
    """
    omega = _routed(sae, "omega_per_expert").feature_scaling_omega()
    if omega is not None:
        return omega.detach().float().cpu()
    if isinstance(sae, TrainingSAE):
        raise ValueError(
            f"{type(sae).__name__} trains no omega: only a Scale SAE with feature_scaling='mean' (its default) does."
        )
    raise ValueError(
        f"{type(sae).__name__} is an inference SAE: export folds omega into W_enc, so it cannot be read back. "
        "Load the training checkpoint instead, e.g. sae_lens TrainingSAE.load_from_disk(checkpoint_dir)."
    )


def _fraction_above(values: Tensor, threshold: float) -> float:
    return (values > threshold).sum().item() / values.numel()


def _decoder(sae: SAE[Any]) -> Tensor:
    W_dec = getattr(sae, "W_dec", None)
    if not isinstance(W_dec, Tensor) or W_dec.ndim != 2:
        raise ValueError(
            f"{type(sae).__name__} has no 2-D decoder W_dec [d_sae, d_in]; the redundancy metrics compare decoder "
            "rows, so pass a SAELens SAE with a linear decoder."
        )
    return W_dec


def _routed(sae: SAE[Any], metric: str) -> RoutedSAE[Any]:
    if not isinstance(sae, RoutedSAE):
        raise ValueError(
            f"{metric} needs a routed SAE with cfg.n_experts, but {type(sae).__name__} "
            f"(architecture {sae.cfg.architecture()!r}) has no experts. Use a 'scale' or 'switch' SAE from "
            "sae_lens_scale; for a dense SAE use feature_redundancy or activation_similarity."
        )
    return sae


def _flat_inputs(sae: SAE[Any], activations: Tensor) -> Tensor:
    if activations.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"activations have last dim {activations.shape[-1]} but the SAE's d_in is {sae.cfg.d_in}; pass the "
            "hooked model activations the SAE was trained on, shape [n_tokens, d_in]."
        )
    return activations.reshape(-1, sae.cfg.d_in)


def _require_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
