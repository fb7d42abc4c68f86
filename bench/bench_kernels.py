"""Microbenchmarks of fastcache.kernels against the computations they replace (not a test).

CPU section (always; the torch implementations, which is what CPU runs):
- FasterCache skip step: real-space `fastercache_uncond` vs diffusers' FFT formula
  (split(c) -> scale the stored complex deltas -> ifftshift -> ifft2 -> real), at a CogVideoX latent
  (B*F = 13, C = 16, 60 x 90; CogVideoX outputs BFCHW, which diffusers flattens to (B*F, C, H, W)) and a
  Flux-like one (1 x 16 x 128 x 128), fp32.
- FasterCache full step (the deltas): `frequency_split(u - c)` vs diffusers' LF/HF of u and of c as complex64.
- The state each keeps: two real fp32 deltas vs two complex64 deltas, in bytes.
- `absmean_rel_diff` vs the eager composite `(a-b).abs().mean() / b.abs().mean()` and vs torch.compile of it.
Providers run round-robin inside each repeat (so load from other processes hits all of them alike); medians of
the repeats, warm-up excluded.

GPU section (only when CUDA is available; run `python bench/bench_kernels.py` on a CUDA machine with triton
installed and TRITON_INTERPRET unset): each Triton kernel's GB/s against the device's copy bandwidth
(`torch.clone`), the eager composite and the compiled composite; the frequency split's two CUDA
implementations (`impl="matmul"`: four torch matmuls; `impl="triton"`: the fused Triton kernel) in ms and GB/s
against a copy, at the CogVideoX, Flux and Wan latent shapes, with torch.fft's split for scale.
`triton.testing.do_bench`, with inputs rotated over more than twice the L2 cache so every call reads DRAM.

Writes `bench/results/kernels_cpu.{json,md}` (and `kernels_cuda.{json,md}` on CUDA) with the machine, the
versions and the shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fastcache.kernels import absmean_rel_diff, absmean_sums, extrapolate, fastercache_uncond, frequency_split
from fastcache.kernels.frequency_split import triton_split_config, triton_split_fits

RESULTS = Path(__file__).resolve().parent / "results"
LATENTS = {"cogvideox": (13, 16, 60, 90), "flux": (1, 16, 128, 128)}
RESIDUALS = {"flux_hidden": (1, 4096, 3072)}
# GPU frequency split: the latents above and Wan 2.1's (21 latent frames, 16 channels) at 480p and 720p.
SPLIT_SHAPES = {**LATENTS, "wan_480p": (21, 16, 60, 104), "wan_720p": (21, 16, 90, 160)}


# ---------------------------------------------------------------- diffusers' FFT formulation (the baseline)
def disc_mask(height: int, width: int, device: torch.device) -> torch.Tensor:
    """diffusers' low-pass mask on the fftshift-ed spectrum: closed disc, radius min(H, W) // 5."""
    r = min(height, width) // 5
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= r * r


