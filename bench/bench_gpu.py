"""GPU benchmark: fastcache's drop-in vs diffusers' own hooks, and the engine, compiled, in one time-boxed run.

A. Drop-in (`fastcache.enable_cache`) vs diffusers' hooks (`model.enable_cache`) on random-weight diffusers
   transformers (`fastcache.diffusers._tiny.case`: Flux, Wan with separate cond/uncond passes, CogVideoX with
   batched CFG), at a launch-bound small size and a compute-bound large size (`SIZES`), for FirstBlockCache
   (threshold probed so that both skips and computes happen), PAB, FasterCache, MagCache (synthetic ratios),
   TaylorSeer and SeaCache (Wan only: diffusers' built-in latents adapter; the loop passes step and sigma to
   `cache_context`, as WanPipeline does). Providers:
       uncached-compiled           no cache, fullgraph=True (the baseline)
       uncached-reduce-overhead    no cache, fullgraph=True, mode="reduce-overhead" (small sizes only)
       diffusers-compiled          diffusers' hooks, fullgraph=False (its hooks cannot run under fullgraph=True)
       fastcache-compiled          fastcache's drop-in, fullgraph=True
       fastcache-reduce-overhead   the drop-in, fullgraph=True, mode="reduce-overhead" (small sizes only):
                                   whether inductor really records CUDA graphs is reported, not assumed
       <kind>-regional[-reduce-overhead]   the same, compiled with diffusers' regional compilation
                                   (`compile_repeated_blocks`; unit `flux-small-fbc@...`): fastcache's
                                   FirstBlockCache then reads its decision on the host once per call around
                                   blocks compiled alone (no torch.cond: CUDA graphs possible), against
                                   diffusers' hooks compiled the same way
   The loop runs 20 steps, timesteps 1000 -> 0 as host floats (diffusers' PAB callback returns a host float, so
   it never syncs), one `cache_context` per CFG pass. Per provider: median ms per step (one step = every CFG
   pass), over `--repeats` round-robin rounds after `--warmup` warm-up generations; syncs per step (host syncs
   counted with `torch.cuda.set_sync_debug_mode("warn")` over one generation); peak memory over one generation;
   dynamo graphs and graph breaks; CUDA graphs recorded and inductor's reasons for skipping them;
   `torch.cond` nodes per compiled call (fastcache, from a capture-only compile); the computed share; the final
   latent's max abs diff vs diffusers-compiled.
B. Engine (`fastcache.make(config)`: `init` / `plan` / `step`) on the reference DiT (`ENGINE_DIT`, bf16, CFG
   batch 2): uncached vs PAB and FasterCache (planned decisions: Python values, no `torch.cond`) vs
   FirstBlockCache (decided on the device: one `torch.cond` per step), `fullgraph=True`, in the default mode
   (unit `engine`) and in mode="reduce-overhead" (unit `engine-ro`). ms per generation, syncs per step,
   speedup vs uncached in the same mode, share of FLOPs computed.

Units run in `--units` order and each is skipped when the time left (`--budget-s`) is under its estimate (the
last similar unit's duration; first guesses in `DEFAULT_ESTIMATE_S`, or 15 s + 30 s per provider given with
`--providers`); `gpu_bench.{json,md}` are rewritten in `--out` after every unit, so a run cut short keeps what
finished; `--append` adds to them (bench/gpu.sh runs one process per unit, so that a CUDA-graph failure cannot
leave cudagraph trees broken for the units after it). Sizing, measured on an H100 host (run 2): compiling
dominates, 15-60 s per provider (diffusers' hooks the slowest), 130-150 s per unit with every provider.

    OUT_DIR=$OUT bash bench/gpu.sh                              # on the GPU machine: setup, kernels, this
    python bench/bench_gpu.py --out bench/results              # this script only (CUDA)
    python bench/bench_gpu.py --smoke --device cpu --out /tmp/x   # CPU smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_engine
import torch
from bench_diffusers import _config as diffusers_config
from bench_diffusers import loop_context, own_frame
from torch import Tensor
from torch._dynamo.utils import counters

import fastcache
import fastcache.diffusers as fd
from fastcache.diffusers._tiny import TinyCase, case, fbc_threshold
from fastcache.methods import faster_cache, mag_cache, pyramid_attention_broadcast, taylorseer
from fastcache.models.dit import DiT, DiTConfig, cfg_inputs, sampling_timesteps
from fastcache.protocol import forward
from fastcache.testing import CompileCounter

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = {"flux": ("cond",), "wan": ("cond", "uncond"), "cogvideox": ("cond_uncond",)}
SIZES = {  # arguments of `case`; hidden size = heads * 16 * scale (head dim 128 at the large size, as in Flux/Wan)
    "flux": {"small": dict(scale=4, size=16, layers=4),  # hidden 128, 256 image tokens: launch-bound
             "large": dict(scale=8, heads=16, size=64, layers=4)},  # hidden 2048, 4096 tokens: compute-bound
    "wan": {"small": dict(scale=4, size=16, frames=2, layers=4),
            "large": dict(scale=8, heads=12, size=64, frames=4, layers=4)},  # hidden 1536 (Wan 1.3B), 4096 tokens
    "cogvideox": {"small": dict(scale=4, size=16, frames=2, layers=4),
                  "large": dict(scale=8, heads=12, size=64, frames=4, layers=4)},
}
SMOKE_SIZE = dict(scale=1, size=8, frames=2, layers=2)
PROVIDERS = {
    "small": ("uncached-compiled", "uncached-reduce-overhead", "diffusers-compiled", "fastcache-compiled",
              "fastcache-reduce-overhead"),
    "large": ("uncached-compiled", "diffusers-compiled", "fastcache-compiled"),
}
ENGINE_DIT = dict(in_channels=4, sample_size=64, patch_size=2, hidden_size=1024, num_heads=16, depth=8)
SMOKE_DIT = dict(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, num_heads=2, depth=2)
ENGINE_SETTINGS = ("uncached", "PAB spatial N=2", "FasterCache uncond N=2, wide ranges", "FBC threshold 0.2",
                   "FBC threshold 0.2, split step")
SPLIT = bench_engine.SPLIT  # as fastcache.compile_step runs FBC: compiled head, one host read, compiled tail
REGIONAL = "uncached-regional+diffusers-regional+fastcache-regional+fastcache-regional-reduce-overhead"
# first the units whose CUDA graphs were fixed on CPU and never measured (planned PAB and the engine under
# mode="reduce-overhead", the regional FBC), so that a default bench/gpu.sh run of 450 s reaches them
DEFAULT_UNITS = (f"flux-small-pab,engine-ro,flux-small-fbc@{REGIONAL},flux-small-fbc,flux-small-mag,engine,"
                 "flux-large-fbc,flux-large-pab,flux-large-mag,wan-large-fbc,wan-large-pab,wan-small-fbc,"
                 "wan-small-pab,flux-small-taylorseer,cogvideox-small-fastercache,wan-small-sea,wan-large-sea")
SMOKE_UNITS = ("flux-small-fbc,flux-small-fbc@uncached-regional+fastcache-regional,wan-small-pab,"
               "cogvideox-small-fastercache,flux-small-mag,flux-small-taylorseer,wan-small-sea,engine,engine-ro")
DEFAULT_ESTIMATE_S = {"small": 150.0, "large": 130.0, "engine": 65.0}  # measured on an H100 (run 2)


# ---------------------------------------------------------------------------------------------- utilities
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def graphs_and_breaks() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class CudagraphLog(logging.Handler):
    """Collects inductor's 'skipping cudagraphs due to ...' messages and cudagraph trees' re-recordings with their
    reason (first line of each)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if record.name.endswith("__cudagraphs"):  # cudagraph trees' debug log: only its re-recordings
            if "Re-recording" not in message:
                return
            message = "re-recorded: " + message.split("reason=", 1)[-1]
        self.messages.append(message.splitlines()[0][:200])

    @classmethod
    def install(cls) -> CudagraphLog:
        """Attached to the loggers that inductor's `log_cudagraph_skip_and_bump_counter` writes to (their names
        changed across torch versions; none found: reasons show as counts only)."""
        handler = cls()
        try:
            from torch._inductor import cudagraph_utils
        except ImportError:
            return handler
        for name in ("cudagraphs_log", "perf_hint_log"):
            logger = getattr(cudagraph_utils, name, None)
            if isinstance(logger, logging.Logger):
                logger.addHandler(handler)
        # re-recording reasons are computed only at DEBUG (torch 2.11), on this artifact logger alone
        from torch._inductor import cudagraph_trees

        trees_log = getattr(cudagraph_trees, "log", None)
        if isinstance(trees_log, logging.Logger):
            trees_log.setLevel(logging.DEBUG)
            trees_log.propagate = False
            trees_log.addHandler(handler)
        return handler

    def mark(self) -> tuple[int, int]:
        return len(self.messages), counters["inductor"]["cudagraph_skips"]

    def since(self, mark: tuple[int, int]) -> list[str]:
        """Skip reasons since `mark`; skips counted by inductor but not logged are reported as a count."""
        new = self.messages[mark[0]:]
        unlogged = counters["inductor"]["cudagraph_skips"] - mark[1] - len(new)
        return new + ([f"{unlogged} cudagraph skip(s), reason not logged"] if unlogged > 0 else [])


