"""Relative mean absolute difference `mean|a - b| / mean|b|`: the First-Block-Cache / TeaCache skip predicate.

One pass over `a` and `b` accumulates `sum|a - b|` and `sum|b|` in fp32 and writes them to a 2-element device
tensor; the ratio is formed on the device, so the caller compares it with a threshold inside a compiled graph
(`torch.where` / `torch.cond`) without a host sync. The two sums are exposed separately so that a
data-parallel caller can all-reduce them before taking the ratio (the ratio of means equals the ratio of
sums).

Defined edge cases:
- `sum|b| == 0` gives `+inf` (also when `a == b == 0`), so `ratio <= threshold` is False: the caller computes.
- NaN / inf in the inputs give a NaN or `+inf` ratio; `nan <= threshold` is False too, so a broken
  residual never looks "similar enough" to skip.
- Sums are fp32: finite inputs whose absolute sum exceeds ~3.4e38 overflow to inf (ratio inf or NaN, not
  small).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_same, check_tensor, inline_in_compiled_cpu_graph
from ._triton import (
    HAS_TRITON,
    device_guard,
    interpreter_op,
    is_interpreted,
    require_triton,
    strided_layout,
    tl,
    triton,
    unravel4,
)

# CUDA, by element size: (elements per loop iteration, warps, programs per SM). Each program strides over the
# tensor and the partials (programs per SM x SMs) go to one tiny second kernel. `bench/bench_kernels.py` sweeps
# 16 configs (its absmean table); on an H100 (run 3) this default reached 0.957 of copy bandwidth in fp32 (the
# best config 0.973) and 0.903 in bf16 (the best), both kernels and the op's dispatch included.
CUDA_CONFIGS: dict[int, tuple[int, int, int]] = {4: (4096, 8, 4), 2: (4096, 8, 4)}
# Interpreter (CPU tests): every program instance costs ~3-6 ms and each loop iteration runs as numpy over the
# whole block, so a few programs with large blocks: 1M fp32 elements take ~0.1 s.
_BLOCK_INTERPRETER = 32768
_PROGRAMS_INTERPRETER = 2
# CPU (plain torch): chunks of 256K elements through a 1 MB fp32 scratch that stays in L2, with in-place
# `abs_().sum()` (`vector_norm(x, 1)` is 6x slower per chunk: 236 vs 36 us). On 1 x 4096 x 3072, one thread:
# ~25 ms vs ~170 ms for the eager composite (fp32 and bf16); inductor's fused composite is faster still (~8 ms
# fp32), but it cannot see inside this op.
_CPU_CHUNK = 1 << 18
_CPU_PLAIN_MAX = 1 << 15  # eagerly up to here, plain ops without the op (temporaries of 128 KB at most)


@triton.jit
def _absmean_partials_kernel(
    a_ptr,  # first input, any float dtype, addressed through (size*, a_stride*)
    b_ptr,  # second input, same shape and dtype
    partial_ptr,  # fp32 [2 * num_programs]: sum|a-b| per program, then sum|b| per program
    n_elements,
    size1,  # logical sizes of dims 1..3 (dim 0 is implied by n_elements)
    size2,
    size3,
    a_stride0,
    a_stride1,
    a_stride2,
    a_stride3,
    b_stride0,
    b_stride1,
    b_stride2,
    b_stride3,
    CONTIGUOUS: tl.constexpr,  # both inputs contiguous: skip the index arithmetic
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    # Grid-stride loop: a fixed grid, and a fixed summation order for a given device (deterministic result).
    for start in tl.range(pid * BLOCK, n_elements, num_programs * BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_elements
        if CONTIGUOUS:
            a_off = idx
            b_off = idx
        else:
            i0, i1, i2, i3 = unravel4(idx.to(tl.int64), size1, size2, size3)
            a_off = i0 * a_stride0 + i1 * a_stride1 + i2 * a_stride2 + i3 * a_stride3
            b_off = i0 * b_stride0 + i1 * b_stride1 + i2 * b_stride2 + i3 * b_stride3
        # Masked lanes load 0 for both, adding |0 - 0| = 0 and |0| = 0.
        a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
        acc_diff += tl.abs(a - b)
        acc_b += tl.abs(b)
    tl.store(partial_ptr + pid, tl.sum(acc_diff, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(acc_b, axis=0))


@triton.jit
def _absmean_finalize_kernel(
    partial_ptr,  # fp32 [2 * num_partials]
    out_ptr,  # fp32 [2]: sum|a-b|, sum|b|
    num_partials,
    BLOCK: tl.constexpr,  # power of two >= num_partials (at least 16: no 1-wide tl.arange)
):
    offs = tl.arange(0, BLOCK)
    mask = offs < num_partials
    diff = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    b = tl.load(partial_ptr + num_partials + offs, mask=mask, other=0.0)
    tl.store(out_ptr, tl.sum(diff, axis=0))
    tl.store(out_ptr + 1, tl.sum(b, axis=0))


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _absmean_sums_triton(a: Tensor, b: Tensor) -> Tensor:
    """Host launcher: `[sum|a-b|, sum|b|]` as fp32 [2] on a's device; two launches (partials, total)."""
    require_triton()
    n = a.numel()
    out = torch.empty(2, dtype=torch.float32, device=a.device)
    layout = None
    contiguous = a.is_contiguous() and b.is_contiguous()
    if not contiguous:
        layout = strided_layout((a, b))
        if layout is None:  # more than 4 dims that cannot merge: copy once
            a, b, contiguous = a.contiguous(), b.contiguous(), True
    if layout is None:
        layout = ([1, 1, 1, n], [[0, 0, 0, 1], [0, 0, 0, 1]])
    sizes, (a_strides, b_strides) = layout
    if is_interpreted(_absmean_partials_kernel):
        block, max_programs, num_warps = _BLOCK_INTERPRETER, _PROGRAMS_INTERPRETER, 4
    else:
        block, num_warps, per_sm = CUDA_CONFIGS.get(a.element_size(), CUDA_CONFIGS[4])
        max_programs = per_sm * _num_sms(a.device.index if a.device.index is not None else 0)
    num_programs = max(1, min(triton.cdiv(n, block), max_programs))
    partials = torch.empty(2 * num_programs, dtype=torch.float32, device=a.device)
    with device_guard(a):
        _absmean_partials_kernel[(num_programs,)](
            a, b, partials, n, sizes[1], sizes[2], sizes[3], *a_strides, *b_strides,
            CONTIGUOUS=contiguous, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        _absmean_finalize_kernel[(1,)](
            partials, out, num_programs, BLOCK=max(16, triton.next_power_of_2(num_programs)), num_warps=4
        )
    return out


def _absmean_sums_torch(a: Tensor, b: Tensor) -> Tensor:
    """Plain-torch implementation (what CPU runs): fp32 differences and accumulation, fp32 [2] result."""
    if a.device.type != "cpu":  # one pass per term; a Python loop of small launches would be slower there
        return _absmean_sums_composite(a, b)
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)  # a copy only for layouts that cannot be flattened
    n = a_flat.numel()
    scratch = torch.empty(min(n, _CPU_CHUNK), dtype=torch.float32)
    partials = []
    for start in range(0, n, _CPU_CHUNK):
        a_chunk, b_chunk = a_flat[start : start + _CPU_CHUNK], b_flat[start : start + _CPU_CHUNK]
        work = scratch[: a_chunk.numel()]
        partials.append(work.copy_(a_chunk).sub_(b_chunk).abs_().sum())  # exact upcast, difference in fp32
        partials.append(work.copy_(b_chunk).abs_().sum())
    return torch.stack(partials).view(-1, 2).sum(dim=0)


