"""Caching under diffusers' context parallelism on CPU (gloo): 1 process against 2 ranks, side by side.

For a small Flux transformer (random weights from a config), each world size runs the same Euler loop uncached,
with PAB (planned: no collective of fastcache's) and with FirstBlockCache (one all-reduce of 3 floats per call
from fastcache, to decide alike on every rank), and reports the median wall time per generation. 2 ranks on a
2-core machine do not run faster than 1 process (Ulysses adds two all-to-alls per attention, and gloo's CPU
collectives cost more than these blocks): the point is the cost, not a speedup. The all-reduce fastcache adds is
timed on its own (median of 200).

    python bench/bench_distributed.py                  # about 2 min on 2 idle cores
    python bench/bench_distributed.py --steps 10 --repeats 2

Writes bench/results/distributed_cpu.json and .md (machine and versions included).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("uncached", "PAB", "FirstBlockCache")


def _case() -> Any:
    from fastcache.diffusers._tiny import case

    return case("flux", scale=8, size=32, layers=2, heads=2)  # width 256, 1024 image tokens, 2 + 2 blocks


def _config(method: str, clock: dict, threshold: float) -> Any:
    import fastcache.diffusers as fd

    if method == "PAB":
        return fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  spatial_attention_timestep_skip_range=(-1, 1001),
                                                  current_timestep_callback=lambda: clock["t"])
    return fd.FirstBlockCacheConfig(threshold=threshold)


def _generation(model: Any, tc: Any, timesteps: torch.Tensor, clock: dict) -> float:
    import fastcache.diffusers as fd
    from fastcache.diffusers._tiny import denoise

    if fd.cache_state(model, "cond") is not None:
        fd.reset_cache(model)  # a new generation (a pipeline call resets its states itself)
    start = time.perf_counter()
    denoise(model, tc, timesteps, ("cond",), clock=clock)
    return time.perf_counter() - start


def _worker(rank: int, world: int, init: str, out: str, steps: int, repeats: int, threshold: float,
            threads: int) -> None:
    import torch.distributed as dist

    import fastcache.diffusers as fd

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    tc = _case()
    timesteps = torch.linspace(1000, 0, steps)
    results: dict[str, Any] = {}
    for method in METHODS:
        model = copy.deepcopy(tc.model).eval()
        if world > 1:
            from diffusers import ContextParallelConfig

            # diffusers 0.42.1 divides by the accelerator count (0 on a CPU-only torch): report one
            with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        clock: dict = {}
        if method != "uncached":
            fd.enable_cache(model, _config(method, clock, threshold))
        _generation(model, tc, timesteps, clock)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(_generation(model, tc, timesteps, clock))
        computed = None
        if method == "FirstBlockCache":
            computed = int(fd.cache_state(model, "cond")["num_computed"]) / steps
        results[method] = dict(seconds=statistics.median(times), runs=times, computed=computed)
    if world > 1:
        from fastcache.distributed import sum_over

        reduce, sums, lat = sum_over(dist.group.WORLD), torch.zeros(3), []
        for _ in range(220):
            start = time.perf_counter()
            reduce(sums)
            lat.append(time.perf_counter() - start)
        results["all_reduce_us"] = statistics.median(lat[20:]) * 1e6
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _threshold(steps: int) -> float:
    """A FirstBlockCache threshold that skips about half the steps of this model, found on one process."""
    from fastcache.diffusers._tiny import fbc_threshold

    return fbc_threshold(_case(), torch.linspace(1000, 0, steps))


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed_cpu")
    args = p.parse_args()
    threshold = _threshold(args.steps)
    by_world = {}
    for key, world, threads in (("1", 1, 1), ("1x2", 1, 2), ("2", 2, 1)):  # 1 process on 1 and 2 threads
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, args.steps, args.repeats, threshold,
                                    threads), nprocs=world, join=True)
            by_world[key] = json.loads(Path(out).read_text())
    import diffusers

    meta = dict(date=time.strftime("%F %T %Z"), platform=platform.platform(), processor=platform.processor(),
                cpus=os.cpu_count(), threads_per_rank=1, python=platform.python_version(), torch=torch.__version__,
                diffusers=diffusers.__version__, load=os.getloadavg(), steps=args.steps, repeats=args.repeats,
                model="FluxTransformer2DModel, width 256, 2 + 2 blocks, 1024 image + 8 text tokens",
                fbc_threshold=threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=by_world), indent=1))
    lines = [f"# Caching under context parallelism, CPU gloo ({meta['date']})", "",
             f"Machine: {meta['processor'] or 'cpu'}, {meta['cpus']} cores, 1 torch thread per rank, "
             f"{meta['platform']}; Python {meta['python']}, torch {meta['torch']}, diffusers {meta['diffusers']}. "
             f"Load average at the end {tuple(round(x, 2) for x in meta['load'])}.", "",
             f"{meta['model']}; {args.steps} Euler steps; median of {args.repeats} generations after a warm-up; "
             "2 ranks: diffusers' Ulysses (`ContextParallelConfig(ulysses_degree=2)`).", "",
             "| method | computed | 1 process, 1 thread s/gen | 1 process, 2 threads | 2 ranks x 1 thread | "
             "2 ranks / 1 process on 2 threads | speedup over uncached: 1 process (2 threads) | 2 ranks |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        one, both, two = (by_world[key][method] for key in ("1", "1x2", "2"))
        share = two["computed"]
        lines.append(f"| {method} | {'-' if share is None else f'{share:.0%} of steps'} | {one['seconds']:.3f} | "
                     f"{both['seconds']:.3f} | {two['seconds']:.3f} | {two['seconds'] / both['seconds']:.2f} | "
                     f"{by_world['1x2']['uncached']['seconds'] / both['seconds']:.2f}x | "
                     f"{by_world['2']['uncached']['seconds'] / two['seconds']:.2f}x |")
    reduce_us = by_world["2"]["all_reduce_us"]
    lines += ["", f"fastcache's all-reduce (3 fp32 values, gloo, 2 ranks): median {reduce_us:.0f} us per call, "
              f"one per FirstBlockCache call: {args.steps * reduce_us / 1e3:.1f} ms per generation "
              f"({args.steps * reduce_us / 1e6 / by_world['2']['FirstBlockCache']['seconds']:.1%} of its 2-rank "
              "time)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
