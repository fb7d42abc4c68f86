"""FasterCache's skip-step reconstruction of the unconditional branch, in real space, as one fused pass.

diffusers, on a step that skips the unconditional half, scales the stored complex deltas (`dLF *= w_low`,
`dHF *= w_high`, stored back, so the weights compound over consecutive skipped steps) and computes
`uncond = real(ifft2(ifftshift(LF(c) + dLF + HF(c) + dHF)))`. Since `LF(c) + HF(c)` is the whole spectrum of
`c` and the inverse transform is linear, with real-space deltas `d_low = low(u - c)`, `d_high = high(u - c)`
(see `frequency_split`) the same step is

    new_d_low = d_low * w_low,  new_d_high = d_high * w_high,  uncond = c + new_d_low + new_d_high,

elementwise: one read of c and both deltas, three writes, no FFT.
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
# kernel (enough bytes in flight per SM with many resident programs). Not tuned here (no GPU on this machine).
_BLOCK_CUDA = 1024
_NUM_WARPS_CUDA = 4
# Interpreter (CPU tests): ~3-6 ms per program instance, so one program covers 32768 elements.
_BLOCK_INTERPRETER = 32768


@triton.jit
def _fastercache_uncond_kernel(
    c_ptr,  # cond output, any float dtype, strided
    d_low_ptr,  # low-frequency delta (normally fp32), strided
    d_high_ptr,  # high-frequency delta (normally fp32), strided
    w_low_ptr,  # 0-dim weight on the device: read here, so a new value neither syncs nor recompiles
    w_high_ptr,
    uncond_ptr,  # out, contiguous, c's dtype
    new_d_low_ptr,  # out, contiguous, d_low's dtype
    new_d_high_ptr,  # out, contiguous, d_high's dtype
    n_elements,
    size1,
    size2,
    size3,
    c_stride0,
    c_stride1,
    c_stride2,
    c_stride3,
    dl_stride0,
    dl_stride1,
    dl_stride2,
    dl_stride3,
    dh_stride0,
    dh_stride1,
    dh_stride2,
    dh_stride3,
    CONTIGUOUS: tl.constexpr,  # all three inputs contiguous: skip the index arithmetic
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: latents can exceed 2**31 elements
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    if CONTIGUOUS:
        c_off = idx
        dl_off = idx
        dh_off = idx
    else:
        i0, i1, i2, i3 = unravel4(idx, size1, size2, size3)
        c_off = i0 * c_stride0 + i1 * c_stride1 + i2 * c_stride2 + i3 * c_stride3
        dl_off = i0 * dl_stride0 + i1 * dl_stride1 + i2 * dl_stride2 + i3 * dl_stride3
        dh_off = i0 * dh_stride0 + i1 * dh_stride1 + i2 * dh_stride2 + i3 * dh_stride3
    # Scalars are cast here: they may arrive as fp64 or fp16 tensors.
    w_low = tl.load(w_low_ptr).to(tl.float32)
    w_high = tl.load(w_high_ptr).to(tl.float32)
    c = tl.load(c_ptr + c_off, mask=mask).to(tl.float32)
    d_low = tl.load(d_low_ptr + dl_off, mask=mask).to(tl.float32) * w_low
    d_high = tl.load(d_high_ptr + dh_off, mask=mask).to(tl.float32) * w_high
    # Round the deltas to their storage dtype first: uncond is built from exactly what the caller stores.
    d_low = d_low.to(new_d_low_ptr.dtype.element_ty)
    d_high = d_high.to(new_d_high_ptr.dtype.element_ty)
    tl.store(new_d_low_ptr + idx, d_low, mask=mask)
    tl.store(new_d_high_ptr + idx, d_high, mask=mask)
    uncond = c + d_low.to(tl.float32) + d_high.to(tl.float32)
    tl.store(uncond_ptr + idx, uncond.to(uncond_ptr.dtype.element_ty), mask=mask)


def _fastercache_uncond_triton(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Host launcher: contiguous outputs, one program per BLOCK elements."""
    require_triton()
    uncond = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    new_d_low = torch.empty(c.shape, dtype=d_low.dtype, device=c.device)
    new_d_high = torch.empty(c.shape, dtype=d_high.dtype, device=c.device)
    n = c.numel()
    if n == 0:
        return uncond, new_d_low, new_d_high
    inputs = (c, d_low, d_high)
    contiguous = all(t.is_contiguous() for t in inputs)
    layout = None if contiguous else strided_layout(inputs)
    if not contiguous and layout is None:  # more than 4 unmergeable dims: copy once
        inputs, contiguous = tuple(t.contiguous() for t in inputs), True
    if layout is None:
        layout = ([1, 1, 1, n], [[0, 0, 0, 1]] * 3)
    sizes, strides = layout
    interpreted = is_interpreted(_fastercache_uncond_kernel)
    block = _BLOCK_INTERPRETER if interpreted else _BLOCK_CUDA
    with device_guard(c):
        _fastercache_uncond_kernel[(triton.cdiv(n, block),)](
            *inputs, w_low, w_high, uncond, new_d_low, new_d_high, n, sizes[1], sizes[2], sizes[3],
            *strides[0], *strides[1], *strides[2],
            CONTIGUOUS=contiguous, BLOCK=block, num_warps=_NUM_WARPS_CUDA,
        )  # fmt: skip
    return uncond, new_d_low, new_d_high


