"""The drop-in under `torch.compile(transformer, fullgraph=True)`: no graph break, a bounded number of graphs,
a bounded number of host syncs, outputs equal to eager fastcache.

Graphs: a context's first call (no state yet: everything computes), plus one per distinct decision planned on
the host (PAB, FasterCache: the compiled forward specialises on it), or one for FBC (decided on the device).
Host syncs on a GPU are the `torch.cond` nodes a compiled call runs (`fastcache.testing.CompileCounter`): 0
for the planned methods, one per block segment for FBC (1 on Flux, CogVideoX and Wan). Context names are
switched eagerly, outside the graph, so cond/uncond passes share the graphs."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")


import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._api import _session  # noqa: E402
from fastcache.diffusers._families import FAMILIES  # noqa: E402
from fastcache.diffusers._runtime import HostSide  # noqa: E402
from fastcache.diffusers._segments import block_roles, num_blocks  # noqa: E402
from fastcache.diffusers._tiny import CASES as CASES_ALL  # noqa: E402
from fastcache.diffusers._tiny import case, denoise, fbc_threshold  # noqa: E402
from fastcache.methods import faster_cache as fc  # noqa: E402
from fastcache.methods import pyramid_attention_broadcast as pab  # noqa: E402
from fastcache.testing import CompileCounter  # noqa: E402
from tests._families import FASTERCACHE, NO_FULLGRAPH  # noqa: E402

TIMESTEPS = torch.linspace(1000, 0, 10)


def _config(method: str, clock: dict, distilled: bool = False, threshold: float = 0.4):
    """`clock["t"]` is the loop's timestep: diffusers' `current_timestep_callback` usage, which lets the drop-in
    plan PAB's and FasterCache's decisions on the host. FBC's threshold comes from `_fbc_threshold`."""
    if method == "fbc":
        return fd.FirstBlockCacheConfig(threshold=threshold)
    if method == "pab":
        return fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  cross_attention_block_skip_range=3,
                                                  current_timestep_callback=lambda: clock["t"])
    return fd.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=3,
                                tensor_format="BFCHW", is_guidance_distilled=distilled,
                                current_timestep_callback=lambda: clock["t"])


def _fbc_threshold(tc, contexts: tuple[str, ...]) -> float:
    """A threshold between two observed ratios of this family's tiny model, so that a run both skips and
    computes (a fixed threshold never skipped on Flux2 and always skipped on Wan, LTX, Latte and Allegro)."""
    return fbc_threshold(tc, TIMESTEPS, contexts)


def _assert_skips_and_computes(model, contexts: tuple[str, ...]) -> None:
    for name in contexts:
        computed = int(fd.cache_state(model, name)["num_computed"])
        assert 1 < computed < len(TIMESTEPS), f"context {name}: {computed} of {len(TIMESTEPS)} calls computed"


def _graph_bound(config) -> int:
    """A context's first call, plus one graph per distinct planned decision (FBC: one graph, decided on the
    device)."""
    if isinstance(config, fd.FirstBlockCacheConfig):
        return 2
    plan = (pab.plan if isinstance(config, fd.PyramidAttentionBroadcastConfig) else fc.plan)(config, TIMESTEPS)
    return plan.variants() + 1


CASES = [
    ("flux", "fbc", ("cond",)),
    ("flux", "pab", ("cond",)),
    ("flux", "fc-distilled", ("cond",)),
    ("cogvideox", "fbc", ("cond_uncond",)),
    ("cogvideox", "pab", ("cond_uncond",)),
    ("cogvideox", "fc", ("cond_uncond",)),
    ("wan", "fbc", ("cond", "uncond")),
    ("wan", "pab", ("cond", "uncond")),
    ("wan", "fc-distilled", ("cond", "uncond")),
]


