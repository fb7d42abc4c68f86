"""absmean_sums / absmean_rel_diff: the real Triton kernel under the interpreter and the torch path, against
float64 references, over shapes, dtypes, strides and special values."""

from __future__ import annotations

import math

import pytest
import torch
from fastcache.kernels import absmean as absmean_mod
from fastcache.kernels import (
    absmean_rel_diff,
    absmean_rel_diff_reference,
    absmean_sums,
    absmean_sums_reference,
    ratio_or_inf_on_host,
    rel_diff_from_sums,
    to_fp32,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._strided import strided

# Inputs of every dtype are compared with a reference on the very same (already rounded) values, so the only
# error left is fp32 accumulation: one tolerance fits all three; the table keeps the shape of the other tests.
TOLERANCES = {  # dtype: (atol, rtol) on the sums
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
}
DTYPES = list(TOLERANCES)


def make(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    return strided(shape, dtype, layout, gen)


shapes = st.lists(st.integers(1, 23), min_size=1, max_size=4).map(tuple)
layouts = st.sampled_from(["contiguous", "transposed", "sliced"])


def assert_sums_close(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[a.dtype]
    assert got.dtype == torch.float32 and got.shape == (2,) and got.device == a.device
    ref = absmean_sums_reference(a, b)
    torch.testing.assert_close(got.double(), ref, atol=atol * a.numel(), rtol=rtol)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes, dtype=st.sampled_from(DTYPES), layout_a=layouts, layout_b=layouts, seed=st.integers(0, 99)
)
def test_triton_kernel_matches_reference(shape, dtype, layout_a, layout_b, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = make(shape, dtype, layout_a, gen), make(shape, dtype, layout_b, gen)
    assert_sums_close(absmean_mod._absmean_sums_triton(a, b), a, b)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), layout=layouts, seed=st.integers(0, 99))
def test_public_cpu_path_matches_reference(shape, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = make(shape, dtype, layout, gen), make(shape, dtype, "contiguous", gen)
    assert_sums_close(absmean_sums(a, b), a, b)
    ratio = absmean_rel_diff(a, b)
    assert ratio.shape == () and ratio.dtype == torch.float32
    torch.testing.assert_close(ratio.double(), absmean_rel_diff_reference(a, b), atol=0, rtol=3e-5)


def test_triton_kernel_many_programs_and_5d_permutation():
    """More elements than one program's block (grid-stride loop, several partials), and a 5-D permuted layout
    that merges to 4 dims, plus one that cannot merge (copied)."""
    gen = torch.Generator().manual_seed(0)
    n = 3 * absmean_mod._BLOCK_INTERPRETER + 17
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    assert_sums_close(absmean_mod._absmean_sums_triton(a, b), a, b)
    a5 = torch.randn(2, 3, 4, 5, 6, generator=gen).permute(0, 2, 1, 4, 3)  # BCFHW -> BFCWH
    b5 = torch.randn(2, 4, 3, 6, 5, generator=gen)
    assert_sums_close(absmean_mod._absmean_sums_triton(a5, b5), a5, b5)
    a6 = torch.randn(2, 3, 4, 5, 6, 7, generator=gen).permute(5, 3, 1, 4, 2, 0)  # 6 dims, none mergeable
    b6 = torch.randn(a6.shape, generator=gen)
    assert_sums_close(absmean_mod._absmean_sums_triton(a6, b6), a6, b6)


def test_cpu_path_over_several_chunks():
    """The torch path walks flat chunks through a scratch buffer: more than one chunk, with a remainder."""
    gen = torch.Generator().manual_seed(2)
    n = 2 * absmean_mod._CPU_CHUNK + 5
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    assert_sums_close(absmean_sums(a, b), a, b)
    a2 = torch.randn(n // 5, 5, generator=gen).t().bfloat16()  # not flattenable: copied once
    b2 = torch.randn(5, n // 5, generator=gen).bfloat16()
    assert_sums_close(absmean_sums(a2, b2), a2, b2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_special_values(impl):
    """b == 0 gives +inf (also a == b == 0); NaN / inf give NaN or inf; none compares <= a threshold."""
    sums = absmean_mod._absmean_sums_triton if impl == "triton" else absmean_sums
    z = torch.zeros(7, 5)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))

    def ratio(a, b):
        return rel_diff_from_sums(sums(a, b))

    assert ratio(x, z).item() == math.inf
    assert ratio(z, z).item() == math.inf
    assert ratio(x, x).item() == 0.0
    with_nan, with_inf = x.clone(), x.clone()
    with_nan[3, 2] = math.nan
    with_inf[0, 4] = math.inf
    cases = [(with_nan, x), (x, with_nan), (with_inf, x), (x, with_inf), (with_inf, with_inf), (with_nan, z)]
    for a, b in cases:
        r = ratio(a, b)
        assert torch.isnan(r) or r.item() == math.inf, (a, b, r)
        assert not bool(r <= 1e30)
    assert ratio(x, with_inf).item() == math.inf  # inf / inf: an infinite sum is never a small change


def test_rel_diff_from_sums():
    assert rel_diff_from_sums(torch.tensor([1.0, 4.0])).item() == 0.25
    assert rel_diff_from_sums(torch.tensor([0.0, 0.0])).item() == math.inf
    assert torch.isnan(rel_diff_from_sums(torch.tensor([math.nan, 2.0])))
    with pytest.raises(ValueError, match="shape"):
        rel_diff_from_sums(torch.ones(3))
    with pytest.raises(TypeError):
        rel_diff_from_sums([1.0, 2.0])


# float32 sums: ordinary, tiny and huge quotients (past float32's range), zero, infinite and NaN sums
EDGE_SUMS = [(1.0, 4.0), (0.0, 0.0), (3.0, 0.0), (0.0, 2.0), (math.inf, 1.0), (1.0, math.inf), (math.nan, 2.0),
             (2.0, math.nan), (1e30, 1e-30), (1e-30, 1e30), (3.4e38, 0.5), (0.1, 1.0), (1.0, 3.0), (7.0, 70.0)]


@pytest.mark.parametrize("num, den", EDGE_SUMS)
def test_ratio_on_host_is_the_device_ratio(num, den):
    """What the drop-in reads on the host when it runs eagerly is the device rule's float32 value."""
    sums = torch.tensor([num, den], dtype=torch.float32)
    expected = rel_diff_from_sums(sums).item()
    got = ratio_or_inf_on_host(*sums.tolist())
    assert (math.isnan(got) and math.isnan(expected)) or got == expected, (num, den, got, expected)


@settings(max_examples=200, deadline=None)
@given(*[st.floats(min_value=0, width=32, allow_infinity=False)] * 2)
def test_ratio_on_host_matches_float32_division(num, den):
    expected = rel_diff_from_sums(torch.tensor([num, den], dtype=torch.float32)).item()
    assert ratio_or_inf_on_host(num, den) == expected


def test_to_fp32():
    assert to_fp32(0.1) == torch.tensor(0.1, dtype=torch.float32).item() != 0.1
    assert to_fp32(1e39) == math.inf and to_fp32(-1e39) == -math.inf and math.isnan(to_fp32(math.nan))


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.ones(0), torch.ones(0), ValueError, "empty"),
        (torch.ones(2, 3), torch.ones(3, 2), ValueError, "shape"),
        (torch.ones(3), torch.ones(3, dtype=torch.float16), ValueError, "dtype"),
        (torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), ValueError, "dtype"),
        (torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), ValueError, "dtype"),
        (torch.ones(3), torch.ones(3, device="meta"), ValueError, "meta"),
        (torch.ones(3), [1.0, 1.0, 1.0], TypeError, "b must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise(a, b, error, match):
    with pytest.raises(error, match=match):
        absmean_sums(a, b)
    with pytest.raises(error, match=match):
        absmean_rel_diff(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 10, generator=gen)
    b = torch.randn(10, 6, generator=gen).t()
    torch.library.opcheck(torch.ops.fastcache.absmean_sums.default, (a, b))
    torch.library.opcheck(absmean_mod.interpreter_test_op(), (a.half(), b.half()))


def test_outputs_do_not_alias_inputs():
    a = torch.randn(4, 4)
    out = absmean_sums(a, a)
    assert out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_an_overflowed_sum_is_never_a_small_change(impl):
    """a=[0, 2e38], b=[2e38, 2e38]: sum|b| overflows fp32 to inf, and x / inf = 0 read as "no change" (a skip).
    An infinite sum gives +inf (compute), like no reference at all."""
    a = torch.tensor([0.0, 2e38])
    b = torch.tensor([2e38, 2e38])
    if impl == "torch":
        ratio = absmean_rel_diff(a, b)
    else:
        ratio = rel_diff_from_sums(absmean_mod._absmean_sums_triton(a, b))
    assert torch.isinf(ratio) and ratio > 0
    assert torch.isinf(rel_diff_from_sums(torch.tensor([float("inf"), 1.0])))
    assert torch.isnan(rel_diff_from_sums(torch.tensor([float("nan"), 1.0])))
