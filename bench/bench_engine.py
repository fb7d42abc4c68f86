"""Engine benchmark: the reference DiT, compiled with fullgraph=True, uncached vs each method.

For every setting: wall time per generation (median over repeats, compile excluded, settings timed
round-robin so that load drifts hit all of them alike), the share of the model's FLOPs computed, the ideal
speedup (1 / share), the measured speedup vs uncached compiled, and efficiency = measured / ideal.

    python bench/bench_engine.py                 # CPU, writes bench/results/engine_cpu.{json,md}
    python bench/bench_engine.py --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import fastcache
from fastcache.models.dit import DiT, DiTConfig, cfg_inputs, sampling_timesteps
from fastcache.protocol import forward

NULL = 10
SPLIT = ", split step"  # as `fastcache.compile_step` runs FBC, TeaCache, DBCache: head, one host read, tail


def settings() -> dict[str, Any]:
    return {
        "uncached": None,
        "PAB spatial N=2": fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                                     spatial_attention_timestep_skip_range=(0, 1000)),
        "PAB spatial 3, cross 3": fastcache.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3, cross_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=(0, 1000), cross_attention_timestep_skip_range=(0, 1000)),
        "FasterCache defaults": fastcache.FasterCacheConfig(tensor_format="BCHW"),
        "FasterCache uncond N=2, wide ranges": fastcache.FasterCacheConfig(
            tensor_format="BCHW", unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(0, 1000),
            spatial_attention_timestep_skip_range=(0, 1000)),
        "FBC threshold 0.05": fastcache.FirstBlockCacheConfig(threshold=0.05),
        "FBC threshold 0.2": fastcache.FirstBlockCacheConfig(threshold=0.2),
        "FBC threshold 0.05" + SPLIT: fastcache.FirstBlockCacheConfig(threshold=0.05),
        "FBC threshold 0.2" + SPLIT: fastcache.FirstBlockCacheConfig(threshold=0.2),
    }


def step_indexed_settings(model: DiT, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """MagCache (with this random model's ratios, calibrated here by one uncached run) and TaylorSeer."""
    from fastcache.methods import mag_cache

    calibration = fastcache.MagCacheConfig(calibrate=True, num_inference_steps=steps)
    generate, _ = make_generate(model, calibration, x0, labels, steps, compile=False)
    generate()
    ratios = mag_cache.calibrated_ratios(generate.last["state"])[1]
    return {
        "MagCache threshold 0.1": fastcache.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps,
                                                           threshold=0.1),
        "TaylorSeer interval 3 (fp32 factors)": fastcache.TaylorSeerCacheConfig(
            cache_interval=3, disable_cache_before_step=3, taylor_factors_dtype=torch.float32),
        "TaylorSeer lite, interval 3": fastcache.TaylorSeerCacheConfig(
            use_lite_mode=True, cache_interval=3, disable_cache_before_step=3, taylor_factors_dtype=torch.float32),
    }


def beyond_diffusers_settings(model: DiT, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """TeaCache (its coefficients fitted on this random model by one uncached run) and DBCache."""
    from fastcache.methods import teacache

    coefficients = teacache.calibrate(model, lambda denoise: euler(lambda i, inputs: denoise(inputs), x0, labels,
                                                                   steps))
    return {
        "TeaCache threshold 0.3 (calibrated)": fastcache.TeaCacheConfig(threshold=0.3, coefficients=coefficients),
        "DBCache F1B0 threshold 0.2 (= FBC + warm-up 2)": fastcache.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=2),
        "DBCache F2B1 threshold 0.2": fastcache.DBCacheConfig(
            Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.2, max_warmup_steps=2),
        "DBCache F2B1 threshold 0.2 + TaylorSeer 1": fastcache.DBCacheConfig(
            Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.2, max_warmup_steps=2,
            taylorseer_order=1),
        "TeaCache threshold 0.3 (calibrated)" + SPLIT: fastcache.TeaCacheConfig(threshold=0.3,
                                                                                coefficients=coefficients),
        "DBCache F2B1 threshold 0.2" + SPLIT: fastcache.DBCacheConfig(
            Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.2, max_warmup_steps=2),
    }


def build_model(device: str) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, sample_size=32, patch_size=2, hidden_size=256, num_heads=4, depth=8))
    with torch.no_grad():  # random weights with live adaLN gates (zero-init would make blocks identities)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().to(device)


def euler(denoise: Callable[[int, dict[str, torch.Tensor]], torch.Tensor], x0: torch.Tensor, labels: torch.Tensor,
          steps: int) -> torch.Tensor:
    """The bench's CFG Euler loop (guidance 4): `denoise(step index, [uncond; cond] inputs)` -> model output."""
    timesteps, x = sampling_timesteps(steps, x0.device), x0
    for i in range(steps):
        u, c = denoise(i, cfg_inputs(x, timesteps[i], labels, NULL)).chunk(2)
        t_next = timesteps[i + 1] if i + 1 < steps else torch.zeros((), device=x.device)
        x = x + (t_next - timesteps[i]) / 1000 * (u + 4.0 * (c - u))
    return x


