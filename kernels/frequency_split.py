"""FasterCache's low/high frequency split, in real space and without complex tensors.

diffusers (`diffusers.hooks.faster_cache._split_low_high_freq`) splits `x` (..., H, W) as
`LF = fftshift(fft2(x)) * mask`, `HF = fftshift(fft2(x)) * (1 - mask)`, with `mask` the closed disc of radius
`r = min(H, W) // 5` centred at (row H // 2, col W // 2) of the shifted spectrum, and keeps the complex
tensors. Here `low = real(ifft2(ifftshift(LF)))` and `high = x - low` are computed directly in real space.

Derivation. In unshifted frequencies the disc is `D = {(p, q): p^2 + q^2 <= r^2}` (|p|, |q| <= r < H/2, W/2,
so no wrap-around). `D` is symmetric under p -> -p and q -> -q separately, so the imaginary parts and the
sine-times-cosine cross terms cancel and

    low[y, x] = 1/(H W) sum_{(p,q) in D} sum_{y',x'} cos(2 pi p (y-y') / H) cos(2 pi q (x-x') / W) x[y',x'].

Expanding each cosine of a difference (cos cos + sin sin) and folding +p with -p gives, with the real basis
`B_n` of shape (2r + 1, n) whose rows are cos(2 pi k i / n) for k = 0..r and sin(2 pi k i / n) for k = 1..r,

    low = B_H^T (M * (B_H x B_W^T)) B_W,    M[j, k] = [p_j^2 + q_k^2 <= r^2] m_j m_k / (H W),

where p_j, q_k are the frequencies of rows j, k and m = 1 for frequency 0, 2 otherwise. That is four small
real matrix products over only 2r + 1 frequencies per axis (25 instead of 60 and 90 for a 60 x 90 latent).

Accuracy against an fp64 FFT of the same input (measured, sizes 1..128 and 4 x 16 x 60 x 90): fp32 max abs
error ~1e-7 * max|x|, relative L2 error 1e-7..6e-7. fp16 / bf16 inputs are converted to fp32 exactly,
computed in fp32, and the results rounded once to the input dtype, so their error is that rounding (at most
one ulp of each value): relative L2 error ~2e-4 for fp16 and ~1.7e-3 for bf16. With TF32 matmuls enabled by
the caller on CUDA (`torch.set_float32_matmul_precision("high")`) the fp32 error grows to ~1e-3 relative
(not measured here), far below what FasterCache's approximation itself changes.

GPU: two implementations of `frequency_split`, chosen per call (`frequency_split(x, impl="auto" | "matmul" |
"triton")`) or for every call without `impl` (`set_frequency_split_impl`; "auto" unless changed: the one
measured faster at the image's tile size, below). CPU always runs the
matmuls (the Triton kernel runs on CPU only in the interpreter, through the test-only `interpreter_test_op`).
`lowpass` always runs the matmuls.

- "matmul": the four products above as torch matmuls (inner dims W, H, then K = 2r + 1 twice; fp32,
  so no TF32 unless the caller enables it), then the mask multiply, `x - low` and, for fp16 / bf16, the
  casts: six or more kernel launches, with the (..., H, K) and (..., K, K) intermediates and the fp32 low
  going through memory.
- "triton" (`_frequency_split_kernel`): one launch, one program per (H, W) image. Zero-padded power-of-two
  tiles (W_P, K_P >= 16 as `tl.dot` needs; row blocks of max(16, 8192 / W_P) rows); pass 1 accumulates
  `B_H x B_W^T` over the row blocks, pass 2 rebuilds each row block of `low` from `M * (...)`, reads that
  block of x again (normally from L2: the image was just read) and writes `low` and `high = x - low` in x's
  dtype. All four products use `tl.dot(..., input_precision="ieee")` (fp32, no TF32), so the accuracy above
  should hold on a GPU too; tested only in the interpreter, against the fp64 FFT (the matmuls' tolerances)
  and against the matmuls (within 2e-6 * max|x| before rounding to x's dtype). Limit: the (K_P, W_P)
  basis tile held by a program is at most 16384 fp32 values (64 KB), which every latent size of CogVideoX
  (60 x 90), Flux (128 x 128) and Wan (60 x 104, 90 x 160) meets; wider images (e.g. 256 x 256) run the
  matmuls even with impl="triton" (`triton_split_fits`). Compiled for sm_90 in CI
  (tests/test_kernel_sm90_compile.py): shared memory per program 96 KB at 60 x 90 fp32 (64 KB bf16), 128 KB
  at 128 x 128, 144 KB at 90 x 160, so one or two programs per SM.
- It writes the unweighted parts: FasterCache's frequency weights apply on skip steps, in
  `fastercache_uncond.py`, and the split runs only on full steps.

Measured on one H100 (torch 2.11, triton 3.6; `bench/bench_kernels.py`, `bench/results/kernels_cuda.md`, fp32,
do_bench medians, outputs equal): Triton 0.054 vs matmul 0.058 ms at 13x16x60x90 (1.07x) and 0.078 vs 0.167 ms at
21x16x60x104 (2.15x), both with a 32 x 128 basis tile; matmul 0.059 vs Triton 0.432 ms at 1x16x128x128 and
0.140 vs 2.98 ms at 21x16x90x160 (64 x 128 and 64 x 256 tiles: the kernel's tiles outgrow its registers and
it runs 7-20x slower). So "auto" picks Triton up to a 32 x 128 tile (`auto_picks_triton`) and the matmuls
beyond; at its best the kernel reaches 324 GB/s, a quarter of a copy (1257 GB/s) at that size: the tiles
are small (13-21 x 16 images) and block shape and warps are untuned first guesses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_tensor
from ._triton import HAS_TRITON, device_guard, interpreter_op, require_triton, tl, triton

# The implementations of the split on CUDA (CPU always runs "matmul"; see the module docstring).
FREQUENCY_SPLIT_IMPLS = ("auto", "matmul", "triton")
# The default for `frequency_split(x)` on CUDA: "auto" runs whichever was faster at that tile size on an H100
# (bench/results/kernels_cuda.md, fp32: Triton 1.07x at 60x90 and 2.15x at 60x104, where the (K_P, W_P) basis
# tile is 32 x 128; matmul 7x faster at 128x128 (64 x 128) and 20x at 90x160 (64 x 256), where the kernel's
# tiles no longer fit its registers). Change it with `set_frequency_split_impl`.
_split_impl = "auto"
_AUTO_TRITON_MAX_TILE = 4096  # K_P * W_P up to which "auto" picks the Triton kernel

# Triton kernel limits: every fp32 tile a program holds (the (K_P, W_P) basis and a (BLOCK_H, W_P) row block
# of the image) stays within 16384 elements = 64 KB; images are processed in row blocks, so H is free.
_MAX_TILE = 16384
_ROW_BLOCK_ELEMENTS = 8192


def lowpass_radius(height: int, width: int) -> int:
    """diffusers' disc radius `min(H, W) // 5`."""
    return min(height, width) // 5


