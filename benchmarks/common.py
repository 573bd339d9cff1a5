"""What more than one benchmark script needs, so that no script imports another: where results go, the speed
benchmarks' trainer, timing, memory and fresh-process helpers, and the quality benchmark's activations and schedule.

A plain module next to the scripts: ``python benchmarks/<script>.py`` puts this folder on ``sys.path``.
"""

import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from torch.multiprocessing.spawn import start_processes

from sae_lens_scale.optimizers import OptimizerName, use_optimizer
from sae_lens_scale.parallel.process_group import join_process_group
from sae_lens_scale.routed_sae import RoutedTrainingSAE
from sae_lens_scale.routing import expert_matmul
from sae_lens_scale.row_sparse_adam import RowSparseAdam
from sae_lens_scale.training_guards import geometric_median

RESULTS = Path(__file__).parent / "results"


def result_file(name: str) -> Path:
    """``results/<name>``, creating the folder: plots are saved before the JSON that lists them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name


def write_results(stem: str, result: dict[str, Any], markdown: str | None = None, indent: int = 2) -> list[Path]:
    """``results/<stem>.json`` and, given a table, ``results/<stem>.md``: the files the README links to."""
    paths = [result_file(f"{stem}.json")]
    paths[0].write_text(json.dumps(result, indent=indent) + "\n")
    if markdown is not None:
        paths.append(result_file(f"{stem}.md"))
        paths[1].write_text(markdown)
    return paths


def machine(device: str) -> dict[str, Any]:
    """What a timing depends on, recorded next to it, including which expert-matmul path ran."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "expert_matmul": {str(dtype): expert_matmul_path(device, dtype) for dtype in (torch.float32, torch.bfloat16)},
    }


def expert_matmul_path(device: str, dtype: torch.dtype, d_in: int = 768, expert_width: int = 384) -> str:
    """Which path the engine's expert product took, seen in a profile of one call: torch's grouped kernel, or the
    per-expert loop it falls back to."""
    rows = torch.randn(64, d_in, device=device, dtype=dtype)
    weights = torch.randn(4, d_in, expert_width, device=device, dtype=dtype)
    offsets = torch.tensor([16, 32, 48, 64], dtype=torch.int32, device=device)
    with torch.profiler.profile() as profile:
        expert_matmul(rows, weights, offsets)
        synchronize(device)
    ran_grouped = any("grouped_mm" in event.name for event in profile.events() or [])
    return "grouped kernel (F.grouped_mm)" if ran_grouped else "loop fallback (one mm per expert)"


# The speed benchmarks: SAELens's own training step, timed, and its memory.


# What a SAE without a routed training pass (TopK, the dense MoE) trains with in an optimizer's place.
DENSE_FALLBACK: dict[str, OptimizerName] = {"adam_row_sparse": "adam_fused"}


@dataclass(frozen=True)
class Shape:
    """One timed configuration: the SAE's sizes, the batch, how many steps the median takes, where it runs."""

    d_in: int
    d_sae: int
    k: int
    batch: int
    repeats: int
    device: str = "cpu"
    autocast: bool = False  # SAELens's bf16 autocast of the SAE's forward and backward
    optimizer: OptimizerName = "adam"  # what the trainer steps with (sae_lens_scale.optimizers)


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
    use_optimizer(trainer, shape.optimizer)
    trainer.n_training_steps = 1
    return trainer


