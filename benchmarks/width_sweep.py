"""How training cost grows with the number of latents: SAELens TopK against Switch and Scale e=2, 24,576 to 262,144
latents (up to 1,048,576 with ``--max-width`` on a GPU), side by side in one process.

For each width, every SAE takes SAELens's own ``SAETrainer.step`` (forward, firing statistics, backward, clip, Adam)
on the same batch; the routed SAEs keep their experts near 384 latents wide (``expert_width``). TopK's step grows with
the width; a routed SAE's encoder and decode do not, so its step should stay nearly flat apart from the optimizer,
which touches every parameter (the "floor": clip + Adam alone on the same parameters). TopK is timed over fewer steps
where a step takes minutes. Memory is the peak over two steps, as in ``speed.py``.

    python benchmarks/width_sweep.py                          # CPU: 24,576 to 262,144 latents
    python benchmarks/width_sweep.py --device cuda --autocast --max-width 1048576
"""

import argparse
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tqdm import tqdm

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig, SwitchTrainingSAE, SwitchTrainingSAEConfig
from sae_lens_scale.optimizers import OPTIMIZERS

from common import (
    Shape,
    floor_seconds,
    in_fresh_process,
    machine,
    make_trainer,
    median_seconds,
    result_file,
    step_memory,
    write_results,
)

D_IN, K = 768, 32
BATCH = {"cpu": 1024, "cuda": 4096}  # on the CPU, TopK's dense [batch, d_sae] tensors must fit in 24 GiB at 262,144
WIDTHS = (24_576, 65_536, 131_072, 262_144, 524_288, 1_048_576)
ARCHITECTURES = ("TopK", "Switch", "Scale e=2")
SHIPPED = "TopK (SAELens's Adam)"  # with another optimizer, SAELens's TopK as shipped is measured too
SLOW_STEP_SECONDS = 20.0  # past this, a contender is timed over one step after its warm-up


def expert_width(d_sae: int) -> int:
    """384 where it divides the width, else the power of two nearest 384 from above (512)."""
    return 384 if d_sae % 384 == 0 else 512


def architectures(shape: Shape) -> tuple[str, ...]:
    return ARCHITECTURES if shape.optimizer == "adam" else (SHIPPED, *ARCHITECTURES)


def row_shape(architecture: str, shape: Shape) -> Shape:
    return replace(shape, optimizer="adam") if architecture == SHIPPED else shape


def maker(architecture: str, d_sae: int, shape: Shape) -> Callable[[], TrainingSAE[Any]]:
    n_experts = d_sae // expert_width(d_sae)
    sizes: dict[str, Any] = {"d_in": D_IN, "d_sae": d_sae, "k": K, "device": shape.device}
    if architecture in ("TopK", SHIPPED):
        return lambda: TopKTrainingSAE(TopKTrainingSAEConfig(**sizes))
    if architecture == "Switch":
        return lambda: SwitchTrainingSAE(SwitchTrainingSAEConfig(n_experts=n_experts, **sizes))
    return lambda: ScaleTrainingSAE(ScaleTrainingSAEConfig(n_experts=n_experts, n_active_experts=2, **sizes))


def timed_steps(make: Callable[[], TrainingSAE[Any]], shape: Shape) -> tuple[float, int, float]:
    """Median step seconds, how many steps were timed, and the floor's seconds (the SAE is freed on return)."""
    torch.manual_seed(0)
    sae = make()
    trainer = make_trainer(sae, shape)
    batch = torch.randn(shape.batch, D_IN, device=shape.device)
    first = median_seconds(lambda: trainer.step(batch), 1, shape.device)
    repeats = 1 if first > SLOW_STEP_SECONDS else shape.repeats
    step = first if repeats == 1 else median_seconds(lambda: trainer.step(batch), repeats, shape.device)
    return step, repeats, floor_seconds(sae, shape.repeats, shape.device, shape.optimizer)


def measure(architecture: str, d_sae: int, shape: Shape) -> dict[str, Any]:
    own = row_shape(architecture, shape)
    step, repeats, floor = timed_steps(maker(architecture, d_sae, own), own)
    memory = memory_in_fresh_process(architecture, d_sae, shape)
    return {
        "architecture": architecture,
        "optimizer": own.optimizer,
        "d_sae": d_sae,
        "n_experts": None if architecture in ("TopK", SHIPPED) else d_sae // expert_width(d_sae),
        "timed_steps": repeats,
        "step_ms": 1000 * step,
        "train_tokens_per_s": shape.batch / step,
        "floor_ms": 1000 * floor,
        "step_over_floor": step / floor,
        "optimizer_share": floor / step,
        **memory,
    }


def memory_in_fresh_process(architecture: str, d_sae: int, shape: Shape) -> dict[str, Any]:
    if shape.device == "cuda":
        torch.cuda.empty_cache()
        return step_memory(maker(architecture, d_sae, shape), row_shape(architecture, shape))
    flags = ["--optimizer", shape.optimizer] + (["--autocast"] if shape.autocast else [])
    try:
        return in_fresh_process(__file__, "--memory-probe", architecture, str(d_sae), *flags)
    except subprocess.CalledProcessError as error:  # killed for memory, say: that is a result too
        return {"memory_probe_failed": f"exit code {error.returncode}: {error.stderr.strip()[-200:]}"}


