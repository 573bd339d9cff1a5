"""Time ``feature_redundancy`` on a paper-sized decoder (GPT-2 small, d_sae = 24576, d_in = 768).

The metric is an exact nearest-neighbour search over all decoder rows, half a 24576 x 24576 x 768 Gram matrix
(about 464 GFLOP), so it is the one analysis metric whose speed matters. Runs on the CPU and writes
``benchmarks/results/redundancy-speed-cpu.json``.

    python benchmarks/redundancy_speed.py [--chunk-size 2048] [--repeats 3]
"""

import argparse
import os
import platform
import time

import torch
from sae_lens import TopKSAE, TopKSAEConfig

from sae_lens_scale.metrics import DEFAULT_CHUNK_SIZE, FeatureRedundancy, feature_redundancy

from common import write_results

D_IN, D_SAE = 768, 24576


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported (others share CPUs)")
    args = parser.parse_args()

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=32))
    load_before = os.getloadavg()[0]
    runs = [_timed(sae, args.chunk_size) for _ in range(args.repeats)]
    seconds, result = [run[0] for run in runs], runs[-1][1]
    record = {
        "metric": "feature_redundancy",
        "d_sae": D_SAE,
        "d_in": D_IN,
        "dtype": "float32",
        "chunk_size": args.chunk_size,
        "seconds_best": min(seconds),
        "seconds_all": seconds,
        "device": "cpu",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_before": load_before,
        "result": result.to_dict(),
    }
    print(
        f"feature_redundancy d_sae={D_SAE} d_in={D_IN} chunk={args.chunk_size}: best {min(seconds):.2f} s of {seconds}"
    )
    (path,) = write_results("redundancy-speed-cpu", record)
    print(f"wrote {path}")


def _timed(sae: TopKSAE, chunk_size: int) -> tuple[float, FeatureRedundancy]:
    start = time.perf_counter()
    result = feature_redundancy(sae, chunk_size=chunk_size)
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
