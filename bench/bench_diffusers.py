"""fastcache's drop-in vs diffusers' own cache hooks on the same diffusers transformers, in one run.

For each (model, method) the same random-weight transformer (built from a config, no download) runs the same
denoising loop (timesteps 1000 -> 0, one `cache_context` per CFG pass as the family's pipeline runs them)
through these providers:

    uncached-eager, uncached-compiled        no cache: the baseline (compiled with fullgraph=True)
    diffusers-eager, diffusers-compiled      diffusers' hooks (`model.enable_cache`); compiled with
                                             fullgraph=False, since fullgraph=True fails (diffusers-fullgraph
                                             records how)
    fastcache-eager, fastcache-compiled      fastcache's drop-in (`fastcache.enable_cache`), fullgraph=True

`--compile regional` compiles the same way with diffusers' regional compilation instead
(`transformer.compile_repeated_blocks(fullgraph=...)`: each repeated block on its own, the rest eager).

Both caches get the same config and timesteps, so they take the same decisions, with one exception kept on
purpose: diffusers' PAB keeps one state per attention module, not per cache context, so with separate cond /
uncond passes (Wan) its uncond pass reuses the cond pass's attention; fastcache keeps one state per context.
The final latent of every provider is compared with diffusers-eager's (`max|diff|`: a different decision
shows far above 1e-4).

Every provider first runs two rounds of warm-up generations (compiles happen there, see `bench`), then the
timed generations go round-robin over the providers (`--repeats` rounds, rotating the order), so a change in
machine load hits all alike; fastcache-compiled's time over diffusers-compiled's is also taken per round
(paired) and its median reported. In a round each provider runs `--burst` generations back to back and only the
last is timed: the first generation after another provider's (an eager one above all) finds the caches cold and
took about 10 ms more on the tiny overhead-bound Flux (19 against 29 ms uncached compiled, measured), a cost
common to all that a user running one pipeline never pays and that pulls every ratio towards 1. Per provider:
the median seconds per generation, the warm-up time, graph breaks and graphs compiled over all its generations
(in brackets: during the timed rounds), and the share computed (FBC, SeaCache: steps that ran every block; PAB:
hooked attention calls; FasterCache: steps that ran the unconditional batch; MagCache: steps that ran the blocks;
TaylorSeer: steps that ran the forecast modules).
diffusers-fullgraph runs last, untimed: it records how diffusers' hooks fail under fullgraph=True.

    python bench/bench_diffusers.py                      # writes bench/results/diffusers_bench.{md,json}
    python bench/bench_diffusers.py --regime overhead    # the smallest models: bench/results/diffusers_bench_overhead.*
"""

from __future__ import annotations

import argparse
import contextlib
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
from bench_engine import _commit
from torch._dynamo.utils import counters

import fastcache.diffusers as fd
from fastcache.diffusers._runtime import classify_sites
from fastcache.diffusers._tiny import TinyCase, case, fbc_threshold
from fastcache.methods import faster_cache as fc
from fastcache.methods import mag_cache as mag
from fastcache.methods import pyramid_attention_broadcast as pab
from fastcache.methods import taylorseer as taylor

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
# the overhead-bound regime: the smallest models, where host work between kernels is most of a step
OVERHEAD_SIZES = {"flux": dict(scale=1, size=8, layers=2), "wan": dict(scale=1, size=8, frames=2, layers=2),
                  "cogvideox": dict(scale=1, size=8, frames=2, layers=2)}
DEFAULT_RUNS = "flux:fbc,flux:pab,wan:fbc,wan:pab,cogvideox:fastercache,cogvideox:pab"


