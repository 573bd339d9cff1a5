"""Builders the test modules share: SAEs moved off their init, and a short SAELens run on the tiny offline model."""

from pathlib import Path
from typing import Any, TypeVar

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.sae import TrainStepInput
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformer_lens import HookedTransformer

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from tests.support.models import CONTEXT, D_MODEL

aten = torch.ops.aten

TINY_HOOK = "blocks.1.hook_resid_pre"
T_MODULE = TypeVar("T_MODULE", bound=torch.nn.Module)


def perturbed(sae: T_MODULE, seed: int = 0, scale: float = 0.2) -> T_MODULE:
    """Move every parameter (biases, router, omega included) off its init, as training would, so each term of the
    math matters in a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * noise.to(parameter.device, parameter.dtype))
    return sae


def step_input(x: torch.Tensor, dead: torch.Tensor | None, step: int = 1, logging: bool = False) -> TrainStepInput:
    """A training step's input; step 1 by default, so the first-step bias initialisation stays out of the way."""
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=logging
    )


def scale_training_sae(seed: int = 0, **fields: Any) -> ScaleTrainingSAE:
    """A perturbed float64 Scale SAE: d_in 16, 64 latents in 8 experts, e = 2, k = 6, unless ``fields`` say else."""
    torch.manual_seed(seed)
    defaults: dict[str, Any] = {"d_in": 16, "d_sae": 64, "n_experts": 8, "n_active_experts": 2, "k": 6}
    cfg = ScaleTrainingSAEConfig(**{"dtype": "float64", **defaults, **fields})
    return perturbed(ScaleTrainingSAE(cfg), seed)


def switch_training_sae(seed: int = 0, **fields: Any) -> SwitchTrainingSAE:
    """A perturbed float64 Switch SAE: d_in 16, 64 latents in 8 experts, k = 4, unless ``fields`` say else."""
    torch.manual_seed(seed)
    defaults: dict[str, Any] = {"d_in": 16, "d_sae": 64, "n_experts": 8, "k": 4}
    return perturbed(SwitchTrainingSAE(SwitchTrainingSAEConfig(**{"dtype": "float64", **defaults, **fields})), seed)


def tiny_sae_config(architecture: str, **fields: Any) -> ScaleTrainingSAEConfig | SwitchTrainingSAEConfig:
    """The SAE config of the tiny-model runs: d_in = the tiny model's width, 128 latents, k = 8."""
    shape = {"d_in": D_MODEL, "d_sae": 128, "k": 8}
    if architecture == "scale":
        return ScaleTrainingSAEConfig(**{"n_experts": 8, "n_active_experts": 2, **shape, **fields})
    return SwitchTrainingSAEConfig(**{"n_experts": 4, **shape, **fields})


def tiny_runner_config(sae_cfg: Any, output: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """A short SAELens run on the tiny model's TINY_HOOK, offline (the dataset and model are passed to the runner)."""
    settings: dict[str, Any] = {
        "sae": sae_cfg,
        "model_name": "tiny",
        "hook_name": TINY_HOOK,
        "dataset_path": "in-memory",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "prepend_bos": False,
        "sequence_separator_token": None,
        "training_tokens": 60 * 256,
        "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 32,
        "n_batches_in_buffer": 32,
        "lr": 3e-3,
        "device": "cpu",
        "seed": 0,
        "checkpoint_path": str(output / "checkpoints"),
        "output_path": str(output / "final"),
        "logger": LoggingConfig(log_to_wandb=False),
        "verbose": False,
    }
    return LanguageModelSAERunnerConfig(**(settings | overrides))


def make_runner(cfg: LanguageModelSAERunnerConfig[Any], model: HookedTransformer, dataset: Any) -> Any:
    torch.manual_seed(0)  # SAELens does not seed the SAE's initialisation from cfg.seed
    return LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


def tiny_activations(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """``[n_tokens, D_MODEL]`` activations at TINY_HOOK."""
    _, cache = model.run_with_cache(tokens, names_filter=TINY_HOOK)
    return cache[TINY_HOOK].reshape(-1, D_MODEL)


def reconstruction_mse(sae: Any, acts: torch.Tensor) -> float:
    """Per-token sum of squared error, averaged over tokens."""
    with torch.no_grad():
        return (sae(acts).float() - acts).pow(2).sum(-1).mean().item()


def dense_reference(sae: ScaleTrainingSAE, x: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """The routed SAE's outputs and losses computed the plain way: EVERY expert for every token, the unrouted ones
    masked, the global top-k, a dense decode (as the authors' code does). The fast paths are checked against it."""
    cfg = sae.cfg
    m = cfg.d_sae // cfg.n_experts
    W_enc = sae.W_enc
    if cfg.feature_scaling == "mean":
        blocks = []
        for i in range(cfg.n_experts):
            W_i = W_enc[:, i * m : (i + 1) * m]
            mean_i = W_i.mean(dim=1, keepdim=True)
            blocks.append(mean_i + (1 + sae.omega[i]) * (W_i - mean_i))
        W_enc = torch.cat(blocks, dim=1)
    probs = torch.softmax((x - sae.b_router) @ sae.W_router, dim=-1)
    top_experts = probs.topk(cfg.n_active_experts, dim=-1).indices
    expert_of_latent = torch.arange(cfg.d_sae, device=x.device) // m
    routed = (expert_of_latent[None, :, None] == top_experts[:, None, :]).any(-1)
    pre = (x - sae.b_dec) @ W_enc + sae.b_enc
    values, latents = torch.where(routed, pre, -torch.inf).topk(cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, latents, values.relu())
    acts = probs[:, expert_of_latent] * z
    W_dec_unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    x_hat = acts @ W_dec_unit + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()

    counts = torch.stack([(top_experts == i).sum() for i in range(cfg.n_experts)]).to(x.dtype)
    fractions = counts / top_experts.numel()
    balance = cfg.n_experts * (fractions * probs.mean(0)).sum()

    k_aux = min(cfg.d_in // 2, int(dead.sum()))
    aux_values, aux_latents = torch.where(routed & dead, pre, -torch.inf).topk(k_aux, dim=-1)
    aux_acts = probs[:, expert_of_latent] * torch.zeros_like(pre).scatter(1, aux_latents, aux_values.relu())
    aux = (aux_acts @ W_dec_unit - (x - x_hat).detach()).pow(2).sum(-1).mean()
    aux_loss = cfg.aux_loss_coefficient * min(int(dead.sum()) / (cfg.d_in // 2), 1.0) * aux

    loss = mse + cfg.load_balance_coefficient * cfg.d_in * balance + aux_loss
    return {"x_hat": x_hat, "acts": acts, "loss": loss, "mse": mse, "balance": balance, "aux": aux_loss}


class StepAudit(TorchDispatchMode):
    """Every op a training step dispatches: reads of a value on the host, ops whose output shape depends on values
    (both stall a GPU until the device catches up), and the largest dense tensor any op produced."""

    DATA_DEPENDENT = (aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive)

    def __init__(self) -> None:
        super().__init__()
        self.host_reads: list[str] = []
        self.data_dependent: list[str] = []
        self.largest: tuple[int, str] = (0, "")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            self.host_reads.append(str(func))
        boolean_index = packet is aten.index and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1]
        )
        if packet in self.DATA_DEPENDENT or boolean_index:
            self.data_dependent.append(str(func))
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.largest = max(self.largest, (tensor.numel(), f"{func} -> {tuple(tensor.shape)}"))
        return out
