"""fastcache's drop-in vs diffusers' own cache hooks on the same diffusers transformers, in one run.

For each (model, method) the same random-weight transformer (built from a config, no download) runs the same
denoising loop (timesteps 1000 -> 0, one `cache_context` per CFG pass as the family's pipeline runs them)
through these providers:

    uncached-eager, uncached-compiled        no cache: the baseline (compiled with fullgraph=True)
    diffusers-eager, diffusers-compiled      diffusers' hooks (`model.enable_cache`); compiled with
                                             fullgraph=False, since fullgraph=True fails (diffusers-fullgraph
                                             records how)
    fastcache-eager, fastcache-compiled      fastcache's drop-in (`fastcache.enable_cache`), fullgraph=True

Both caches get the same config and timesteps, so they take the same decisions; the final latent of every
provider is compared with diffusers-eager's (`max|diff|`: a different decision would show far above 1e-4).
Per provider: median seconds per generation over `--repeats` timed generations after one warm-up generation
(so compile time is not in it, but recompiles during timed runs are), the warm-up time, graph breaks and
graphs compiled over all its generations, and the share computed (FBC: steps that ran every block; PAB:
hooked attention calls; FasterCache: steps that ran the unconditional batch). torch._dynamo is reset
between providers (diffusers' classes share one `forward` code object, and so one recompile limit).

    python bench/bench_diffusers.py                      # writes bench/results/diffusers_bench.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import fastcache.diffusers as fd
from fastcache.diffusers._runtime import classify_sites
from fastcache.diffusers._tiny import TinyCase, case, fbc_threshold
from fastcache.methods import faster_cache as fc
from fastcache.methods import pyramid_attention_broadcast as pab

RESULTS = Path(__file__).parent / "results"
PROVIDERS = ("uncached-eager", "uncached-compiled", "diffusers-eager", "diffusers-compiled", "diffusers-fullgraph",
             "fastcache-eager", "fastcache-compiled")


@dataclass(frozen=True)
class Setup:
    model: str
    contexts: tuple[str, ...]  # one cache context per CFG pass, as the family's pipeline runs them
    size: dict  # arguments of `case`


SETUPS = {
    "flux": Setup("flux", ("cond",), dict(scale=8, size=24, layers=4)),  # guidance-distilled: one pass
    "wan": Setup("wan", ("cond", "uncond"), dict(scale=8, size=32, frames=4, layers=8)),
    "cogvideox": Setup("cogvideox", ("cond_uncond",), dict(scale=8, size=32, frames=4, layers=8)),  # batched
}
DEFAULT_RUNS = "flux:fbc,flux:pab,wan:fbc,wan:pab,cogvideox:fastercache,cogvideox:pab"


def _config(method: str, threshold: float, clock: dict) -> Any:
    """diffusers' own config object: fastcache translates it, so both sides read exactly the same fields."""
    import diffusers

    if method == "fbc":
        return diffusers.FirstBlockCacheConfig(threshold=threshold)
    if method == "pab":
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
            current_timestep_callback=lambda: clock["t"])
    if method == "fastercache":
        return diffusers.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=3,
                                           tensor_format="BFCHW", current_timestep_callback=lambda: clock["t"])
    raise ValueError(f"method: unknown {method!r}; known: fbc, pab, fastercache")


def _generate(runner: Any, model: Any, tc: TinyCase, setup: Setup, timesteps: torch.Tensor, clock: dict,
              observe: Any = None) -> torch.Tensor:
    x = tc.latent.clone()
    for t in timesteps:
        clock["t"] = t
        outs = []
        for name in setup.contexts:
            with torch.no_grad(), model.cache_context(name):
                outs.append(runner(**tc.kwargs(x, t), return_dict=False)[0])
        if observe is not None:
            observe()
        x = x - 0.05 * outs[-1]  # any update works: the loop only has to feed the output back
    return x


def _computed_share(method: str, config: Any, model: Any, setup: Setup, timesteps: torch.Tensor,
                    fbc_computed: list[int]) -> float:
    if method == "fbc":  # fastcache's own count (the same decisions as diffusers': see max|diff|)
        return sum(fbc_computed) / (len(setup.contexts) * len(timesteps))
    ours = fd.to_fastcache_config(config)
    if method == "fastercache":
        return fc.plan(ours, timesteps.tolist()).rows["uncond"].count("F") / len(timesteps)
    rows = pab.plan(ours, timesteps.tolist()).rows
    kinds = [kind for _, kind in classify_sites(model, ours).values()]
    return sum(rows[k].count("C") for k in kinds) / (len(kinds) * len(timesteps))


