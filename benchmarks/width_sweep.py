"""How training cost grows with the number of latents: SAELens TopK against Switch and Scale e=2, 24,576 to 262,144
latents (up to 1,048,576 with ``--max-width`` on a GPU), side by side in one process.

For each width, every SAE takes SAELens's own ``SAETrainer.step`` (forward, firing statistics, backward, clip, Adam)
on the same batch; the routed SAEs keep their experts near 384 latents wide (``expert_width``). TopK's step grows with
the width; a routed SAE's encoder and decode do not, so its step should stay nearly flat apart from the optimizer,
which touches every parameter (the "floor": clip + Adam alone on the same parameters). TopK is timed over fewer steps
where a step takes minutes. Memory is the peak over two steps, as in ``speed.py``.

Every SAE trains with each optimizer of ``--optimizers``, beside SAELens's TopK as shipped (its own Adam); TopK,
which has no row-sparse step, takes ``adam_fused`` in that one's place.

    python benchmarks/width_sweep.py                          # CPU: 24,576 to 262,144 latents
    python benchmarks/width_sweep.py --optimizers adam adam_fused adam_row_sparse --max-width 524288
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
from sae_lens_scale.optimizers import OPTIMIZERS, OptimizerName

from common import (
    DENSE_FALLBACK,
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
SLOW_STEP_SECONDS = 20.0  # past this, a contender is timed over one step after its warm-up


def expert_width(d_sae: int) -> int:
    """384 where it divides the width, else the power of two nearest 384 from above (512)."""
    return 384 if d_sae % 384 == 0 else 512


def contenders(optimizers: list[OptimizerName]) -> list[tuple[str, OptimizerName]]:
    """(architecture, optimizer) rows: SAELens's TopK as shipped first, then every SAE with each optimizer."""
    rows: list[tuple[str, OptimizerName]] = [("TopK", "adam")]
    for optimizer in optimizers:
        for architecture in ARCHITECTURES:
            own = DENSE_FALLBACK.get(optimizer, optimizer) if architecture == "TopK" else optimizer
            if (architecture, own) not in rows:
                rows.append((architecture, own))
    return rows


def maker(architecture: str, d_sae: int, shape: Shape) -> Callable[[], TrainingSAE[Any]]:
    n_experts = d_sae // expert_width(d_sae)
    sizes: dict[str, Any] = {"d_in": D_IN, "d_sae": d_sae, "k": K, "device": shape.device}
    if architecture == "TopK":
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
    return step, repeats, floor_seconds(trainer, batch, shape.repeats, shape.device)


