"""fastcache's drop-in vs diffusers' own cache hooks, eager and compiled, in one run.

Providers per (model, method): diffusers hooks eager, diffusers hooks compiled (fullgraph=False: with
fullgraph=True diffusers' FirstBlockCache does not compile and its PAB fails on the 9th call), fastcache
eager, fastcache compiled (fullgraph=True). Both sides take the same decisions (same config, same
timesteps). Reported per provider: median seconds per generation (warm-up generation excluded, so compile
time is not in it), graph breaks and graphs compiled (over warm-up + timed runs), fraction of blocks (FBC)
or hooked attention calls (PAB) computed.

    python bench/bench_diffusers.py --scale 4 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import fastcache.diffusers as fd
from fastcache.diffusers._tiny import TinyCase, case
from fastcache.methods import pyramid_attention_broadcast as pab

RESULTS = Path(__file__).parent / "results"


def _generate(model, tc: TinyCase, timesteps: torch.Tensor, clock: dict, set_ctx) -> torch.Tensor:
    x = tc.latent.clone()
    for t in timesteps:
        clock["t"] = t
        with torch.no_grad(), set_ctx("cond"):
            out = model(**tc.kwargs(x, t), return_dict=False)[0]
        x = x - 0.05 * out
    return x


def _configs(method: str, clock: dict, threshold: float):
    import diffusers

    if method == "fbc":
        return diffusers.FirstBlockCacheConfig(threshold=threshold)
    return diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     current_timestep_callback=lambda: clock["t"])


def bench(name: str, method: str, args: argparse.Namespace) -> list[dict]:
    tc = case(name, scale=args.scale, size=args.size)
    tc.model.eval()
    timesteps = torch.linspace(1000, 0, args.steps)
    rows = []
    for provider in ("diffusers-eager", "diffusers-compiled", "fastcache-eager", "fastcache-compiled"):
        clock: dict = {}
        model = copy.deepcopy(tc.model)
        config = _configs(method, clock, args.threshold)
        if provider.startswith("diffusers"):
            model.enable_cache(config)
        else:
            fd.enable_cache(model, config)
        runner = model
        torch._dynamo.reset()
        counters.clear()
        if provider.endswith("compiled"):
            runner = torch.compile(model, fullgraph=provider.startswith("fastcache"), backend=args.backend)
        set_ctx = model.cache_context
        t0 = time.perf_counter()
        out = _generate(runner, tc, timesteps, clock, set_ctx)  # warm-up (and compile)
        warmup = time.perf_counter() - t0
        if provider.startswith("fastcache"):
            state = fd.cache_state(model, "cond")
        times = []
        for _ in range(args.repeats):
            if provider.startswith("fastcache"):
                fd.reset_cache(model)
            else:
                model._reset_stateful_cache()
            t0 = time.perf_counter()
            out = _generate(runner, tc, timesteps, clock, set_ctx)
            times.append(time.perf_counter() - t0)
        if method == "fbc":
            computed = (float(state["num_computed"]) / args.steps) if provider.startswith("fastcache") else None
        else:
            plan = pab.plan(fd.to_fastcache_config(config), timesteps.tolist())
            computed = plan.rows["spatial"].count("C") / args.steps
        rows.append(dict(model=name, method=method, provider=provider, seconds=statistics.median(times),
                         warmup_seconds=warmup, graph_breaks=sum(counters["graph_break"].values()),
                         graphs=counters["stats"]["unique_graphs"], computed_fraction=computed,
                         output_checksum=float(out.double().abs().sum())))
        print(json.dumps(rows[-1]))
    # both sides took the same decisions: FBC's fraction for diffusers is fastcache's when outputs agree
    for r in rows:
        if r["computed_fraction"] is None:
            r["computed_fraction"] = rows[-1]["computed_fraction"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux,wan")
    parser.add_argument("--methods", default="fbc,pab")
    parser.add_argument("--scale", type=int, default=4, help="hidden size = 32 * scale")
    parser.add_argument("--size", type=int, default=16, help="latent height/width")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--out", default=str(RESULTS / "diffusers_bench"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [r for m in args.models.split(",") for meth in args.methods.split(",") for r in bench(m, meth, args)]
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=torch.get_num_threads(), args=vars(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["| model | method | provider | s/generation | warm-up s | graph breaks | graphs | computed |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['provider']} | {r['seconds']:.3f} | {r['warmup_seconds']:.1f} | "
              f"{r['graph_breaks']} | {r['graphs']} | {r['computed_fraction']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