def _config(method: str, threshold: float, clock: dict, steps: int = 20) -> Any:
    """diffusers' own config object: fastcache translates it, so both sides read exactly the same fields.
    MagCache gets synthetic ratios (slowly rising magnitudes: both sides skip the same steps, 40-50% of them)."""
    import diffusers

    if method == "mag":
        ratios = [1.0] + [1.0 + 0.004 * i for i in range(1, steps)]
        return diffusers.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps, threshold=0.1)
    if method == "taylorseer":  # the tiny models' attention modules (diffusers' defaults end in "attn")
        return diffusers.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                               taylor_factors_dtype=torch.float32,
                                               cache_identifiers=[r"(transformer_blocks|single_transformer_blocks|blocks)"
                                                                  r"\.\d+\.attn\d?"])

    if method == "fbc":
        return diffusers.FirstBlockCacheConfig(threshold=threshold)
    if method == "sea":  # Wan text-to-video: diffusers' built-in latents adapter; the loop passes step and sigma
        return diffusers.SeaCacheConfig(threshold=0.25 if threshold == 0.0 else threshold)
    if method == "pab":
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
            current_timestep_callback=lambda: clock["t"])
    if method == "fastercache":
        return diffusers.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=3,
                                           tensor_format="BFCHW", current_timestep_callback=lambda: clock["t"])
    raise ValueError(f"method: unknown {method!r}; known: fbc, pab, fastercache, mag, taylorseer, sea")


def loop_context(model: torch.nn.Module, method: str, name: str, step: int, timesteps: Any) -> Any:
    """The cache context of one CFG pass at `step`; SeaCache's also says where the loop is, as diffusers'
    WanPipeline passes it (`timesteps`: 1000 -> 0, a tensor or a list)."""
    if method == "sea":
        return model.cache_context(name, step_index=step, sigma=float(timesteps[step]) / 1000,
                                   num_inference_steps=len(timesteps))
    return model.cache_context(name)


