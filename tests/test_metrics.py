import math

import numpy as np
import pytest
import torch

from fastcache import metrics


def test_psnr_known_value_and_identity() -> None:
    ref = torch.zeros(3, 1, 16, 16)
    x = ref + 0.1  # mse 0.01, range 2 -> 10 log10(4 / 0.01)
    assert torch.allclose(metrics.psnr(x, ref), torch.full((3,), 10 * math.log10(400.0)), atol=1e-4)
    assert torch.isinf(metrics.psnr(ref, ref)).all()
    assert metrics.psnr(x, ref, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_is_per_sample() -> None:
    ref = torch.zeros(2, 1, 8, 8)
    x = ref.clone()
    x[1] += 0.2
    p = metrics.psnr(x, ref)
    assert math.isinf(p[0].item()) and p[1].item() == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)


def test_per_frame_psnr() -> None:
    ref = torch.zeros(2, 1, 4, 8, 8)
    x = ref.clone()
    x[:, :, 2] += 0.1  # only frame 2 differs
    p = metrics.per_frame_psnr(x, ref)
    assert p.shape == (2, 4)
    assert torch.isinf(p[:, [0, 1, 3]]).all()
    assert p[:, 2] == pytest.approx(10 * math.log10(400.0), abs=1e-4)
    with pytest.raises(ValueError):
        metrics.per_frame_psnr(x[:, :, 0], ref[:, :, 0])


def test_ssim_identity_and_constants() -> None:
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2), atol=1e-6)
    # constant images: variances vanish, SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.5, -0.25, (0.01 * 2) ** 2
    s = metrics.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def _ssim_reference(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Window by window, straight from Wang et al. (2004), gaussian weights, valid positions."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_windowed_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    x = (ref + 0.3 * torch.randn(2, 1, 16, 16, generator=gen)).clamp(-1, 1)
    got = metrics.ssim(x, ref)
    for k in range(2):
        assert got[k].item() == pytest.approx(_ssim_reference(x[k, 0].numpy(), ref[k, 0].numpy()), abs=1e-5)
    assert 0.0 < got.min() < got.max() < 1.0


def test_ssim_video_and_small_images() -> None:
    x = torch.rand(2, 1, 3, 8, 8) * 2 - 1
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2), atol=1e-6)  # 8x8 < 11: a 7x7 window
    noisy = x + 0.2
    frames = torch.stack([metrics.ssim(noisy[:, :, f], x[:, :, f]) for f in range(3)], 1).mean(1)
    assert torch.allclose(metrics.ssim(noisy, x), frames, atol=1e-6)


def test_max_abs_error_and_accuracy() -> None:
    ref = torch.zeros(2, 1, 4, 4)
    x = ref.clone()
    x[1, 0, 2, 3] = -0.75
    assert metrics.max_abs_error(x, ref) == 0.75
    labels = torch.tensor([0, 1, 2, 3])
    assert metrics.class_accuracy(torch.tensor([0, 1, 0, 3]), labels) == 0.75
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 10).float()
    assert metrics.class_accuracy(logits, labels) == 0.75


def test_compare_and_shape_errors() -> None:
    ref = torch.zeros(2, 1, 4, 8, 8)
    out = metrics.compare(ref + 0.1, ref)
    c1 = (0.01 * 2) ** 2  # flat images: only the luminance term of SSIM is left
    assert out["psnr"] == pytest.approx(26.0206, abs=1e-3) and out["ssim"] == pytest.approx(c1 / (0.01 + c1))
    assert len(out["per_frame_psnr"]) == 4
    assert "per_frame_psnr" not in metrics.compare(ref[:, :, 0], ref[:, :, 0])
    with pytest.raises(ValueError):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    assert metrics.finite_or_none(math.inf) is None and metrics.finite_or_none(1.5) == 1.5
