"""`fastcache demo`: every cache method on the embedded digit models, side by side.

For each model (image and/or video) it generates the same seeds uncached and with each method, each compiled
with `torch.compile(fullgraph=True)`, and reports in one table: the share of block work computed, the median
time per generation (warm-up and compile excluded), the speedup over the uncached compiled run, the ideal
speedup (1 / fraction), quality against the uncached samples (PSNR, SSIM, max |error|, class accuracy under
the embedded classifier), graph breaks, graphs compiled and the warm-up (compile) time. It writes a sample
grid per model, a speed-vs-quality plot and `results.json` to `--out`.

    fastcache demo --quick                  # about a minute on 2 CPU cores
    fastcache demo --model video --methods uncached,fbc --fbc-thresholds 0.05,0.1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from fastcache import metrics
from fastcache.models import digits
from fastcache.models.dit import DiT, cfg_inputs, sampling_timesteps
from fastcache.protocol import forward

METHODS = ("uncached", "pab", "fastercache", "fbc", "mag", "taylorseer", "teacache", "dbcache")
MODEL_CHOICES = ("image", "video", "both")
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2)
MAX_THRESHOLD = 1.0  # a relative residual change above 1 means "always skip": no longer a cache setting


# -- what to run ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: a method and its settings (config None = uncached)."""

    method: str
    settings: str
    config: Any = None


def pab_config(kind: str, spatial: int = 2, temporal: int | None = 3, cross: int | None = 4,
               lo: float = 100, hi: float = 800) -> Any:
    import fastcache

    return fastcache.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=spatial,
        temporal_attention_block_skip_range=temporal if kind == "video" else None,
        cross_attention_block_skip_range=cross,
        spatial_attention_timestep_skip_range=(lo, hi),
        temporal_attention_timestep_skip_range=(lo, hi),
        cross_attention_timestep_skip_range=(lo, hi))


def fastercache_config(kind: str, spatial: int = 2, uncond: int = 5, hi: float = 681,
                       uncond_hi: float = 641) -> Any:
    import fastcache

    return fastcache.FasterCacheConfig(
        spatial_attention_block_skip_range=spatial,
        spatial_attention_timestep_skip_range=(-1, hi),
        unconditional_batch_skip_range=uncond,
        unconditional_batch_timestep_skip_range=(-1, uncond_hi),
        tensor_format="BCFHW" if kind == "video" else "BCHW")


def fbc_config(threshold: float) -> Any:
    import fastcache

    return fastcache.FirstBlockCacheConfig(threshold=threshold)


def mag_config(kind: str, steps: int, threshold: float = 0.06) -> Any:
    """MagCache with the model's shipped ratios (`fastcache calibrate`), resampled to `steps`."""
    import fastcache
    from fastcache.calibrate import load_mag_ratios

    return fastcache.MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=load_mag_ratios(kind))


def taylorseer_config(kind: str, steps: int) -> Any:
    """diffusers' defaults (interval 5 after 3 computed steps, first order), factors in fp32 like the model;
    fewer warm-up steps on short runs."""
    import fastcache

    del kind
    return fastcache.TaylorSeerCacheConfig(cache_interval=5 if steps >= 20 else 3,
                                           disable_cache_before_step=3 if steps >= 20 else 2,
                                           taylor_factors_dtype=torch.float32)


def teacache_config(kind: str, threshold: float = 0.3, coefficients: Any = None) -> Any:
    """TeaCache with the model's shipped coefficients (`fastcache calibrate --method teacache`), or the given
    ones (a published fit's name, e.g. "flux", or 5 numbers)."""
    import fastcache
    from fastcache.calibrate import load_teacache_coefficients

    fitted = load_teacache_coefficients(kind) if coefficients is None else coefficients
    return fastcache.TeaCacheConfig(threshold=threshold, coefficients=fitted)