def own_frame(model: torch.nn.Module, tag: str) -> Any:
    """`model(...)` behind a function with a code object of its own, compiled instead of the model: dynamo keeps
    its caches and skip marks per code object, and once diffusers' hooks under fullgraph=False fail to resume
    after a graph break it marks the model's shared `forward` frame to run eagerly, for every provider (the
    uncached provider then ran uncompiled: measured)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=f"call_{tag.replace('-', '_')}")
    return call


class Provider:
    """One way of running the loop: its own copy of the model, cache and (maybe compiled) runner."""

    def __init__(self, name: str, setup: Setup, tc: TinyCase, method: str, threshold: float,
                 timesteps: torch.Tensor, regional: bool = False) -> None:
        self.name, self.setup, self.tc, self.method, self.timesteps = name, setup, tc, method, timesteps
        self.clock: dict = {}
        self.model = copy.deepcopy(tc.model)
        self.config = None if name.startswith("uncached") else _config(method, threshold, self.clock, len(timesteps))
        if name.startswith("diffusers"):
            self.model.enable_cache(self.config)
        elif name.startswith("fastcache"):
            fd.enable_cache(self.model, self.config)
        self.runner = self.model
        if name.endswith(("compiled", "fullgraph")):
            fullgraph = not name.startswith("diffusers-compiled")
            if regional:  # diffusers' regional compilation: each repeated block compiled on its own
                self.model.compile_repeated_blocks(fullgraph=fullgraph)
            else:
                self.runner = torch.compile(own_frame(self.model, name), fullgraph=fullgraph)
        self.blocks_computed: list[int] = []  # FBC, SeaCache: per context, the calls that ran every block
        self.nonfinite: int | None = None  # reuses that met a non-finite cached value (fastcache providers)
        self.times: list[float] = []
        self.breaks = self.graphs = 0

    def generate(self) -> torch.Tensor:
        """One generation from fresh cache states; graph breaks and graphs compiled are added to this provider."""
        if self.name.startswith("fastcache"):
            fd.reset_cache(self.model)
        elif self.name.startswith("diffusers"):
            self.model._reset_stateful_cache()
        breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        x = self.tc.latent.clone()
        for i, t in enumerate(self.timesteps):
            self.clock["t"] = t
            outs = []
            for name in self.setup.contexts:
                with torch.no_grad(), self._context(name, i):
                    outs.append(self.runner(**self.tc.kwargs(x, t), return_dict=False)[0])
            x = x - 0.05 * outs[-1]  # any update works: the loop only has to feed the output back
        if self.name.startswith("fastcache"):  # the counters, read once after the loop
            states = [fd.cache_state(self.model, n) for n in self.setup.contexts]
            self.nonfinite = sum(int(s["nonfinite"]) for s in states)
            if self.method in ("fbc", "sea"):
                self.blocks_computed = [int(s["num_computed"]) for s in states]
        self.breaks += sum(counters["graph_break"].values()) - breaks
        self.graphs += counters["stats"]["unique_graphs"] - graphs
        return x

    def _context(self, name: str, step: int) -> Any:
        if self.config is None:
            return contextlib.nullcontext()
        return loop_context(self.model, self.method, name, step, self.timesteps)

    def computed_share(self) -> float | None:
        """FBC, SeaCache: steps that ran every block (fastcache's count); PAB: hooked attention calls computed;
        FasterCache: steps that ran the unconditional batch (both from the plan)."""
        if not self.name.startswith("fastcache"):
            return None
        if self.method in ("fbc", "sea"):
            return sum(self.blocks_computed) / (len(self.setup.contexts) * len(self.timesteps))
        ours = fd.to_fastcache_config(self.config)
        if self.method == "mag":
            return mag.plan(ours, self.timesteps.tolist()).rows["blocks"].count("C") / len(self.timesteps)
        if self.method == "taylorseer":
            return taylor.plan(ours, self.timesteps.tolist()).rows["forecast"].count("C") / len(self.timesteps)
        if self.method == "fastercache":
            return fc.plan(ours, self.timesteps.tolist()).rows["uncond"].count("F") / len(self.timesteps)
        rows = pab.plan(ours, self.timesteps.tolist()).rows
        kinds = [kind for _, kind in classify_sites(self.model, ours).values()]
        return sum(rows[k].count("C") for k in kinds) / (len(kinds) * len(self.timesteps))


def bench(model_name: str, method: str, args: argparse.Namespace) -> list[dict]:
    """Every provider warms up (compiles) once, then the timed generations go round-robin over the providers,
    so a change in machine load hits all of them alike."""
    setup = SETUPS[model_name]
    if args.regime == "overhead":
        setup = Setup(setup.model, setup.contexts, OVERHEAD_SIZES[model_name])
    tc = case(model_name, **setup.size)
    tc.model.eval()
    timesteps = torch.linspace(1000, 0, args.steps)
    # FBC: a threshold between two observed ratios that skips about half the steps on these random weights
    threshold = args.threshold
    if threshold is None:
        threshold = fbc_threshold(tc, timesteps, setup.contexts) if method == "fbc" else 0.0
    names = args.providers.split(",")
    probe = "diffusers-fullgraph" in names  # expected to fail: run last, outside the timing
    torch._dynamo.reset()
    counters.clear()
    regional = args.compile == "regional"
    providers = [Provider(n, setup, tc, method, threshold, timesteps, regional) for n in names
                 if n != "diffusers-fullgraph"]
    latents, warmups = {}, {p.name: 0.0 for p in providers}
    # two warm-up rounds: the first compiles; in the second a provider may still recompile because another
    # provider's graphs on the shared diffusers code objects changed which guards it meets first
    for _ in range(2):
        for p in providers:
            t0 = time.perf_counter()
            latents[p.name] = p.generate()
            warmups[p.name] += time.perf_counter() - t0
    compiled_in_warmup = {p.name: p.graphs for p in providers}
    for r in range(args.repeats):
        for p in providers[r % len(providers):] + providers[:r % len(providers)]:
            for _ in range(args.burst - 1):  # untimed: caches warm again after the previous provider's run
                latents[p.name] = p.generate()
            t0 = time.perf_counter()
            latents[p.name] = p.generate()
            p.times.append(time.perf_counter() - t0)
    rows = []
    reference = latents.get("diffusers-eager")
    computed = next((p.computed_share() for p in providers if p.computed_share() is not None), None)
    baseline = statistics.median(next(p.times for p in providers if p.name == "uncached-compiled"))
    for p in providers:
        seconds = statistics.median(p.times)
        row = dict(model=model_name, method=method, provider=p.name, regime=args.regime, seconds=seconds, times=p.times,
                   warmup_seconds=warmups[p.name], graph_breaks=p.breaks, graphs=p.graphs,
                   graphs_during_timing=p.graphs - compiled_in_warmup[p.name],
                   speedup_vs_uncached_compiled=baseline / seconds,
                   computed=None if p.config is None else computed, nonfinite=p.nonfinite)
        if reference is not None:
            row["max_diff_vs_diffusers_eager"] = float((latents[p.name] - reference).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    timed = {p.name: p.times for p in providers}
    if "fastcache-compiled" in timed and "diffusers-compiled" in timed:  # paired by round: load drifts cancel
        ratios = [f / d for f, d in zip(timed["fastcache-compiled"], timed["diffusers-compiled"])]
        row = next(r for r in rows if r["provider"] == "fastcache-compiled")
        row["paired_ratio_vs_diffusers_compiled"] = statistics.median(ratios)
    if probe:
        rows.append(_probe_fullgraph(setup, tc, method, threshold, timesteps, regional))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _probe_fullgraph(setup: Setup, tc: TinyCase, method: str, threshold: float, timesteps: torch.Tensor,
                     regional: bool) -> dict:
    """diffusers' hooks under torch.compile(fullgraph=True): one generation, and how it fails."""
    torch._dynamo.reset()
    row: dict = dict(model=setup.model, method=method, provider="diffusers-fullgraph")
    try:
        Provider("diffusers-fullgraph", setup, tc, method, threshold, timesteps, regional).generate()
        row["error"] = None
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| model | method | provider | s/generation | vs uncached compiled | time / diffusers compiled (paired) "
             "| warm-up s | graph breaks | graphs (in timed runs) | computed | max abs diff vs diffusers eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['method']} | {r['provider']} |"
        if "error" in r:
            lines.append(f"{head} {'runs' if r['error'] is None else 'fails: ' + r['error']} |" + " |" * 8)
            continue
        paired = r.get("paired_ratio_vs_diffusers_compiled")
        computed, diff = r.get("computed"), r.get("max_diff_vs_diffusers_eager")
        lines.append(f"{head} {r['seconds']:.3f} | {r['speedup_vs_uncached_compiled']:.2f}x | "
                     f"{'' if paired is None else f'{paired:.3f}'} | {r['warmup_seconds']:.1f} | "
                     f"{r['graph_breaks']} | {r['graphs']} ({r['graphs_during_timing']}) | "
                     f"{'-' if computed is None else f'{computed:.2f}'} | {'-' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + f"\n\n{json.dumps(meta)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="model:method pairs")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all providers")
    parser.add_argument("--burst", type=int, default=2,
                        help="generations per provider per round, the last one timed (1: every one, cold caches)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="FBC threshold (default: probed to skip about half the steps); 0 always computes")
    parser.add_argument("--regime", choices=("compute", "overhead"), default="compute",
                        help="compute: models big enough that compute dominates; overhead: the smallest models")
    parser.add_argument("--compile", choices=("whole", "regional"), default="whole",
                        help="whole: torch.compile of the transformer; regional: compile_repeated_blocks")
    parser.add_argument("--out", default=None, help="default: bench/results/diffusers_bench[_overhead]")
    args = parser.parse_args()
    if args.burst < 1 or args.repeats < 1:
        parser.error(f"--burst and --repeats: at least 1 (got {args.burst}, {args.repeats})")
    if args.out is None:
        args.out = str(RESULTS / ("diffusers_bench" if args.regime == "compute" else "diffusers_bench_overhead"))
    load_before = os.getloadavg()
    rows = [r for pair in args.runs.split(",") for r in bench(*pair.split(":"), args)]
    import diffusers

    meta = dict(torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
                commit=_commit(),
                machine=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                loadavg_before=load_before, loadavg_after=os.getloadavg(), args=vars(args),
                sizes=OVERHEAD_SIZES if args.regime == "overhead" else {k: v.size for k, v in SETUPS.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = _markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
