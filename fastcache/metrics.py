"""Quality of cached samples against the uncached run with the same seeds. Pure torch.

Samples are images (B, C, H, W) or videos (B, C, F, H, W) in [-1, 1], so the data range is 2. Every per-sample
metric returns a (B,) tensor; `compare` reduces them to the plain numbers the demo and the benchmarks report.

Example:
    >>> ref = torch.zeros(2, 1, 16, 16); x = ref + 0.1
    >>> psnr(x, ref)   # 10 log10(2^2 / 0.01) = 26.02 dB per sample
    tensor([26.0206, 26.0206])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 2.0  # samples live in [-1, 1]


def _check(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    if x.dim() not in (4, 5):
        raise ValueError(f"expected images (B,C,H,W) or videos (B,C,F,H,W), got shape {tuple(x.shape)}")


def mse(x: Tensor, ref: Tensor) -> Tensor:
    """Mean squared error per sample, (B,), computed in float64 so that tiny differences are not lost."""
    _check(x, ref)
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, (B,); +inf where a sample equals its reference."""
    return (10.0 * torch.log10(data_range**2 / mse(x, ref))).float()


def per_frame_psnr(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """PSNR of each frame of videos (B, C, F, H, W): (B, F). Caches tend to drift more on some frames."""
    _check(x, ref)
    if x.dim() != 5:
        raise ValueError(f"per_frame_psnr needs videos (B,C,F,H,W), got shape {tuple(x.shape)}")
    err = (x.double() - ref.double()).pow(2).mean(dim=(1, 3, 4))
    return (10.0 * torch.log10(data_range**2 / err)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The normalised 2-D gaussian window of SSIM (Wang et al. 2004: 11x11, sigma 1.5)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean gaussian-window SSIM per sample, (B,), valid windows only (no padding).

    Channels are compared separately and averaged; videos average over their frames. Images smaller than the
    window use the largest odd window that fits (a 16x16 digit keeps the standard 11x11).
    """
    _check(x, ref)
    if x.dim() == 5:  # (B, C, F, H, W) -> frames as extra channels
        b, c, f, h, w = x.shape
        x, ref = x.reshape(b, c * f, h, w), ref.reshape(b, c * f, h, w)
    b, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2  # odd
    win = gaussian_window(size, sigma).to(x.device)[None, None].expand(c, 1, size, size)
    x, ref = x.double(), ref.double()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(ref * ref) - mu_y**2
    cov = blur(x * ref) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def max_abs_error(x: Tensor, ref: Tensor) -> float:
    """The largest absolute difference over every element of the batch."""
    _check(x, ref)
    return float((x.double() - ref.double()).abs().max())


def class_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of correct classes; `predictions` are class indices (B,) or logits (B, K)."""
    if predictions.dim() == 2:
        predictions = predictions.argmax(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} vs labels {tuple(labels.shape)}")
    if labels.numel() == 0:
        return math.nan
    return float((predictions.cpu() == labels.cpu()).float().mean())


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: a PSNR of identical samples is written as null (and shown as "inf")."""
    return value if math.isfinite(value) else None


def compare(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE) -> dict[str, float | list[float]]:
    """The demo's quality summary of samples `x` against the reference samples `ref` (same seeds).

    Returns:
        psnr (mean over samples of per-sample dB; inf if all identical), psnr_min, ssim (mean),
        max_abs_error, and for videos per_frame_psnr (mean over samples, one value per frame).
    """
    p = psnr(x, ref, data_range)
    out: dict[str, float | list[float]] = {
        "psnr": float(p.mean()),
        "psnr_min": float(p.min()),
        "ssim": float(ssim(x, ref, data_range).mean()),
        "max_abs_error": max_abs_error(x, ref),
    }
    if x.dim() == 5:
        out["per_frame_psnr"] = [float(v) for v in per_frame_psnr(x, ref, data_range).mean(0)]
    return out