def _absmean_sums_composite(a: Tensor, b: Tensor) -> Tensor:
    """The sums as plain fp32 torch ops: what inductor fuses into one loop, and one pass per term elsewhere."""
    diff = a.float() - b.float()
    return torch.stack((diff.abs().sum(), b.abs().sum(dtype=torch.float32)))


def absmean_sums_reference(a: Tensor, b: Tensor) -> Tensor:
    """Test oracle: `[sum|a-b|, sum|b|]` computed and returned in float64."""
    a64, b64 = a.double(), b.double()
    return torch.stack(((a64 - b64).abs().sum(), b64.abs().sum()))


def absmean_rel_diff_reference(a: Tensor, b: Tensor) -> Tensor:
    """Test oracle: `mean|a-b| / mean|b|` in float64 with the same edge-case rules as `absmean_rel_diff`."""
    return rel_diff_from_sums(absmean_sums_reference(a, b))


@torch.library.custom_op("fastcache::absmean_sums", mutates_args=())
def absmean_sums_op(a: Tensor, b: Tensor) -> Tensor:
    return _absmean_sums_torch(a, b)


@absmean_sums_op.register_kernel("cuda")
def _absmean_sums_cuda(a: Tensor, b: Tensor) -> Tensor:
    return _absmean_sums_triton(a, b) if HAS_TRITON else _absmean_sums_torch(a, b)


@absmean_sums_op.register_fake
def _absmean_sums_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((2,), dtype=torch.float32)


@functools.cache
def interpreter_test_op() -> Callable[[Tensor, Tensor], Tensor]:
    """TEST ONLY: a CPU custom op `fastcache_test::absmean_sums` that launches the real Triton kernel.

    Needs `TRITON_INTERPRET=1` set before triton is imported. It lets a test run the Triton kernel inside a
    `torch.compile(fullgraph=True)` graph on CPU (a raw `kernel[grid]` launch or `wrap_triton` cannot be
    traced there under the interpreter). No input validation: call it with inputs `absmean_sums` would accept.
    """
    return interpreter_op("absmean_sums", _absmean_partials_kernel, _absmean_sums_triton, _absmean_sums_fake)