def cudagraph_nodes(device: torch.device) -> int | None:
    """CUDA graphs recorded so far in the device's cudagraph tree (None where it cannot be read)."""
    if device.type != "cuda":
        return None
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        if manager is None or manager.roots is None:
            return 0
        nodes, count = list(manager.get_roots()), 0
        while nodes:
            node = nodes.pop()
            count += 1
            nodes.extend(child for children in node.children.values() for child in children)
        return count
    except Exception:
        return None


def count_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str | None]:
    """Host syncs during `fn()` (warnings of `torch.cuda.set_sync_debug_mode("warn")`) and one message text."""
    if device.type != "cuda":
        return None, None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(device)
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return len(found), (found[0].splitlines()[0][:200] if found else None)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, float | None]:
    """(max_memory_allocated, its excess over the memory allocated before) around `fn()`, in MiB."""
    if device.type != "cuda":
        return None, None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return round(peak / 2**20, 1), round((peak - before) / 2**20, 1)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = dict(date=time.strftime("%F %T %Z"), device=device.type, python=platform.python_version(),
                                torch=torch.__version__, platform=platform.platform(), cpus=os.cpu_count())
    for name in ("triton", "diffusers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # a missing package is a fact to report
            info[name] = f"not importable ({type(error).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


# ------------------------------------------------------------------------------------- A: drop-in providers
def to_device(tc: TinyCase, device: torch.device, dtype: torch.dtype) -> TinyCase:
    """`tc` on `device`: model and latent in `dtype`; the constant call arguments are moved once (floats in
    `dtype` except position ids, which stay fp32); a host-float timestep becomes a device scalar made by a
    fill (no host-to-device copy, so no sync)."""
    moved: dict[str, Tensor] = {}

    def move(name: str, value: Any) -> Any:
        if not isinstance(value, Tensor) or value.device.type == device.type:
            return value
        if name not in moved:
            keep = not value.is_floating_point() or name.endswith("_ids")
            moved[name] = value.to(device) if keep else value.to(device, dtype)
        return moved[name]

    def kwargs(x: Tensor, t: Any) -> dict[str, Any]:
        if not isinstance(t, Tensor):
            t = torch.full((), float(t), device=device)
        return {name: move(name, value) for name, value in tc.kwargs(x, t).items()}

    model = tc.model.to(device, dtype).eval()
    return TinyCase(tc.name, model, tc.latent.to(device, dtype), kwargs, tc.cfg_batched)


class DropIn:
    """One provider of section A: its own copy of the model, cache and compiled runner, and its statistics."""

    def __init__(self, name: str, tc: TinyCase, contexts: tuple[str, ...], method: str, threshold: float,
                 timesteps: list[float], backend: Any) -> None:
        self.name, self.tc, self.contexts, self.method, self.timesteps = name, tc, contexts, method, timesteps
        self.kind = name.split("-")[0]  # uncached | diffusers | fastcache
        self.clock: dict[str, float] = {"t": timesteps[0]}
        self.model = copy.deepcopy(tc.model)
        self.config = (None if self.kind == "uncached"
                       else diffusers_config(method, threshold, self.clock, steps=len(timesteps)))
        if self.kind == "diffusers":
            self.model.enable_cache(self.config)
        elif self.kind == "fastcache":
            fd.enable_cache(self.model, self.config)
        options: dict[str, Any] = dict(fullgraph=self.kind != "diffusers", backend=backend)
        if name.endswith("reduce-overhead"):
            options["mode"] = "reduce-overhead"
        if "-regional" in name:  # diffusers' regional compilation: each repeated block compiled on its own
            self.model.compile_repeated_blocks(**options)
            self.runner = self.model
        else:
            self.runner = torch.compile(own_frame(self.model, name), **options)
        self.device = tc.latent.device
        self.times: list[float] = []
        self.graphs = self.breaks = 0
        self.cudagraphs: int | None = 0 if self.device.type == "cuda" else None
        self.skip_reasons: list[str] = []
        self.warmup_s = 0.0
        self.latent: Tensor | None = None
        self.record_computed = False
        self.computed: list[Tensor] = []

    def generate(self) -> Tensor:
        """One generation from fresh cache states; dynamo's graph and CUDA-graph counts are added to this
        provider's."""
        if self.kind == "fastcache":
            fd.reset_cache(self.model)
        elif self.kind == "diffusers":
            self.model._reset_stateful_cache()
        graphs, breaks = graphs_and_breaks()
        nodes = cudagraph_nodes(self.device)
        x = self.tc.latent.clone()
        for step, t in enumerate(self.timesteps):
            self.clock["t"] = t
            t_device = torch.full((), t, device=self.device)
            for name in self.contexts:
                with torch.no_grad(), self._context(name, step):
                    out = self.runner(**self.tc.kwargs(x, t_device), return_dict=False)[0]
            x = x - 0.05 * out  # any update works: the loop only has to feed the output back
        if self.record_computed and self.kind == "fastcache" and self.method in ("fbc", "sea"):
            # read right away: with CUDA graphs, state tensors may be overwritten by another provider's replay
            self.computed = [fd.cache_state(self.model, n)["num_computed"].clone() for n in self.contexts]
        new_graphs, new_breaks = graphs_and_breaks()
        self.graphs += new_graphs - graphs
        self.breaks += new_breaks - breaks
        after = cudagraph_nodes(self.device)
        if self.cudagraphs is not None and nodes is not None and after is not None:
            self.cudagraphs += max(after - nodes, 0)
        return x

    def _context(self, name: str, step: int) -> Any:
        if self.config is None:
            return contextlib.nullcontext()
        return loop_context(self.model, self.method, name, step, self.timesteps)

    def computed_share(self) -> float | None:
        """fastcache only. FBC, SeaCache: calls that ran every block (the state's counter); PAB: hooked attention
        calls computed; FasterCache: steps that ran the unconditional half (both from the plan)."""
        if self.kind != "fastcache":
            return None
        steps = len(self.timesteps)
        if self.method in ("fbc", "sea"):
            return sum(int(c) for c in self.computed) / (len(self.contexts) * steps) if self.computed else None
        ours = fd.to_fastcache_config(self.config)
        if self.method == "fastercache":
            return faster_cache.plan(ours, self.timesteps).rows["uncond"].count("F") / steps
        if self.method == "mag":  # blocks computed
            return mag_cache.plan(ours, self.timesteps).rows["blocks"].count("C") / steps
        if self.method == "taylorseer":  # attention computed (the rest of each block always runs)
            return taylorseer.plan(ours, self.timesteps).rows["forecast"].count("C") / steps
        from fastcache.diffusers._runtime import classify_sites

        rows = pyramid_attention_broadcast.plan(ours, self.timesteps).rows
        kinds = [kind for _, kind in classify_sites(self.model, ours).values()]
        return sum(rows[k].count("C") for k in kinds) / (len(kinds) * steps) if kinds else None


def timed(provider: DropIn | EngineRun) -> float:
    """Wall seconds of one whole generation, device synchronised on both ends."""
    sync(provider.device)
    start = time.perf_counter()
    provider.latent = provider.generate()
    sync(provider.device)
    return time.perf_counter() - start


def count_conds(tc: TinyCase, contexts: tuple[str, ...], method: str, threshold: float,
                timesteps: list[float]) -> dict[str, Any]:
    """`torch.cond` nodes per compiled call of the drop-in: three steps (a context's first call and later ones)
    through a capture-only compile."""
    counter = CompileCounter("eager")
    try:
        DropIn("fastcache-capture", tc, contexts, method, threshold, timesteps[:3], counter).generate()
    except Exception as error:  # reported with the rows; the timed providers still run
        return dict(conds_error=short_error(error))
    finally:
        torch._dynamo.reset()
    return dict(conds_per_call=counter.max_conds_per_call, conds_per_graph=counter.conds_per_graph)


def dropin_unit(model: str, size: str, method: str, args: argparse.Namespace, log: Callable[[str], None],
                skips: CudagraphLog) -> list[dict[str, Any]]:
    """One (model, size, method): every provider warms up, then timed generations go round-robin; then one
    generation each for the sync count and the peak memory."""
    device, dtype = args.device, args.dtype
    dims = SMOKE_SIZE if args.smoke else SIZES[model][size]
    contexts = CONTEXTS[model]
    tc = to_device(case(model, **dims), device, dtype)
    timesteps = torch.linspace(1000, 0, args.steps).tolist()
    threshold = fbc_threshold(tc, timesteps, contexts) if method == "fbc" else 0.0
    names = args.providers.split(",") if args.providers else PROVIDERS[size]
    base = dict(model=model, size=size, dims=dims, method=method, contexts=len(contexts), steps=len(timesteps),
                threshold=threshold if method == "fbc" else None)
    conds: dict[str, Any] = {}
    if any(n.startswith("fastcache") for n in names):
        conds = count_conds(tc, contexts, method, threshold, timesteps)
        log(f"  torch.cond per compiled call: {conds}")
    torch._dynamo.reset()
    counters.clear()
    rows: dict[str, dict[str, Any]] = {}
    providers: list[DropIn] = []
    for name in names:
        rows[name] = dict(base, provider=name)
        if name.endswith("reduce-overhead") and device.type != "cuda":
            rows[name]["error"] = "n/a on cpu"
            continue
        try:
            providers.append(DropIn(name, tc, contexts, method, threshold, timesteps, args.backend))
        except Exception as error:  # e.g. a cache that refuses this model: a result of this row
            rows[name]["error"] = f"setup: {short_error(error)}"
    providers = run_phases(providers, rows, args, log, skips)
    reference = next((p.latent for p in providers if p.name in ("diffusers-compiled", "diffusers-regional")), None)
    medians = {p.name: statistics.median(p.times) for p in providers if p.times}
    for p in providers:
        row = rows[p.name]
        ms = medians.get(p.name)
        row.update(ms_per_step=None if ms is None else ms * 1e3 / len(timesteps), times_s=p.times,
                   warmup_s=round(p.warmup_s, 1), graphs=p.graphs, graph_breaks=p.breaks, cudagraphs=p.cudagraphs,
                   cudagraph_skip_reasons=sorted(set(p.skip_reasons)), computed=p.computed_share())
        compiled = "regional" if "-regional" in p.name else "compiled"  # against the same compilation
        if ms is not None and f"uncached-{compiled}" in medians:
            row["speedup_vs_uncached"] = medians[f"uncached-{compiled}"] / ms
        if ms is not None and f"diffusers-{compiled}" in medians:
            row["speedup_vs_diffusers"] = medians[f"diffusers-{compiled}"] / ms
        if reference is not None and p.latent is not None:
            row["max_diff_vs_diffusers"] = float((p.latent.float() - reference.float()).abs().max())
        if p.kind == "fastcache":
            row.update(conds)
    return list(rows.values())


def run_phases(providers: list[Any], rows: dict[str, dict[str, Any]], args: argparse.Namespace,
               log: Callable[[str], None], skips: CudagraphLog) -> list[Any]:
    """Warm-up, round-robin timing, sync count and peak memory; a provider that raises gets its error in its
    row and leaves the remaining phases. Returns the providers that finished."""
    alive = list(providers)

    def attempt(p: Any, phase: str, fn: Callable[[], Any]) -> Any:
        before = skips.mark()
        try:
            return fn()
        except Exception as error:  # one provider's failure is a result
            rows[p.name]["error"] = f"{phase}: {short_error(error)}"
            log(f"  {p.name} failed in {phase}: {short_error(error)}")
            if args.verbose:
                traceback.print_exc()
            alive.remove(p)
            return None
        finally:
            p.skip_reasons += skips.since(before)

    for r in range(args.warmup):
        for p in list(alive):
            p.record_computed = r == args.warmup - 1
            start = time.perf_counter()
            attempt(p, "warm-up", lambda p=p: timed(p))
            p.record_computed = False
            p.warmup_s += time.perf_counter() - start
            if p in alive:
                log(f"  warm-up {r + 1}: {p.name} {time.perf_counter() - start:.1f} s")
    for r in range(args.repeats):
        for p in alive[r % len(alive):] + alive[:r % len(alive)] if alive else []:
            seconds = attempt(p, "timing", lambda p=p: timed(p))
            if seconds is not None:
                p.times.append(seconds)
    for p in list(alive):
        count, sample = attempt(p, "sync count", lambda p=p: count_syncs(p.generate, p.device)) or (None, None)
        if p in alive:
            rows[p.name].update(syncs_per_step=None if count is None else count / args.steps, sync_message=sample)
            peak, extra = attempt(p, "peak memory", lambda p=p: peak_memory(p.generate, p.device)) or (None, None)
            rows[p.name].update(peak_mib=peak, peak_extra_mib=extra)
    return alive


# ------------------------------------------------------------------------------------------- B: the engine
def engine_model(dims: dict[str, int], device: torch.device, dtype: torch.dtype) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(**dims))
    with torch.no_grad():  # random weights with live adaLN gates (zero-init would make blocks identities)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().to(device, dtype)


