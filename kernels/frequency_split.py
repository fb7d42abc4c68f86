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

GPU: no Triton kernel on purpose. The split is four GEMMs (inner dims W, H, then K = 2r + 1 <= 51 twice);
cuBLAS runs them near peak, while a fused Triton kernel would have to keep a whole image per program (60 x 90
fp32 = 21 KB, 128 x 128 = 64 KB) and could save only the (H, K) intermediates, which are K / W ~ 28 % of the
input. The split runs only on FasterCache's full steps; the per-skip-step work is the Triton kernel in
`fastercache_uncond.py`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._checks import check_tensor


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
def frequency_split_op(x: Tensor) -> tuple[Tensor, Tensor]:
    return _frequency_split_torch(x)


@frequency_split_op.register_fake
def _frequency_split_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


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


def frequency_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split `x` into FasterCache's low and high frequency parts, both in real space.

    Args:
        x: float32, float16 or bfloat16 tensor (..., H, W), any leading dims and strides, not empty.

    Returns:
        `(low, high)`, contiguous, x's shape and dtype: `low = lowpass(x)`, `high = x - low` (in fp32, then
        cast). In real space diffusers' complex deltas become `LF(u) - LF(c) -> low(u - c)` (linearity).

    Raises:
        TypeError: x is not a tensor.
        ValueError: fewer than 2 dims, empty, or an unsupported dtype.

    Example:
        >>> d_low, d_high = frequency_split((uncond - cond).float())  # FasterCache full-step state
    """
    _check_image(x, "frequency_split")
    return torch.ops.fastcache.frequency_split(x)