def run_provider(provider: str, setup: Setup, tc: TinyCase, method: str, threshold: float,
                 timesteps: torch.Tensor, repeats: int) -> dict:
    clock: dict = {}
    model = copy.deepcopy(tc.model)
    config = None if provider.startswith("uncached") else _config(method, threshold, clock)
    if provider.startswith("diffusers"):
        model.enable_cache(config)
    elif provider.startswith("fastcache"):
        fd.enable_cache(model, config)
    torch._dynamo.reset()
    counters.clear()
    runner = model
    if provider.endswith(("compiled", "fullgraph")):
        runner = torch.compile(model, fullgraph=not provider.startswith("diffusers-compiled"))
    ctx_model = model if config is not None else _NoContext(model)
    row: dict = dict(model=setup.model, method=method, provider=provider)
    fbc_computed: list[int] = []

    def record_fbc() -> None:
        if provider.startswith("fastcache") and method == "fbc":
            fbc_computed[:] = [int(fd.cache_state(model, n)["num_computed"]) for n in setup.contexts]

    t0 = time.perf_counter()
    try:
        out = _generate(runner, ctx_model, tc, setup, timesteps, clock, record_fbc)  # warm-up (and compile)
    except Exception as error:  # diffusers-fullgraph: the documented failure, recorded
        if provider != "diffusers-fullgraph":
            raise
        row.update(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}")
        return row
    row["warmup_seconds"] = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _reset(model, provider)
        t0 = time.perf_counter()
        out = _generate(runner, ctx_model, tc, setup, timesteps, clock, record_fbc)
        times.append(time.perf_counter() - t0)
    row.update(seconds=statistics.median(times), times=times, graph_breaks=sum(counters["graph_break"].values()),
               graphs=counters["stats"]["unique_graphs"], latent=out)
    if config is not None and provider.startswith("fastcache"):
        row["computed"] = _computed_share(method, config, model, setup, timesteps, fbc_computed)
    return row


class _NoContext:
    """An uncached model has no cache_context: a no-op one keeps the loop the same."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def cache_context(self, name: str) -> Any:
        import contextlib

        return contextlib.nullcontext()


def _reset(model: Any, provider: str) -> None:
    if provider.startswith("fastcache"):
        fd.reset_cache(model)
    elif provider.startswith("diffusers"):
        model._reset_stateful_cache()


def bench(model_name: str, method: str, args: argparse.Namespace) -> list[dict]:
    setup = SETUPS[model_name]
    tc = case(model_name, **setup.size)
    tc.model.eval()
    timesteps = torch.linspace(1000, 0, args.steps)
    # FBC: a threshold between two observed ratios that skips about half the steps on these random weights
    threshold = fbc_threshold(tc, timesteps, setup.contexts) if method == "fbc" else 0.0
    rows = []
    for provider in args.providers.split(","):
        row = run_provider(provider, setup, tc, method, threshold, timesteps, args.repeats)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "latent"}), flush=True)
    reference = next((r["latent"] for r in rows if r["provider"] == "diffusers-eager"), None)
    computed = next((r["computed"] for r in rows if "computed" in r), None)
    baseline = next((r["seconds"] for r in rows if r["provider"] == "uncached-compiled"), None)
    for r in rows:
        latent = r.pop("latent", None)
        if reference is not None and latent is not None:
            r["max_diff_vs_diffusers_eager"] = float((latent - reference).abs().max())
        if not r["provider"].startswith("uncached") and "seconds" in r:
            r["computed"] = computed
        if baseline is not None and "seconds" in r:
            r["speedup_vs_uncached_compiled"] = baseline / r["seconds"]
    return rows


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| model | method | provider | s/generation | vs uncached compiled | warm-up s | graph breaks | graphs "
             "| computed | max abs diff vs diffusers eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['provider']} | fails: {r['error']} | | | | | | |")
            continue
        computed = "-" if r.get("computed") is None else f"{r['computed']:.2f}"
        diff = r.get("max_diff_vs_diffusers_eager")
        lines.append(f"| {r['model']} | {r['method']} | {r['provider']} | {r['seconds']:.3f} | "
                     f"{r.get('speedup_vs_uncached_compiled', float('nan')):.2f}x | {r['warmup_seconds']:.1f} | "
                     f"{r['graph_breaks']} | {r['graphs']} | {computed} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + f"\n\n{json.dumps(meta)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="model:method pairs")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "diffusers_bench"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [r for pair in args.runs.split(",") for r in bench(*pair.split(":"), args)]
    import diffusers

    meta = dict(torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                loadavg_before=load_before, loadavg_after=os.getloadavg(), args=vars(args),
                sizes={k: v.size for k, v in SETUPS.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = _markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
