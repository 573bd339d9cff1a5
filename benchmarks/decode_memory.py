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
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common import in_fresh_process, median_seconds, peak_mb, start_peak, write_results

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

    resting = start_peak(device)
    step()  # also the warm-up of the timed runs
    peak = peak_mb(device) - resting
    return {"peak_above_rest_mb": peak, "ms": 1000 * median_seconds(step, REPEATS, device, warm_up=False)}


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
            measured = in_fresh_process(__file__, "--device", args.device, "--probe", method, str(d_sae))
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
    table = "\n".join(lines) + "\n"
    write_results(f"decode-memory-{args.device}", result, table)
    print(table, end="")


if __name__ == "__main__":
    main()
