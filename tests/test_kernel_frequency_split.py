"""frequency_split / lowpass (real-space truncated DFT) against an fp64 FFT reference and against diffusers'
own FasterCache split, over sizes 1..128, leading dims, dtypes, strides and special values."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch._dynamo.testing
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

from tests._strided import strided

split_module = sys.modules[frequency_split.__module__]  # the package exports the function under the module's name

# dtype: (atol as a fraction of max|x|, rtol). fp32 is held to the 1e-5 target; fp16 / bf16 are computed in
# fp32 and rounded once to their dtype, so one ulp of each value (2^-10, 2^-7) bounds their error.
TOLERANCES = {
    torch.float32: (1e-5, 0.0),
    torch.float16: (1e-5, 2.0**-10),
    torch.bfloat16: (1e-5, 2.0**-7),
}


def make(lead: tuple[int, ...], h: int, w: int, dtype: torch.dtype, layout: str, gen: torch.Generator):
    return strided((*lead, h, w), dtype, layout, gen)


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


# ------------------------------------------------------------- the Triton kernel, run by the interpreter
# Every (H, W) image is one program instance (~3-6 ms each in the interpreter): few images, small sizes, and
# one CogVideoX-sized latent.
TRITON_CASES = [
    # (lead, h, w, dtype, layout)
    ((), 8, 8, torch.float32, "contiguous"),  # r = 1, K = 3 -> 16
    ((2, 3), 17, 31, torch.float32, "permuted"),  # odd sizes, leading dims that do not merge
    ((3,), 5, 7, torch.float16, "transposed"),  # column-major images
    ((2,), 40, 33, torch.bfloat16, "sliced"),  # a column stride of 2
    ((1, 2), 1, 1, torch.float32, "contiguous"),  # r = 0: low == x
    ((4,), 3, 300, torch.float16, "contiguous"),  # W_P = 512
    ((2,), 130, 20, torch.bfloat16, "contiguous"),  # H beyond one row block: 2 blocks of 128
    ((1, 2), 60, 90, torch.float32, "contiguous"),  # CogVideoX latent: 64 x 128 tile, K = 25 -> 32
]


@pytest.mark.parametrize("lead, h, w, dtype, layout", TRITON_CASES)
def test_triton_split_matches_fp64_fft(lead, h, w, dtype, layout):
    op = split_module.interpreter_test_op()
    x = make(lead, h, w, dtype, layout, torch.Generator().manual_seed(h * w))
    low, high = op(x)
    assert_split_close(x, low, high)
    # Against the matmul path: the same fp32 math summed in another order (~1e-7 apart), then one rounding to
    # x's dtype that may go either way (one ulp).
    m_low, m_high = frequency_split(x)
    atol = 2e-6 * x.abs().max().item() + 1e-30
    torch.testing.assert_close(low, m_low, atol=atol, rtol=TOLERANCES[dtype][1])
    torch.testing.assert_close(high, m_high, atol=atol, rtol=TOLERANCES[dtype][1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN / inf
def test_triton_split_special_values_and_leading_dims():
    x = torch.randn(3, 2, 10, 12, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0
    x[0, 1, 4, 5] = math.nan
    x[2, 0, 0, 0] = math.inf
    low, high = split_module.interpreter_test_op()(x)
    assert (low[1] == 0).all() and (high[1] == 0).all()
    assert not torch.isfinite(low[0, 1]).any() and not torch.isfinite(low[2, 0]).any()  # as the FFT's
    for i, j in [(0, 0), (2, 1)]:  # images without special values are untouched by their neighbours
        assert_split_close(x[i, j], low[i, j], high[i, j])


def test_triton_split_limits():
    """The kernel holds the (K_P, W_P) basis tile in at most 16384 fp32 values: every latent size that
    matters fits; wider images (and impl="triton" for them) run the matmuls."""
    fits = split_module.triton_split_fits
    for h, w in [(60, 90), (60, 104), (90, 160), (128, 128), (8, 8), (1, 1), (4096, 64)]:
        assert fits(h, w), (h, w)
    assert split_module.triton_split_config(60, 90) == (128, 32, 64, 8)
    assert split_module.triton_split_config(128, 128) == (128, 64, 64, 8)
    assert not fits(256, 256) and not fits(2, 2000) and not fits(160, 320)


def test_cuda_dispatch_runs_the_chosen_implementation(monkeypatch):
    """The CUDA implementation's choice, exercised on CPU tensors (the kernel runs in the interpreter)."""
    calls = []
    kernel_launcher = split_module._frequency_split_triton
    monkeypatch.setattr(split_module, "_frequency_split_triton", lambda x: calls.append(x.shape) or kernel_launcher(x))
    x = torch.randn(2, 12, 10, generator=torch.Generator().manual_seed(0))
    expected = frequency_split(x)
    for impl, launched in [("matmul", []), ("triton", [x.shape]), ("auto", [x.shape])]:
        calls.clear()
        got = split_module._frequency_split_cuda(x, impl)
        assert calls == launched, impl
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    calls.clear()
    wide = torch.randn(2, 2000)  # does not fit the kernel: the matmuls
    for g, e in zip(split_module._frequency_split_cuda(wide, "triton"), frequency_split(wide)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    assert calls == []


def test_choosing_the_implementation():
    x = torch.randn(2, 9, 11, generator=torch.Generator().manual_seed(0))
    assert split_module.frequency_split_impl() == "auto"  # the faster one at each size, measured on an H100
    try:
        split_module.set_frequency_split_impl("triton")
        assert split_module.frequency_split_impl() == "triton"
        low, high = frequency_split(x)  # CPU: the matmuls whatever the choice
        torch.testing.assert_close(low, frequency_split(x, impl="matmul")[0], atol=0, rtol=0)
        with pytest.raises(ValueError, match="impl"):
            split_module.set_frequency_split_impl("fft")
        assert split_module.frequency_split_impl() == "triton"
    finally:
        split_module.set_frequency_split_impl("auto")
    with pytest.raises(ValueError, match="impl"):
        frequency_split(x, impl="cublas")
    torch.library.opcheck(torch.ops.fastcache.frequency_split.default, (x, "triton"))


def test_a_compiled_caller_follows_the_default_implementation(dynamo):
    """The module default is read inside the compiled frame: guarded on, so a change recompiles once."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x: frequency_split(x * 2), fullgraph=True, backend=counter)
    x = torch.randn(2, 8, 8)
    try:
        for impl, frames in [("matmul", 1), ("matmul", 1), ("triton", 2), ("matmul", 2)]:
            split_module.set_frequency_split_impl(impl)
            compiled(x)
            assert counter.frame_count == frames, impl
    finally:
        split_module.set_frequency_split_impl("auto")


def test_auto_picks_the_implementation_measured_faster_at_each_latent_size():
    """bench/results/kernels_cuda.md (H100): Triton faster at 60x90 and 60x104 (32 x 128 basis tiles), the
    matmuls at 128x128 and 90x160 (64 x 128 and 64 x 256)."""
    picks = {size: split_module.auto_picks_triton(*size) for size in [(60, 90), (60, 104), (128, 128), (90, 160)]}
    assert picks == {(60, 90): True, (60, 104): True, (128, 128): False, (90, 160): False}