def _real_dft_basis(n: int, r: int) -> Tensor:
    """fp64 (2r + 1, n): cos(2 pi k i / n) for k = 0..r, then sin(2 pi k i / n) for k = 1..r."""
    k = torch.arange(r + 1, dtype=torch.int64)[:, None]
    i = torch.arange(n, dtype=torch.int64)[None, :]
    # Reduce k * i modulo n in integers first: the angle stays in [0, 2 pi) and exact before the fp64 cos/sin.
    angle = (2 * math.pi / n) * ((k * i) % n).to(torch.float64)
    return torch.cat((torch.cos(angle), torch.sin(angle[1:])), dim=0)


def _disc_weights(height: int, width: int, r: int) -> Tensor:
    """fp64 (2r + 1, 2r + 1): the disc mask on the folded frequencies, times fold multiplicities / (H W)."""
    k = torch.arange(r + 1, dtype=torch.int64)
    freq = torch.cat((k, k[1:]))  # frequency of each basis row: cos rows 0..r, sin rows 1..r
    mult = torch.where(freq == 0, 1.0, 2.0).to(torch.float64)
    inside = (freq[:, None] ** 2 + freq[None, :] ** 2) <= r * r
    return inside.to(torch.float64) * mult[:, None] * mult[None, :] / (height * width)


