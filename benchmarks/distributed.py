"""Data-parallel training on the CPU: 2 single-thread processes (gloo, one half of each batch each) against 1
two-thread process with the whole batch, same SAE, same global batch, SAELens's own ``SAETrainer.step``.

This machine has 2 cores, so data parallelism can at best match one process using both: the point is that the
collectives (DDP's gradient all-reduce, the routed SAE's one all-reduce of batch statistics) cost little. Reported:
training tokens/s over the global batch, and each process's peak RSS.

    python benchmarks/distributed.py            # Scale 64/e=2, d_in 768, d_sae 24576, k 32, global batch 4096
"""

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from sae_lens_scale import ScaleTrainingSAE, ScaleTrainingSAEConfig
from sae_lens_scale.parallel import replicate_training_pass

from common import Shape, in_fresh_process, make_trainer, on_two_ranks, proc_status_mb, write_results

SHAPE = Shape(d_in=768, d_sae=24576, k=32, batch=4096, repeats=5)
N_EXPERTS, N_ACTIVE = 64, 2


def measure(rank: int, world_size: int) -> dict[str, float]:
    """Median step seconds over this process's share of the global batch, and its peak RSS."""
    torch.manual_seed(0)
    config = ScaleTrainingSAEConfig(
        d_in=SHAPE.d_in, d_sae=SHAPE.d_sae, n_experts=N_EXPERTS, n_active_experts=N_ACTIVE, k=SHAPE.k
    )
    sae = ScaleTrainingSAE(config)
    per_rank = SHAPE.batch // world_size
    trainer = make_trainer(sae, Shape(**{**SHAPE.__dict__, "batch": per_rank}))
    if world_size > 1:
        replicate_training_pass(sae)
    batch = torch.randn(SHAPE.batch, SHAPE.d_in, generator=torch.Generator().manual_seed(1))
    share = batch[rank * per_rank : (rank + 1) * per_rank]
    trainer.step(share)  # warm-up: allocations, Adam state
    times = []
    for _ in range(SHAPE.repeats):
        if world_size > 1:
            dist.barrier()  # every rank starts the step together
        started = time.perf_counter()
        trainer.step(share)
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "peak_rss_mb": proc_status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:  # in a fresh process, so its peak RSS is its own
        torch.set_num_threads(2)
        print(json.dumps(measure(0, 1)))
        return
    single = in_fresh_process(__file__, "--single")
    ranks = on_two_ranks(measure)
    rows: list[dict[str, Any]] = [
        {"setup": "1 process, 2 threads", "tokens_per_s": SHAPE.batch / single["step_s"], **single},
        {
            "setup": "2 processes, 1 thread each (gloo)",
            "tokens_per_s": SHAPE.batch / max(rank["step_s"] for rank in ranks),
            "step_s": max(rank["step_s"] for rank in ranks),
            "peak_rss_mb": max(rank["peak_rss_mb"] for rank in ranks),
        },
    ]
    result = {
        "sae": f"Scale {N_EXPERTS}/e={N_ACTIVE}, d_in {SHAPE.d_in}, d_sae {SHAPE.d_sae}, k {SHAPE.k}",
        "global_batch": SHAPE.batch,
        "repeats": SHAPE.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }
    lines = [
        "# Data-parallel training on 2 CPU cores",
        "",
        f"{result['sae']}; global batch {SHAPE.batch} tokens (2048 per rank with 2 ranks); median of {SHAPE.repeats} "
        "SAELens `SAETrainer.step`s after a warm-up. Peak RSS: per process (the larger rank's for 2 processes).",
        "",
        "| setup | step s | tokens/s | vs 1 process | peak RSS MB per process |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {row['setup']} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} "
            f"| {row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | {row['peak_rss_mb']:.0f} |"
            for row in rows
        ],
    ]
    table = "\n".join(lines) + "\n"
    write_results("distributed-cpu", result, table)
    print(table, end="")


if __name__ == "__main__":
    main()