class EngineRun:
    """One engine setting, compiled with fullgraph=True in one mode: a CFG Euler generation loop."""

    def __init__(self, name: str, config: Any, model: DiT, x0: Tensor, labels: Tensor, steps: int,
                 compile_options: dict[str, Any]) -> None:
        self.name, self.model, self.x0, self.labels, self.steps = name, model, x0, labels, steps
        self.device = x0.device
        self.timesteps = sampling_timesteps(steps, self.device)
        self.zero = torch.zeros((), device=self.device)
        first = cfg_inputs(x0, self.timesteps[0], labels, bench_engine.NULL)
        self.uses_cuda_graphs = compile_options.get("mode") == "reduce-overhead"
        self.last_state: Any = None
        self.latent: Tensor | None = None
        self.times: list[float] = []
        self.skip_reasons: list[str] = []
        if config is None:
            compiled = torch.compile(lambda inputs: forward(model, inputs), **compile_options)

            def uncached_step(state: Any, inputs: Any, decision: Any) -> Any:
                if self.uses_cuda_graphs:  # one cudagraph-trees generation per step, as compile_step starts
                    torch.compiler.cudagraph_mark_step_begin()
                return compiled(inputs), state

            self.step: Callable[..., Any] = uncached_step
            self.state0: Any = None
            self.plan: Any = [None] * steps
            self.fraction: Callable[[Any], float] = lambda state: 1.0
        else:
            method = fastcache.make(config)
            # the API a user calls: under CUDA graphs it starts a cudagraph-trees generation per step (the split
            # step's head and tail share it) and copies the new state out of the pool (fastcache.cuda_graphs)
            self.step = fastcache.compile_step(method, model, split=name.endswith(SPLIT), **compile_options)
            # a state is a value (steps never write into it): one initial state serves every generation
            self.state0 = method.init(model, first)
            self.plan = method.plan(self.timesteps)
            self.fraction = lambda state: method.computed_fraction(model, first, self.plan, state)

    def generate(self) -> Tensor:
        x, state, ts = self.x0, self.state0, self.timesteps
        for i in range(self.steps):
            out, state = self.step(state, cfg_inputs(x, ts[i], self.labels, bench_engine.NULL), self.plan[i])
            u, c = out.chunk(2)
            t_next = ts[i + 1] if i + 1 < self.steps else self.zero
            x = x + (t_next - ts[i]) / 1000 * (u + 4.0 * (c - u))
        self.last_state = state
        return x


