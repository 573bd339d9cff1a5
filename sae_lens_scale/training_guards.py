"""What a routed training step checks beside its math: the batch's centre for the first-batch biases, the non-finite
guard, and the router-collapse monitor.

A training batch may be one of several parts (``BatchParts``): the statistics a step's losses need, the biases it
sets and the guard's diagnosis then span every part, and an error names the part at fault.
"""

import warnings
from collections.abc import Iterable
from typing import Literal, Protocol

import torch
from torch import Tensor

BiasInit = Literal["geometric_median", "mean", "none"]


class BatchParts(Protocol):
    """The parts one training batch is split over, and the two collectives the step needs across them."""

    def sum(self, values: Tensor) -> Tensor:
        """``values`` added up over the parts; may sum into ``values`` itself and return it."""
        ...

    def concat(self, rows: Tensor) -> Tensor:
        """Every part's ``rows``, concatenated in part order."""
        ...

    def owner(self, part: int) -> str:
        """Whose rows part ``part`` holds, in possessive form for messages, such as "the batch's"."""
        ...


class WholeBatch:
    """A batch that is all there is: both collectives are the identity."""

    def sum(self, values: Tensor) -> Tensor:
        return values

    def concat(self, rows: Tensor) -> Tensor:
        return rows

    def owner(self, part: int) -> str:
        return "the batch's"


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


def batch_centre(sae_in: Tensor, bias_init: Literal["geometric_median", "mean"]) -> Tensor:
    """The centre of a batch ``[..., d_in]`` in float64, where squared distances of float32 activations cannot
    overflow; not finite when the batch is not."""
    points = sae_in.detach().reshape(-1, sae_in.shape[-1]).double()
    return geometric_median(points) if bias_init == "geometric_median" else points.mean(0)


@torch.no_grad()
def non_finite_step_error(
    step: int,
    sae_in: Tensor,
    losses: dict[str, Tensor],
    parameters: Iterable[tuple[str, Tensor]],
    parts: BatchParts,
) -> FloatingPointError:
    """Name the step, the part of the batch at fault and the culprit: bad input activations (the usual case) or an
    overflow inside the SAE. A collective over the parts: every part calls it, since the step's statistics told each
    one that some part failed.
    """
    finite_rows = torch.isfinite(sae_in).flatten(1).all(dim=1)
    loss_finite = torch.isfinite(torch.stack(list(losses.values()))).all()
    bad_weights = [name for name, param in parameters if not torch.isfinite(param).all()]
    own = [
        sae_in.isnan().sum(),
        sae_in.isinf().sum(),
        (~finite_rows).sum(),
        ~loss_finite,
        sae_in.abs().max(),
        sae_in.new_tensor(len(bad_weights)),
    ]
    report = parts.concat(torch.stack([value.double() for value in own]).view(1, -1)).tolist()
    n_rows = sae_in.shape[0]
    header = f"Training step {step} (0-based trainer.n_training_steps)"
    untouched = (
        "The step was not applied: weights and optimizer state are as before it (except b_dec and b_router when a "
        "first step set them from its batch's centre: that stays)."
    )
    bad_inputs = [
        f"{int(n_nan)} NaN and {int(n_inf)} inf values, in {int(bad_rows)} of {parts.owner(part)} {n_rows} rows"
        for part, (n_nan, n_inf, bad_rows, *_) in enumerate(report)
        if n_nan or n_inf
    ]
    if bad_inputs:
        return FloatingPointError(
            f"{header}: the input activations contain {'; '.join(bad_inputs)}. {untouched} They come from the model "
            "or the activation cache, not the SAE: check the hooked model's dtype (float16 overflows; try a float32 "
            "model or autocast_lm=False) and the cached activations. Resuming from a checkpoint replays the same batch."
        )
    values = ", ".join(f"{name}={float(value):.4g}" for name, value in losses.items())
    if len(report) > 1:
        values += "; not finite for " + ", ".join(parts.owner(part) for part, row in enumerate(report) if row[3])
        values += " rows"
    weights = f"non-finite parameters: {bad_weights}" if bad_weights else "all parameters are finite"
    holders = [parts.owner(part) for part, row in enumerate(report) if row[5]]
    if len(report) > 1 and holders:
        weights = f"non-finite parameters in {', '.join(holders)} share (here: {bad_weights or 'none'})"
    largest = max(row[4] for row in report)
    return FloatingPointError(
        f"{header}: the loss is not finite ({values}) although the input activations are finite "
        f"(largest |x| = {largest:.4g}; {weights}). {untouched} If |x| is that large, its squared error overflows "
        f"{sae_in.dtype}: set normalize_activations='expected_average_only_in'. If parameters are non-finite, resume "
        "from an earlier checkpoint with a lower lr."
    )


class CollapseMonitor:
    """Counts consecutive steps where one expert takes more than ``fraction`` of the tokens, and warns once.

    One batch can be lopsided by chance; a streak of ``window`` steps means the load balancing lost and the other
    experts' latents are starving. The streak is plain state, not saved: a resumed run starts a new one.
    """

    def __init__(self, n_experts: int, n_active_experts: int, fraction: float, window: int, coefficient: float):
        self.balanced_share = n_active_experts / n_experts
        self.fraction, self.window, self.coefficient = fraction, window, coefficient
        self.streak = 0
        self.warned = False

    @property
    def checked(self) -> bool:
        """Whether collapse can be told apart: a balanced router already gives each expert this share."""
        return self.balanced_share < self.fraction

    def update(self, max_expert_token_share: float) -> None:
        if not self.checked:
            return
        self.streak = self.streak + 1 if max_expert_token_share > self.fraction else 0
        if self.streak >= self.window and not self.warned:
            self.warned = True
            warnings.warn(
                f"Router collapse: for {self.streak} consecutive training steps one expert took more than "
                f"router_collapse_fraction={self.fraction} of the tokens (last step: {max_expert_token_share:.1%}; "
                f"balanced is {self.balanced_share:.1%}). The other experts' latents are starving. Raise "
                f"load_balance_coefficient (now {self.coefficient}) or lower the learning rate; watch "
                "metrics/routing/max_expert_token_share.",
                RuntimeWarning,
                stacklevel=3,  # the caller of training_forward_pass
            )

    def metrics(self) -> dict[str, float]:
        return {
            "routing/collapse_streak": float(self.streak),
            "routing/collapse_warning": float(self.streak >= self.window),
        }