@pytest.mark.parametrize(("name", "method", "contexts"), CASES, ids=[f"{n}-{m}" for n, m, _ in CASES])
def test_fullgraph_compile(name: str, method: str, contexts: tuple[str, ...], dynamo) -> None:
    """Inductor, fullgraph=True: 0 breaks, graphs <= planned variants + 1, host syncs (torch.cond nodes per
    compiled call) 0 for PAB and FasterCache, at most 1 for FBC, outputs equal to eager."""
    tc = case(name)
    model = tc.model.eval()
    clock: dict = {}
    threshold = _fbc_threshold(tc, contexts) if method == "fbc" else 0.0
    config = _config(method.split("-")[0], clock, distilled=method.endswith("distilled"), threshold=threshold)
    if method.startswith("fc") and name != "cogvideox":
        config = dataclasses.replace(config, tensor_format="BCFHW")
    fd.enable_cache(model, config)
    eager = denoise(model, tc, TIMESTEPS, contexts, clock=clock)
    if method == "fbc":
        _assert_skips_and_computes(model, contexts)  # so that both compiled branches are compared
    fd.reset_cache(model)

    counter = CompileCounter("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    outs = denoise(compiled, tc, TIMESTEPS, contexts, clock=clock)
    # nothing of a call outlives it: what stays reachable is rebuilt by dynamo's residual bytecode after every
    # call, and kept tensors hold memory (an attribute cleared after a torch.cond kept its old value: Session.scratch)
    assert _session(model).scratch is None
    graphs = counter.graphs
    breaks = dynamo.graph_breaks
    fd.reset_cache(model)  # a second generation: fresh states, the same graphs
    again = denoise(compiled, tc, TIMESTEPS, contexts, clock=clock)
    fd.disable_cache(model)

    assert breaks == 0
    assert 1 <= graphs <= _graph_bound(config), f"{graphs} graphs"
    if method == "fbc":  # the README's count: the context's first call, then one graph for every other
        assert graphs == 2
    assert counter.graphs == graphs, "the second generation recompiled"
    assert counter.max_conds_per_call == (1 if method == "fbc" else 0), counter.conds_per_call
    for a, b, c in zip(eager, outs, again, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pab", "fc"])
def test_without_a_host_timestep_decisions_move_to_the_device(method: str, dynamo) -> None:
    """No callback and no pipeline: the timestep is known only on the device, so the rules run there, one
    torch.cond per hooked site, in a single graph after the first call; the outputs are the planned ones."""
    tc = case("cogvideox")
    model = tc.model.eval()
    clock: dict = {}
    planned = _config(method, clock)
    fd.enable_cache(model, planned)
    reference = denoise(model, tc, TIMESTEPS, ("cond_uncond",), clock=clock)
    fd.disable_cache(model)
    fd.enable_cache(model, dataclasses.replace(planned, current_timestep_callback=None))
    counter = CompileCounter("eager")
    outs = denoise(torch.compile(model, fullgraph=True, backend=counter), tc, TIMESTEPS, ("cond_uncond",))
    where = fd.decided_on(model)
    fd.disable_cache(model)
    assert where == "device"
    assert counter.graphs == 2
    assert counter.max_conds_per_call >= 1
    for a, b in zip(reference, outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def _regional_config(method: str, clock: dict, tc, contexts: tuple[str, ...]):
    if method == "mag":  # diffusers' own config object, slowly rising synthetic ratios: some steps skip
        import diffusers

        ratios = [1.0] + [1.0 + 0.004 * i for i in range(1, len(TIMESTEPS))]
        return diffusers.MagCacheConfig(mag_ratios=ratios, num_inference_steps=len(TIMESTEPS), threshold=0.1)
    return _config(method, clock, threshold=_fbc_threshold(tc, contexts) if method == "fbc" else 0.0)


def _regional_run(name: str, method: str, backend, monkeypatch=None,
                  compile_first: bool = False) -> tuple[list, list, torch.nn.Module, list[int]]:
    """Eager fastcache, then the same config under diffusers' regional compilation (and its host reads, counted
    with `monkeypatch`); `compile_first`: the blocks compiled before fastcache is enabled."""
    tc = case(name)
    tc.model.eval()
    contexts = ("cond", "uncond") if name == "wan" else ("cond",)
    clock: dict = {}
    config = _regional_config(method, clock, tc, contexts)
    eager_model, model = copy.deepcopy(tc.model), copy.deepcopy(tc.model)
    fd.enable_cache(eager_model, config)
    eager = denoise(eager_model, tc, TIMESTEPS, contexts, clock=clock)
    if method == "fbc":
        _assert_skips_and_computes(eager_model, contexts)
    if compile_first:
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    fd.enable_cache(model, config)
    if not compile_first:
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    reads = [0] if monkeypatch is None else _count_host_reads(monkeypatch)
    return eager, denoise(model, tc, TIMESTEPS, contexts, clock=clock), model, reads


REGIONAL = [("flux", "fbc"), ("wan", "fbc"), ("flux", "mag"), ("wan", "mag")]


@pytest.mark.parametrize(("name", "method"), REGIONAL, ids=[f"{n}-{m}" for n, m in REGIONAL])
def test_regional_compilation(name: str, method: str, dynamo, monkeypatch) -> None:
    """diffusers' regional compilation (`transformer.compile_repeated_blocks(fullgraph=True)`: each repeated block
    compiled on its own, the transformer's forward eager around them) with the block-range and step-level methods:
    0 breaks, no torch.cond, outputs equal to eager. FirstBlockCache's rule runs eagerly around the compiled blocks
    (the graphs hold the blocks alone, as many as the model compiled the same way uncached) and reads its decision on
    the host once per call, but for a context's first, which computes; MagCache's decisions are planned. Blocks of
    one class share their graphs, under dynamo's recompile limit of 8."""
    counter = CompileCounter("aot_eager")
    eager, outs, model, reads = _regional_run(name, method, counter, monkeypatch)
    monkeypatch.undo()
    assert dynamo.graph_breaks == 0
    assert counter.max_conds_per_call == 0, counter.conds_per_graph
    if method == "fbc":  # as many graphs as the model compiled the same way without a cache
        assert counter.graphs == _regional_graphs_uncached(name), counter.graphs
        contexts = ("cond", "uncond") if name == "wan" else ("cond",)
        assert reads[0] == len(contexts) * (len(TIMESTEPS) - 1)
        # a skip runs the first block's graph alone: every compiled block call is a computed call's or a first block
        computed = sum(int(fd.cache_state(model, c)["num_computed"]) for c in contexts)
        blocks = num_blocks(model, FAMILIES[type(model).__name__])
        assert counter.calls == computed * blocks + (len(contexts) * len(TIMESTEPS) - computed), counter.calls
    else:
        assert 1 <= counter.graphs <= 8, counter.graphs
    for a, b in zip(eager, outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    fd.disable_cache(model)
    assert not any(isinstance(m.__dict__.get("_compiled_call_impl"), HostSide) for m in model.modules())


def test_regional_compilation_before_enable_cache(dynamo, monkeypatch) -> None:
    """The blocks compiled first, fastcache enabled after (the order a user with a compiled pipeline takes): the
    same outputs as eager, no torch.cond, one host read per call but each context's first; disable_cache leaves
    the blocks compiled."""
    counter = CompileCounter("aot_eager")
    eager, outs, model, reads = _regional_run("wan", "fbc", counter, monkeypatch, compile_first=True)
    monkeypatch.undo()
    assert dynamo.graph_breaks == 0 and counter.max_conds_per_call == 0
    assert reads[0] == 2 * (len(TIMESTEPS) - 1)
    for a, b in zip(eager, outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    fd.disable_cache(model)
    assert all(block._compiled_call_impl is not None and not isinstance(block._compiled_call_impl, HostSide)
               for block in model.blocks)


def _regional_graphs_uncached(name: str) -> int:
    tc = case(name)
    model = copy.deepcopy(tc.model.eval())
    counter = CompileCounter("eager")
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    contexts = ("cond", "uncond") if name == "wan" else ("cond",)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            for _ in contexts:
                model(**tc.kwargs(tc.latent, t), return_dict=False)
    return counter.graphs


def _count_host_reads(monkeypatch) -> list[int]:
    """Counts the device-to-host reads of tensors (`bool`, `item`, `tolist`: each a sync on a GPU) while the test
    runs: the drop-in's one read of its decision per call."""
    reads = [0]

    def counting(read: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any) -> Any:
            reads[0] += 1
            return read(self, *args)

        return counted

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    return reads


@pytest.mark.xfail(strict=True, raises=torch._dynamo.exc.FailOnRecompileLimitHit,
                   reason="a per-site method's state is keyed by its site's name, so under regional compilation "
                          "each block of a class guards on its own keys: one graph per block and decision "
                          "(Wan PAB passes the recompile limit of 8)")
def test_regional_compilation_of_pab_shares_graphs_between_blocks(dynamo) -> None:
    eager, outs, _, _ = _regional_run("wan", "pab", CompileCounter("aot_eager"))
    for a, b in zip(eager, outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


BACKEND = "eager"  # dynamo capture only, run eagerly
# the families not compiled with inductor above (those three are, with every method)
OTHER_FAMILIES = [n for n in CASES_ALL if n not in ("flux", "cogvideox", "wan", *NO_FULLGRAPH)]
EVERY_FAMILY = ([(n, "fbc") for n in OTHER_FAMILIES] + [(n, "pab") for n in OTHER_FAMILIES]
                + [(n, "fc") for n in FASTERCACHE if n in OTHER_FAMILIES])


@pytest.mark.parametrize(("name", "method"), EVERY_FAMILY, ids=[f"{n}-{m}" for n, m in EVERY_FAMILY])
def test_every_family_captures_fullgraph(name: str, method: str, dynamo) -> None:
    """The other 9 families x each method they support (all 12 with the inductor cases above): fullgraph
    capture with 0 breaks, graphs <= planned variants + 1, no torch.cond for the planned methods and one per
    block segment for FBC (segments are split by code that runs between block lists, e.g. Flux2's concat),
    outputs equal to eager. Dynamo's own backend ("eager") keeps this fast; graph breaks, recompiles and
    torch.cond's branch rules (no None outputs, the traced attention processors) are all decided at capture."""
    tc = case(name)
    model = tc.model.eval()
    clock: dict = {}
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    config = _config(method, clock, threshold=_fbc_threshold(tc, contexts) if method == "fbc" else 0.0)
    if method == "fc":
        config = dataclasses.replace(config, tensor_format=FAMILIES[type(model).__name__].layout)
    fd.enable_cache(model, config)
    # one cond per segment that ends in a block other than the first (a head-only segment has no residual)
    roles = block_roles(model, FAMILIES[type(model).__name__], 1, 0)
    segment_conds = sum(role.middle_last for _, role in roles)
    eager = denoise(model, tc, TIMESTEPS, contexts, clock=clock)
    if method == "fbc":
        _assert_skips_and_computes(model, contexts)
    fd.reset_cache(model)
    counter = CompileCounter("eager")
    compiled = denoise(torch.compile(model, fullgraph=True, backend=counter), tc, TIMESTEPS, contexts, clock=clock)
    fd.disable_cache(model)
    assert dynamo.graph_breaks == 0
    assert 1 <= counter.graphs <= _graph_bound(config)
    if method == "fbc":
        assert counter.max_conds_per_call == segment_conds >= 1, counter.conds_per_graph
    else:
        assert counter.max_conds_per_call == 0, counter.conds_per_graph
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(NO_FULLGRAPH))
def test_no_fullgraph_families_break_the_graph_uncached(name: str) -> None:
    """The families left out of the capture tests above cannot be captured whole even without a cache (the
    reason is in tests/_families.py): diffusers' own forward breaks the graph."""
    tc = case(name)
    compiled = torch.compile(tc.model.eval(), fullgraph=True, backend="eager")
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(**tc.kwargs(tc.latent, TIMESTEPS[0]), return_dict=False)
    torch._dynamo.reset()


def _static_inputs_recorder(model: torch.nn.Module, foreign: list[list[tuple]]):
    """A backend that records, per compiled graph, the static inputs (what CUDA graph trees keep at a fixed address
    and re-record for when it moves) that are not the model's own parameters or buffers."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    own = {id(t) for t in (*model.parameters(), *model.buffers())}

    def backend(gm, example_inputs):
        def forward_compiler(fx_gm, _fake_inputs):
            static = torch._guards.TracingContext.get().fw_metadata.static_input_indices
            foreign.append([tuple(example_inputs[i].shape) for i in static if id(example_inputs[i]) not in own])
            return make_boxed_func(fx_gm.forward)

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    return backend


# one method per way the state is read: a segment's cond (FBC, DBCache), planned attention (PAB, FasterCache's
# uncond deltas) and planned decisions holding tensors (TaylorSeer)
STATIC_CASES = [("flux", "fbc"), ("flux", "pab"), ("flux", "taylorseer"), ("flux", "dbcache"), ("cogvideox", "fc")]


@pytest.mark.parametrize(("name", "method"), STATIC_CASES, ids=[f"{n}-{m}" for n, m in STATIC_CASES])
def test_the_state_is_no_static_input(name: str, method: str, dynamo) -> None:
    """dynamo takes a tensor it reaches through the model (the wrapped forward's closure included) for a static
    input, and CUDA graph trees re-record a graph whenever a static input moves: the state and the planned
    decisions (new tensors every call) must reach the graph another way (H100: 76 recordings for 3 graphs)."""
    tc = case(name)
    model = tc.model.eval()
    clock: dict = {}
    if method == "taylorseer":
        config = fd.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2)
    elif method == "dbcache":
        config = fd.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.2,
                                  max_warmup_steps=2, taylorseer_order=1)
    else:
        config = _config(method, clock, threshold=_fbc_threshold(tc, ("cond",)) if method == "fbc" else 0.0)
    fd.enable_cache(model, config)
    foreign: list[list[tuple]] = []
    backend = _static_inputs_recorder(model, foreign)
    contexts = ("cond_uncond",) if name == "cogvideox" else ("cond",)
    # compiled inside a function of the user's, the model reached from its closure (compiled as a module, the
    # model is the frame's own argument: its forward's closure was never taken for static)
    step = torch.compile(lambda **kwargs: model(**kwargs), fullgraph=True, backend=backend)
    denoise(step, tc, TIMESTEPS[:6], contexts, clock=clock, set_context=model.cache_context)
    fd.disable_cache(model)
    assert len(foreign) >= 2
    assert all(not shapes for shapes in foreign), foreign
