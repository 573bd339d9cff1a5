"""Adam that steps only the rows of a parameter that have a gradient, for SAEs whose step touches few latents.

In a routed SAE's step only the latents some token selected (top-k or AuxK) get a gradient in ``W_dec``, ``b_enc``
and, without Feature Scaling, ``W_enc``: at wide dictionaries a small share of the rows. Dense Adam still reads and
writes every row and both moments, and autograd zero-fills the rest of each gradient. Here the SAE's backward leaves
those parameters' gradients as row lists (``RowGradient``, through ``gather_rows``) and the optimizer updates only
rows whose gradient is nonzero.

The step, for a row-sparse parameter: each row is an Adam of its own, stepped on the steps where it has a nonzero
gradient and with its own step count for the bias corrections. A row without a gradient keeps its weights and both
moments exactly. Plain Adam would instead decay that row's moments and move it by its momentum
``lr * m_hat / (sqrt(v_hat) + eps)``, and would count every step in the bias corrections. Every other parameter takes
exactly torch's Adam step (its fused implementation). Before the update every gradient, row lists included, is
clipped to global norm ``MAX_GRAD_NORM`` by the formula of torch's ``clip_grad_norm_``, as SAELens's trainer clips.
"""

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm
from torch.optim import Optimizer
from torch.optim.adam import adam

from sae_lens_scale.training_guards import BatchParts

MAX_GRAD_NORM = 1.0  # SAELens's trainer clips with clip_grad_norm_(parameters, 1.0)


class RowGradient(NamedTuple):
    """The gradient of some rows of a parameter along its row dimension."""

    rows: Tensor  # [n] int64 row ids, sorted and unique once merged
    values: Tensor  # [n, *rest] the rows' gradients, row dimension first


class RowGradients:
    """Where a backward pass leaves gradients for ``RowSparseAdam`` until its step takes them: row lists from
    ``gather_rows`` and, through a post-accumulate-grad hook, the dense gradient of each of ``dense_params``, taken
    off the parameter so that nothing is left on ``.grad`` for another clip to see."""

    def __init__(self, dense_params: Iterable[Tensor]) -> None:
        self.rows: dict[Tensor, list[RowGradient]] = {}
        self.dense: dict[Tensor, Tensor] = {}
        for param in dense_params:
            param.register_post_accumulate_grad_hook(self.add_dense)

    def add_rows(self, param: Tensor, gradient: RowGradient) -> None:
        self.rows.setdefault(param, []).append(gradient)

    def add_dense(self, param: Tensor) -> None:
        if param.grad is not None:
            self.dense[param] = param.grad
            param.grad = None

    def take_rows(self, param: Tensor) -> RowGradient | None:
        """The parameter's row gradients of this backward, merged: each row once, its parts summed."""
        parts = self.rows.pop(param, [])
        if len(parts) < 2:
            return parts[0] if parts else None
        rows, inverse = torch.unique(torch.cat([part.rows for part in parts]), return_inverse=True)
        values = torch.cat([part.values for part in parts])
        merged = values.new_zeros(rows.shape[0], *values.shape[1:]).index_add_(0, inverse, values)
        return RowGradient(rows, merged)

    def clear(self) -> None:
        self.rows.clear()
        self.dense.clear()


