"""Memory and time of the sparse decode, forward and backward: ``F.embedding_bag`` against gathering the k decoder
rows and taking a batched product.

The routed SAEs decode each token from its k active latents, ``sum_j acts_j * W_dec[latents_j]``, without a
[batch, d_sae] matrix. Two ways to compute it under autograd:

- ``embedding_bag``: ``F.embedding_bag(latents, W_dec, per_sample_weights=acts, mode="sum")`` (what the engine uses);
- ``gather + bmm``: ``W_dec[latents]`` as a [batch, k, d_in] tensor, then ``acts @ rows`` per token.

Each runs forward and backward (gradients for ``W_dec`` and the activations) in a fresh process. On the CPU the peak
is the process's peak RSS above its resting RSS with W_dec and its gradient allocated; on CUDA, the allocator's peak
above the same resting point.

    python benchmarks/decode_memory.py                  # CPU, d_in 768, batch 4096, k 32, d_sae 24576 and 262144
    python benchmarks/decode_memory.py --device cuda
"""

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from speed import RESULTS, proc_status_mb

D_IN, BATCH, K = 768, 4096, 32
WIDTHS = (24_576, 262_144)
REPEATS = 5


def embedding_bag(latents: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(latents, W_dec, per_sample_weights=acts, mode="sum")


def gather_bmm(latents: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    rows = W_dec[latents]  # [batch, k, d_in]
    return torch.bmm(acts.unsqueeze(1), rows).squeeze(1)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "embedding_bag": embedding_bag,
    "gather + bmm": gather_bmm,
}


def resident_mb(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else proc_status_mb("VmRSS")


def peak_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else proc_status_mb("VmHWM")


def probe(method: str, d_sae: int, device: str) -> dict[str, float]:
    """One method, fresh process: peak memory of a forward + backward above rest, then its median time."""
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, D_IN, generator=generator).to(device).requires_grad_()
    latents = torch.randint(0, d_sae, (BATCH, K), generator=generator).to(device)
    acts = torch.rand(BATCH, K, generator=generator).to(device).requires_grad_()
    grad_out = torch.randn(BATCH, D_IN, generator=generator).to(device)
    W_dec.grad = torch.zeros_like(W_dec)
    acts.grad = torch.zeros_like(acts)
    decode = METHODS[method]

    def step() -> None:
        decode(latents, acts, W_dec).backward(grad_out)

    resting = resident_mb(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    step()
    peak = peak_mb(device) - resting
    times = []
    for _ in range(REPEATS):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"peak_above_rest_mb": peak, "ms": 1000 * sorted(times)[REPEATS // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--probe", nargs=2, metavar=("METHOD", "D_SAE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]), args.device)))
        return
    rows = []
    for d_sae in WIDTHS:
        for method in METHODS:
            command = [sys.executable, __file__, "--device", args.device, "--probe", method, str(d_sae)]
            measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append({"method": method, "d_sae": d_sae, **measured})
    result = {"device": args.device, "d_in": D_IN, "batch": BATCH, "k": K, "torch": torch.__version__, "rows": rows}
    lines = [
        f"# Sparse decode, forward + backward ({args.device})",
        "",
        f"d_in {D_IN}, batch {BATCH} tokens, k {K}; peak memory above rest (W_dec and its gradient allocated) in a "
        f"fresh process, then the median of {REPEATS} timed runs.",
        "",
        "| d_sae | method | peak above rest MB | ms |",
        "|---:|---|---:|---:|",
        *[f"| {r['d_sae']} | {r['method']} | {r['peak_above_rest_mb']:.0f} | {r['ms']:.1f} |" for r in rows],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"decode-memory-{args.device}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
