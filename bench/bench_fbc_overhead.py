"""Where a FirstBlockCache call's time goes in the overhead-bound regime (the smallest Flux, CPU, inductor).

Per call, medians over round-robin rounds (so load drifts hit every variant alike), compiled with fullgraph=True
(diffusers' hooks with fullgraph=False, which they need):

    uncached                      the whole model
    uncached, first block only    the same model cut to its first block: what a skip call cannot avoid
    fastcache, always compute     threshold 0: every call runs the one torch.cond's compute branch
    fastcache, always skip        threshold 1e9: every call after a context's first reuses the residuals
    diffusers, always compute / always skip   the same for diffusers' hook

and, for each, the time spent inside inductor's compiled graphs against outside them (dynamo's guards, the
frame's argument plumbing, the AOT wrapper). Then the guard check alone of each compiled graph. Last, the same
split for the engine's FirstBlockCache step on the reference DiT of `bench_engine.py` (256 wide, 8 blocks, CFG
batch 2), skipping and computing, against the uncached model and the model cut to its first block: the one-cond
step and the split step (`fastcache.compile_step` with split=False and by default: a compiled head, one host
read, a compiled tail).

    python bench/bench_fbc_overhead.py      # writes bench/results/fbc_overhead_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_diffusers import OVERHEAD_SIZES, RESULTS, own_frame  # noqa: E402
from bench_engine import _commit  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._tiny import case  # noqa: E402

VARIANTS = ("uncached", "uncached, first block only", "fastcache, always compute", "fastcache, always skip",
            "diffusers, always compute", "diffusers, always skip")


class GraphClock:
    """Adds up the time spent in inductor's compiled graphs (wraps `CompiledFxGraph.__call__` while it lives)."""

    def __init__(self) -> None:
        import torch._inductor.output_code as output_code

        self.module, self.original, self.seconds = output_code, output_code.CompiledFxGraph.__call__, 0.0
        clock = self

        def timed(graph: Any, inputs: Any) -> Any:
            start = time.perf_counter()
            try:
                return clock.original(graph, inputs)
            finally:
                clock.seconds += time.perf_counter() - start

        output_code.CompiledFxGraph.__call__ = timed

    def close(self) -> None:
        self.module.CompiledFxGraph.__call__ = self.original


def split_rows(calls: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Per variant, the median us per call, inside inductor's graphs and outside them."""
    rows = []
    for name, timed in calls.items():
        total = statistics.median(c[0] for c in timed) * 1e6
        inside = statistics.median(c[1] for c in timed) * 1e6
        rows.append(dict(variant=name, us_per_call=total, us_in_graphs=inside, us_outside_graphs=total - inside))
    return rows


def build(name: str, model: torch.nn.Module) -> tuple[torch.nn.Module, Any, bool]:
    import diffusers

    model = copy.deepcopy(model)
    cached = name.startswith(("fastcache", "diffusers"))
    threshold = 0.0 if name.endswith("compute") else 1e9
    if name == "uncached, first block only":
        model.transformer_blocks = torch.nn.ModuleList(list(model.transformer_blocks)[:1])
        model.single_transformer_blocks = torch.nn.ModuleList()
    elif name.startswith("fastcache"):
        fd.enable_cache(model, fd.FirstBlockCacheConfig(threshold=threshold))
    elif name.startswith("diffusers"):
        model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=threshold))
    tag = "".join(c if c.isalnum() else "_" for c in name)
    runner = torch.compile(own_frame(model, tag), fullgraph=not name.startswith("diffusers"))
    return model, runner, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=9, help="round-robin rounds (one generation each)")
    parser.add_argument("--out", default=str(RESULTS / "fbc_overhead_cpu"))
    args = parser.parse_args()
    tc = case("flux", **OVERHEAD_SIZES["flux"])
    tc.model.eval()
    timesteps = torch.linspace(1000, 0, args.steps)
    variants = {name: build(name, tc.model) for name in VARIANTS}
    clock = GraphClock()
    calls: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}

    def generate(name: str, record: bool) -> None:
        model, runner, cached = variants[name]
        if name.startswith("fastcache"):
            fd.reset_cache(model)
        elif name.startswith("diffusers"):
            model._reset_stateful_cache()
        x = tc.latent.clone()
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                kwargs = tc.kwargs(x, t)
                with model.cache_context("cond") if cached else contextlib.nullcontext():
                    clock.seconds = 0.0
                    start = time.perf_counter()
                    out = runner(**kwargs, return_dict=False)[0]
                    total = time.perf_counter() - start
                if record and i > 0:  # a context's first call always computes
                    calls[name].append((total, clock.seconds))
                x = x - 0.05 * out

    load_before = os.getloadavg()
    for _ in range(2):  # compiles
        for name in VARIANTS:
            generate(name, record=False)
    for r in range(args.repeats):
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            generate(name, record=True)
    clock.close()
    rows = split_rows(calls)
    guards = guard_times(variants, tc, timesteps)
    engine = engine_steps(args.repeats)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), commit=_commit(), args=vars(args),
                size=OVERHEAD_SIZES["flux"], loadavg_before=load_before, loadavg_after=os.getloadavg())
    lines = ["| variant | us per call | in inductor's graphs | outside them |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['us_per_call']:.0f} | {r['us_in_graphs']:.0f} | {r['us_outside_graphs']:.0f} |"
              for r in rows]
    lines += ["", "| compiled graph | guard check, us |", "|---|---|"]
    lines += [f"| {name} | {seconds * 1e6:.1f} |" for name, seconds in guards.items()]
    lines += ["", "| engine (reference DiT, 8 blocks) | us per call | in inductor's graphs | outside them |",
              "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['us_per_call']:.0f} | {r['us_in_graphs']:.0f} | {r['us_outside_graphs']:.0f} |"
              for r in engine]
    table = "\n".join(lines) + f"\n\n{json.dumps(meta)}\n"
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, guards_seconds=guards,
                                                    engine=engine), indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)


