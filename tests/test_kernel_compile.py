"""The kernel ops under torch.compile(fullgraph=True) on CPU: inductor with the torch implementations,
aot_eager with the real Triton kernels (interpreter) through the test-only CPU ops, no recompiles on new
weight values, and an import check without triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch._dynamo.testing
from fastcache.kernels import absmean as absmean_module
from fastcache.kernels import (
    absmean_rel_diff,
    absmean_rel_diff_reference,
    absmean_sums,
    extrapolate,
    extrapolate_reference,
    fastercache_uncond,
    fastercache_uncond_reference,
    frequency_split,
    frequency_split_reference,
    lowpass,
    rel_diff_from_sums,
)
from fastcache.kernels.extrapolate import interpreter_test_op as extrapolate_interpreter_op
from fastcache.kernels.fastercache_uncond import interpreter_test_op as uncond_interpreter_op

split_interpreter_op = sys.modules[frequency_split.__module__].interpreter_test_op


def engine_like_step(c, u, r, r_ref, d_low, d_high, w_low, w_high, w_attn, f_prev):
    """Every public op once, wired roughly as the engine will use them."""
    skip = absmean_rel_diff(r, r_ref) <= 0.1
    sums = absmean_sums(r, r_ref)
    ratio = rel_diff_from_sums(sums)
    full_low, full_high = frequency_split((u - c).float())
    uncond, new_low, new_high = fastercache_uncond(c, d_low, d_high, w_low, w_high)
    attn = extrapolate(c, f_prev, w_attn)
    return skip, ratio, full_low, full_high, lowpass(c), uncond, new_low, new_high, attn


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, 12, 18)
    c, u, f_prev = (torch.randn(shape, generator=gen) for _ in range(3))
    r, r_ref = torch.randn(4, 33, generator=gen), torch.randn(4, 33, generator=gen)
    d_low, d_high = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    weights = torch.tensor(1.1), torch.tensor(1.0), torch.tensor(0.5)
    return (c, u, r, r_ref, d_low, d_high, *weights, f_prev)


def test_inductor_fullgraph_matches_eager_without_graph_breaks(dynamo):
    args = inputs()
    compiled = torch.compile(engine_like_step, fullgraph=True, backend="inductor")
    got = compiled(*args)
    assert dynamo.graph_breaks == 0 and dynamo.graphs == 1
    for g, e in zip(got, engine_like_step(*args), strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    c, u, r, r_ref, d_low, d_high, w_low, w_high, w_attn, f_prev = args
    torch.testing.assert_close(got[1].double(), absmean_rel_diff_reference(r, r_ref), atol=0, rtol=1e-5)
    ref_low, ref_high = frequency_split_reference(u - c)
    torch.testing.assert_close(got[2].double(), ref_low, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3].double(), ref_high, atol=1e-5, rtol=0)
    for g, ref in zip(got[5:8], fastercache_uncond_reference(c, d_low, d_high, w_low, w_high), strict=True):
        torch.testing.assert_close(g.double(), ref, atol=1e-6, rtol=1e-6)
    expected = extrapolate_reference(c, f_prev, w_attn)
    torch.testing.assert_close(got[8].double(), expected, atol=1e-6, rtol=1e-6)


def test_elementwise_ops_are_traced_inline_in_a_compiled_cpu_graph():
    """On CPU a custom op in a compiled graph is an opaque eager call (tens of us of dispatch, no fusion): the
    elementwise ops trace their torch composite there; the matmul-bound split stays one op."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(engine_like_step, fullgraph=True, backend=record)(*inputs())
    (gm,) = graphs
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fastcache" in str(n.target)}
    assert ops == {"fastcache.frequency_split", "fastcache.lowpass"}, ops
    # eager CPU calls keep the op (its chunked loop), but on a small tensor, where the op's dispatch costs more
    big = torch.randn(2, absmean_module._CPU_PLAIN_MAX)
    for a, keeps_op in ((big, True), (inputs()[2], False)):
        with torch.profiler.profile() as prof:
            absmean_sums(a, a.flip(0))
        assert any(e.name == "fastcache::absmean_sums" for e in prof.events()) == keeps_op


