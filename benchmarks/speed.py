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
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm import tqdm

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.flops import SaeFlops, dense_routed_flops, flops_matched_topk_width, routed_flops, topk_flops
from sae_lens_scale.routing import expert_fractions, load_balance_loss, select_experts

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Shape:
    d_in: int
    d_sae: int
    k: int
    batch: int
    repeats: int
    device: str = "cpu"
    autocast: bool = False  # SAELens's bf16 autocast of the SAE's forward and backward


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
        balance = (
            cfg.load_balance_coefficient
            * cfg.d_in
            * load_balance_loss(routing.probs, expert_fractions(routing, cfg.n_experts))
        )
        return TrainStepOutput(sae_in, sae_out, acts, pre, mse + balance, {"mse_loss": mse, "balance": balance})


class Contender(NamedTuple):
    name: str
    make: Callable[[], TrainingSAE[Any]]
    flops: SaeFlops


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
    return [
        Contender(f"TopK {M} (width-matched)", topk(M), topk_flops(d, M, k)),
        Contender(f"TopK {matched} (FLOPs-matched to Scale 64/e=2)", topk(matched), topk_flops(d, matched, k)),
        Contender("Dense MoE 64/e=2 (authors' way)", scale(64, 2, DenseScaleTrainingSAE), dense_routed_flops(d, M, 64)),
        *[Contender(f"Switch {n}", switch(n), routed_flops(d, M, n, 1, k)) for n in (16, 32, 64)],
        *[Contender(f"Scale 64/e={e}", scale(64, e), routed_flops(d, M, 64, e, k)) for e in (2, 4, 8)],
    ]


def make_trainer(sae: TrainingSAE[Any], shape: Shape) -> SAETrainer[Any, Any]:
    """A trainer past its first step, so every timed step is a steady-state one (step 0 also sets the biases)."""
    cfg = SAETrainerConfig(
        total_training_samples=10**9,
        train_batch_size_samples=shape.batch,
        lr_end=3e-4,
        device=shape.device,
        autocast=shape.autocast,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    trainer.n_training_steps = 1
    return trainer


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up: allocator, Adam state, lazy inits
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_seconds(sae: TrainingSAE[Any], repeats: int, device: str = "cpu") -> float:
    """clip_grad_norm + Adam on the SAE's own parameters, with random gradients."""
    params = [p for p in sae.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-12)
    for param in params:
        param.grad = torch.randn_like(param)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    seconds = median_seconds(step, repeats, device)
    for param in params:
        param.grad = None
    return seconds


def inference_encode_seconds(sae: TrainingSAE[Any], batch: torch.Tensor, shape: Shape) -> float:
    """``encode`` of the exported inference SAE, SAELens's dense [batch, d_sae] contract, without grad."""
    exported = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    exported.load_state_dict(state)
    autocast = torch.autocast(shape.device, dtype=torch.bfloat16, enabled=shape.autocast)
    with torch.no_grad(), autocast:
        return median_seconds(lambda: exported.encode(batch), shape.repeats, shape.device)


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def step_memory(make: Callable[[], TrainingSAE[Any]], shape: Shape) -> dict[str, float]:
    """Resting memory with params + grads + Adam state, then the peak over two steps (CPU: call in a fresh process,
    since the peak RSS covers the whole process)."""
    torch.manual_seed(0)
    sae = make()
    trainer = make_trainer(sae, shape)
    batch = torch.randn(shape.batch, shape.d_in, device=shape.device)
    for param in sae.parameters():
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()  # zero gradients: allocates Adam state, leaves the weights as they are
    if shape.device == "cuda":
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        resting = proc_status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    for _ in range(2):
        trainer.step(batch)
    if shape.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = proc_status_mb("VmHWM")
    return {"resting_mb": resting, "peak_mb": peak, "step_mb": peak - resting}


def measure_memory(name: str, shape: Shape, quick: bool) -> dict[str, float]:
    if shape.device == "cuda":
        return step_memory(next(c for c in contenders(shape) if c.name == name).make, shape)
    command = [sys.executable, __file__, "--memory-probe", name] + (["--quick"] if quick else [])
    command += ["--autocast"] if shape.autocast else []
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def time_contender(contender: Contender, batch: torch.Tensor, shape: Shape, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    sae = contender.make()
    trainer = make_trainer(sae, shape)
    step = median_seconds(lambda: trainer.step(batch), shape.repeats, shape.device)
    floor = floor_seconds(sae, shape.repeats, shape.device)
    encode = inference_encode_seconds(sae, batch, shape)
    return {
        "name": contender.name,
        "params": sum(p.numel() for p in sae.parameters()),
        "step_ms": 1000 * step,
        "train_tokens_per_s": shape.batch / step,
        "floor_ms": 1000 * floor,
        "step_over_floor": step / floor,
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
    topk = rows[0]
    for row in rows:
        row["train_speedup_vs_topk"] = row["train_tokens_per_s"] / topk["train_tokens_per_s"]
        row["encode_speedup_vs_topk"] = row["encode_tokens_per_s"] / topk["encode_tokens_per_s"]
        row["peak_vs_topk"] = row["peak_mb"] / topk["peak_mb"]
    return {"shape": asdict(shape), "device": shape.device, "machine": machine(shape.device), "rows": rows}


def machine(device: str) -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    where = result["machine"]["gpu"] or f"CPU, {result['machine']['cpu_threads']} threads"
    precision = "bf16 autocast" if shape["autocast"] else "float32"
    lines = [
        f"# Training-step speed ({where}, {precision}, torch {result['machine']['torch']})",
        "",
        f"d_in={shape['d_in']}, d_sae={shape['d_sae']}, k={shape['k']}, batch {shape['batch']} tokens, median of "
        f"{shape['repeats']} steps after a warm-up. Step = SAELens `SAETrainer.step` (forward, firing stats, backward, "
        "clip, Adam). Floor = clip + Adam alone on the same parameters. Peak/step memory: RSS in a fresh process "
        "(CPU) or the CUDA allocator's peak.",
        "",
        "| SAE | ms/step | train tok/s | vs TopK | step / floor | encode tok/s | encode vs TopK "
        "| peak MB | step MB | enc. GFLOP/tok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['name']} | {row['step_ms']:.0f} | {row['train_tokens_per_s']:.0f} "
            f"| {row['train_speedup_vs_topk']:.1f}x | {row['step_over_floor']:.2f} | {row['encode_tokens_per_s']:.0f} "
            f"| {row['encode_speedup_vs_topk']:.1f}x | {row['peak_mb']:.0f} | {row['step_mb']:.0f} "
            f"| {row['encoder_flops_per_token'] / 1e9:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small shape: {QUICK}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--autocast", action="store_true", help="train in SAELens's bf16 autocast")
    parser.add_argument("--memory-probe", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = replace(QUICK if args.quick else FULL, device=args.device, autocast=args.autocast)
    if args.memory_probe:
        print(json.dumps(step_memory(next(c for c in contenders(shape) if c.name == args.memory_probe).make, shape)))
        return
    result = benchmark(shape, args.quick)
    stem = f"speed-{args.device}" + ("-quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
