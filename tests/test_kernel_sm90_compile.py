"""Every Triton kernel of fastcache.kernels, in each dtype / layout variant its launcher uses, compiled for an
H100 (sm_90: PTX and cubin through the ptxas in the triton wheel) on this CPU-only machine.

The interpreter (`TRITON_INTERPRET=1`, which the other kernel tests use) runs code the real compiler rejects,
so this is the only CI check that the kernels build for a GPU. It runs in a subprocess without the interpreter
(conftest.py sets it before triton is imported) and with a fresh triton cache, so every variant really
compiles. Representative integer arguments are i32; launches with sizes or strides >= 2**31 specialise to i64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import fastcache.kernels
import pytest
from fastcache.kernels.absmean import CUDA_CONFIGS

pytest.importorskip("triton")

FLOATS = ("fp32", "fp16", "bf16")
# (module, kernel, pointer dtypes by argument name, constexprs, num_warps); constexpr values and warps are
# read from the module in the subprocess where given as a string naming a module attribute.
VARIANTS: list[tuple[str, str, dict[str, str], dict[str, object], object]] = []
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
for dt in FLOATS:
    for contiguous in (True, False):
        block, warps, _ = CUDA_CONFIGS[ITEMSIZE[dt]]  # the launcher's config for this element size
        VARIANTS.append(
            ("absmean", "_absmean_partials_kernel", {"a_ptr": dt, "b_ptr": dt, "partial_ptr": "fp32"},
             {"CONTIGUOUS": contiguous, "BLOCK": block}, warps)
        )  # fmt: skip
        VARIANTS.append(
            ("extrapolate", "_extrapolate_kernel", {"f_k_ptr": dt, "f_prev_ptr": dt, "w_ptr": "fp32", "out_ptr": dt},
             {"CONTIGUOUS": contiguous, "BLOCK": "_BLOCK_CUDA"}, "_NUM_WARPS_CUDA")
        )  # fmt: skip
# Partials: the most programs per SM times 132 SMs on an H100, to the next power of two.
PARTIALS = 1 << (max(per_sm for *_, per_sm in CUDA_CONFIGS.values()) * 132 - 1).bit_length()
VARIANTS.append(
    ("absmean", "_absmean_finalize_kernel", {"partial_ptr": "fp32", "out_ptr": "fp32"}, {"BLOCK": PARTIALS}, 4)
)  # fmt: skip
# c in any float dtype with fp32 deltas (what the engine stores), and deltas stored in c's low precision.
for dt, delta in [(d, "fp32") for d in FLOATS] + [("bf16", "bf16"), ("fp16", "fp16")]:
    for contiguous in (True, False) if delta == "fp32" else (True,):
        ptrs = {"c_ptr": dt, "d_low_ptr": delta, "d_high_ptr": delta, "w_low_ptr": "fp32", "w_high_ptr": "fp32"}
        ptrs |= {"uncond_ptr": dt, "new_d_low_ptr": delta, "new_d_high_ptr": delta}
        VARIANTS.append(
            ("fastercache_uncond", "_fastercache_uncond_kernel", ptrs,
             {"CONTIGUOUS": contiguous, "BLOCK": "_BLOCK_CUDA"}, "_NUM_WARPS_CUDA")
        )  # fmt: skip
# The split: one compiled variant per (dtype, tile config); image sizes give the configs (CogVideoX 60 x 90 in
# every dtype; Flux 128 x 128, Wan 90 x 160 = the largest tile allowed, a tiny 8 x 8).
for dt, size in [(d, (60, 90)) for d in FLOATS] + [("fp32", (128, 128)), ("fp32", (90, 160)), ("fp32", (8, 8))]:
    ptrs = {"x_ptr": dt, "by_ptr": "fp32", "bx_ptr": "fp32", "m_ptr": "fp32", "low_ptr": dt, "high_ptr": dt}
    VARIANTS.append(("frequency_split", "_frequency_split_kernel", ptrs, {"config_for": list(size)}, None))

# Triton functions that are not kernels but device helpers, compiled inside the kernels that call them.
HELPERS = {"_triton.unravel4"}

SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys, time
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    import fastcache.kernels

    spec = json.loads(sys.stdin.read())
    assert fastcache.kernels.__file__ == spec["kernels_file"], (fastcache.kernels.__file__, spec["kernels_file"])
    found = []
    for name in spec["modules"]:
        module = importlib.import_module(f"fastcache.kernels.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found.append(f"{name}.{attr}")
    target = GPUTarget("cuda", 90, 32)
    results = []
    for module_name, kernel_name, ptrs, constexprs, num_warps in spec["variants"]:
        module = importlib.import_module(f"fastcache.kernels.{module_name}")
        kernel = getattr(module, kernel_name)
        if "config_for" in constexprs:  # the split: the launcher's tile config for this image size
            w_p, k_p, block_h, num_warps = module.triton_split_config(*constexprs["config_for"])
            constexprs = {"W_P": w_p, "K_P": k_p, "BLOCK_H": block_h}
        constexprs = {k: getattr(module, v) if isinstance(v, str) else v for k, v in constexprs.items()}
        num_warps = getattr(module, num_warps) if isinstance(num_warps, str) else num_warps
        signature = {}
        for arg in kernel.arg_names:
            signature[arg] = "constexpr" if arg in constexprs else f"*{ptrs[arg]}" if arg in ptrs else "i32"
        t0 = time.perf_counter()
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=target,
            options={"num_warps": num_warps},
        )
        assert compiled.asm["cubin"], kernel_name
        results.append({"kernel": f"{module_name}.{kernel_name}", "s": round(time.perf_counter() - t0, 2),
                        "shared": compiled.metadata.shared})
    print(json.dumps({"found": found, "results": results}))
    """
)


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    modules = sorted({v[0] for v in VARIANTS} | {"_triton"})
    spec = {"kernels_file": fastcache.kernels.__file__, "modules": modules, "variants": VARIANTS}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, leave no cache behind
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,  # nothing importable from the working directory: the installed fastcache only
    )
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    covered = {f"{module}.{kernel}" for module, kernel, *_ in VARIANTS}
    assert set(out["found"]) == covered | HELPERS, "a Triton kernel without an sm_90 compile variant (or gone)"
    assert len(out["results"]) == len(VARIANTS)
    # H100: at most 227 KB of shared memory per program.
    assert all(r["shared"] <= 227 * 1024 for r in out["results"]), out["results"]
    print(f"{len(VARIANTS)} variants compiled for sm_90 in {time.perf_counter() - t0:.1f} s")