def sweep(shape: Shape, widths: list[int]) -> dict[str, Any]:
    rows = []
    for d_sae in tqdm(widths, desc="widths"):
        for architecture in architectures(shape):
            try:
                rows.append(measure(architecture, d_sae, shape))
            except torch.OutOfMemoryError as error:  # where TopK does not fit, that is the result
                rows.append({"architecture": architecture, "d_sae": d_sae, "out_of_memory": str(error)[:200]})
                torch.cuda.empty_cache()
    shipped = SHIPPED if shape.optimizer != "adam" else "TopK"
    for row in rows:
        topk = next(r for r in rows if r["architecture"] == shipped and r["d_sae"] == row["d_sae"])
        same = next(r for r in rows if r["architecture"] == "TopK" and r["d_sae"] == row["d_sae"])
        if "step_ms" in row and "step_ms" in topk:
            row["speedup_vs_topk"] = topk["step_ms"] / row["step_ms"]
        if "step_ms" in row and "step_ms" in same:
            row["speedup_vs_topk_same_optimizer"] = same["step_ms"] / row["step_ms"]
        if "peak_mb" in row and "peak_mb" in topk:
            row["peak_vs_topk"] = row["peak_mb"] / topk["peak_mb"]
    return {
        "shape": {
            "d_in": D_IN,
            "k": K,
            "batch": shape.batch,
            "device": shape.device,
            "autocast": shape.autocast,
            "optimizer": shape.optimizer,
        },
        "machine": machine(shape.device),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    where = result["machine"]["gpu"] or f"CPU, {result['machine']['cpu_threads']} threads"
    lines = [
        f"# Training step against width ({where}, {'bf16 autocast' if shape['autocast'] else 'float32'}, "
        f"{shape.get('optimizer', 'adam')})",
        "",
        f"d_in {shape['d_in']}, k {shape['k']}, batch {shape['batch']} tokens; SAELens `SAETrainer.step`. Routed SAEs "
        "keep experts 384 latents wide (512 where 384 does not divide the width); Scale routes each token to 2. "
        "Floor = clip + the optimizer alone on the same parameters; its share of the step is floor / step. vs TopK: "
        "against SAELens's TopK as shipped; same opt.: against TopK with the run's optimizer. Peak: RSS of a fresh "
        "process (CPU) or the CUDA allocator's peak, over two steps.",
        "",
        "| d_sae | SAE | optimizer | experts | ms/step | tok/s | vs TopK | vs TopK, same opt. | step / floor "
        "| optimizer share | peak MB | vs TopK peak |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "out_of_memory" in row:
            lines.append(f"| {row['d_sae']} | {row['architecture']} | | | out of memory | | | | | | | |")
            continue
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else "probe failed"
        versus_peak = f"{row['peak_vs_topk']:.2f}" if "peak_vs_topk" in row else ""
        lines.append(
            f"| {row['d_sae']} | {row['architecture']} | {row.get('optimizer', 'adam')} | {row['n_experts'] or ''} "
            f"| {row['step_ms']:.0f} | {row['train_tokens_per_s']:.0f} "
            f"| {row.get('speedup_vs_topk', float('nan')):.1f}x "
            f"| {row.get('speedup_vs_topk_same_optimizer', float('nan')):.1f}x "
            f"| {row['step_over_floor']:.2f} | {row['floor_ms'] / row['step_ms']:.0%} | {peak} | {versus_peak} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    speed_axes, memory_axes = figure.subplots(1, 2)
    colours = {"TopK": "tab:gray", SHIPPED: "black", "Switch": "tab:orange", "Scale e=2": "tab:blue"}
    present = [a for a in (SHIPPED, *ARCHITECTURES) if any(r["architecture"] == a for r in result["rows"])]
    for architecture in present:
        rows = [r for r in result["rows"] if r["architecture"] == architecture and "step_ms" in r]
        widths = [r["d_sae"] for r in rows]
        speed_axes.plot(widths, [r["train_tokens_per_s"] for r in rows], "o-", color=colours[architecture])
        measured = [r for r in rows if "peak_mb" in r]
        peaks = [r["peak_mb"] for r in measured]
        memory_axes.plot([r["d_sae"] for r in measured], peaks, "o-", color=colours[architecture], label=architecture)
        if architecture == "Scale e=2":
            floor = [result["shape"]["batch"] / (r["floor_ms"] / 1000) for r in rows]
            speed_axes.plot(widths, floor, ":", color="black", linewidth=0.8, label="optimizer floor (Scale's params)")
    for axes in (speed_axes, memory_axes):
        axes.set(xscale="log", yscale="log", xlabel="latents (d_sae)")
    speed_axes.set(ylabel="training tokens / s", title="Speed")
    memory_axes.set(ylabel="peak memory, MB", title="Memory")
    memory_axes.legend(fontsize=8)
    speed_axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--autocast", action="store_true", help="train in SAELens's bf16 autocast")
    parser.add_argument("--max-width", type=int, default=262_144, help="the widest SAE to measure")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="what every SAE trains with")
    parser.add_argument("--memory-probe", nargs=2, metavar=("ARCHITECTURE", "D_SAE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = BATCH[args.device]
    shape = Shape(
        d_in=D_IN,
        d_sae=0,
        k=K,
        batch=batch,
        repeats=3,
        device=args.device,
        autocast=args.autocast,
        optimizer=args.optimizer,
    )
    if args.memory_probe:
        architecture, d_sae = args.memory_probe
        print(json.dumps(step_memory(maker(architecture, int(d_sae), shape), row_shape(architecture, shape))))
        return
    result = sweep(shape, [width for width in WIDTHS if width <= args.max_width])
    stem = f"width-sweep-{args.device}" + ("" if args.optimizer == "adam" else f"-{args.optimizer}")
    write_results(stem, result, markdown(result))
    plot(result, result_file(f"{stem}.png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