def synchronize(device: str) -> None:
    """Wait for queued CUDA kernels, so that a clock or memory counter read afterwards covers them."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int, device: str = "cpu", warm_up: bool = True) -> float:
    """Median of ``repeats`` timed calls, after an untimed one (allocator, Adam state, lazy inits) unless the caller
    has already warmed ``fn`` up."""
    if warm_up:
        fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_seconds(trainer: SAETrainer[Any, Any], batch: torch.Tensor, repeats: int, device: str = "cpu") -> float:
    """clip_grad_norm + the optimizer on the SAE's own parameters: no step inside SAELens's trainer can be faster.

    Adam and fused Adam step random gradients of every parameter (a fresh optimizer, lr 1e-12). ``RowSparseAdam``
    steps what it steps in training: the row gradients of one real backward, copied back before each timed step.
    """
    sae = trainer.sae
    params = list(sae.parameters())
    if not isinstance(trainer.optimizer, RowSparseAdam):
        optimizer = torch.optim.Adam(params, lr=1e-12, fused=bool(trainer.optimizer.param_groups[0].get("fused")))
        for param in params:
            param.grad = torch.randn_like(param)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        seconds = median_seconds(step, repeats, device)
        for param in params:
            param.grad = None
        return seconds
    gradients = trainer.optimizer.gradients
    step_input = TrainStepInput(batch, {}, None, n_training_steps=1, is_logging_step=False)
    sae.training_forward_pass(step_input).loss.backward()
    rows, dense = gradients.rows, gradients.dense
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        gradients.rows = {
            param: [part._replace(values=part.values.clone()) for part in parts] for param, parts in rows.items()
        }
        gradients.dense = {param: grad.clone() for param, grad in dense.items()}
        synchronize(device)
        start = time.perf_counter()
        trainer.optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: CPU torch keeps no allocator statistics."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def start_peak(device: str) -> float:
    """The memory in use now, in MiB, which the next ``peak_mb`` counts from (CPU: the process's RSS)."""
    synchronize(device)
    if device == "cuda":
        resting = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return resting
    resting = proc_status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    return resting


def peak_mb(device: str) -> float:
    """The most memory in use since ``start_peak``, in MiB."""
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else proc_status_mb("VmHWM")


def step_memory(make: Callable[[], TrainingSAE[Any]], shape: Shape) -> dict[str, float]:
    """Resting memory with params + the optimizer's state (after one step), then the peak over two more steps (CPU:
    call in a fresh process, since the peak RSS covers the whole process)."""
    torch.manual_seed(0)
    sae = make()
    trainer = make_trainer(sae, shape)
    batch = torch.randn(shape.batch, shape.d_in, device=shape.device)
    trainer.step(batch)
    resting = start_peak(shape.device)
    for _ in range(2):
        trainer.step(batch)
    peak = peak_mb(shape.device)
    return {"resting_mb": resting, "peak_mb": peak, "step_mb": peak - resting}


def in_fresh_process(script: str, *args: str) -> dict[str, Any]:
    """The JSON on the last line ``python script *args`` prints, run in a new interpreter so that its peak RSS is its
    own; a failed run raises ``CalledProcessError`` carrying its stderr."""
    child = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(child.stdout.splitlines()[-1])


def on_two_ranks(measure: Callable[..., dict[str, Any]], *args: Any) -> list[dict[str, Any]]:
    """``measure(rank, 2, *args)`` in two fresh single-thread processes joined by gloo, each rank's result in rank
    order. ``measure`` is a module-level function, which the spawned processes import by name."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        start_processes(_rank, args=(port, out, measure, args), nprocs=2, join=True)
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(2)]


def _rank(rank: int, port: int, out: str, measure: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
    torch.set_num_threads(1)
    join_process_group("cpu")
    try:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(measure(rank, 2, *args)))
    finally:
        dist.destroy_process_group()


# The quality benchmark's data and schedule, which liveness.py trains on too.

IN_DOMAIN, CROSS_DOMAIN = "shakespeare", "python-docs"
# AuxK treats a latent as dead after 1/16 of the run without firing (51k tokens in the full run); a quarter of the
# run let latents die en masse before AuxK started (docs/dead-latents.md).
DEAD_WINDOW_FRACTION = 1 / 16


@dataclass(frozen=True)
class QualityConfig:
    """A quality run's budget and the training settings every SAE in it shares."""

    train_tokens: int
    heldout_tokens: int
    d_sae: int
    k: int
    seeds: tuple[int, ...]
    ce_batches: int
    ce_batch_prompts: int = 8  # token rows per CE-loss batch (the loss runs the whole model three times per batch)
    hook: str = "blocks.6.hook_resid_post"
    context_size: int = 128
    batch: int = 1024
    lr: float = 1e-3
    n_experts_scale: int = 32
    active_experts: tuple[int, ...] = (2, 4, 8)  # Scale's e values, each with Feature Scaling
    without_feature_scaling: tuple[int, ...] = (2, 4, 8)  # the e values trained without it as well
    switch_experts: tuple[int, ...] = (16, 32)  # n/2 (Scale e=2's active width) and n (its experts)
    gated_l0_target: float | None = None  # a Gated SAE at the total width, its L1 coefficient set for this L0
    epochs: int = 1  # passes over the cached training tokens, in the same order each time


QUALITY_QUICK = QualityConfig(train_tokens=147_456, heldout_tokens=8192, d_sae=2304, k=32, seeds=(0,), ce_batches=1)
QUALITY_FULL = QualityConfig(train_tokens=819_200, heldout_tokens=16_384, d_sae=4608, k=32, seeds=(0, 1), ce_batches=2)
# The Scale SAE paper's setting: 24,576 latents, 64 experts, e up to 16, its Gated baseline. One seed and a quarter
# of the tokens, to fit the time budget the benchmark's full runs share.
PAPER_WIDTH = replace(
    QUALITY_FULL,
    train_tokens=204_800,
    d_sae=24_576,
    seeds=(0,),
    n_experts_scale=64,
    active_experts=(2, 4, 8, 16),
    without_feature_scaling=(2, 16),
    switch_experts=(32, 64),
    gated_l0_target=32.0,
)


# The functions below import sae_lens_scale.tools (the model and text tooling) when called: imported with this module,
# it would add to the RSS that the speed benchmarks report.


def model_and_rows(cfg: QualityConfig) -> tuple[Any, dict[str, Any]]:
    """The bundled model, and the token rows of the in-domain train / held-out and cross-domain held-out splits."""
    from sae_lens_scale.tools.sources import BUNDLED_MODEL, load_model, token_splits

    model, tokenizer = load_model(BUNDLED_MODEL)
    in_domain = token_splits(tokenizer, IN_DOMAIN, cfg.context_size, 0.1, seed=0, max_tokens=cfg.train_tokens)
    cross = token_splits(tokenizer, CROSS_DOMAIN, cfg.context_size, 0.5, seed=0, max_tokens=cfg.heldout_tokens)
    heldout_rows = cfg.heldout_tokens // cfg.context_size
    return model, {
        "train": in_domain.train,
        "heldout": in_domain.heldout.select(range(heldout_rows)),
        "cross": cross.heldout.select(range(heldout_rows)),
    }


def activation_cache(cfg: QualityConfig) -> Path:
    from sae_lens_scale.tools.offline import default_cache_dir

    return default_cache_dir() / "quality" / f"{cfg.hook}-{cfg.train_tokens}-{cfg.heldout_tokens}.safetensors"


def cached_activations(cfg: QualityConfig, cache: Path) -> dict[str, torch.Tensor]:
    """The three splits' activations, harvested once into ``cache`` (fp16) and read from there afterwards."""
    if not cache.exists():
        from sae_lens_scale.tools.sources import hook_activations

        model, rows = model_and_rows(cfg)
        cache.parent.mkdir(parents=True, exist_ok=True)
        harvested = {
            split: hook_activations(model, split_rows, cfg.hook, dtype=torch.float16)
            for split, split_rows in rows.items()
        }
        save_file(harvested, str(cache))
    return load_file(str(cache))


def activation_scale(train: torch.Tensor) -> float:
    """The factor that brings the training activations to mean norm sqrt(d_in): SAELens's expected_average_only_in."""
    return train.shape[1] ** 0.5 / train[:20_000].float().norm(dim=-1).mean().item()


def batches(train: torch.Tensor, batch: int, scale: float, seed: int) -> Iterator[torch.Tensor]:
    """The one token stream every SAE sees: a fixed permutation, cycled, in float32, scaled to norm sqrt(d_in)."""
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    while True:
        for start in range(0, len(order) - batch + 1, batch):
            yield train[order[start : start + batch]].float() * scale


def trainer_config(cfg: QualityConfig, dead_window_fraction: float = DEAD_WINDOW_FRACTION) -> SAETrainerConfig:
    """The quality run's schedule over its passes of the cached tokens."""
    return schedule(cfg.train_tokens * cfg.epochs // cfg.batch, cfg.batch, cfg.lr, dead_window_fraction)


def schedule(steps: int, batch: int, lr: float, dead_window_fraction: float = DEAD_WINDOW_FRACTION) -> SAETrainerConfig:
    """The one schedule every benchmarked SAE trains with: warm-up over the first 1/20 of the steps, decay to lr / 10
    over the last 1/5, AuxK's dead-latent window a fraction of the run."""
    return SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr / 10,
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        dead_feature_window=max(1, round(steps * dead_window_fraction)),
        feature_sampling_window=max(1, steps // 2),
        logger=LoggingConfig(log_to_wandb=False),
    )


def train_sae(
    sae: TrainingSAE[Any], stream: Iterator[torch.Tensor], cfg: SAETrainerConfig, optimizer: OptimizerName = "adam"
) -> float:
    """Train with SAELens's trainer on ``stream``; returns the seconds it took.

    The routed SAEs set ``b_dec`` and ``b_router`` from the first batch themselves (``bias_init``); SAELens's TopK
    gets the same start here, so every SAE begins centred on the same point.
    """
    if not isinstance(sae, RoutedTrainingSAE):
        first = next(stream)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(first.double()))
        stream = itertools.chain([first], stream)
    started = time.perf_counter()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=stream)
    use_optimizer(trainer, optimizer)
    trainer.fit()
    return time.perf_counter() - started


@torch.no_grad()
def reconstruction(sae: SAE[Any], acts: torch.Tensor) -> dict[str, float]:
    """Per-token SSE and FVU (1 - explained variance) on raw activations, latents that never fired, and mean L0."""
    acts = acts.float()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sse = 0.0
    active = 0
    for chunk in acts.split(4096):
        feature_acts = sae.encode(chunk)
        firing = feature_acts != 0
        fired |= firing.any(0)
        active += int(firing.sum())
        sse += (sae.decode(feature_acts) - chunk).pow(2).sum().item()
    variance = (acts - acts.mean(0)).pow(2).sum().item()
    return {
        "sse_per_token": sse / acts.shape[0],
        "fvu": sse / variance,
        "dead_latents": int((~fired).sum()),
        "l0": active / acts.shape[0],
    }