def engine_unit(mode: str, args: argparse.Namespace, log: Callable[[str], None],
                skips: CudagraphLog) -> list[dict[str, Any]]:
    device, dtype = args.device, args.dtype
    dims = SMOKE_DIT if args.smoke else ENGINE_DIT
    base = dict(mode=mode, dit=dims, steps=args.steps, cfg_batch=2)
    if mode == "reduce-overhead" and device.type != "cuda":
        return [dict(base, setting=name, error="n/a on cpu") for name in ENGINE_SETTINGS]
    model = engine_model(dims, device, dtype)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, dims["in_channels"], dims["sample_size"], dims["sample_size"], generator=g).to(device, dtype)
    labels = torch.tensor([1], device=device)
    options: dict[str, Any] = dict(fullgraph=True, backend=args.backend)
    if mode == "reduce-overhead":
        options["mode"] = mode
    configs = bench_engine.settings()
    torch._dynamo.reset()
    counters.clear()
    names = args.settings.split(";") if args.settings else ENGINE_SETTINGS
    unknown = [n for n in names if n not in ENGINE_SETTINGS]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; expected some of {ENGINE_SETTINGS}")
    rows = {name: dict(base, setting=name) for name in names}
    runs: list[EngineRun] = []
    # every setting's compiled step shares one code object; each planned step variant is one cache entry
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for name in names:
            run = EngineRun(name, configs[name], model, x0, labels, args.steps, options)
            if warm_engine(run, rows[name], args, log, skips):
                runs.append(run)
        alive = run_phases(runs, rows, dict_args(args, warmup=0), log, skips)
    medians = {r.name: statistics.median(r.times) for r in alive if r.times}
    for run in alive:
        ms = medians.get(run.name)
        rows[run.name].update(ms_per_generation=None if ms is None else ms * 1e3,
                              ms_per_step=None if ms is None else ms * 1e3 / args.steps, times_s=run.times,
                              cudagraph_skip_reasons=sorted(set(run.skip_reasons)))
        if ms is not None and "uncached" in medians:
            rows[run.name]["speedup_vs_uncached"] = medians["uncached"] / ms
    return list(rows.values())