def test_triton_kernels_inside_compiled_graph_via_interpreter(dynamo):
    """The real Triton kernels (interpreted) inside one fullgraph aot_eager graph on CPU."""
    absmean_op = absmean_module.interpreter_test_op()
    uncond_op = uncond_interpreter_op()
    extrapolate_op = extrapolate_interpreter_op()
    split_op = split_interpreter_op()

    def step(c, d_low, d_high, w_low, w_high, f_prev, w_attn, r, r_ref):
        ratio = rel_diff_from_sums(absmean_op(r, r_ref))
        uncond, new_low, new_high = uncond_op(c, d_low, d_high, w_low, w_high)
        full_low, full_high = split_op(uncond - c)
        return ratio, uncond, new_low, new_high, extrapolate_op(uncond, f_prev, w_attn), full_low, full_high

    c, _, r, r_ref, d_low, d_high, w_low, w_high, w_attn, f_prev = inputs(1)
    c_bf16 = c.transpose(-1, -2).bfloat16()  # a strided, low-precision input as well
    args = (c_bf16, d_low.transpose(-1, -2), d_high.transpose(-1, -2), w_low, w_high)
    args += (f_prev.transpose(-1, -2).bfloat16(), w_attn, r, r_ref.t().contiguous().t())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert dynamo.graph_breaks == 0
    torch.testing.assert_close(got[0].double(), absmean_rel_diff_reference(r, r_ref), atol=0, rtol=1e-5)
    ref = fastercache_uncond_reference(*args[:5])
    torch.testing.assert_close(got[1].double(), ref[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2].double(), ref[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[3].double(), ref[2], atol=1e-6, rtol=1e-6)
    # the chained ops against the fp64 chain (never the kernels' own outputs as a reference's input); bf16
    # rounding of the intermediate uncond is what the tolerances allow for
    uncond_ref = ref[0]
    expected = extrapolate_reference(uncond_ref, args[5], w_attn)
    torch.testing.assert_close(got[4].double(), expected, atol=4e-2, rtol=2e-2)
    for g, ref in zip(got[5:], frequency_split_reference(uncond_ref - c_bf16.double()), strict=True):
        torch.testing.assert_close(g.double(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_new_weight_values_do_not_recompile(dynamo):
    counter = torch._dynamo.testing.CompileCounter()

    def skip_step(c, d_low, d_high, w_low, w_high, w_attn):
        uncond, d_low, d_high = fastercache_uncond(c, d_low, d_high, w_low, w_high)
        return extrapolate(uncond, c, w_attn), d_low, d_high

    compiled = torch.compile(skip_step, fullgraph=True, backend=counter)
    c, d_low, d_high = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for step, (w_low, w_high, w_attn) in enumerate([(1.1, 1.0, 0.5), (1.0, 1.1, 0.3), (1.2, 0.9, 0.7)]):
        weights = torch.tensor(w_low), torch.tensor(w_high), torch.tensor(w_attn)
        uncond, low, high = fastercache_uncond_reference(c, d_low, d_high, *weights[:2])
        expected = (extrapolate_reference(uncond, c, weights[2]), low, high)  # fp64, from the inputs only
        got = compiled(c, d_low, d_high, *weights)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)
        _, d_low, d_high = got
        assert counter.frame_count == 1, f"recompiled at step {step}"


def test_import_without_triton_changes_no_global_setting():
    """In a fresh interpreter with triton made unimportable: the package imports, the CPU ops run, and no
    global torch / dynamo / inductor setting moved."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch, torch._dynamo, torch._inductor.config as ic
        def snapshot():
            return (
                torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32, torch.get_default_dtype(), torch.get_num_threads(),
                torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled(),
                repr(sorted(torch._dynamo.config.get_config_copy().items())),
                repr(sorted(ic.get_config_copy().items())),
            )
        before = snapshot()
        import fastcache.kernels as k
        from fastcache.kernels import _triton
        assert not _triton.HAS_TRITON
        x = torch.randn(2, 9, 10)
        w = torch.tensor(1.1)
        k.absmean_rel_diff(x, x + 1); k.frequency_split(x); k.fastercache_uncond(x, x, x, w, w)
        k.frequency_split(x, impl="triton")
        k.extrapolate(x, x, w)
        try:
            k.absmean.interpreter_test_op()
        except RuntimeError:
            pass
        else:
            raise AssertionError("interpreter_test_op must refuse without triton")
        assert snapshot() == before
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