def measure(architecture: str, d_sae: int, shape: Shape) -> dict[str, Any]:
    step, repeats, floor = timed_steps(maker(architecture, d_sae, shape), shape)
    memory = memory_in_fresh_process(architecture, d_sae, shape)
    return {
        "architecture": architecture,
        "optimizer": shape.optimizer,
        "d_sae": d_sae,
        "n_experts": None if architecture == "TopK" else d_sae // expert_width(d_sae),
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
        return step_memory(maker(architecture, d_sae, shape), shape)
    flags = ["--optimizers", shape.optimizer] + (["--autocast"] if shape.autocast else [])
    try:
        return in_fresh_process(__file__, "--memory-probe", architecture, str(d_sae), *flags)
    except subprocess.CalledProcessError as error:  # killed for memory, say: that is a result too
        return {"memory_probe_failed": f"exit code {error.returncode}: {error.stderr.strip()[-200:]}"}


def sweep(shape: Shape, widths: list[int], optimizers: list[OptimizerName], max_topk_width: int) -> dict[str, Any]:
    rows = []
    for d_sae in tqdm(widths, desc="widths"):
        for architecture, optimizer in contenders(optimizers):
            if architecture == "TopK" and d_sae > max_topk_width:
                rows.append(
                    {"architecture": architecture, "optimizer": optimizer, "d_sae": d_sae, "not_measured": True}
                )
                continue
            try:
                rows.append(measure(architecture, d_sae, replace(shape, optimizer=optimizer)))
            except torch.OutOfMemoryError as error:  # where TopK does not fit, that is the result
                rows.append({"architecture": architecture, "d_sae": d_sae, "out_of_memory": str(error)[:200]})
                torch.cuda.empty_cache()

    def topk_row(d_sae: int, optimizer: OptimizerName) -> dict[str, Any]:
        return next(
            r for r in rows if r["architecture"] == "TopK" and r.get("optimizer") == optimizer and r["d_sae"] == d_sae
        )

    for row in rows:
        shipped = topk_row(row["d_sae"], "adam")
        optimizer: OptimizerName = row.get("optimizer", "adam")
        same = topk_row(row["d_sae"], DENSE_FALLBACK.get(optimizer, optimizer))
        if "step_ms" in row and "step_ms" in shipped:
            row["speedup_vs_topk"] = shipped["step_ms"] / row["step_ms"]
        if "step_ms" in row and "step_ms" in same:
            row["speedup_vs_topk_same_optimizer"] = same["step_ms"] / row["step_ms"]
        if "peak_mb" in row and "peak_mb" in shipped:
            row["peak_vs_topk"] = row["peak_mb"] / shipped["peak_mb"]
    return {
        "shape": {
            "d_in": D_IN,
            "k": K,
            "batch": shape.batch,
            "device": shape.device,
            "autocast": shape.autocast,
            "optimizers": optimizers,
        },
        "machine": machine(shape.device),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    where = result["machine"]["gpu"] or f"CPU, {result['machine']['cpu_threads']} threads"
    lines = [
        f"# Training step against width ({where}, {'bf16 autocast' if shape['autocast'] else 'float32'}, "
        f"{', '.join(shape['optimizers'])})",
        "",
        f"d_in {shape['d_in']}, k {shape['k']}, batch {shape['batch']} tokens; SAELens `SAETrainer.step`. Routed SAEs "
        "keep experts 384 latents wide (512 where 384 does not divide the width); Scale routes each token to 2. "
        "Floor = clip + the optimizer alone on the same parameters (row-sparse: on one real step's row gradients); "
        "its share of the step is floor / step. vs TopK: against SAELens's TopK as shipped; same opt.: against TopK "
        "with the row's optimizer (adam_fused for adam_row_sparse rows: TopK has no row-sparse step). Peak: RSS of a "
        "fresh process (CPU) or the CUDA allocator's peak, over two steps after one warm-up step.",
        "",
        "| d_sae | SAE | optimizer | experts | ms/step | tok/s | vs TopK | vs TopK, same opt. | step / floor "
        "| optimizer share | peak MB | vs TopK peak |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "out_of_memory" in row or "not_measured" in row:
            why = "out of memory" if "out_of_memory" in row else "not measured: does not fit in memory"
            lines.append(
                f"| {row['d_sae']} | {row['architecture']} | {row.get('optimizer', '')} | | {why} | | | | | | | |"
            )
            continue
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else "probe failed"
        versus_peak = f"{row['peak_vs_topk']:.2f}" if "peak_vs_topk" in row else ""
        lines.append(
            f"| {row['d_sae']} | {row['architecture']} | {row['optimizer']} | {row['n_experts'] or ''} "
            f"| {row['step_ms']:.0f} | {row['train_tokens_per_s']:.0f} "
            f"| {row.get('speedup_vs_topk', float('nan')):.1f}x "
            f"| {row.get('speedup_vs_topk_same_optimizer', float('nan')):.1f}x "
            f"| {row['step_over_floor']:.2f} | {row['floor_ms'] / row['step_ms']:.0%} | {peak} | {versus_peak} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s and peak memory against width, a colour per SAE and a line style per optimizer."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    speed_axes, memory_axes = figure.subplots(1, 2)
    colours = {"TopK": "tab:gray", "Switch": "tab:orange", "Scale e=2": "tab:blue"}
    styles = {"adam": "o-", "adam_fused": "s--", "adam_row_sparse": "^-."}
    pairs = dict.fromkeys((r["architecture"], r["optimizer"]) for r in result["rows"] if "step_ms" in r)
    for architecture, optimizer in pairs:
        rows = [
            r
            for r in result["rows"]
            if (r["architecture"], r.get("optimizer")) == (architecture, optimizer) and "step_ms" in r
        ]
        label = f"{architecture}, {optimizer}"
        style, colour = styles[optimizer], colours[architecture]
        speed_axes.plot(
            [r["d_sae"] for r in rows], [r["train_tokens_per_s"] for r in rows], style, color=colour, label=label
        )
        measured = [r for r in rows if "peak_mb" in r]
        memory_axes.plot([r["d_sae"] for r in measured], [r["peak_mb"] for r in measured], style, color=colour)
    widths = sorted({r["d_sae"] for r in result["rows"]})
    for axes in (speed_axes, memory_axes):
        axes.set(xscale="log", yscale="log", xlabel="latents (d_sae)")
        axes.set_xticks(widths, [f"{w // 1024}k" for w in widths])
        axes.xaxis.set_minor_formatter(NullFormatter())
    speed_axes.set(ylabel="training tokens / s", title="Speed")
    memory_axes.set(ylabel="peak memory, MB", title="Memory")
    speed_axes.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--autocast", action="store_true", help="train in SAELens's bf16 autocast")
    parser.add_argument("--max-width", type=int, default=262_144, help="the widest SAE to measure")
    parser.add_argument(
        "--optimizers", nargs="+", default=["adam"], choices=OPTIMIZERS, help="what the SAEs train with"
    )
    parser.add_argument("--max-topk-width", type=int, default=262_144, help="the widest TopK to measure")
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
        optimizer=args.optimizers[0],
    )
    if args.memory_probe:
        architecture, d_sae = args.memory_probe
        print(json.dumps(step_memory(maker(architecture, int(d_sae), shape), shape)))
        return
    widths = [width for width in WIDTHS if width <= args.max_width]
    result = sweep(shape, widths, args.optimizers, args.max_topk_width)
    named = [optimizer for optimizer in args.optimizers if optimizer != "adam"]
    stem = f"width-sweep-{args.device}" + (
        "-optimizers" if len(args.optimizers) > 1 else "".join(f"-{o}" for o in named)
    )
    write_results(stem, result, markdown(result))
    plot(result, result_file(f"{stem}.png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
