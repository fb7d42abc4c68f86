"""Compile-friendliness, counted: each method's denoising step under torch.compile(fullgraph=True) over a
12-step run with real timesteps 1000 -> 0 has 0 graph breaks, compiles at most once per distinct step
variant (planned decisions) or exactly once (decisions on the device), holds no torch.cond when planned and
one per step for FBC (host syncs on a GPU), and matches eager."""

from __future__ import annotations

import pytest
import torch

import fastcache
from fastcache.models.dit import cfg_inputs
from fastcache.testing import CompileCounter
from tests.test_engine import LABELS, METHODS, NULL, denoise, max_diff, noise, tiny_dit

STEPS = 12

CASES = {
    # name: (config, decisions on the device?)
    "pab-planned": ("pab", False),
    "fastercache-planned": ("fastercache", False),
    "fbc-device": ("fbc", True),
    "pab-device": ("pab", True),
    "teacache-planned": ("teacache", False),  # the first and last steps planned (no cond), the others on device
    "teacache-device": ("teacache", True),
    "dbcache-planned": ("dbcache", False),  # warm-up steps planned (no cond), the others on the device
    "dbcache-device": ("dbcache", True),
}


@pytest.mark.parametrize("case", CASES)
def test_fullgraph_compile_counts_and_matches_eager(case: str, dynamo) -> None:
    name, device_decisions = CASES[case]
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    x = noise(False, 0)
    with torch.no_grad():
        eager, eager_state = denoise(model, config, x, STEPS, device_decisions=device_decisions)
        counter = CompileCounter("inductor")
        compiled_step = torch.compile(lambda s, i, d: method.step(model, s, i, d), fullgraph=True, backend=counter)
        compiled, state = denoise(model, config, x, STEPS, step_fn=compiled_step, device_decisions=device_decisions)
    graph_breaks = dynamo.graph_breaks
    graphs = counter.graphs
    plan = method.plan(torch.linspace(1000, 0, STEPS + 1)[:-1])
    bound = 1 if device_decisions else plan.variants()
    print(f"{case}: graph breaks {graph_breaks}, compiled graphs {graphs} (bound {bound}), plan:\n{plan}")
    assert graph_breaks == 0
    assert 1 <= graphs <= bound
    assert max_diff(eager, compiled) <= 1e-5
    # host syncs on a GPU: planned steps hold no torch.cond, FBC one per step, device-decided PAB one per site
    expected_conds = {"pab-planned": 0, "fastercache-planned": 0, "fbc-device": 1, "teacache-planned": 1,
                      "teacache-device": 1, "dbcache-planned": 1, "dbcache-device": 1}
    if case in expected_conds:
        assert counter.max_conds_per_call == expected_conds[case], counter.conds_per_graph
    else:
        assert counter.max_conds_per_call >= 1
    if case in ("teacache-planned", "dbcache-planned"):  # the forced steps' graph has no cond
        assert sorted(counter.conds_per_graph) == [0, 1]
    if name in ("fbc", "teacache", "dbcache"):  # the data-dependent decisions agree, both kinds happened
        assert int(state.num_computed) == int(eager_state.num_computed)
        assert 1 < int(state.num_computed) < STEPS


def test_branch_operand_computed_from_a_transposed_view_compiles_with_inductor(dynamo) -> None:
    # A DiT patchifies with flatten(2).transpose(1, 2); inductor may lay out a pointwise result of that view
    # transposed while compiling the cond branch for contiguous operands (torch 2.11-2.13: the branch's
    # input stride assert fails). control.branch pins operand layouts; this is the minimal case.
    from fastcache.control import branch

    def f(x: torch.Tensor, w: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (x.shape[1],)) * 2 + 1
        return branch(pred, lambda h, w: h @ w, lambda h, w: h * 3, (h, w))

    x, w = torch.randn(1, 32, 4, 8), torch.randn(32, 32)
    compiled = torch.compile(f, fullgraph=True)
    for pred in (True, False):
        torch.testing.assert_close(compiled(x, w, torch.tensor(pred)), f(x, w, torch.tensor(pred)))