def engine_steps(repeats: int) -> list[dict]:
    """Per call: the uncached reference DiT, the same model cut to its first block, and FirstBlockCache's step,
    one-cond and split, when it skips (threshold 1e9; a state's first call always computes and is left out) and
    when it computes (threshold 0)."""
    from bench_engine import NULL, build_model

    import fastcache
    from fastcache.models.dit import cfg_inputs, sampling_timesteps
    from fastcache.protocol import forward

    model = build_model("cpu")
    first = copy.deepcopy(model)
    first.blocks, first.num_blocks = torch.nn.ModuleList(list(first.blocks)[:1]), 1
    x0, labels = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3])
    timesteps = sampling_timesteps(20, "cpu")
    inputs = [cfg_inputs(x0, t, labels, NULL) for t in timesteps]
    steps: dict[str, Any] = {"uncached": torch.compile(lambda i: forward(model, i), fullgraph=True),
             "uncached, first block only": torch.compile(lambda i: forward(first, i), fullgraph=True)}
    states = {}
    for when, threshold in (("skip", 1e9), ("compute", 0.0)):
        method = fastcache.make(fastcache.FirstBlockCacheConfig(threshold=threshold))
        states[when] = method.init(model, inputs[0])
        steps[f"FirstBlockCache, {when} step"] = fastcache.compile_step(method, model, split=False)
        steps[f"FirstBlockCache, split {when} step"] = fastcache.compile_step(method, model)
    clock = GraphClock()
    calls: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}

    with torch.no_grad():
        for r in range(repeats + 2):  # two rounds compile
            state = {name: states["skip" if "skip" in name else "compute"] for name in steps}
            for k, i in enumerate(inputs):
                for name, step in steps.items():
                    clock.seconds = 0.0
                    start = time.perf_counter()
                    if name.startswith("uncached"):
                        step(i)
                    else:
                        _, state[name] = step(state[name], i, None)
                    if r >= 2 and (k > 0 or name.startswith("uncached")):
                        calls[name].append((time.perf_counter() - start, clock.seconds))
    clock.close()
    return split_rows(calls)


def guard_times(variants: dict, tc: Any, timesteps: torch.Tensor) -> dict[str, float]:
    """Each fullgraph variant's guard check on a later call's inputs (the cache entry those inputs pass)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    found = {}
    kwargs = tc.kwargs(tc.latent.clone(), timesteps[1])
    kwargs["return_dict"] = False
    for name, (model, runner, cached) in variants.items():
        if name.startswith("diffusers"):
            continue
        code = runner._torchdynamo_orig_callable.__code__
        with torch.no_grad(), model.cache_context("cond") if cached else contextlib.nullcontext():
            scope = {"args": (), "kwargs": kwargs, "model": model}
            for entry in _debug_get_cache_entry_list(code):
                if entry.guard_manager.check(scope):
                    check = entry.guard_manager.check
                    found[name] = min(timeit.repeat(lambda: check(scope), number=500, repeat=5)) / 500  # noqa: B023
                    break
    return found


if __name__ == "__main__":
    main()