@functools.lru_cache(maxsize=64)
def _lowpass_basis(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (B_H, B_W, M) for one image size on one device, built once (fp64 on CPU, then moved).

    Called only from the op's eager implementation (opaque to torch.compile), keyed on Python ints and the
    device, so it neither guards nor graph-breaks. Under CUDA graphs (compile mode "reduce-overhead") the
    first call happens in the warm-up run, before capture. Built outside inference mode so the cached tensors
    can be used by later calls in any mode.
    """
    r = lowpass_radius(height, width)
    with torch.inference_mode(False), torch.no_grad():
        by = _real_dft_basis(height, r)
        bx = _real_dft_basis(width, r)
        weights = _disc_weights(height, width, r)
        return tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in (by, bx, weights))


def _lowpass_fp32(x: Tensor) -> Tensor:
    """Low-pass of x (..., H, W) as a contiguous fp32 tensor: four matmuls, see the module docstring."""
    by, bx, weights = _lowpass_basis(x.shape[-2], x.shape[-1], x.device)
    x32 = x.to(torch.float32)
    t = torch.matmul(x32, bx.mT)  # (..., H, K): one GEMM over all rows
    z = torch.matmul(by, t) * weights  # (..., K, K): masked folded spectrum
    return torch.matmul(torch.matmul(by.mT, z), bx)  # (..., H, K) then (..., H, W)


def _lowpass_torch(x: Tensor) -> Tensor:
    return _lowpass_fp32(x).to(x.dtype)


def _frequency_split_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    low = _lowpass_fp32(x)
    high = (x.to(torch.float32) - low).contiguous()  # contiguous whatever x's strides, like the fake
    return low.to(x.dtype), high.to(x.dtype)


# ------------------------------------------------------------------------------------------- Triton kernel
@triton.jit
def _frequency_split_kernel(
    x_ptr,  # input (..., H, W), any float dtype, addressed through (lead*, stride_h, stride_w)
    by_ptr,  # fp32 (K, H) contiguous: B_H
    bx_ptr,  # fp32 (K, W) contiguous: B_W
    m_ptr,  # fp32 (K, K) contiguous: the masked fold weights M
    low_ptr,  # out, contiguous (..., H, W), x's dtype
    high_ptr,  # out, contiguous (..., H, W), x's dtype
    H,
    W,
    K,
    lead1,  # sizes of leading dims 1 and 2 (dim 0 is implied by the grid)
    lead2,
    x_stride0,  # strides of the 3 (merged) leading dims, then of the rows and columns
    x_stride1,
    x_stride2,
    x_stride_h,
    x_stride_w,
    W_P: tl.constexpr,  # power of two >= max(W, 16)
    K_P: tl.constexpr,  # power of two >= max(K, 16)
    BLOCK_H: tl.constexpr,  # rows per block, power of two >= 16
):
    """One program per image: low = B_H^T (M * (B_H x B_W^T)) B_W in fp32, high = x - low.

    Pass 1 accumulates Z = B_H x B_W^T (K_P, K_P) over row blocks of x; pass 2 rebuilds each row block of
    low from M * Z and reads that block of x again (normally from L2) to write low and high.
    Zero padding (masked loads) keeps every padded row and column out of the sums.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: image offsets can exceed 2**31
    i2 = pid % lead2
    rest = pid // lead2
    i1 = rest % lead1
    i0 = rest // lead1
    x_img = x_ptr + i0 * x_stride0 + i1 * x_stride1 + i2 * x_stride2
    out_off = pid * H * W
    rk = tl.arange(0, K_P)
    rw = tl.arange(0, W_P)
    x_cols = rw[None, :].to(tl.int64) * x_stride_w  # int64 within an image too: permuted strides can be huge
    rh = tl.arange(0, BLOCK_H)
    k_ok = rk < K
    w_ok = rw < W
    bw = tl.load(bx_ptr + rk[:, None] * W + rw[None, :], mask=k_ok[:, None] & w_ok[None, :], other=0.0)
    z = tl.zeros((K_P, K_P), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + rh
        h_ok = rows < H
        xw_mask = h_ok[:, None] & w_ok[None, :]
        x = tl.load(x_img + rows[:, None].to(tl.int64) * x_stride_h + x_cols, mask=xw_mask, other=0.0)
        t = tl.dot(x.to(tl.float32), tl.trans(bw), input_precision="ieee")  # (BLOCK_H, K_P)
        bh = tl.load(by_ptr + rk[:, None] * H + rows[None, :], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        z = tl.dot(bh, t, acc=z, input_precision="ieee")  # (K_P, K_P)
    z *= tl.load(m_ptr + rk[:, None] * K + rk[None, :], mask=k_ok[:, None] & k_ok[None, :], other=0.0)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + rh
        h_ok = rows < H
        xw_mask = h_ok[:, None] & w_ok[None, :]
        bh_t = tl.load(by_ptr + rows[:, None] + rk[None, :] * H, mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.dot(bh_t, z, input_precision="ieee")  # (BLOCK_H, K_P)
        low = tl.dot(u, bw, input_precision="ieee")  # (BLOCK_H, W_P)
        x = tl.load(x_img + rows[:, None].to(tl.int64) * x_stride_h + x_cols, mask=xw_mask, other=0.0)
        high = x.to(tl.float32) - low
        out = out_off + rows[:, None] * W + rw[None, :]
        tl.store(low_ptr + out, low.to(low_ptr.dtype.element_ty), mask=xw_mask)
        tl.store(high_ptr + out, high.to(high_ptr.dtype.element_ty), mask=xw_mask)


def _pad16(n: int) -> int:
    """Power of two >= max(n, 16): `tl.dot` needs every dim >= 16."""
    return max(16, triton.next_power_of_2(n))


def triton_split_config(height: int, width: int) -> tuple[int, int, int, int] | None:
    """`(W_P, K_P, BLOCK_H, num_warps)` for the Triton split of an (H, W) image, or None where it does not fit.

    Fits when the (K_P, W_P) basis tile holds at most 16384 fp32 values (64 KB), e.g. W <= 256 with
    K = 2 min(H, W) // 5 + 1 <= 64; H is free (row blocks of at most 8192 values, at least 16 rows).
    Not tuned on a GPU: the block shape and warps are first guesses.
    """
    k = 2 * lowpass_radius(height, width) + 1
    w_p, k_p = _pad16(width), _pad16(k)
    if w_p * k_p > _MAX_TILE:
        return None
    block_h = max(16, min(_pad16(height), _ROW_BLOCK_ELEMENTS // w_p))
    num_warps = 8 if block_h * w_p > 4096 or w_p * k_p > 4096 else 4
    return w_p, k_p, block_h, num_warps


def triton_split_fits(height: int, width: int) -> bool:
    """Whether the Triton kernel handles (H, W) images; elsewhere impl="triton" runs the matmul path."""
    return triton_split_config(height, width) is not None


def _image_layout(x: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """x, its leading dims merged to 3 `(sizes, strides)` (padded at the front); a contiguous copy when more
    than 3 leading dims cannot merge."""
    sizes = [s for s in x.shape[:-2] if s != 1]
    strides = [st for s, st in zip(x.shape[:-2], x.stride()[:-2]) if s != 1]
    i = len(sizes) - 2
    while i >= 0:
        if strides[i] == strides[i + 1] * sizes[i + 1]:
            sizes[i] *= sizes.pop(i + 1)
            strides[i] = strides.pop(i + 1)
        i -= 1
    if len(sizes) > 3:
        x = x.contiguous()
        return x, [1, 1, x.numel() // (x.shape[-2] * x.shape[-1])], [0, 0, x.shape[-2] * x.shape[-1]]
    pad = 3 - len(sizes)
    return x, [1] * pad + sizes, [0] * pad + strides


def _frequency_split_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """Host launcher: one program per (H, W) image, contiguous outputs in x's dtype."""
    require_triton()
    height, width = x.shape[-2], x.shape[-1]
    config = triton_split_config(height, width)
    if config is None:
        raise ValueError(f"frequency_split: the Triton kernel does not handle {height} x {width} images")
    w_p, k_p, block_h, num_warps = config
    by, bx, weights = _lowpass_basis(height, width, x.device)
    low = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    high = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x, lead, lead_strides = _image_layout(x)
    images = lead[0] * lead[1] * lead[2]
    with device_guard(x):
        _frequency_split_kernel[(images,)](
            x, by, bx, weights, low, high, height, width, by.shape[0], lead[1], lead[2],
            *lead_strides, x.stride(-2), x.stride(-1),
            W_P=w_p, K_P=k_p, BLOCK_H=block_h, num_warps=num_warps,
        )  # fmt: skip
    return low, high


def _disc_mask(height: int, width: int) -> Tensor:
    """diffusers' boolean mask on the fftshift-ed spectrum (H, W)."""
    r = lowpass_radius(height, width)
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return (cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= r * r


def lowpass_reference(x: Tensor) -> Tensor:
    """Test oracle: `real(ifft2(ifftshift(mask * fftshift(fft2(x)))))` over the last two dims, in float64."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    masked = spectrum * _disc_mask(x.shape[-2], x.shape[-1]).to(x.device)
    return torch.fft.ifft2(torch.fft.ifftshift(masked, dim=(-2, -1))).real


def frequency_split_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Test oracle: `(low, x - low)` with `low = lowpass_reference(x)`, in float64."""
    low = lowpass_reference(x)
    return low, x.double() - low


@torch.library.custom_op("fastcache::lowpass", mutates_args=())
def lowpass_op(x: Tensor) -> Tensor:
    return _lowpass_torch(x)


@lowpass_op.register_fake
def _lowpass_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("fastcache::frequency_split", mutates_args=())
def frequency_split_op(x: Tensor, impl: str = "matmul") -> tuple[Tensor, Tensor]:
    return _frequency_split_torch(x)  # CPU: always the matmuls (the kernel needs a GPU or the interpreter)


@frequency_split_op.register_kernel("cuda")
def _frequency_split_cuda(x: Tensor, impl: str = "matmul") -> tuple[Tensor, Tensor]:
    if impl == "auto":
        impl = "triton" if auto_picks_triton(x.shape[-2], x.shape[-1]) else "matmul"
    if impl == "triton" and HAS_TRITON and triton_split_fits(x.shape[-2], x.shape[-1]):
        return _frequency_split_triton(x)
    return _frequency_split_torch(x)


def auto_picks_triton(height: int, width: int) -> bool:
    """Whether impl="auto" runs the Triton kernel for (H, W) images on CUDA (measured faster up to a 32 x 128
    basis tile, slower from 64 x 128)."""
    config = triton_split_config(height, width)
    return HAS_TRITON and config is not None and config[0] * config[1] <= _AUTO_TRITON_MAX_TILE


@frequency_split_op.register_fake
def _frequency_split_fake(x: Tensor, impl: str = "matmul") -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@functools.cache
def interpreter_test_op() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """TEST ONLY: a CPU custom op `fastcache_test::frequency_split` that launches the real Triton kernel.

    Needs `TRITON_INTERPRET=1` set before triton is imported; lets a test run the kernel (also inside a
    compiled graph) on CPU. No input validation; sizes where `triton_split_fits` is False raise.
    """
    return interpreter_op(
        "frequency_split", _frequency_split_kernel, _frequency_split_triton, lambda x: _frequency_split_fake(x)
    )


def _check_image(x: object, fn: str) -> None:
    check_tensor("x", x, fn)
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x is empty (shape {tuple(x.shape)})")


def lowpass(x: Tensor) -> Tensor:
    """FasterCache's low-frequency component of `x`, in real space.

    Args:
        x: float32, float16 or bfloat16 tensor (..., H, W), any leading dims and strides, not empty.

    Returns:
        Contiguous tensor of x's shape and dtype: `real(ifft2(ifftshift(mask * fftshift(fft2(x)))))`, mask the
        closed disc of radius `min(H, W) // 5` at (H // 2, W // 2); computed in fp32.

    Raises:
        TypeError: x is not a tensor.
        ValueError: fewer than 2 dims, empty, or an unsupported dtype.
    """
    _check_image(x, "lowpass")
    return torch.ops.fastcache.lowpass(x)


def set_frequency_split_impl(impl: str) -> None:
    """Choose what `frequency_split(x)` runs on CUDA when called without `impl`: "auto" (the default: the one
    measured faster at the image's size), "matmul" or "triton". Read when `frequency_split` is called (a
    compiled caller guards on it and recompiles after a change); CPU always runs the matmuls.
    """
    global _split_impl
    _split_impl = _check_impl(impl)


def frequency_split_impl() -> str:
    """The implementation `frequency_split(x)` runs on CUDA when called without `impl`."""
    return _split_impl


def _check_impl(impl: object) -> str:
    if impl not in FREQUENCY_SPLIT_IMPLS:
        raise ValueError(f"frequency_split: impl must be one of {FREQUENCY_SPLIT_IMPLS}, got {impl!r}")
    return impl


def frequency_split(x: Tensor, impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Split `x` into FasterCache's low and high frequency parts, both in real space.

    Args:
        x: float32, float16 or bfloat16 tensor (..., H, W), any leading dims and strides, not empty.
        impl: on CUDA, "matmul" (four torch matmuls and an elementwise pass), "triton" (one fused Triton
            kernel; images too wide for it, see `triton_split_fits`, run the matmuls) or "auto" (the one
            measured faster at this size, `auto_picks_triton`). None: the module default, "auto" unless
            changed with `set_frequency_split_impl`. CPU always runs the matmuls.

    Returns:
        `(low, high)`, contiguous, x's shape and dtype: `low = lowpass(x)`, `high = x - low` (in fp32, then
        cast). In real space diffusers' complex deltas become `LF(u) - LF(c) -> low(u - c)` (linearity).

    Raises:
        TypeError: x is not a tensor.
        ValueError: fewer than 2 dims, empty, an unsupported dtype, or an unknown impl.

    Example:
        >>> d_low, d_high = frequency_split((uncond - cond).float())  # FasterCache full-step state
    """
    _check_image(x, "frequency_split")
    impl = _check_impl(_split_impl if impl is None else impl)
    return torch.ops.fastcache.frequency_split(x, impl)