SPLIT_CASES = {
    # name: (method, decisions on the device?)
    "fbc": ("fbc", True),
    "teacache-planned": ("teacache", False),  # the first and last steps are planned computes: no host read
    "teacache-device": ("teacache", True),
    "dbcache-planned": ("dbcache", False),  # the warm-up steps are planned computes
    "dbcache-device": ("dbcache", True),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_step_compiles_without_cond_and_matches_the_one_cond_step(case: str, dynamo) -> None:
    """The data-dependent methods for CUDA graphs, as `fastcache.compile_step` runs them by default: a compiled
    head (embed, the blocks before the decision, the decision), one host read of the decision, then a compiled
    tail specialised on it. No graph holds a torch.cond (so all can be CUDA-graphed); a head per planned decision
    kind and a tail per decision value; outputs and counters equal the eager one-cond step's."""
    name, device_decisions = SPLIT_CASES[case]
    model, config = tiny_dit(), METHODS[name](False)
    x = noise(False, 0)
    with torch.no_grad():
        expected, expected_state = denoise(model, config, x, STEPS, device_decisions=device_decisions)
        counter = CompileCounter("inductor")
        step = fastcache.compile_step(fastcache.make(config), model, backend=counter)
        outs, state = denoise(model, config, x, STEPS, step_fn=step, device_decisions=device_decisions)
    assert step.split and dynamo.graph_breaks == 0
    assert counter.max_conds_per_call == 0, counter.conds_per_graph
    heads = 1 if device_decisions else 2  # planned: the forced computes' head and the deciding one
    assert counter.graphs == heads + 2, counter.graphs  # and a tail per decision value
    assert int(state.num_computed) == int(expected_state.num_computed)
    assert int(state.nonfinite) == int(expected_state.nonfinite)
    assert 1 < int(state.num_computed) < STEPS
    assert max_diff(expected, outs) <= 1e-5


def test_compile_step_of_a_planned_method_is_its_compiled_step(dynamo) -> None:
    """A planned method through compile_step: no split, one graph per step variant, no cond, equal to eager."""
    model, config = tiny_dit(), METHODS["pab"](False)
    method = fastcache.make(config)
    x = noise(False, 0)
    with torch.no_grad():
        eager, _ = denoise(model, config, x, STEPS)
        counter = CompileCounter("aot_eager")
        step = fastcache.compile_step(method, model, backend=counter)
        compiled, _ = denoise(model, config, x, STEPS, step_fn=step)
    assert not step.split and dynamo.graph_breaks == 0
    assert 1 <= counter.graphs <= method.plan(torch.linspace(1000, 0, STEPS + 1)[:-1]).variants()
    assert counter.max_conds_per_call == 0
    assert max_diff(eager, compiled) <= 1e-5


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_step_asked_for_cuda_graphs_on_cpu_warns_and_compiles_without_them(mode: str, dynamo) -> None:
    """CUDA graphs asked for on a CPU: one clear warning at the first step, before anything compiles; the step
    compiles without CUDA graphs (torch.compile gets no mode for reduce-overhead, max-autotune-no-cudagraphs
    for max-autotune) and gives the eager outputs."""
    model, config = tiny_dit(), METHODS["fbc"](False)
    x = noise(False, 0)
    with torch.no_grad():
        expected, _ = denoise(model, config, x, 4, device_decisions=True)
        step = fastcache.compile_step(fastcache.make(config), model, mode=mode)
        with pytest.warns(UserWarning, match=r"CUDA graphs need inputs on a CUDA device \(got cpu\)") as caught:
            outs, _ = denoise(model, config, x, 4, step_fn=step, device_decisions=True)
    assert sum("CUDA graphs need" in str(w.message) for w in caught) == 1 and step.cuda_graphs is False
    assert max_diff(expected, outs) <= 1e-5


def test_compile_step_refuses_bad_input_before_compiling() -> None:
    model = tiny_dit()
    pab, fbc = fastcache.make(METHODS["pab"](False)), fastcache.make(METHODS["fbc"](False))
    with pytest.raises(ValueError, match="split: only FirstBlockCache, TeaCache and DBCache have a split step"):
        fastcache.compile_step(pab, model, split=True)
    with pytest.raises(TypeError, match="split: expected True, False or None"):
        fastcache.compile_step(fbc, model, split="yes")
    with pytest.raises(TypeError, match=r"method: expected a fastcache.make\(config\) result"):
        fastcache.compile_step(METHODS["fbc"](False), model)
    with pytest.raises(TypeError, match="mode: expected a torch.compile mode string"):
        fastcache.compile_step(fbc, model, mode=1)


WRONG_DECISIONS = {
    "pab": (METHODS["pab"](False), "decision: PAB takes plan"),
    "fastercache": (METHODS["fastercache"](False), "decision: FasterCache takes plan"),
    "fbc": (METHODS["fbc"](False), "decision: FirstBlockCache decides on the device"),
    "teacache": (METHODS["teacache"](False), "decision: TeaCache takes plan"),
    "dbcache": (METHODS["dbcache"](False), "decision: DBCache takes plan"),
    "mag": (fastcache.MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS),
            "decision: MagCache is planned"),
    "taylorseer": (fastcache.TaylorSeerCacheConfig(), "decision: TaylorSeer is planned"),
}


@pytest.mark.parametrize("name", WRONG_DECISIONS)
def test_compile_step_refuses_a_wrong_decision_before_compiling(name: str) -> None:
    """A decision of the wrong kind is a TypeError naming the field at the call, before anything is traced (it
    was dynamo's "Observed exception" from inside the trace)."""
    config, message = WRONG_DECISIONS[name]
    model = tiny_dit()
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), torch.tensor(999.0), LABELS, NULL)
    counter = CompileCounter("eager")
    step = fastcache.compile_step(method, model, backend=counter)
    with pytest.raises(TypeError, match=message):
        step(method.init(model, inputs), inputs, "reuse")
    assert counter.graphs == 0


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_fastercache_decided_on_the_device_compiles_fullgraph_with_inductor(video: bool, dynamo) -> None:
    """FasterCache with decision=None (nested torch.conds: the unconditional skip, then each attention site)
    compiles with fullgraph=True and inductor, once, and matches eager. Three failures this pins: the BCFHW
    video's size-1 dim stride inside cond (branch outputs get canonical strides); batch halves made outside the
    skip branch reaching cond as operands aliasing the inputs (aot_autograd: "cond_true might be aliasing");
    inductor dropping the copy of the window's conditional half as a no-op clone (storage offset mismatch)."""
    model, config = tiny_dit(video), METHODS["fastercache"](video)
    method = fastcache.make(config)
    x = noise(video, 0)
    with torch.no_grad():
        eager, _ = denoise(model, config, x, 8, device_decisions=True)
        counter = CompileCounter("inductor")
        step = torch.compile(lambda s, i, d: method.step(model, s, i, d), fullgraph=True, backend=counter)
        compiled, _ = denoise(model, config, x, 8, step_fn=step, device_decisions=True)
    assert counter.graphs == 1 and counter.max_conds_per_call >= 1
    assert max_diff(eager, compiled) <= 1e-5