def _fastercache_uncond_torch(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch implementation (what CPU runs), same rounding steps as the kernel, contiguous outputs."""
    new_d_low = (d_low.float() * w_low.float()).to(d_low.dtype).contiguous()
    new_d_high = (d_high.float() * w_high.float()).to(d_high.dtype).contiguous()
    uncond = c.float() + new_d_low.float()  # a new tensor: c and the deltas are never written
    uncond += new_d_high
    return uncond.to(c.dtype).contiguous(), new_d_low, new_d_high


def fastercache_uncond_reference(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Test oracle: `(c + d_low w_low + d_high w_high, d_low w_low, d_high w_high)` in float64."""
    new_d_low = d_low.double() * w_low.double()
    new_d_high = d_high.double() * w_high.double()
    return c.double() + new_d_low + new_d_high, new_d_low, new_d_high


@torch.library.custom_op("fastcache::fastercache_uncond", mutates_args=())
def fastercache_uncond_op(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _fastercache_uncond_torch(c, d_low, d_high, w_low, w_high)


@fastercache_uncond_op.register_kernel("cuda")
def _fastercache_uncond_cuda(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if not HAS_TRITON:
        return _fastercache_uncond_torch(c, d_low, d_high, w_low, w_high)
    return _fastercache_uncond_triton(c, d_low, d_high, w_low, w_high)


@fastercache_uncond_op.register_fake
def _fastercache_uncond_fake(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        c.new_empty(c.shape),
        c.new_empty(c.shape, dtype=d_low.dtype),
        c.new_empty(c.shape, dtype=d_high.dtype),
    )


@functools.cache
def interpreter_test_op() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """TEST ONLY: a CPU custom op `fastcache_test::fastercache_uncond` that launches the real Triton kernel.

    Needs `TRITON_INTERPRET=1` set before triton is imported; lets a test run the kernel inside a compiled
    graph on CPU. No input validation.
    """
    return interpreter_op("fastercache_uncond", _fastercache_uncond_kernel, _fastercache_uncond_triton,
                          _fastercache_uncond_fake)


def fastercache_uncond(
    c: Tensor, d_low: Tensor, d_high: Tensor, w_low: Tensor, w_high: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """FasterCache skip step: rebuild the unconditional output from the conditional one and the stored deltas.

    Args:
        c: conditional output, float32 / float16 / bfloat16, any shape and strides.
        d_low: stored low-frequency delta `low(u - c)` of the last full step, same shape as c (normally fp32).
        d_high: stored high-frequency delta `high(u - c)`, same shape as c (normally fp32).
        w_low: 0-dim floating tensor on c's device, the low-frequency weight of this step.
        w_high: 0-dim floating tensor on c's device, the high-frequency weight of this step.

    Returns:
        `(uncond, new_d_low, new_d_high)`, contiguous: `new_d_low = d_low * w_low` (d_low's dtype),
        `new_d_high = d_high * w_high` (d_high's dtype), `uncond = c + new_d_low + new_d_high` (in fp32,
        cast to c's dtype). Store the new deltas back: the weights compound over consecutive skipped steps.

    Raises:
        TypeError: a tensor argument is not a tensor (e.g. a Python float weight).
        ValueError: mismatched shapes or devices, weights not 0-dim, or an unsupported dtype.
    """
    fn = "fastercache_uncond"
    check_tensor("c", c, fn)
    check_tensor("d_low", d_low, fn)
    check_tensor("d_high", d_high, fn)
    check_same(fn, "c", c, "d_low", d_low, dtype=False)
    check_same(fn, "c", c, "d_high", d_high, dtype=False)
    check_weight("w_low", w_low, c, fn)
    check_weight("w_high", w_high, c, fn)
    if inline_in_compiled_cpu_graph(c):
        return _fastercache_uncond_torch(c, d_low, d_high, w_low, w_high)
    return torch.ops.fastcache.fastercache_uncond(c, d_low, d_high, w_low, w_high)