def _check_pair(a: object, b: object, fn: str) -> None:
    check_tensor("a", a, fn)
    check_tensor("b", b, fn)
    check_same(fn, "a", a, "b", b, dtype=True)
    if a.numel() == 0:
        raise ValueError(f"{fn}: inputs are empty (shape {tuple(a.shape)}); the mean is undefined")


def absmean_sums(a: Tensor, b: Tensor) -> Tensor:
    """The two partial sums of the relative difference, for callers that all-reduce them across ranks.

    Args:
        a: float32, float16 or bfloat16 tensor, any shape and strides, not empty.
        b: the reference, same shape, dtype and device as `a`.

    Returns:
        A float32 tensor of shape (2,) on a's device: `[sum|a - b|, sum|b|]`, accumulated in fp32.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: empty inputs, mismatched shapes, dtypes or devices, or an unsupported dtype.
    """
    _check_pair(a, b, "absmean_sums")
    if inline_in_compiled_cpu_graph(a):  # one fused loop (bench/results/kernels_cpu.md: 8.6 ms vs 23.6 ms)
        return _absmean_sums_composite(a, b)
    if a.device.type == "cpu" and a.numel() <= _CPU_PLAIN_MAX:
        # small, eagerly: the op's dispatch and chunk loop cost more than the passes (1 x 64 x 32: 8 vs 22 us)
        return _absmean_sums_composite(a, b)
    return torch.ops.fastcache.absmean_sums(a, b)


def rel_diff_from_sums(sums: Tensor) -> Tensor:
    """`sums[0] / sums[1]` as a 0-dim tensor, `+inf` where `sums[1] == 0`.

    Args:
        sums: floating tensor of shape (2,), `[sum|a - b|, sum|b|]` (from `absmean_sums`, possibly
            all-reduced).

    Returns:
        A 0-dim tensor of sums' dtype on sums' device: `+inf` where a sum is infinite (an overflow never reads
        as a small change); NaN in the sums stays NaN; note `nan <= thr` and `inf <= thr` are False.
    """
    if not isinstance(sums, torch.Tensor):
        raise TypeError(f"rel_diff_from_sums: sums must be a torch.Tensor, got {type(sums).__name__}")
    if sums.shape != (2,) or not sums.dtype.is_floating_point:
        raise ValueError(
            "rel_diff_from_sums: sums must be a floating tensor of shape (2,), "
            f"got {sums.dtype} {tuple(sums.shape)}"
        )
    num, den = sums.unbind(0)
    return ratio_or_inf(num, den)


def ratio_or_inf(num: Tensor, den: Tensor) -> Tensor:
    """`num / den` elementwise, `+inf` where `den == 0` or either is infinite; NaN stays NaN. The relative-change
    rule of every skip predicate (FBC, TeaCache per sample, DBCache)."""
    # 0 / 0 would be NaN: +inf keeps "nothing to compare against" on the compute side of any threshold. An
    # overflowed sum (inf) would make any ratio look small (x / inf = 0): +inf there too.
    unusable = (den == 0) | torch.isinf(den) | torch.isinf(num)
    return torch.where(unusable, torch.full_like(den, float("inf")), num / den)


def to_fp32(x: float) -> float:
    """`x` rounded to the nearest float32 (+-inf past its range), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def ratio_or_inf_on_host(num: float, den: float) -> float:
    """`ratio_or_inf` of two float32 sums read on the host: the same float32 value (a float64 quotient of two
    float32 numbers rounds to the correctly rounded float32 quotient, as float32 division gives)."""
    if den == 0 or math.isinf(den) or math.isinf(num):
        return math.inf
    return to_fp32(num / den)  # NaN stays NaN


def absmean_rel_diff(a: Tensor, b: Tensor) -> Tensor:
    """`mean|a - b| / mean|b|` in one pass, as a 0-dim fp32 device tensor (no host sync).

    Args:
        a: float32, float16 or bfloat16 tensor, any shape and strides, not empty.
        b: the reference, same shape, dtype and device as `a`.

    Returns:
        0-dim float32 tensor on a's device. `+inf` when `sum|b| == 0` (also when `a == b == 0`); NaN or `+inf`
        when the inputs hold NaN or inf. Both compare False with `<= threshold`, so the caller computes.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: empty inputs, mismatched shapes, dtypes or devices, or an unsupported dtype.

    Example:
        >>> skip = absmean_rel_diff(residual, ref_residual) <= threshold  # a 0-dim bool tensor
    """
    return rel_diff_from_sums(absmean_sums(a, b))