def make_generate(model: DiT, config: Any, x0: torch.Tensor, labels: torch.Tensor, steps: int,
                  compile: bool = True,
                  split: bool = False) -> tuple[Callable[[], torch.Tensor], Callable[[], tuple[float, int]]]:
    """A compiled (or eager) CFG Euler generation, and a function giving the last run's computed FLOP share and its
    count of reuses that met a non-finite cached value (the state's `nonfinite`); `generate.last["state"]` is the
    last run's final state. `split`: FirstBlockCache's split step."""
    timesteps = sampling_timesteps(steps, x0.device)
    first = cfg_inputs(x0, timesteps[0], labels, NULL)
    if config is None:
        compiled = torch.compile(lambda inputs: forward(model, inputs), fullgraph=True)
        step: Callable = lambda state, inputs, decision: (compiled(inputs), state)  # noqa: E731
        init: Callable = lambda: None  # noqa: E731
        plan: list = [None] * steps
        fraction: Callable[[Any], float] = lambda state: 1.0  # noqa: E731
    else:
        method = fastcache.make(config)
        compiled = (lambda s, i, d: method.step(model, s, i, d))
        if compile:  # FirstBlockCache with one torch.cond, or (split) its split step
            compiled = fastcache.compile_step(method, model, split=split)
        # A state is a value (steps never write into it): one initial state serves every generation, so
        # init's shape trace is paid once per input shape, not per generation.
        state0 = method.init(model, first)
        step, init = compiled, (lambda: state0)
        plan = method.plan(timesteps)
        fraction = lambda state: method.computed_fraction(model, first, plan, state)  # noqa: E731
    last: dict[str, Any] = {}

    def generate() -> torch.Tensor:
        state = init()

        def denoise(i: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            nonlocal state
            out, state = step(state, inputs, plan[i])
            return out

        x = euler(denoise, x0, labels, steps)
        last["state"] = state
        return x

    generate.last = last  # type: ignore[attr-defined]

    def report() -> tuple[float, int]:  # computed FLOP share and non-finite cache hits of the last run
        state = last["state"]
        return fraction(state), 0 if state is None else int(state.nonfinite)

    return generate, report


def _commit() -> str | None:
    """The checkout's commit, so a results file says which code it measured."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--only", default=None,
                        help="comma-separated prefixes of the settings to run (uncached always runs)")
    parser.add_argument("--stem", default=None, help="results file stem (default engine_<device>)")
    args = parser.parse_args(argv)

    model = build_model(args.device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, 32, 32, generator=g).to(args.device)
    labels = torch.arange(args.batch).to(args.device) % 10
    rows: dict[str, dict[str, Any]] = {}
    runs = {}
    # Every setting's compiled step shares one code object here, and each planned step variant is one cache
    # entry: 14 in all, over dynamo's default limit of 8 per code object (a bench setting, not a library one).
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        everything = {**settings(), **step_indexed_settings(model, x0, labels, args.steps),
                      **beyond_diffusers_settings(model, x0, labels, args.steps)}
        prefixes = args.only.split(",") if args.only else None
        chosen = {name: config for name, config in everything.items()
                  if name == "uncached" or prefixes is None or any(name.startswith(p) for p in prefixes)}
        for name, config in chosen.items():
            counters.clear()
            generate, fraction = make_generate(model, config, x0, labels, args.steps, split=name.endswith(SPLIT))
            start = time.perf_counter()
            generate()  # warm-up: compiles every step variant
            sync(args.device)
            rows[name] = {"compile_s": time.perf_counter() - start,
                          "graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": sum(counters["graph_break"].values()),
                          "times_s": []}
            runs[name] = (generate, fraction)
            print(f"compiled {name}: {rows[name]['compile_s']:.1f} s, {rows[name]['graphs']} graphs", file=sys.stderr)
        for _ in range(args.repeats):  # round-robin: noise on a shared machine hits every setting alike
            for name, (generate, _) in runs.items():
                sync(args.device)
                start = time.perf_counter()
                generate()
                sync(args.device)
                rows[name]["times_s"].append(time.perf_counter() - start)
    base = statistics.median(rows["uncached"]["times_s"])
    for name, (_, fraction) in runs.items():
        row = rows[name]
        row["median_s"] = statistics.median(row["times_s"])
        row["fraction"], row["nonfinite"] = fraction()
        row["ideal_speedup"] = 1 / row["fraction"]
        row["speedup"] = base / row["median_s"]
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "steps": args.steps, "repeats": args.repeats, "batch": args.batch,
        "model": "DiT 256 wide, 8 blocks, 32x32x4, patch 2 (256 tokens), CFG batch 2x", "date": time.strftime("%F"),
        "commit": _commit(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.stem or f"engine_{args.device}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    command = " ".join(["python bench/bench_engine.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Engine benchmark ({args.device})", "", f"`{command.strip()}`", "",
             " | ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| setting | FLOPs computed | ideal speedup | median s/generation | speedup | efficiency | graphs | "
             "graph breaks | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['fraction']:.3f} | {r['ideal_speedup']:.2f}x | {r['median_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['graphs']} | {r['graph_breaks']} | "
                     f"{r['compile_s']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