class _GatherRows(torch.autograd.Function):
    """``weight``'s rows ``rows`` along ``dim``, row dimension first; the backward hands their gradient to ``sink``
    instead of building the zero-filled gradient of the whole parameter."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: Tensor, dim: int, sink: RowGradients) -> Tensor:
        ctx.weight, ctx.rows, ctx.sink = weight, rows, sink
        if dim == 0:
            return weight.index_select(0, rows)
        # Columns: a gather reads each row of the weight in order, where index_select would stride across them.
        return weight.gather(1, rows.expand(weight.shape[0], -1)).t().contiguous()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[None, None, None, None]:
        (grad,) = grad_outputs
        ctx.sink.add_rows(ctx.weight, RowGradient(ctx.rows, grad))
        return None, None, None, None


def gather_rows(weight: Tensor, rows: Tensor, dim: int, sink: RowGradients) -> Tensor:
    """``weight.index_select(dim, rows)`` with its row dimension first, differentiable into ``sink``; ``dim`` is 0,
    or 1 for the columns of a matrix."""
    return _GatherRows.apply(weight, rows, dim, sink)


class RowSparseAdam(Optimizer):
    """Adam over an SAE's parameters, row-sparse for those in ``row_dims`` (module docstring).

    ``row_dims`` maps a parameter to the dimension its rows run along (1 for the columns of ``W_enc``); those
    parameters' gradients arrive as row lists in ``gradients``, every other parameter's as a dense gradient there
    (``RowGradients``). ``parts``: when the batch is one of several parts, each gradient is the mean over the parts,
    a row list over the union of the parts' rows, so every part takes the step one process would take with the
    whole batch.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        row_dims: dict[Tensor, int],
        gradients: RowGradients,
        parts: BatchParts,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.row_dims, self.gradients, self.parts = row_dims, gradients, parts

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.gradients.clear()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        params = [param for group in self.param_groups for param in group["params"]]
        for param in self.row_dims:
            if param.grad is not None:
                raise RuntimeError(
                    f"A row-sparse parameter of shape {tuple(param.shape)} has a dense gradient: the SAE's training "
                    "pass did not leave its row gradients (RoutedTrainingSAE.decode_selection with row_gradients "
                    "set), so RowSparseAdam would skip it. Train this SAE with optimizer='adam_fused'."
                )
        n_parts = self.parts.concat(torch.ones(1, device=params[0].device)).numel()
        dense = self._mean_dense_gradients([param for param in params if param not in self.row_dims], n_parts)
        row_gradients = {param: self._mean_row_gradient(param, n_parts) for param in params if param in self.row_dims}
        rows = {param: gradient for param, gradient in row_gradients.items() if gradient is not None}
        grads = [*dense.values(), *(gradient.values for gradient in rows.values())]
        if not grads:
            return
        total_norm = get_total_norm(grads)
        clip = (MAX_GRAD_NORM / (total_norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(clip.to(grad.device))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            stepped = [param for param in group["params"] if param in dense]
            states = [self._state(param, dense=True) for param in stepped]
            adam(
                stepped,
                [dense[param] for param in stepped],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                [state["step"] for state in states],
                fused=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=0.0,
                eps=group["eps"],
                maximize=False,
            )
            for param in group["params"]:
                gradient = rows.get(param)
                if gradient is not None:
                    self._step_rows(param, gradient, group["lr"], beta1, beta2, group["eps"])
        self.gradients.clear()

    def _state(self, param: Tensor, dense: bool) -> dict[str, Tensor]:
        """The parameter's moments and its step count. A row-sparse parameter's moments are stored rows first (for
        ``W_enc``, transposed), so a row's moments are contiguous, and its rows count their own steps. Adam's state (a
        resumed run, or SAELens's trainer's) gives every row the parameter's count: under Adam every row stepped every
        step."""
        state = self.state[param]
        dim = self.row_dims.get(param, 0)
        if not state:
            shape = param.movedim(dim, 0).shape
            state["exp_avg"], state["exp_avg_sq"] = param.new_zeros(shape), param.new_zeros(shape)
            state["step"] = torch.zeros(())
            if not dense:
                state["row_steps"] = torch.zeros(shape[0], dtype=torch.int64, device=param.device)
        state["step"] = state["step"].to(param.device, torch.float32)
        if not dense and "row_steps" not in state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].movedim(dim, 0).contiguous()
            count = int(state["step"].item())
            state["row_steps"] = torch.full((param.shape[dim],), count, dtype=torch.int64, device=param.device)
        return state

    def _step_rows(
        self, param: Tensor, gradient: RowGradient, lr: float, beta1: float, beta2: float, eps: float
    ) -> None:
        """Adam on the rows with a nonzero gradient, each with its own step count: torch's Adam update
        ``lr * m_hat / (sqrt(v_hat) + eps)``, computed in the gradient's own memory and added to the rows in place."""
        state = self._state(param, dense=False)
        state["step"] += 1
        rows, grad = gradient
        nonzero = grad.reshape(rows.numel(), -1).ne(0).any(1)
        if not bool(nonzero.all()):
            rows, grad = rows[nonzero], grad[nonzero]
        if rows.numel() == 0:
            return
        steps = state["row_steps"].index_select(0, rows) + 1
        state["row_steps"].index_copy_(0, rows, steps)
        shape = (-1,) + (1,) * (grad.dim() - 1)
        bias_correction1 = (1 - beta1 ** steps.double()).to(grad.dtype).view(shape)
        bias_correction2_sqrt = (1 - beta2 ** steps.double()).sqrt().to(grad.dtype).view(shape)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        update = torch.sqrt(exp_avg_sq, out=grad).div_(bias_correction2_sqrt).add_(eps).mul_(bias_correction1)
        torch.div(exp_avg, update, out=update).mul_(-lr)
        if self.row_dims[param] == 0:
            param.index_add_(0, rows, update)
        else:  # columns, added along each row of the matrix in order
            param.scatter_add_(1, rows.expand(param.shape[0], -1), update.t().contiguous())

    def _mean_dense_gradients(self, params: list[Tensor], n_parts: int) -> dict[Tensor, Tensor]:
        """This step's dense gradients, averaged over the batch's parts; a parameter no part gave one is skipped,
        as torch's Adam skips a parameter without a gradient."""
        taken = {param: self.gradients.dense.pop(param, None) for param in params}
        if n_parts == 1:
            return {param: grad for param, grad in taken.items() if grad is not None}
        grads = [grad if grad is not None else torch.zeros_like(param) for param, grad in taken.items()]
        given = torch.tensor([grad is not None for grad in taken.values()], dtype=grads[0].dtype)
        flat = self.parts.sum(torch.cat([given.to(grads[0].device), *(grad.flatten() for grad in grads)]))
        given, *summed = flat.split([len(grads), *(grad.numel() for grad in grads)])
        return {
            param: (total / n_parts).view_as(param)
            for param, total, any_part in zip(taken, summed, given.tolist(), strict=True)
            if any_part > 0
        }

    def _mean_row_gradient(self, param: Tensor, n_parts: int) -> RowGradient | None:
        """The parameter's row gradient averaged over the batch's parts, over the union of their rows."""
        local = self.gradients.take_rows(param)
        if n_parts == 1:
            return local
        row_shape = list(param.movedim(self.row_dims[param], 0).shape[1:])
        if local is None:
            empty = torch.zeros(0, dtype=torch.int64, device=param.device)
            local = RowGradient(empty, param.new_zeros(0, *row_shape))
        counts = self.parts.concat(torch.tensor([local.rows.numel()], device=param.device))
        padded = torch.full((int(counts.max()),), -1, dtype=torch.int64, device=param.device)
        padded[: local.rows.numel()] = local.rows
        every = self.parts.concat(padded)
        union = torch.unique(every[every >= 0])
        values = param.new_zeros(union.numel(), *row_shape)
        values.index_copy_(0, torch.searchsorted(union, local.rows), local.values)
        values = self.parts.sum(values) / n_parts
        return RowGradient(union, values) if union.numel() else None
