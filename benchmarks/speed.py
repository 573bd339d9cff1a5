"""Training-step speed and memory of routed SAEs against SAELens TopK, side by side in one process.

A "step" is SAELens's own ``SAETrainer.step``: forward, the trainer's firing statistics, backward,
clip_grad_norm(1.0), Adam and the schedulers. Every contender steps on the same random batch. The floor is
clip_grad_norm + Adam alone on the same parameters: no architecture can step faster inside SAELens's trainer.

Peak memory: ``resting`` is the memory once parameters, gradients and Adam state exist, ``peak`` the highest over
two steps, so ``peak - resting`` is what the step itself needs. On the CPU it is the RSS of a fresh child process per
contender (CPU torch has no allocator statistics); on CUDA the allocator's own counters.

    python benchmarks/speed.py            # d_in=768, d_sae=24576, k=32, batch 4096
    python benchmarks/speed.py --quick    # a small shape
    python benchmarks/speed.py --device cuda --autocast   # on a GPU, in bf16 autocast
"""

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tqdm import tqdm

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.flops import SaeFlops, dense_routed_flops, flops_matched_topk_width, routed_flops, topk_flops
from sae_lens_scale.optimizers import OPTIMIZERS, OptimizerName
from sae_lens_scale.routing import expert_counts, load_balance_loss, select_experts

from common import (
    DENSE_FALLBACK,
    Shape,
    floor_seconds,
    in_fresh_process,
    machine,
    make_trainer,
    median_seconds,
    step_memory,
    write_results,
)

FULL = Shape(d_in=768, d_sae=24576, k=32, batch=4096, repeats=3)
QUICK = Shape(d_in=256, d_sae=8192, k=32, batch=1024, repeats=3)


class DenseScaleTrainingSAE(ScaleTrainingSAE):
    """The authors' way: every expert computed for every token, masked to the routed ones, decoded densely."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in, cfg = step_input.sae_in, self.cfg
        routing = select_experts(torch.softmax((sae_in - self.b_router) @ self.W_router, -1), cfg.n_active_experts)
        expert_of_latent = torch.arange(cfg.d_sae, device=sae_in.device) // (cfg.d_sae // cfg.n_experts)
        routed = torch.zeros_like(routing.probs, dtype=torch.bool).scatter(1, routing.experts, True)
        pre = (sae_in - self.b_dec) @ self.effective_W_enc() + self.b_enc
        values, latents = pre.masked_fill(~routed[:, expert_of_latent], -torch.inf).topk(cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(1, latents, values.relu()) * routing.probs[:, expert_of_latent]
        sae_out = acts @ self.effective_W_dec() + self.b_dec
        mse = (sae_out - sae_in).pow(2).sum(-1).mean()
        counts = expert_counts(routing.experts, cfg.n_experts)
        balance = cfg.load_balance_coefficient * cfg.d_in * load_balance_loss(routing.probs, counts / counts.sum())
        return TrainStepOutput(sae_in, sae_out, acts, pre, mse + balance, {"mse_loss": mse, "balance": balance})


class Contender(NamedTuple):
    name: str
    make: Callable[[], TrainingSAE[Any]]
    flops: SaeFlops
    optimizer: OptimizerName | None = None  # None: the run's optimizer


def contender_shape(contender: Contender, shape: Shape) -> Shape:
    return replace(shape, optimizer=contender.optimizer or shape.optimizer)


def contenders(shape: Shape) -> list[Contender]:
    d, M, k = shape.d_in, shape.d_sae, shape.k

    device = shape.device

    def topk(width: int) -> Callable[[], TrainingSAE[Any]]:
        return lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, device=device))

    def scale(n: int, e: int, cls: type = ScaleTrainingSAE) -> Callable[[], TrainingSAE[Any]]:
        config = ScaleTrainingSAEConfig(d_in=d, d_sae=M, n_experts=n, n_active_experts=e, k=k, device=device)
        return lambda: cls(config)

    def switch(n: int) -> Callable[[], TrainingSAE[Any]]:
        return lambda: SwitchTrainingSAE(SwitchTrainingSAEConfig(d_in=d, d_sae=M, n_experts=n, k=k, device=device))

    matched = flops_matched_topk_width(M, 64, 2)
    # With another optimizer, SAELens's TopK as shipped comes first: every speed-up is also against it.
    shipped = [Contender(f"TopK {M} (SAELens's Adam)", topk(M), topk_flops(d, M, k), "adam")]
    # The row-sparse step needs a routed training pass: the dense SAEs take the fastest exact Adam instead.
    dense = DENSE_FALLBACK.get(shape.optimizer)
    return [
        *(shipped if shape.optimizer != "adam" else []),
        Contender(f"TopK {M} (width-matched)", topk(M), topk_flops(d, M, k), dense),
        Contender(f"TopK {matched} (FLOPs-matched to Scale 64/e=2)", topk(matched), topk_flops(d, matched, k), dense),
        Contender(
            "Dense MoE 64/e=2 (authors' way)", scale(64, 2, DenseScaleTrainingSAE), dense_routed_flops(d, M, 64), dense
        ),
        *[Contender(f"Switch {n}", switch(n), routed_flops(d, M, n, 1, k)) for n in (16, 32, 64)],
        *[Contender(f"Scale 64/e={e}", scale(64, e), routed_flops(d, M, 64, e, k)) for e in (2, 4, 8)],
    ]


def inference_encode_seconds(sae: TrainingSAE[Any], batch: torch.Tensor, shape: Shape) -> float:
    """``encode`` of the exported inference SAE, SAELens's dense [batch, d_sae] contract, without grad."""
    exported = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    exported.load_state_dict(state)
    autocast = torch.autocast(shape.device, dtype=torch.bfloat16, enabled=shape.autocast)
    with torch.no_grad(), autocast:
        return median_seconds(lambda: exported.encode(batch), shape.repeats, shape.device)