def warm_engine(run: EngineRun, row: dict[str, Any], args: argparse.Namespace, log: Callable[[str], None],
                skips: CudagraphLog) -> bool:
    """Compile (the first generation) and warm up one engine setting. Records compile time, graphs, CUDA graphs
    and the computed FLOP share (read right after a generation, before another replay)."""
    graphs, breaks = graphs_and_breaks()
    nodes, before = cudagraph_nodes(run.device), skips.mark()
    start = time.perf_counter()
    try:
        for _ in range(max(args.warmup, 1)):
            timed(run)
    except Exception as error:  # recorded in the row
        row["error"] = f"warm-up: {short_error(error)}"
        log(f"  {run.name} failed: {row['error']}")
        if args.verbose:
            traceback.print_exc()
        return False
    new_graphs, new_breaks = graphs_and_breaks()
    after = cudagraph_nodes(run.device)
    run.skip_reasons += skips.since(before)
    row.update(compile_s=round(time.perf_counter() - start, 1), graphs=new_graphs - graphs,
               graph_breaks=new_breaks - breaks, fraction=run.fraction(run.last_state),
               cudagraphs=None if after is None or nodes is None else after - nodes,
               plan_variants=run.plan.variants() if hasattr(run.plan, "variants") else 1)
    log(f"  {run.name}: compile + warm-up {row['compile_s']} s, {row['graphs']} graphs")
    return True


