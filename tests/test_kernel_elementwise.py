"""fastercache_uncond and extrapolate: the real Triton kernels under the interpreter and the torch path,
against float64 references, over shapes, dtypes, strides and special values."""

from __future__ import annotations

import math

import pytest
import torch
from fastcache.kernels import (
    extrapolate,
    extrapolate_reference,
    fastercache_uncond,
    fastercache_uncond_reference,
)
from fastcache.kernels.extrapolate import _extrapolate_triton
from fastcache.kernels.extrapolate import interpreter_test_op as extrapolate_interpreter_op
from fastcache.kernels.fastercache_uncond import _fastercache_uncond_triton
from fastcache.kernels.fastercache_uncond import interpreter_test_op as uncond_interpreter_op
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._strided import strided

# dtype: (atol, rtol) of an output stored in that dtype (computed in fp32, rounded once; inputs ~N(0, 1)).
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 2.0**-10),
    torch.bfloat16: (1e-2, 2.0**-7),
}
DTYPES = list(TOLERANCES)
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def make(shape, dtype, layout, gen, special=None):
    return strided(shape, dtype, layout, gen, special)


def check(got, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol, equal_nan=True)


shapes = st.lists(st.integers(1, 17), min_size=1, max_size=4).map(tuple)
specials = st.sampled_from([None, None, 0.0, math.nan, math.inf, -math.inf])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    c_dtype=st.sampled_from(DTYPES),
    delta_fp32=st.booleans(),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
    special=specials,
    weights=st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5)),
    triton=st.booleans(),
    seed=st.integers(0, 99),
)
def test_fastercache_uncond(shape, c_dtype, delta_fp32, layouts, special, weights, triton, seed):
    gen = torch.Generator().manual_seed(seed)
    d_dtype = torch.float32 if delta_fp32 else c_dtype
    c = make(shape, c_dtype, layouts[0], gen, special)
    d_low = make(shape, d_dtype, layouts[1], gen)
    d_high = make(shape, d_dtype, layouts[2], gen, special)
    w_low, w_high = (torch.tensor(w, dtype=torch.float32) for w in weights)
    fn = _fastercache_uncond_triton if triton else fastercache_uncond
    uncond, new_d_low, new_d_high = fn(c, d_low, d_high, w_low, w_high)
    ref_uncond, ref_low, ref_high = fastercache_uncond_reference(c, d_low, d_high, w_low, w_high)
    check(new_d_low, ref_low, d_dtype)
    check(new_d_high, ref_high, d_dtype)
    # uncond is defined from the deltas as stored (rounded to their dtype): c + new_d_low + new_d_high.
    check(uncond, c.double() + new_d_low.double() + new_d_high.double(), c_dtype)
    if d_dtype == torch.float32:
        check(uncond, ref_uncond, c_dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 2),
    special=specials,
    w=st.floats(-1.0, 2.0),
    triton=st.booleans(),
    seed=st.integers(0, 99),
)
def test_extrapolate(shape, dtype, layouts, special, w, triton, seed):
    gen = torch.Generator().manual_seed(seed)
    f_k = make(shape, dtype, layouts[0], gen, special)
    f_prev = make(shape, dtype, layouts[1], gen)
    w = torch.tensor(w)
    out = (_extrapolate_triton if triton else extrapolate)(f_k, f_prev, w)
    atol, rtol = TOLERANCES[dtype]
    ref = extrapolate_reference(f_k, f_prev, w)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=atol * 4, rtol=rtol, equal_nan=True)


