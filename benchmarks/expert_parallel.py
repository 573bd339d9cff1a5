"""How wide a Scale SAE trains within a memory limit per process: one process holding every expert against two
expert-parallel ranks (gloo) holding half each. d_in 768, experts 512 latents wide, e = 2, k = 32, a global batch of
4096 tokens (2048 per rank), SAELens's own ``SAETrainer.step``.

For each width, each setup runs in fresh processes; reported are the median step time over the global batch and each
process's peak RSS. The widest width whose peak stays within ``--limit-gib`` per process is each setup's answer; the
sweep for a setup stops at the first width over the limit (that width is measured and shown).

    python benchmarks/expert_parallel.py --limit-gib 4
"""

import argparse
import json
import subprocess
from typing import Any

import torch

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.parallel import expert_parallel_sae

from common import (
    Shape,
    in_fresh_process,
    make_trainer,
    median_seconds,
    on_two_ranks,
    proc_status_mb,
    write_results,
)

D_IN, K, BATCH, EXPERT_WIDTH, REPEATS = 768, 32, 4096, 512, 3
WIDTHS = (65_536, 131_072, 262_144, 524_288, 1_048_576)


def measure(rank: int, world_size: int, d_sae: int) -> dict[str, float]:
    """Median seconds of this process's steps over its share of the global batch, and its peak RSS."""
    torch.manual_seed(0)
    config = ScaleTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, n_experts=d_sae // EXPERT_WIDTH, n_active_experts=2, k=K)
    sae = expert_parallel_sae(config) if world_size > 1 else ScaleTrainingSAE(config)
    per_rank = BATCH // world_size
    trainer = make_trainer(sae, Shape(d_in=D_IN, d_sae=d_sae, k=K, batch=per_rank, repeats=REPEATS))
    batch = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))[
        rank * per_rank : (rank + 1) * per_rank
    ]
    return {
        "step_s": median_seconds(lambda: trainer.step(batch), REPEATS),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "parameters": sum(p.numel() for p in sae.parameters()),
    }


def one_process(d_sae: int) -> dict[str, Any]:
    try:
        return in_fresh_process(__file__, "--one-process", str(d_sae))
    except subprocess.CalledProcessError as error:  # killed for memory, say: that is a result too
        return {"failed": f"exit code {error.returncode}: {error.stderr.strip()[-300:]}"}


def two_ranks(d_sae: int) -> dict[str, Any]:
    ranks = on_two_ranks(measure, d_sae)
    return {
        "step_s": max(r["step_s"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "parameters": ranks[0]["parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-gib", type=float, default=4.0, help="memory per process")
    parser.add_argument("--one-process", type=int, metavar="D_SAE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_process:
        torch.set_num_threads(2)
        print(json.dumps(measure(0, 1, args.one_process)))
        return
    limit_mb = args.limit_gib * 1024
    rows = []
    for setup, run in (("1 process, 2 threads", one_process), ("2 expert-parallel ranks, 1 thread each", two_ranks)):
        for d_sae in WIDTHS:
            measured = run(d_sae)
            rows.append({"setup": setup, "d_sae": d_sae, **measured})
            if "failed" in measured or measured["peak_rss_mb"] > limit_mb:
                break
    widest = {
        setup: max(
            (r["d_sae"] for r in rows if r["setup"] == setup and r.get("peak_rss_mb", 1e12) <= limit_mb), default=0
        )
        for setup in dict.fromkeys(r["setup"] for r in rows)
    }
    result = {
        "limit_gib": args.limit_gib,
        "d_in": D_IN,
        "expert_width": EXPERT_WIDTH,
        "batch": BATCH,
        "rows": rows,
        "widest_within_limit": widest,
        "torch": torch.__version__,
    }
    lines = [
        f"# Expert parallelism on 2 CPU cores: the widest Scale SAE within {args.limit_gib:g} GiB per process",
        "",
        f"d_in {D_IN}, experts {EXPERT_WIDTH} latents wide, e = 2, k = {K}, global batch {BATCH} tokens; median of "
        f"{REPEATS} SAELens `SAETrainer.step`s after a warm-up. Peak RSS per process (the larger rank's).",
        "",
        "| setup | d_sae | parameters per process | step s | tokens/s | peak RSS MB per process | within limit |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['setup']} | {row['d_sae']} | | failed: {row['failed'][:80]} | | | no |")
            continue
        within = "yes" if row["peak_rss_mb"] <= limit_mb else "no"
        lines.append(
            f"| {row['setup']} | {row['d_sae']} | {row['parameters']:,} | {row['step_s']:.2f} "
            f"| {BATCH / row['step_s']:.0f} | {row['peak_rss_mb']:.0f} | {within} |"
        )
    lines += ["", *[f"Widest within the limit, {setup}: {width:,} latents." for setup, width in widest.items()]]
    table = "\n".join(lines) + "\n"
    write_results("expert-parallel-cpu", result, table)
    print(table, end="")


if __name__ == "__main__":
    main()