def fft_split(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers `_split_low_high_freq` (fftshift over all dims, as diffusers does), mask built once here."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x))
    return spectrum * mask, spectrum * ~mask


def fft_full_step(u, c, mask):
    (lu, hu), (lc, hc) = fft_split(u.float(), mask), fft_split(c.float(), mask)
    return lu - lc, hu - hc


def fft_skip_step(c, d_lf, d_hf, w_low: float, w_high: float, mask):
    d_lf, d_hf = d_lf * w_low, d_hf * w_high
    lc, hc = fft_split(c.float(), mask)
    uncond = torch.fft.ifft2(torch.fft.ifftshift(lc + d_lf + hc + d_hf)).real
    return uncond.to(c.dtype), d_lf, d_hf


def composite_rel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean() / b.abs().mean()


# ---------------------------------------------------------------------------------------------- CPU timing
def time_round_robin(providers: dict[str, Callable[[], object]], repeats: int, warmup: int = 3):
    """Median wall time (ms) of each provider; one call of each per round, so noise hits all alike."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def bench_latent(shape: tuple[int, ...], repeats: int, gen: torch.Generator) -> tuple[list[dict], dict]:
    """FasterCache skip step and full step at one latent shape: real space vs diffusers' FFT formula."""
    u, c = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    mask = disc_mask(shape[-2], shape[-1], c.device)
    d_low, d_high = frequency_split(u - c)
    d_lf, d_hf = fft_full_step(u, c, mask)
    w_low, w_high = torch.tensor(1.1), torch.tensor(1.0)
    # The two formulations agree (same deltas, same reconstruction).
    ours = fastercache_uncond(c, d_low, d_high, w_low, w_high)[0]
    theirs = fft_skip_step(c, d_lf, d_hf, 1.1, 1.0, mask)[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    skip = time_round_robin(
        {
            "diffusers_fft": lambda: fft_skip_step(c, d_lf, d_hf, 1.1, 1.0, mask),
            "fastcache_real": lambda: fastercache_uncond(c, d_low, d_high, w_low, w_high),
        },
        repeats,
    )
    full = time_round_robin(
        {
            "diffusers_fft": lambda: fft_full_step(u, c, mask),
            "fastcache_real": lambda: frequency_split(u - c),
        },
        repeats,
    )
    rows = [
        {
            "op": op,
            "shape": list(shape),
            "dtype": "float32",
            "baseline": "diffusers_fft",
            "baseline_ms": round(t["diffusers_fft"], 3),
            "ours_ms": round(t["fastcache_real"], 3),
            "speedup": round(t["diffusers_fft"] / t["fastcache_real"], 2),
        }
        for op, t in (("fastercache_skip_step", skip), ("fastercache_full_step", full))
    ]
    ours_bytes, theirs_bytes = d_low.nbytes + d_high.nbytes, d_lf.nbytes + d_hf.nbytes
    state = {
        "shape": list(shape),
        "fastcache_bytes": ours_bytes,
        "diffusers_bytes": theirs_bytes,
        "ratio": round(theirs_bytes / ours_bytes, 2),
    }
    return rows, state


def bench_rel_diff(shape: tuple[int, ...], dtype: torch.dtype, repeats: int, gen: torch.Generator) -> dict:
    """absmean_rel_diff vs the eager composite and its torch.compile (inductor, CPU)."""
    a = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype)
    compiled = torch.compile(composite_rel_diff, fullgraph=True)
    t0 = time.perf_counter()
    compiled(a, b)
    compile_s = time.perf_counter() - t0
    t = time_round_robin(
        {
            "eager_composite": lambda: composite_rel_diff(a, b),
            "compiled_composite": lambda: compiled(a, b),
            "fastcache": lambda: absmean_rel_diff(a, b),
        },
        repeats,
    )
    return {
        "op": "absmean_rel_diff",
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "baseline": "eager_composite",
        "baseline_ms": round(t["eager_composite"], 3),
        "compiled_ms": round(t["compiled_composite"], 3),
        "compile_s": round(compile_s, 1),
        "ours_ms": round(t["fastcache"], 3),
        "speedup": round(t["eager_composite"] / t["fastcache"], 2),
        "speedup_vs_compiled": round(t["compiled_composite"] / t["fastcache"], 2),
    }


def bench_cpu(repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows, state = [], []
    for shape in LATENTS.values():
        latent_rows, latent_state = bench_latent(shape, repeats, gen)
        rows += latent_rows
        state.append(latent_state)
    for shape in RESIDUALS.values():
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(bench_rel_diff(shape, dtype, repeats, gen))
    return {"shapes": {**LATENTS, **RESIDUALS}, "rows": rows, "state": state}


def cpu_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# fastcache.kernels, CPU (torch paths)",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads; load average "
        f"{m['load_average_1m']} at start, the machine is shared); python {m['python']}, torch {m['torch']}, "
        f"triton {m['triton']}. Medians of {result['repeats']} round-robin repeats, warm-up excluded; "
        f"whole run {result.get('total_s', '?')} s.",
        "",
        "| op | shape | dtype | baseline | baseline ms | compiled baseline ms | fastcache ms | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        compiled = f"{r['compiled_ms']} (compile {r['compile_s']} s)" if "compiled_ms" in r else "-"
        speedup = f"{r['speedup']}x"
        if "speedup_vs_compiled" in r:
            speedup += f" ({r['speedup_vs_compiled']}x vs compiled)"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {r['baseline']} | {r['baseline_ms']} | {compiled} | "
            f"{r['ours_ms']} | {speedup} |"
        )
    lines += [
        "",
        "FasterCache state (the two stored deltas):",
        "",
        "| shape | fastcache (2 x fp32, real) | diffusers (2 x complex64) | ratio |",
        "|---|---|---|---|",
    ]
    for s in result["state"]:
        shape = "x".join(map(str, s["shape"]))
        lines.append(f"| {shape} | {s['fastcache_bytes']:,} B | {s['diffusers_bytes']:,} B | {s['ratio']}x |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- GPU section
def rotating(make: Callable[[], tuple], set_bytes: int, l2_bytes: int) -> Callable[[], tuple]:
    """Enough input sets to cover 2x the L2 cache, handed out in turn (every call reads from DRAM)."""
    sets = [make() for _ in range(max(2, -(-2 * l2_bytes // set_bytes)))]
    cycle = itertools.cycle(sets)
    return lambda: next(cycle)


def random_inputs(k: int, dtype, dev, n: int, l2_bytes: int) -> Callable[[], tuple]:
    """`k` random tensors of `n` elements, rotated over 2x L2 (`rotating`)."""
    size = torch.empty((), dtype=dtype).element_size()
    return rotating(lambda: tuple(torch.randn(n, device=dev).to(dtype) for _ in range(k)), k * n * size, l2_bytes)


def cuda_elementwise_rows(dtype, dev, n, l2_bytes, ms) -> list[dict]:
    size = torch.empty((), dtype=dtype).element_size()
    one, pair, triple = (random_inputs(k, dtype, dev, n, l2_bytes) for k in (1, 2, 3))
    copy_gbs = 2 * n * size / ms(lambda: one()[0].clone()) / 1e6
    w_low, w_high = torch.tensor(1.1, device=dev), torch.tensor(0.5, device=dev)

    def uncond_eager(c, d_low, d_high):
        new_low = (d_low.float() * w_low).to(d_low.dtype)
        new_high = (d_high.float() * w_high).to(d_high.dtype)
        return (c.float() + new_low.float() + new_high.float()).to(c.dtype), new_low, new_high

    def extrapolate_eager(f_k, f_prev):
        return (f_k.float() + w_high * (f_k.float() - f_prev.float())).to(f_k.dtype)

    cases = {  # name: (ours, eager composite, its inputs, bytes moved per call)
        "absmean_rel_diff": (absmean_rel_diff, composite_rel_diff, pair, 2 * n * size),
        "fastercache_uncond": (
            lambda c, lo, hi: fastercache_uncond(c, lo, hi, w_low, w_high),
            uncond_eager,
            triple,
            6 * n * size,
        ),
        "extrapolate": (lambda f, p: extrapolate(f, p, w_high), extrapolate_eager, pair, 3 * n * size),
    }
    rows = []
    for name, (ours, eager, make_args, nbytes) in cases.items():
        compiled = torch.compile(eager, fullgraph=True)
        providers = {"fastcache": ours, "eager": eager, "compiled": compiled}
        t = {k: ms(lambda fn=fn, make_args=make_args: fn(*make_args())) for k, fn in providers.items()}
        rows.append(
            {
                "op": name,
                "numel": n,
                "dtype": str(dtype).removeprefix("torch."),
                **{f"{k}_ms": round(v, 4) for k, v in t.items()},
                **{f"{k}_gbs": round(nbytes / v / 1e6, 1) for k, v in t.items()},
                "copy_gbs": round(copy_gbs, 1),
                "fraction_of_copy": round(nbytes / t["fastcache"] / 1e6 / copy_gbs, 3),
            }
        )
    return rows


ABSMEAN_SWEEP = ([(block, warps, per_sm) for block in (4096, 8192) for warps in (4, 8) for per_sm in (4, 16, 64)]
                 + [(block, 16, per_sm) for block in (8192, 16384) for per_sm in (4, 16)])


def cuda_absmean_sweep(dev, n, l2_bytes, ms) -> list[dict]:
    """`absmean_sums` (both kernels) at each (elements per iteration, warps, programs per SM) of ABSMEAN_SWEEP, in
    fp32 and bf16, against a copy of the same bytes; the module's configs are restored afterwards."""
    from fastcache.kernels import absmean as module

    saved = dict(module.CUDA_CONFIGS)
    try:
        return [row for dtype in (torch.float32, torch.bfloat16)
                for row in _absmean_sweep_rows(module, dtype, dev, n, l2_bytes, ms)]
    finally:
        module.CUDA_CONFIGS.clear()
        module.CUDA_CONFIGS.update(saved)


def _absmean_sweep_rows(module, dtype, dev, n, l2_bytes, ms) -> list[dict]:
    size = torch.empty((), dtype=dtype).element_size()
    pair = random_inputs(2, dtype, dev, n, l2_bytes)
    copy_gbs = 2 * n * size / ms(lambda: pair()[0].clone()) / 1e6
    rows = []
    for config in ABSMEAN_SWEEP:
        module.CUDA_CONFIGS[size] = config
        a, b = pair()
        close = torch.allclose(absmean_sums(a, b).double(), module.absmean_sums_reference(a, b), rtol=1e-4)
        gbs = 2 * n * size / ms(lambda: absmean_sums(*pair())) / 1e6
        rows.append({"dtype": str(dtype).removeprefix("torch."), "block": config[0], "warps": config[1],
                     "programs_per_sm": config[2], "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1),
                     "fraction_of_copy": round(gbs / copy_gbs, 3), "matches_reference": close})
    return rows


def cuda_split_row(shape, dev, l2_bytes, ms) -> dict:
    """frequency_split at one fp32 latent shape: the matmul path vs the Triton kernel (ms, GB/s against a
    copy), plus torch.fft's split (and its inverse round trip) for scale. Inputs rotate over 2x L2."""
    n = math.prod(shape)
    nbytes = n * 4
    make = rotating(lambda: (torch.randn(shape, device=dev),), nbytes, l2_bytes)
    mask = disc_mask(shape[-2], shape[-1], dev)
    x = make()[0]
    # Same results (fp32, summation order apart) before timing anything.
    (m_low, m_high), (t_low, t_high) = frequency_split(x, impl="matmul"), frequency_split(x, impl="triton")
    max_diff = max((m_low - t_low).abs().max().item(), (m_high - t_high).abs().max().item())

    def fft_roundtrip(x):
        return tuple(torch.fft.ifft2(torch.fft.ifftshift(s)).real for s in fft_split(x, mask))

    providers = {
        "matmul": lambda x: frequency_split(x, impl="matmul"),
        "triton": lambda x: frequency_split(x, impl="triton"),
        "torch_fft": lambda x: fft_split(x, mask),
        "torch_fft_roundtrip": fft_roundtrip,
        "copy": lambda x: x.clone(),
    }
    t = {k: ms(lambda fn=fn: fn(*make())) for k, fn in providers.items()}
    split_bytes = 3 * nbytes  # read x, write low and high
    copy_gbs = 2 * nbytes / t["copy"] / 1e6
    height, width = shape[-2], shape[-1]
    return {
        "op": "frequency_split",
        "shape": list(shape),
        "dtype": "float32",
        "triton_fits": triton_split_fits(height, width),  # False: impl="triton" ran the matmuls
        "triton_config": triton_split_config(height, width),
        **{f"{k}_ms": round(v, 4) for k, v in t.items()},
        "matmul_gbs": round(split_bytes / t["matmul"] / 1e6, 1),
        "triton_gbs": round(split_bytes / t["triton"] / 1e6, 1),
        "copy_gbs": round(copy_gbs, 1),
        "triton_speedup": round(t["matmul"] / t["triton"], 2),
        "max_abs_diff": max_diff,
        "max_abs_x": x.abs().max().item(),
    }


def bench_cuda(dev: torch.device | None = None, n: int = 64 * 2**20, ms: Callable | None = None) -> dict:
    """GB/s of each Triton kernel vs copy bandwidth, eager and compiled composites; the split's two implementations
    (matmul, triton) vs copy, and torch.fft for scale.

    `n` elements per tensor (default 64M: 256 MB in fp32). `dev` and `ms` exist to smoke-test this function
    on CPU; on CUDA the timer is `triton.testing.do_bench` (median).
    """
    dev = dev or torch.device("cuda")
    l2_bytes = 50 * 2**20
    if dev.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", l2_bytes)
    if ms is None:
        from triton.testing import do_bench

        def ms(fn: Callable[[], object]) -> float:
            return do_bench(fn, warmup=25, rep=200, return_mode="median")

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += cuda_elementwise_rows(dtype, dev, n, l2_bytes, ms)
    for shape in SPLIT_SHAPES.values():
        rows.append(cuda_split_row(shape, dev, l2_bytes, ms))
    sweep = cuda_absmean_sweep(dev, n, l2_bytes, ms)
    return {"numel": n, "l2_bytes": l2_bytes, "shapes": SPLIT_SHAPES, "rows": rows, "absmean_sweep": sweep}


def cuda_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# fastcache.kernels, CUDA",
        "",
        f"{m['gpu']}, CUDA {m['cuda']}, torch {m['torch']}, triton {m['triton']}. `triton.testing.do_bench` "
        "medians, inputs rotated over 2x L2.",
        "",
        "| op | dtype / shape | fastcache | eager | compiled | copy GB/s | fastcache / copy |",
        "|---|---|---|---|---|---|---|",
    ]
    splits = [r for r in result["rows"] if r["op"] == "frequency_split"]
    for r in result["rows"]:
        if r["op"] != "frequency_split":
            lines.append(
                f"| {r['op']} | {r['dtype']} | {r['fastcache_gbs']} GB/s | {r['eager_gbs']} GB/s | "
                f"{r['compiled_gbs']} GB/s | {r['copy_gbs']} | {r['fraction_of_copy']} |"
            )
    lines += [
        "",
        "frequency_split, fp32 (bytes: read x, write low and high; copy: `clone` of x):",
        "",
        "| shape | matmul ms | triton ms | triton / matmul speedup | matmul GB/s | triton GB/s | copy GB/s | "
        "fft split ms | fft + ifft ms | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in splits:
        shape = "x".join(map(str, r["shape"]))
        triton_ms = f"{r['triton_ms']}" if r["triton_fits"] else f"{r['triton_ms']} (matmul: too wide)"
        lines.append(
            f"| {shape} | {r['matmul_ms']} | {triton_ms} | {r['triton_speedup']}x | {r['matmul_gbs']} | "
            f"{r['triton_gbs']} | {r['copy_gbs']} | {r['torch_fft_ms']} | {r['torch_fft_roundtrip_ms']} | "
            f"{r['max_abs_diff']:.2e} (max abs x {r['max_abs_x']:.1f}) |"
        )
    sweep = result.get("absmean_sweep", [])
    if sweep:
        lines += ["", "absmean_sums configs (elements per loop iteration, warps, programs per SM; both kernels):", "",
                  "| dtype | block | warps | programs/SM | GB/s | copy GB/s | / copy | matches reference |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['block']} | {r['warps']} | {r['programs_per_sm']} | {r['gbs']} | "
                  f"{r['copy_gbs']} | {r['fraction_of_copy']} | {r['matches_reference']} |" for r in sweep]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31, help="timed repeats per provider (CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA section")
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor, CUDA section")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is steadier on a busy machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        t0 = time.perf_counter()
        result = {"machine": machine_info("cpu"), "repeats": args.repeats, **bench_cpu(args.repeats)}
        result["total_s"] = round(time.perf_counter() - t0, 1)
        (args.out / "kernels_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "kernels_cpu.md").write_text(cpu_markdown(result))
        print(cpu_markdown(result))
    if torch.cuda.is_available():
        result = {"machine": machine_info("cuda"), **bench_cuda(n=args.numel)}
        (args.out / "kernels_cuda.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "kernels_cuda.md").write_text(cuda_markdown(result))
        print(cuda_markdown(result))
    else:
        print("CUDA section skipped: no GPU")


if __name__ == "__main__":
    main()