def test_many_programs_and_high_rank_layouts():
    gen = torch.Generator().manual_seed(0)
    n = 2 * 32768 + 5
    c, d1, d2 = (torch.randn(n, generator=gen) for _ in range(3))
    w1, w2 = torch.tensor(1.1), torch.tensor(0.9)
    got = _fastercache_uncond_triton(c, d1, d2, w1, w2)
    for g, r in zip(got, fastercache_uncond_reference(c, d1, d2, w1, w2), strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-6)
    x6 = torch.randn(2, 3, 4, 5, 6, 7, generator=gen).permute(5, 3, 1, 4, 2, 0)  # cannot merge: copied
    y6 = torch.randn(x6.shape, generator=gen)
    torch.testing.assert_close(
        _extrapolate_triton(x6, y6, w1).double(), extrapolate_reference(x6, y6, w1), atol=1e-5, rtol=1e-6
    )
    x5 = torch.randn(2, 3, 4, 5, 6, generator=gen).permute(0, 2, 1, 3, 4)  # merges to 3 dims
    y5 = torch.randn(2, 4, 3, 5, 6, generator=gen)
    got = _fastercache_uncond_triton(x5, y5, x5, w1, w2)
    for g, r in zip(got, fastercache_uncond_reference(x5, y5, x5, w1, w2), strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-6)


def test_weights_compound_over_skipped_steps():
    gen = torch.Generator().manual_seed(0)
    d_low, d_high = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    w_low, w_high = torch.tensor(1.1), torch.tensor(1.0)
    low, high = d_low, d_high
    for _ in range(3):
        _, low, high = fastercache_uncond(torch.zeros(4, 6), low, high, w_low, w_high)
    torch.testing.assert_close(low, d_low * 1.1**3)
    torch.testing.assert_close(high, d_high)


def test_empty_inputs():
    e = torch.ones(0, 3)
    w = torch.tensor(1.0)
    assert all(t.shape == (0, 3) for t in fastercache_uncond(e, e, e, w, w))
    assert extrapolate(e, e, w).shape == (0, 3)
    assert _extrapolate_triton(e, e, w).shape == (0, 3)


X = torch.ones(2, 3)
W = torch.tensor(0.5)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((X, X, X, 0.5, W), TypeError, "w_low must be a 0-dim tensor"),
        ((X, X, X, W, torch.ones(1)), ValueError, "w_high must be a 0-dim tensor"),
        ((X, X, X, W, torch.tensor(1)), ValueError, "floating"),
        ((X, X, torch.ones(3, 2), W, W), ValueError, "shape"),
        ((X, X, X, W, torch.tensor(0.5, device="meta")), ValueError, "meta"),
        ((X.double(), X, X, W, W), ValueError, "dtype"),
        ((X, X.to(torch.int64), X, W, W), ValueError, "dtype"),
    ],
)
def test_fastercache_uncond_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        fastercache_uncond(*args)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((X, X, 0.5), TypeError, "w must be a 0-dim tensor"),
        ((X, X.half(), W), ValueError, "dtype"),
        ((X, torch.ones(3, 2), W), ValueError, "shape"),
        ((X, X.to("meta"), W), ValueError, "meta"),
        ((X, X, torch.ones(2)), ValueError, "0-dim"),
    ],
)
def test_extrapolate_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        extrapolate(*args)


def test_opcheck_and_no_aliasing():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(5, 6, generator=gen)
    ct = torch.randn(6, 5, generator=gen).t()
    w1, w2 = torch.tensor(1.0), torch.tensor(0.0)
    for args in [(c, c, c, w1, w2), (ct.half(), c, ct, w1, w2)]:
        torch.library.opcheck(torch.ops.fastcache.fastercache_uncond.default, args)
        torch.library.opcheck(uncond_interpreter_op(), args)
    for args in [(c, ct, w1), (ct.bfloat16(), c.bfloat16(), w2)]:
        torch.library.opcheck(torch.ops.fastcache.extrapolate.default, args)
        torch.library.opcheck(extrapolate_interpreter_op(), args)
    # w = 1 and w = 0 make outputs numerically equal to inputs, but never the same storage
    outs = (*fastercache_uncond(c, c, c, w1, w2), extrapolate(c, c, w2))
    for out in outs:
        assert out.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()