def measure_memory(name: str, shape: Shape, quick: bool) -> dict[str, float]:
    if shape.device == "cuda":
        contender = next(c for c in contenders(shape) if c.name == name)
        return step_memory(contender.make, contender_shape(contender, shape))
    flags = ["--optimizer", shape.optimizer] + (["--quick"] if quick else [])
    flags += ["--autocast"] if shape.autocast else []
    return in_fresh_process(__file__, "--memory-probe", name, *flags)


def time_contender(contender: Contender, batch: torch.Tensor, shape: Shape, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    sae = contender.make()
    own = contender_shape(contender, shape)
    trainer = make_trainer(sae, own)
    step = median_seconds(lambda: trainer.step(batch), shape.repeats, shape.device)
    floor = floor_seconds(trainer, batch, shape.repeats, shape.device)
    encode = inference_encode_seconds(sae, batch, shape)
    return {
        "name": contender.name,
        "optimizer": own.optimizer,
        "params": sum(p.numel() for p in sae.parameters()),
        "step_ms": 1000 * step,
        "train_tokens_per_s": shape.batch / step,
        "floor_ms": 1000 * floor,
        "step_over_floor": step / floor,
        "optimizer_share": floor / step,
        "encode_ms": 1000 * encode,
        "encode_tokens_per_s": shape.batch / encode,
        "encoder_flops_per_token": contender.flops.encoder,
        "step_flops_per_token": contender.flops.training_step,
        **measure_memory(contender.name, shape, quick),
    }


def benchmark(shape: Shape, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    batch = torch.randn(shape.batch, shape.d_in, device=shape.device)
    rows = [time_contender(c, batch, shape, quick) for c in tqdm(contenders(shape), desc="contenders")]
    topk = rows[0]  # SAELens's TopK as shipped
    same_optimizer = next(row for row in rows if row["name"].endswith("(width-matched)"))
    for row in rows:
        row["train_speedup_vs_topk"] = row["train_tokens_per_s"] / topk["train_tokens_per_s"]
        row["train_speedup_vs_topk_same_optimizer"] = row["train_tokens_per_s"] / same_optimizer["train_tokens_per_s"]
        row["encode_speedup_vs_topk"] = row["encode_tokens_per_s"] / topk["encode_tokens_per_s"]
        row["peak_vs_topk"] = row["peak_mb"] / topk["peak_mb"]
    return {"shape": asdict(shape), "device": shape.device, "machine": machine(shape.device), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    where = result["machine"]["gpu"] or f"CPU, {result['machine']['cpu_threads']} threads"
    precision = "bf16 autocast" if shape["autocast"] else "float32"
    lines = [
        f"# Training-step speed ({where}, {precision}, {shape['optimizer']}, torch {result['machine']['torch']})",
        "",
        f"d_in={shape['d_in']}, d_sae={shape['d_sae']}, k={shape['k']}, batch {shape['batch']} tokens, median of "
        f"{shape['repeats']} steps after a warm-up. Step = SAELens `SAETrainer.step` (forward, firing stats, backward, "
        "clip, optimizer). Floor = clip + the optimizer alone on the same parameters; its share of the step is floor / "
        "step. vs TopK: against SAELens's TopK as shipped (the first row); same opt.: against the width-matched TopK "
        "with the row's optimizer. Peak/step memory: RSS in a fresh process (CPU) or the CUDA allocator's peak.",
        "",
        "| SAE | optimizer | ms/step | train tok/s | vs TopK | vs TopK, same opt. | step / floor | optimizer share "
        "| encode tok/s | encode vs TopK | peak MB | step MB | enc. GFLOP/tok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['name']} | {row['optimizer']} | {row['step_ms']:.0f} | {row['train_tokens_per_s']:.0f} "
            f"| {row['train_speedup_vs_topk']:.1f}x | {row['train_speedup_vs_topk_same_optimizer']:.1f}x "
            f"| {row['step_over_floor']:.2f} | {row['optimizer_share']:.0%} | {row['encode_tokens_per_s']:.0f} "
            f"| {row['encode_speedup_vs_topk']:.1f}x | {row['peak_mb']:.0f} | {row['step_mb']:.0f} "
            f"| {row['encoder_flops_per_token'] / 1e9:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small shape: {QUICK}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--autocast", action="store_true", help="train in SAELens's bf16 autocast")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="what every SAE trains with")
    parser.add_argument("--memory-probe", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = replace(QUICK if args.quick else FULL, device=args.device, autocast=args.autocast, optimizer=args.optimizer)
    if args.memory_probe:
        contender = next(c for c in contenders(shape) if c.name == args.memory_probe)
        print(json.dumps(step_memory(contender.make, contender_shape(contender, shape))))
        return
    result = benchmark(shape, args.quick)
    optimizer = "" if args.optimizer == "adam" else f"-{args.optimizer}"
    stem = f"speed-{args.device}{optimizer}" + ("-quick" if args.quick else "")
    write_results(stem, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