def dict_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


# ------------------------------------------------------------------------------------------------ reports
def fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}" if isinstance(value, (int, float)) else str(value)


def dropin_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | size | method | provider | ms/step | vs uncached | vs diffusers | syncs/step | "
             "peak MiB (+gen) | graphs (breaks) | conds/call | computed | max abs diff vs diffusers | "
             "CUDA graphs | warm-up s |", "|" + "---|" * 15]
    notes = []
    for r in rows:
        head = f"| {r['model']} | {r['size']} | {r['method']} | {r['provider']} |"
        if "ms_per_step" not in r:
            lines.append(f"{head} {r.get('error', '-')} |" + " |" * 10)
            continue
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f} (+{r['peak_extra_mib']:.0f})"
        cudagraphs = fmt(r.get("cudagraphs"), "d")
        if r.get("cudagraph_skip_reasons"):
            cudagraphs += " (skips)"
            notes.append(f"{r['model']}-{r['size']}-{r['method']} {r['provider']}: "
                         + "; ".join(r["cudagraph_skip_reasons"]))
        lines.append(f"{head} {fmt(r['ms_per_step'], '.3f')} | {fmt(r.get('speedup_vs_uncached'), '.2f', 'x')} | "
                     f"{fmt(r.get('speedup_vs_diffusers'), '.2f', 'x')} | {fmt(r.get('syncs_per_step'))} | {peak} | "
                     f"{r['graphs']} ({r['graph_breaks']}) | {fmt(r.get('conds_per_call'), 'd')} | "
                     f"{fmt(r.get('computed'))} | {fmt(r.get('max_diff_vs_diffusers'), '.1e')} | {cudagraphs} | "
                     f"{fmt(r['warmup_s'], '.1f')} |")
        if r.get("error"):
            notes.append(f"{r['model']}-{r['size']}-{r['method']} {r['provider']}: {r['error']}")
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def engine_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| mode | setting | ms/generation | ms/step | speedup vs uncached | syncs/step | FLOPs computed | "
             "plan variants | graphs (breaks) | CUDA graphs | compile s |", "|" + "---|" * 11]
    notes = []
    for r in rows:
        head = f"| {r['mode']} | {r['setting']} |"
        if "ms_per_generation" not in r:
            lines.append(f"{head} {r.get('error', '-')} |" + " |" * 8)
            continue
        lines.append(f"{head} {fmt(r['ms_per_generation'], '.1f')} | {fmt(r['ms_per_step'], '.2f')} | "
                     f"{fmt(r.get('speedup_vs_uncached'), '.2f', 'x')} | {fmt(r.get('syncs_per_step'))} | "
                     f"{fmt(r.get('fraction'), '.3f')} | {r.get('plan_variants', '-')} | "
                     f"{r.get('graphs', '-')} ({r.get('graph_breaks', '-')}) | {fmt(r.get('cudagraphs'), 'd')} | "
                     f"{fmt(r.get('compile_s'), '.1f')} |")
        for key in ("note", "error"):
            if r.get(key):
                notes.append(f"{r['mode']} {r['setting']}: {r[key]}")
        if r.get("cudagraph_skip_reasons"):
            notes.append(f"{r['mode']} {r['setting']}: " + "; ".join(r["cudagraph_skip_reasons"]))
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    where = (f"{m.get('gpu')}, CUDA {m.get('cuda')}" if m["device"] == "cuda" else f"CPU ({m['cpus']} cores)")
    lines = ["# fastcache GPU benchmark", "",
             f"{where}; torch {m['torch']}, triton {m['triton']}, diffusers {m['diffusers']}, python {m['python']}; "
             f"{m['date']}. {a['dtype']}, backend {a['backend']}, {a['steps']} steps, {a['warmup']} warm-up + "
             f"{a['repeats']} timed generations per provider (round-robin), medians. Run {result['elapsed_s']:.0f} s "
             f"of a {a['budget_s']:.0f} s budget{' (smoke)' if a['smoke'] else ''}.", "",
             "## A. Drop-in vs diffusers' hooks, compiled", "",
             "Sizes (`_tiny.case` arguments; hidden = heads (default 2) x 16 x scale): "
             + "; ".join(f"{k} {s}: {v}" for k, sizes in SIZES.items() for s, v in sizes.items()) + ". "
             "ms/step: one step is every CFG pass (Wan: cond + uncond calls; CogVideoX: one batched call). "
             "syncs/step: host syncs seen by `torch.cuda.set_sync_debug_mode('warn')`. peak: "
             "`max_memory_allocated` over one generation (+: above what was allocated before it; every provider's "
             "model copy stays resident). conds/call: `torch.cond` nodes in a compiled call of the drop-in. "
             "computed: fastcache's share of calls (FBC) / hooked attention calls (PAB) / full CFG steps "
             "(FasterCache). CUDA graphs: graphs recorded by cudagraph trees (reduce-overhead).", ""]
    lines += dropin_table(result["dropin"]) if result["dropin"] else ["(no unit ran)"]
    lines += ["", f"## B. Engine on the reference DiT ({result['engine_dit']}), fullgraph=True", "",
              "PAB and FasterCache run planned decisions (Python values: one graph per step variant, no "
              "`torch.cond`); FBC decides on the device: one `torch.cond` per step, or (split step) a compiled "
              "head, one host read of the decision and a compiled tail per decision (no `torch.cond`).", ""]
    lines += engine_table(result["engine"]) if result["engine"] else ["(no unit ran)"]
    lines += ["", "## Units", "", "| unit | status | s |", "|---|---|---|"]
    lines += [f"| {u['unit']} | {u['status']} | {fmt(u.get('seconds'), '.0f')} |" for u in result["units"]]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "gpu_bench.md").write_text(markdown(result))


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT_DIR", RESULTS)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps, 1 warm-up + 1 timed round")
    parser.add_argument("--units", default=None, help=f"comma-separated, in order (default: {DEFAULT_UNITS})")
    parser.add_argument("--providers", default=None, help="section A providers for every unit (default: by size)")
    parser.add_argument("--settings", default=None, help="engine settings, separated by ; (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up generations (default 2; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; smoke 1)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip units that would not fit in this time")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; cpu smoke eager)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of provider failures")
    parser.add_argument("--append", action="store_true",
                        help="add to the results in --out (one process per unit: a failure cannot leave CUDA graph "
                             "trees broken for the next unit)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    cpu = args.device.type == "cpu"
    args.units = args.units or (SMOKE_UNITS if args.smoke else DEFAULT_UNITS)
    args.steps = args.steps or (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.repeats = args.repeats or (1 if args.smoke else 5)
    args.backend = args.backend or ("eager" if cpu and args.smoke else "inductor")
    args.dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    return args


def run_unit(unit: str, args: argparse.Namespace, result: dict[str, Any], log: Callable[[str], None],
             skips: CudagraphLog) -> None:
    if unit in ("engine", "engine-ro"):
        result["engine"] += engine_unit("reduce-overhead" if unit == "engine-ro" else "default", args, log, skips)
        return
    unit, _, chosen = unit.partition("@")  # <unit>@<provider>+<provider>: those providers only
    if chosen:
        args = dict_args(args, providers=chosen.replace("+", ","))
    model, size, method = unit.split("-")
    if model not in SIZES or size not in ("small", "large"):
        raise ValueError(f"unit: unknown {unit!r}; expected engine, engine-ro or <model>-<small|large>-<method> "
                         f"with model in {', '.join(SIZES)}")
    result["dropin"] += dropin_unit(model, size, method, args, log, skips)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    skips = CudagraphLog.install()
    printable = {k: str(v) for k, v in vars(args).items()}
    printable["budget_s"] = args.budget_s
    printable["smoke"] = args.smoke
    result: dict[str, Any] = dict(machine=machine_info(args.device), args=printable, dropin=[], engine=[], units=[],
                                  engine_dit=SMOKE_DIT if args.smoke else ENGINE_DIT, elapsed_s=0.0)
    before = 0.0
    if args.append and (args.out / "gpu_bench.json").exists():  # an earlier process's units (bench/gpu.sh)
        earlier = json.loads((args.out / "gpu_bench.json").read_text())
        for key in ("dropin", "engine", "units"):
            result[key] = earlier[key] + result[key]
        before = earlier["elapsed_s"]
    log(f"machine: {result['machine']}")
    estimates = dict(DEFAULT_ESTIMATE_S)
    measured: set[str] = set()
    for unit in args.units.split(","):
        base = unit.partition("@")[0]
        kind = "engine" if base.startswith("engine") else base.split("-")[1] if base.count("-") == 2 else "small"
        if kind != "engine" and args.providers and kind not in measured:  # first guess: by provider count
            estimates[kind] = 15.0 + 30.0 * len(args.providers.split(","))
        left = args.budget_s - (time.perf_counter() - start)
        if left < estimates[kind]:
            status = f"skipped: {left:.0f} s left, estimate {estimates[kind]:.0f} s"
            result["units"].append(dict(unit=unit, status=status))
            log(f"skip {unit}: {status}")
            continue
        log(f"unit {unit}")
        unit_start = time.perf_counter()
        status = "done"
        try:
            run_unit(unit, args, result, log, skips)
        except Exception as error:  # the next units still run
            status = f"error: {short_error(error)}"
            log(f"unit {unit} failed: {status}")
            if args.verbose:
                traceback.print_exc()
        seconds = time.perf_counter() - unit_start
        estimates[kind] = max(seconds, 10.0)
        measured.add(kind)
        result["units"].append(dict(unit=unit, status=status, seconds=round(seconds, 1)))
        result["elapsed_s"] = before + time.perf_counter() - start
        write(result, args.out)
        log(f"unit {unit}: {status} in {seconds:.0f} s; wrote {args.out / 'gpu_bench.md'}")
    result["elapsed_s"] = before + time.perf_counter() - start
    write(result, args.out)
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
