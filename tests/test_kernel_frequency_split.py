"""frequency_split / lowpass (real-space truncated DFT) against an fp64 FFT reference and against diffusers'
own FasterCache split, over sizes 1..128, leading dims, dtypes, strides and special values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from fastcache.kernels import (
    fastercache_uncond,
    frequency_split,
    frequency_split_reference,
    lowpass,
    lowpass_radius,
    lowpass_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# dtype: (atol as a fraction of max|x|, rtol). fp32 is held to the 1e-5 target; fp16 / bf16 are computed in
# fp32 and rounded once to their dtype, so one ulp of each value (2^-10, 2^-7) bounds their error.
TOLERANCES = {
    torch.float32: (1e-5, 0.0),
    torch.float16: (1e-5, 2.0**-10),
    torch.bfloat16: (1e-5, 2.0**-7),
}


def make(lead: tuple[int, ...], h: int, w: int, dtype: torch.dtype, layout: str, gen: torch.Generator):
    if layout == "transposed":
        x = torch.randn(*lead, w, h, generator=gen).transpose(-1, -2)
    elif layout == "sliced":
        x = torch.randn(*lead, h, 2 * w, generator=gen)[..., 1::2]
    elif layout == "permuted" and len(lead) >= 2:
        x = torch.randn(lead[1], lead[0], *lead[2:], h, w, generator=gen).transpose(0, 1)
    else:
        x = torch.randn(*lead, h, w, generator=gen)
    return x.to(dtype)


def assert_split_close(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[x.dtype]
    scale = x.abs().max().double().item()
    ref_low, ref_high = frequency_split_reference(x)  # fp64 FFT of the same (rounded) input
    for got, ref in ((low, ref_low), (high, ref_high)):
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), ref, atol=atol * scale + 1e-30, rtol=rtol)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 128),
    w=st.integers(1, 128),
    lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    dtype=st.sampled_from(list(TOLERANCES)),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "permuted"]),
    seed=st.integers(0, 99),
)
def test_split_matches_fp64_fft(h, w, lead, dtype, layout, seed):
    x = make(lead, h, w, dtype, layout, torch.Generator().manual_seed(seed))
    low, high = frequency_split(x)
    assert_split_close(x, low, high)
    torch.testing.assert_close(lowpass(x), low, atol=0, rtol=0)


def test_fp32_relative_error_is_below_1e5_at_latent_shapes():
    """The accuracy target, stated as a relative L2 error against the fp64 FFT, at CogVideoX / Flux sizes."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 4, 60, 90), (2, 128, 128), (3, 127, 33)]:
        x = torch.randn(shape, generator=gen)
        ref_low = lowpass_reference(x)
        err = (lowpass(x).double() - ref_low).norm() / ref_low.norm()
        assert err < 1e-5, (shape, err.item())


def test_radius_and_small_images():
    assert lowpass_radius(60, 90) == 12 and lowpass_radius(4, 128) == 0
    x = torch.randn(3, 4, 7)  # radius 0: the disc is the DC term only, low = the image mean
    torch.testing.assert_close(lowpass(x), x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-6, rtol=0)
    one = torch.randn(5, 1, 1)
    low, high = frequency_split(one)
    torch.testing.assert_close(low, one, atol=0, rtol=0)
    assert (high == 0).all()


def test_special_values():
    x = torch.randn(3, 10, 12, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0
    x[0, 4, 5] = math.nan
    x[2, 0, 0] = math.inf
    low, high = frequency_split(x)
    assert (low[1] == 0).all() and (high[1] == 0).all()
    assert not torch.isfinite(low[0]).any() and not torch.isfinite(low[2]).any()  # spread like an FFT's
    ok = torch.zeros(1, 10, 12)
    assert (lowpass(ok) == 0).all()


def test_matches_diffusers_split():
    fc = pytest.importorskip("diffusers.hooks.faster_cache")
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 60, 90), (1, 2, 17, 31), (2, 1, 33, 33), (3, 2, 8, 5)]:
        x = torch.randn(shape, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.meshgrid without indexing=, inside diffusers
            lf, hf = fc._split_low_high_freq(x)
        # diffusers' fftshift / ifftshift act on all dims; the round trip restores the leading ones.
        d_low = torch.fft.ifft2(torch.fft.ifftshift(lf)).real
        d_high = torch.fft.ifft2(torch.fft.ifftshift(hf)).real
        low, high = frequency_split(x)
        scale = x.abs().max().item()
        torch.testing.assert_close(low, d_low, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(high, d_high, atol=1e-5 * scale, rtol=0)


def test_skip_steps_match_diffusers_formula():
    """Two consecutive FasterCache skip steps: diffusers' complex-spectrum formula vs real-space deltas."""
    fc = pytest.importorskip("diffusers.hooks.faster_cache")
    gen = torch.Generator().manual_seed(1)
    shape = (2, 4, 30, 45)
    u, c = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = fc._split_low_high_freq
        (lu, hu), (lc, hc) = split(u), split(c)
        d_lf, d_hf = lu - lc, hu - hc
        d_low, d_high = frequency_split(u - c)
        for w_low, w_high in [(1.1, 1.0), (1.1, 1.1)]:
            c = torch.randn(shape, generator=gen)
            d_lf, d_hf = d_lf * w_low, d_hf * w_high
            lf_c, hf_c = split(c)
            expected = torch.fft.ifft2(torch.fft.ifftshift(lf_c + d_lf + hf_c + d_hf)).real
            uncond, d_low, d_high = fastercache_uncond(
                c, d_low, d_high, torch.tensor(w_low), torch.tensor(w_high)
            )
            torch.testing.assert_close(uncond, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.ones(5), ValueError, "at least 2 dims"),
        (torch.ones(2, 0, 4), ValueError, "empty"),
        (torch.ones(3, 3, dtype=torch.float64), ValueError, "dtype"),
        (torch.ones(3, 3, dtype=torch.complex64), ValueError, "dtype"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(x, error, match):
    with pytest.raises(error, match=match):
        frequency_split(x)
    with pytest.raises(error, match=match):
        lowpass(x)


def test_opcheck_and_no_aliasing():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 9, generator=gen)
    for args in [(x,), (x.transpose(-1, -2).half(),), (x[:, ::2].bfloat16(),)]:
        torch.library.opcheck(torch.ops.fastcache.frequency_split.default, args)
        torch.library.opcheck(torch.ops.fastcache.lowpass.default, args)
    one = torch.randn(1, 1)  # radius 0 and H = W = 1: low == x numerically, but never the same storage
    for out in (*frequency_split(one), lowpass(one)):
        assert out.untyped_storage().data_ptr() != one.untyped_storage().data_ptr()
