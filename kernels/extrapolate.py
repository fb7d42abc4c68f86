"""FasterCache's attention approximation `F_k + w (F_k - F_{k-1})`, as one fused pass.

Eager torch makes three passes and two temporaries (`F_k - F_{k-1}`, `w * ...`); the kernel reads each input
once and writes once, with `w` read from device memory (a 0-dim tensor: no host sync, no recompile).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_same, check_tensor, check_weight, inline_in_compiled_cpu_graph
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

# CUDA: 1024 elements and 4 warps per program, 8 per thread: the usual shape for a memory-bound elementwise
# kernel. Not tuned here (no GPU on this machine).
_BLOCK_CUDA = 1024
_NUM_WARPS_CUDA = 4
# Interpreter (CPU tests): ~3-6 ms per program instance, so one program covers 32768 elements.
_BLOCK_INTERPRETER = 32768


@triton.jit
def _extrapolate_kernel(
    f_k_ptr,  # latest output F_k, any float dtype, strided
    f_prev_ptr,  # previous output F_{k-1}, same dtype, strided
    w_ptr,  # 0-dim weight on the device
    out_ptr,  # out, contiguous, F_k's dtype
    n_elements,
    size1,
    size2,
    size3,
    k_stride0,
    k_stride1,
    k_stride2,
    k_stride3,
    p_stride0,
    p_stride1,
    p_stride2,
    p_stride3,
    CONTIGUOUS: tl.constexpr,  # both inputs contiguous: skip the index arithmetic
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: activations can exceed 2**31 elements
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    if CONTIGUOUS:
        k_off = idx
        p_off = idx
    else:
        i0, i1, i2, i3 = unravel4(idx, size1, size2, size3)
        k_off = i0 * k_stride0 + i1 * k_stride1 + i2 * k_stride2 + i3 * k_stride3
        p_off = i0 * p_stride0 + i1 * p_stride1 + i2 * p_stride2 + i3 * p_stride3
    w = tl.load(w_ptr).to(tl.float32)  # cast here: the scalar may arrive as fp64 or fp16
    f_k = tl.load(f_k_ptr + k_off, mask=mask).to(tl.float32)
    f_prev = tl.load(f_prev_ptr + p_off, mask=mask).to(tl.float32)
    out = f_k + w * (f_k - f_prev)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


def _extrapolate_triton(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    """Host launcher: contiguous output, one program per BLOCK elements."""
    require_triton()
    out = torch.empty(f_k.shape, dtype=f_k.dtype, device=f_k.device)
    n = f_k.numel()
    if n == 0:
        return out
    inputs = (f_k, f_prev)
    contiguous = all(t.is_contiguous() for t in inputs)
    layout = None if contiguous else strided_layout(inputs)
    if not contiguous and layout is None:  # more than 4 unmergeable dims: copy once
        inputs, contiguous = tuple(t.contiguous() for t in inputs), True
    if layout is None:
        layout = ([1, 1, 1, n], [[0, 0, 0, 1]] * 2)
    sizes, strides = layout
    block = _BLOCK_INTERPRETER if is_interpreted(_extrapolate_kernel) else _BLOCK_CUDA
    with device_guard(f_k):
        _extrapolate_kernel[(triton.cdiv(n, block),)](
            *inputs, w, out, n, sizes[1], sizes[2], sizes[3], *strides[0], *strides[1],
            CONTIGUOUS=contiguous, BLOCK=block, num_warps=_NUM_WARPS_CUDA,
        )  # fmt: skip
    return out


def _extrapolate_torch(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    """Plain-torch implementation (what CPU runs): fp32 compute, contiguous output in F_k's dtype.

    In place on one new buffer (eager `f_k + w * (f_k - f_prev)` allocates two temporaries). Not `torch.lerp`:
    for weights >= 0.5 it switches formula, which changes inf / NaN results and rounding.
    """
    f_k32 = f_k.float()
    out = torch.sub(f_k32, f_prev.float())  # a new tensor: the inputs are never written
    out.mul_(w.float()).add_(f_k32)
    return out.to(f_k.dtype).contiguous()


def extrapolate_reference(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    """Test oracle: `f_k + w (f_k - f_prev)` in float64."""
    f_k64 = f_k.double()
    return f_k64 + w.double() * (f_k64 - f_prev.double())


@torch.library.custom_op("fastcache::extrapolate", mutates_args=())
def extrapolate_op(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    return _extrapolate_torch(f_k, f_prev, w)


@extrapolate_op.register_kernel("cuda")
def _extrapolate_cuda(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    return _extrapolate_triton(f_k, f_prev, w) if HAS_TRITON else _extrapolate_torch(f_k, f_prev, w)


@extrapolate_op.register_fake
def _extrapolate_fake(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    return f_k.new_empty(f_k.shape)


@functools.cache
def interpreter_test_op() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """TEST ONLY: a CPU custom op `fastcache_test::extrapolate` that launches the real Triton kernel.

    Needs `TRITON_INTERPRET=1` set before triton is imported; lets a test run the kernel inside a compiled
    graph on CPU. No input validation.
    """
    return interpreter_op("extrapolate", _extrapolate_kernel, _extrapolate_triton, _extrapolate_fake)


def extrapolate(f_k: Tensor, f_prev: Tensor, w: Tensor) -> Tensor:
    """Linear extrapolation of a cached output: `f_k + w * (f_k - f_prev)`.

    Args:
        f_k: latest computed output, float32 / float16 / bfloat16, any shape and strides.
        f_prev: the output before it, same shape, dtype and device.
        w: 0-dim floating tensor on f_k's device (FasterCache's attention weight, e.g. 0.5 or 0.3).

    Returns:
        Contiguous tensor of f_k's shape and dtype, computed in fp32.

    Raises:
        TypeError: an argument is not a tensor (e.g. a Python float weight).
        ValueError: mismatched shapes, dtypes or devices, w not 0-dim, or an unsupported dtype.
    """
    fn = "extrapolate"
    check_tensor("f_k", f_k, fn)
    check_tensor("f_prev", f_prev, fn)
    check_same(fn, "f_k", f_k, "f_prev", f_prev, dtype=True)
    check_weight("w", w, f_k, fn)
    if inline_in_compiled_cpu_graph(f_k):
        return _extrapolate_torch(f_k, f_prev, w)
    return torch.ops.fastcache.extrapolate(f_k, f_prev, w)