def dbcache_config(steps: int, threshold: float = 0.15, fn: int = 1, bn: int = 1, taylorseer_order: int = 0
                   ) -> Any:
    """DBCache F1B1 on the 4-block digit models (the two middle blocks cached), warm-up a tenth of the steps."""
    import fastcache

    return fastcache.DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
                                   max_warmup_steps=max(1, steps // 10), taylorseer_order=taylorseer_order)


def describe(config: Any) -> str:
    """Short settings text for the table, e.g. "spatial=2 cross=4 in (100,800)"."""
    import fastcache

    def rng(bounds: tuple[float, float]) -> str:
        return f"({bounds[0]:g},{bounds[1]:g})"

    if config is None:
        return "-"
    if isinstance(config, fastcache.FirstBlockCacheConfig):
        return f"threshold={config.threshold:g}"
    if isinstance(config, fastcache.PyramidAttentionBroadcastConfig):
        kinds = [f"{k}={config.skip_range(k)}" for k in ("spatial", "temporal", "cross")
                 if config.skip_range(k) is not None]
        return " ".join(kinds) + f" in {rng(config.spatial_attention_timestep_skip_range)}"
    if isinstance(config, fastcache.MagCacheConfig):
        return f"threshold={config.threshold:g} K={config.max_skip_steps} keep {config.retention_ratio:g}"
    if isinstance(config, fastcache.TaylorSeerCacheConfig):
        return (f"interval={config.cache_interval} after {config.disable_cache_before_step} "
                f"order={config.max_order}")
    if isinstance(config, fastcache.DBCacheConfig):
        taylor = f" taylorseer={config.taylorseer_order}" if config.taylorseer_order else ""
        return (f"F{config.Fn_compute_blocks}B{config.Bn_compute_blocks} threshold={config.residual_diff_threshold:g} "
                f"warmup={config.max_warmup_steps}{taylor}")
    if isinstance(config, fastcache.TeaCacheConfig):
        from fastcache.methods.teacache import COEFFICIENTS

        named = next((name for name, c in COEFFICIENTS.items() if c == config.coefficients), "calibrated")
        return f"threshold={config.threshold:g} coefficients={named}"
    if isinstance(config, fastcache.FasterCacheConfig):
        return (f"spatial={config.spatial_attention_block_skip_range} in "
                f"{rng(config.spatial_attention_timestep_skip_range)}, "
                f"uncond={config.unconditional_batch_skip_range} in "
                f"{rng(config.unconditional_batch_timestep_skip_range)}")
    return repr(config)


def default_runs(kind: str, methods: Sequence[str], thresholds: Sequence[float], steps: int = 30
                 ) -> list[RunSpec]:
    runs = [RunSpec("uncached", "-")]  # always first: it is the reference of every quality column
    one_setting = {"pab": lambda: pab_config(kind), "fastercache": lambda: fastercache_config(kind),
                   "mag": lambda: mag_config(kind, steps), "taylorseer": lambda: taylorseer_config(kind, steps),
                   "teacache": lambda: teacache_config(kind), "dbcache": lambda: dbcache_config(steps)}
    for method in methods:
        if method == "fbc":
            runs.extend(RunSpec("fbc", describe(fbc_config(t)), fbc_config(t)) for t in thresholds)
        elif method in one_setting:
            cfg = one_setting[method]()
            runs.append(RunSpec(method, describe(cfg), cfg))
    return runs


# -- running one method --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    spec: RunSpec
    samples: Tensor | None = None
    times_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    graph_breaks: int | None = None
    graphs: int | None = None
    fraction: float = 1.0
    nonfinite: int = 0  # reuses that met a non-finite cached value (the state's `nonfinite`)
    plan: str = ""
    error: str | None = None

    @property
    def time_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def run_method(model: DiT, spec: RunSpec, noise: Tensor, labels: Tensor, steps: int, guidance: float,
               repeats: int, compile: bool, progress: Callable[[], None] | None = None,
               warmup: bool = True) -> RunResult:
    """Warm up (compile) once, then time `repeats` generations; the samples are those of the last one.

    `warmup=False` skips the untimed first generation (only sensible eagerly, for quality-only sweeps).

    The uncached run compiles the plain protocol forward; a method compiles `method.step` (one graph per
    distinct planned decision). Dynamo is reset first so that each row's compile time and graph counts are its
    own and no row inherits another's cache entries (which would also eat into the recompile limit).
    """
    result = RunResult(spec)
    try:  # one failing method (config, compile or run) must not hide the others' rows
        _run(result, model, noise, labels, steps, guidance, repeats, compile, progress, warmup)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        result.samples = None
    return result


def _run(result: RunResult, model: DiT, noise: Tensor, labels: Tensor, steps: int, guidance: float,
         repeats: int, compile: bool, progress: Callable[[], None] | None, warmup: bool) -> None:
    import fastcache

    spec = result.spec
    device = noise.device
    timesteps = sampling_timesteps(steps, device=device)
    first_inputs = cfg_inputs(noise, timesteps[0], labels, model.cfg.num_classes)
    if spec.config is None:
        method = None
        state0: Any = None
        plan: Any = [None] * steps

        def call(state: Any, inputs: dict[str, Tensor], decision: Any) -> tuple[Tensor, Any]:
            return forward(model, inputs), state
    else:
        method = fastcache.make(spec.config)
        state0 = method.init(model, first_inputs)
        plan = method.plan(timesteps)
        result.plan = str(plan)

        def call(state: Any, inputs: dict[str, Tensor], decision: Any) -> tuple[Tensor, Any]:
            return method.step(model, state, inputs, decision)

    limit = torch._dynamo.config.recompile_limit
    if compile:
        torch._dynamo.reset()
        call = torch.compile(call, fullgraph=True)
        # one graph per distinct planned decision (PAB with three kinds can have 8): not recompiles to fear
        limit = max(limit, (plan.variants() if hasattr(plan, "variants") else 1) + 1)

    final_state: list[Any] = [state0]

    def generate() -> Tensor:
        state = state0  # states are immutable values: every generation starts from the same initial state

        def denoise(i: int, inputs: dict[str, Tensor]) -> Tensor:
            nonlocal state
            out, state = call(state, inputs, plan[i])
            return out

        x = digits.euler_sample(denoise, noise, labels, steps, guidance,
                                callback=(lambda i: progress()) if progress else None)
        final_state[0] = state
        return x

    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
        breaks0, graphs0 = _dynamo_counts()
        if warmup or compile:
            t0 = time.perf_counter()
            generate()
            _sync(device)
            result.warmup_s = time.perf_counter() - t0
        breaks1, graphs1 = _dynamo_counts()
        for _ in range(repeats):
            t0 = time.perf_counter()
            samples = generate()
            _sync(device)
            result.times_s.append(time.perf_counter() - t0)
        breaks2, graphs2 = _dynamo_counts()
    if compile:  # graphs made after the warm-up would be recompiles: they count too
        result.graph_breaks, result.graphs = breaks2 - breaks0, graphs2 - graphs0
    result.samples = samples.float().cpu()
    if method is not None:
        result.fraction = float(method.computed_fraction(model, first_inputs, plan, final_state[0]))
        result.nonfinite = int(final_state[0].nonfinite)


# -- reporting -----------------------------------------------------------------------------------------------
def summarize(kind: str, results: list[RunResult], labels: Tensor, classifier: torch.nn.Module,
              compiled: bool) -> list[dict[str, Any]]:
    ref = results[0]
    rows = []
    for r in results:
        row: dict[str, Any] = {"model": kind, "method": r.spec.method, "settings": r.spec.settings,
                               "plan": r.plan, "error": r.error}
        if r.error is None and ref.samples is None:
            row["error"] = "no uncached reference to compare with (it failed)"
        if row["error"] is None and r.samples is not None and ref.samples is not None:
            q = metrics.compare(r.samples, ref.samples)
            acc = metrics.class_accuracy(digits.classify(classifier, r.samples), labels.cpu())
            row.update({
                "computed_fraction": round(r.fraction, 4), "nonfinite": r.nonfinite,
                "time_s": r.time_s, "times_s": r.times_s,
                "speedup": ref.time_s / r.time_s if r.times_s else None,
                "ideal_speedup": 1.0 / r.fraction if r.fraction > 0 else None,
                "psnr": metrics.finite_or_none(q["psnr"]), "psnr_min": metrics.finite_or_none(q["psnr_min"]),
                "ssim": q["ssim"], "max_abs_error": q["max_abs_error"],
                "class_accuracy": acc, "compiled": compiled,
                "graph_breaks": r.graph_breaks, "graphs": r.graphs, "warmup_s": r.warmup_s,
            })
            if "per_frame_psnr" in q:
                row["per_frame_psnr"] = [metrics.finite_or_none(v) for v in q["per_frame_psnr"]]
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One plain-text table for every row of every model."""
    head = ["model", "method", "settings", "computed", "ms/gen", "speedup", "ideal", "PSNR dB", "SSIM",
            "max|err|", "acc %", "NaN hits", "breaks", "graphs", "warm-up s"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], r["method"], r["settings"], f"error: {r['error']}"])
            continue
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append([
            r["model"], r["method"], r["settings"], f"{100 * r['computed_fraction']:.0f}%",
            _fmt(1000 * r["time_s"], ".0f"), _fmt(r["speedup"], ".2f") + "x",
            _fmt(r["ideal_speedup"], ".2f") + "x", psnr, _fmt(r["ssim"], ".3f"),
            _fmt(r["max_abs_error"], ".3f"),
            _fmt(100 * r["class_accuracy"], ".0f"), _fmt(r.get("nonfinite"), "d"), _fmt(r["graph_breaks"], "d"),
            _fmt(r["graphs"], "d"),
            _fmt(r["warmup_s"], ".1f")])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines if len(line) == len(head)))
              for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())
    return "\n".join(out)


def _to_uint8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(path: Path, kind: str, results: list[RunResult], scale: int = 4, max_columns: int = 10) -> None:
    """A PNG grid: one row per method (uncached first), same seeds; a video row shows the frames of clip 0
    (and clip 1 after a gap when there is one)."""
    from PIL import Image, ImageDraw

    tiles_per_row = []
    for r in results:
        if r.samples is None:
            tiles_per_row.append([])
            continue
        s = r.samples
        if kind == "video":
            clips = [s[c, 0].unbind(0) for c in range(min(2, s.shape[0]))]  # frames (H, W)
            tiles = list(clips[0]) + ([None] + list(clips[1]) if len(clips) > 1 else [])
        else:
            tiles = [s[i, 0] for i in range(min(max_columns, s.shape[0]))]
        tiles_per_row.append(tiles)
    size = results[0].samples.shape[-1] * scale if results[0].samples is not None else 16 * scale
    label_w, pad = 170, 2
    cols = max(len(t) for t in tiles_per_row) or 1
    img = Image.new("L", (label_w + cols * (size + pad), len(results) * (size + pad)), color=255)
    draw = ImageDraw.Draw(img)
    for row, (r, tiles) in enumerate(zip(results, tiles_per_row, strict=True)):
        y = row * (size + pad)
        text = r.spec.method if r.spec.settings == "-" else f"{r.spec.method}\n{r.spec.settings}"
        draw.multiline_text((4, y + 4), _wrap(text, 26), fill=0)
        for col, tile in enumerate(tiles):
            if tile is None:
                continue
            # ink is +1: show it dark on white, as the digits are usually drawn
            arr = 255 - _to_uint8(tile).numpy()
            cell = Image.fromarray(arr, mode="L").resize((size, size), Image.NEAREST)
            img.paste(cell, (label_w + col * (size + pad), y))
    _atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def _wrap(text: str, width: int) -> str:
    out = []
    for line in text.split("\n"):
        words, cur = line.split(" "), ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > width:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        out.append(cur)
    return "\n".join(out)


def save_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Speedup (x) against PSNR vs uncached (y), one marker per row, one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: never touches the global backend

    kinds = sorted({r["model"] for r in rows}, key=MODEL_CHOICES.index)
    fig = Figure(figsize=(5.5 * len(kinds), 4.2))
    FigureCanvasAgg(fig)
    colors = {"uncached": "black", "pab": "tab:blue", "fastercache": "tab:orange", "fbc": "tab:green",
              "mag": "tab:red", "taylorseer": "tab:purple", "teacache": "tab:brown",
              "dbcache": "tab:pink"}
    for k, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), k + 1)
        ok = [r for r in rows if r["model"] == kind and not r.get("error") and r.get("speedup")]
        finite = [r["psnr"] for r in ok if r["psnr"] is not None]
        top = (max(finite) if finite else 40.0) + 5.0  # identical samples (inf dB) sit on this line
        for r in ok:
            y = r["psnr"] if r["psnr"] is not None else top
            ax.scatter(r["speedup"], y, color=colors.get(r["method"], "gray"), s=40, zorder=3)
            name = f"fbc {r['settings'].split('=')[-1]}" if r["method"] == "fbc" else r["method"]
            ax.annotate(name, (r["speedup"], y),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(30.0, color="gray", lw=0.8, ls="--")
        ax.axhline(top, color="lightgray", lw=0.8, ls=":")
        ax.set_xlabel("measured speedup vs uncached")
        ax.set_ylabel("PSNR vs uncached (dB; dotted line = identical)")
        ax.set_title(f"{kind} model")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _cpu_name() -> str:
    try:  # platform.processor() is empty on most Linux systems
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- command line --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _comma_list(parse: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def convert(text: str) -> list[Any]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [parse(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}") from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastcache demo", description=__doc__.split("\n\n")[0].strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="columns:\n"
                       "  computed   share of the model's FLOPs run (skipped or reused work is not)\n"
                       "  ms/gen     median wall time of one generation (warm-up/compile excluded)\n"
                       "  speedup    uncached ms/gen over the method's; ideal = 1 / computed\n"
                       "  PSNR, SSIM, max|err|  final samples vs the uncached run with the same seeds\n"
                       "  acc %      class accuracy under the embedded digit classifier\n"
                       "  breaks, graphs, warm-up s  graph breaks, graphs compiled, first-generation time")
    p.add_argument("--methods", type=_comma_list(str, "methods"), default=list(METHODS),
                   help=f"comma list of {','.join(METHODS)} (default: all; uncached always runs, it is the "
                        "reference)")
    p.add_argument("--fbc-thresholds", type=_comma_list(float, "numbers"), default=None,
                   help="FirstBlockCache thresholds, each in [0, 1] (default: 0.05,0.1,0.2; quick: 0.2)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="embedded model(s) to run (default: both; quick: image)")
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps per generation (default 30; quick 10)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per generation, seeds 0..N-1, labels i mod 10 (default 8; quick 4)")
    p.add_argument("--seeds", type=_comma_list(int, "integers"), default=None,
                   help="explicit comma list of seeds (overrides --num-samples)")
    p.add_argument("--guidance", type=float, default=digits.DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {digits.DEFAULT_GUIDANCE:g})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generations per method after the warm-up; the median is reported "
                        "(default 3; quick 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default: cuda when available, else cpu), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; on a busy machine try 1: with 2 threads on a "
                        "loaded 2-core box OpenMP waits made --quick 5x slower)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder; must not exist or be empty "
                        "(default: ./fastcache-demo-YYYYmmdd-HHMMSS)")
    p.add_argument("--quick", action="store_true",
                   help="small run, about a minute on 2 CPU cores: image model, 10 steps, 4 samples, one FBC "
                        "threshold, 1 repeat")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile)")
    return p


@dataclass(frozen=True)
class DemoOptions:
    methods: tuple[str, ...]
    thresholds: tuple[float, ...]
    kinds: tuple[str, ...]
    steps: int
    seeds: tuple[int, ...]
    guidance: float
    repeats: int
    device: torch.device
    out: Path
    compile: bool
    threads: int | None = None


def parse_options(argv: Sequence[str]) -> DemoOptions:
    """Parse and validate everything before any model work; errors exit 2 with one line on stderr."""
    parser = build_parser()
    a = parser.parse_args(list(argv))
    quick = a.quick
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    methods = tuple(dict.fromkeys(m for m in a.methods if m != "uncached"))
    # at 10 steps the first block's residual moves 11-36% per step: 0.2 is where FBC starts to skip
    thresholds = tuple(a.fbc_thresholds or ([0.2] if quick else DEFAULT_THRESHOLDS))
    for t in thresholds:
        if not (math.isfinite(t) and 0.0 <= t <= MAX_THRESHOLD):
            parser.error(f"--fbc-thresholds: {t!r} is out of range [0, {MAX_THRESHOLD:g}]")
    steps = a.steps if a.steps is not None else (10 if quick else 30)
    if not 1 <= steps <= 1000:
        parser.error(f"--steps: must be in [1, 1000], got {steps}")
    if a.seeds is not None:
        if a.num_samples is not None and a.num_samples != len(a.seeds):
            parser.error(f"--num-samples {a.num_samples} disagrees with {len(a.seeds)} --seeds")
        seeds = tuple(a.seeds)
    else:
        n = a.num_samples if a.num_samples is not None else (4 if quick else 8)
        if not 1 <= n <= 256:
            parser.error(f"--num-samples: must be in [1, 256], got {n}")
        seeds = tuple(range(n))
    if not 1 <= len(seeds) <= 256:
        parser.error(f"--seeds: give 1 to 256 seeds, got {len(seeds)}")
    if not (math.isfinite(a.guidance) and a.guidance >= 0):
        parser.error(f"--guidance: must be a finite number >= 0, got {a.guidance}")
    repeats = a.repeats if a.repeats is not None else (1 if quick else 3)
    if not 1 <= repeats <= 100:
        parser.error(f"--repeats: must be in [1, 100], got {repeats}")
    if a.threads is not None and not 1 <= a.threads <= 4 * (os.cpu_count() or 1):
        parser.error(f"--threads: must be in [1, {4 * (os.cpu_count() or 1)}], got {a.threads}")
    model = a.model or ("image" if quick else "both")
    kinds = ("image", "video") if model == "both" else (model,)
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    out = a.out if a.out is not None else Path(f"fastcache-demo-{dt.datetime.now():%Y%m%d-%H%M%S}")
    problem = _output_problem(out)
    if problem:
        parser.error(f"--out {out}: {problem}")
    return DemoOptions(methods, thresholds, kinds, steps, seeds, a.guidance, repeats, device, out,
                       not a.no_compile, a.threads)


def _output_problem(out: Path) -> str | None:
    """Why `out` cannot receive the results (None if it can); creates nothing."""
    if out.exists():
        if not out.is_dir():
            return "exists and is not a directory"
        if any(out.iterdir()):
            return "exists and is not empty (results are never overwritten)"
        parent = out.resolve().parent
    else:
        parent = out.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is not a directory"
    try:  # os.access says yes to root everywhere: probe with a real (removed) folder instead
        os.rmdir(tempfile.mkdtemp(prefix=".fastcache-probe-", dir=parent))
    except OSError as exc:
        return f"{parent} is not writable ({exc.strerror or type(exc).__name__})"
    return None


def run_demo(opts: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every model and method, write the outputs to a hidden temporary folder beside `opts.out`, then
    rename it into place: a folder at `opts.out` is always complete."""
    threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run_demo(opts, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(opts: DemoOptions, log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    classifier = digits.load_classifier()
    all_rows: list[dict[str, Any]] = []
    parent = opts.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = parent / f".{opts.out.name}.{os.getpid()}.partial"
    tmp_dir.mkdir()  # plain mkdir: the finished folder gets the user's usual permissions
    try:
        grids: dict[str, str] = {}
        for kind in opts.kinds:
            model = digits.load_pretrained(kind, device=opts.device)
            labels = digits.sample_labels(len(opts.seeds), device=opts.device)
            noise = digits.initial_noise(model, opts.seeds, device=opts.device)
            results = []
            for spec in default_runs(kind, opts.methods, opts.thresholds, opts.steps):
                total = opts.steps * (1 + opts.repeats)
                name = f"{kind} {spec.method}" + ("" if spec.settings == "-" else f" {spec.settings}")
                with tqdm(total=total, desc=name, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
                    result = run_method(model, spec, noise, labels, opts.steps, opts.guidance, opts.repeats,
                                        opts.compile, progress=lambda: bar.update(1))
                results.append(result)
                status = result.error or f"{1000 * result.time_s:.0f} ms/gen"
                print(f"{name}: {status}", file=sys.stderr)
            rows = summarize(kind, results, labels, classifier, opts.compile)
            all_rows.extend(rows)
            grids[kind] = f"samples_{kind}.png"
            save_grid(tmp_dir / grids[kind], kind, results)
        table = format_table(all_rows)
        log(table)
        save_plot(tmp_dir / "speed_quality.png", all_rows)
        report = {
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(opts.device),
            "options": {"methods": list(opts.methods), "fbc_thresholds": list(opts.thresholds),
                        "models": list(opts.kinds), "steps": opts.steps, "seeds": list(opts.seeds),
                        "guidance": opts.guidance, "repeats": opts.repeats, "compile": opts.compile,
                        "threads": torch.get_num_threads()},
            "models": {kind: {"meta": digits.read_meta(kind)} for kind in opts.kinds},
            "rows": all_rows,
            "files": {"grids": grids, "plot": "speed_quality.png", "table": "table.txt"},
        }
        _atomic_save(tmp_dir / "table.txt", lambda tmp: tmp.write_text(table + "\n"))
        _atomic_save(tmp_dir / "results.json",
                     lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n"))
        if opts.out.exists():  # validated empty: replace it by the finished folder
            opts.out.rmdir()
        os.replace(tmp_dir, opts.out)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log(f"wrote {opts.out}/ (results.json, table.txt, {', '.join(grids.values())}, speed_quality.png)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad argument (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        report = run_demo(opts)
    except KeyboardInterrupt:
        print("fastcache demo: interrupted; no results written", file=sys.stderr)
        return 130
    failed = [r for r in report["rows"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
