"""SeaCache in the drop-in: diffusers' own SeaCache hook (0.42.1) is the oracle, on tiny Wan pipelines (its
built-in adapter) and on a Flux transformer through `raw_vision_callback` (its generic path)."""

from __future__ import annotations

import copy
import math

import diffusers
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.hooks import sea_cache as diffusers_sea_cache
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcache
import fastcache.diffusers as fd
from fastcache.diffusers._tiny import case
from fastcache.methods import sea_cache
from fastcache.testing import CompileCounter

STEPS = 12


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    return case("wan", seed=0).model.eval()


def _pipeline(transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None) -> WanPipeline:
    extra = {} if transformer_2 is None else dict(transformer_2=transformer_2, boundary_ratio=0.5)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=transformer, **extra)


def _run(pipe: WanPipeline, guidance_scale: float = 3.0, steps: int = STEPS,
         skipped: list[bool] | None = None) -> tuple[torch.Tensor, list[int]]:
    """The latents after each step, stacked, and how many times block 0's attention ran at each step (the calls
    that computed: a skip runs no block). A compiled model cannot count in a hook (it would run inside the
    torch.cond): `skipped` then gets the "cond" context's skip flag at each step, from fastcache's state."""
    computed, latents = [0], []

    def count(*_):
        computed[-1] += 1

    handles = [t.blocks[0].attn1.register_forward_pre_hook(count)
               for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None and skipped is None]

    def step_end(p, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        computed.append(0)
        if skipped is not None:
            skipped.append(bool(fd.cache_state(p.transformer, "cond")["skipped"]))
        return kwargs

    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, guidance_scale=guidance_scale, num_frames=5,
         height=64, width=64, num_inference_steps=steps, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=step_end)
    for handle in handles:
        handle.remove()
    return torch.stack(latents), computed[:-1]


def _diffusers(model: torch.nn.Module, config: diffusers.SeaCacheConfig) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.enable_cache(config)
    return model


CASES = [(order, cfg, threshold) for order in (0, 1) for cfg in (3.0, 1.0) for threshold in (0.25, 1.0)]


@pytest.mark.parametrize(("order", "guidance", "threshold"), CASES, ids=[f"order{o}-cfg{g}-th{t}" for o, g, t in CASES])
def test_a_wan_pipeline_equals_diffusers_sea_cache_step_by_step(wan, order, guidance, threshold) -> None:
    """diffusers' config object, its WanPipeline (which passes step_index, sigma and num_inference_steps to
    cache_context), CFG on (two contexts) and off: the same calls compute and the latents equal diffusers' at
    every step; and caching changed them (it skipped)."""
    config = diffusers.SeaCacheConfig(threshold=threshold, residual_order=order)
    expected, expected_computed = _run(_pipeline(_diffusers(wan, config)), guidance)
    pipe = _pipeline(copy.deepcopy(wan))
    fastcache.enable_cache(pipe, config)
    got, computed = _run(pipe, guidance)
    uncached, all_computed = _run(_pipeline(copy.deepcopy(wan)), guidance)
    assert computed == expected_computed
    assert sum(computed) < sum(all_computed), "SeaCache must have skipped something"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, uncached, atol=1e-4)


def test_a_bf16_transformer_equals_diffusers(wan) -> None:
    """Half precision: the indicator is filtered in fp32 and cast back to bf16, the residual history is kept in
    bf16 and extrapolated with fp64 scalars, as diffusers does: the same skips and latents."""
    half = copy.deepcopy(wan).to(torch.bfloat16)
    config = diffusers.SeaCacheConfig(threshold=0.5, residual_order=1)
    expected, expected_computed = _run(_pipeline(_diffusers(half, config)))
    pipe = _pipeline(copy.deepcopy(half))
    fastcache.enable_cache(pipe, config)
    got, computed = _run(pipe)
    assert computed == expected_computed and 0 in computed
    assert fastcache.diffusers.cache_state(pipe.transformer, "cond") is None  # the pipeline ended its states
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_wan22_two_transformers_each_equal_diffusers(wan) -> None:
    """Wan 2.2's second transformer starts at the boundary step: its first call computes (no history), and every
    call of both equals diffusers' hooks on the two transformers."""
    second = case("wan", seed=1).model.eval()
    config = diffusers.SeaCacheConfig(threshold=0.5)
    expected, expected_computed = _run(_pipeline(_diffusers(wan, config), _diffusers(second, config)))
    pipe = _pipeline(copy.deepcopy(wan), copy.deepcopy(second))
    fastcache.enable_cache(pipe, config)
    got, computed = _run(pipe)
    assert computed == expected_computed and 0 in computed
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_fullgraph_one_cond_on_each_data_decided_call(wan, dynamo) -> None:
    """Inductor, fullgraph=True: 0 graph breaks; 3 graphs (a context's first call, the planned first and last
    steps, the calls decided on the device); one torch.cond on each device-decided call and none on the others;
    the same skips as eager, outputs within 1e-5; a second generation recompiles nothing."""
    config = fd.SeaCacheConfig(threshold=0.5)
    pipe = _pipeline(copy.deepcopy(wan))
    fastcache.enable_cache(pipe, config)
    eager_skipped, skipped = [], []
    eager, _ = _run(pipe, skipped=eager_skipped)
    counter = CompileCounter("inductor")
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counter)
    compiled, _ = _run(pipe, skipped=skipped)
    graphs = counter.graphs
    again, _ = _run(pipe, skipped=[])
    assert dynamo.graph_breaks == 0
    assert graphs == 3 and counter.graphs == graphs, counter.conds_per_graph
    assert skipped == eager_skipped and any(skipped), skipped
    # two contexts per step: the first step (a context's first call) and the last (cache_end_steps) take no cond
    assert counter.conds_per_call[:2 * STEPS] == [0, 0] + [1] * (2 * STEPS - 4) + [0, 0], counter.conds_per_call
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=0)


def test_regional_compilation_equals_diffusers(wan) -> None:
    """diffusers' regional compilation (each block compiled on its own, fullgraph): the rule runs eagerly around
    the compiled blocks, with the same decisions and latents as diffusers' hooks."""
    config = diffusers.SeaCacheConfig(threshold=0.5)
    expected, expected_computed = _run(_pipeline(_diffusers(wan, config)))
    pipe = _pipeline(copy.deepcopy(wan))
    fastcache.enable_cache(pipe, config)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    skipped: list[bool] = []
    got, _ = _run(pipe, skipped=skipped)
    assert skipped == [c == 0 for c in expected_computed] and any(skipped), (skipped, expected_computed)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _flux_latents(module, args, kwargs):
    """Flux's packed tokens of a square latent as one (C, 1, H, W) tensor per sample."""
    hidden = kwargs["hidden_states"]
    side = math.isqrt(hidden.shape[1])
    return [x.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(1) for x in hidden]


@pytest.mark.parametrize("order", [0, 1])
def test_raw_vision_callback_on_flux_equals_diffusers(order) -> None:
    """diffusers' generic path (any transformer, with `raw_vision_callback`), on Flux's two block lists, called
    by hand with the loop's place in each cache_context: equal to diffusers' hooks at every call."""
    tc = case("flux")
    config = diffusers.SeaCacheConfig(threshold=0.2, residual_order=order, raw_vision_callback=_flux_latents)

    def run(model: torch.nn.Module) -> list[torch.Tensor]:
        outs, x = [], tc.latent.clone()
        with torch.no_grad():
            for i in range(10):
                sigma = 1 - i / 10
                with model.cache_context("cond", step_index=i, sigma=sigma, num_inference_steps=10):
                    outs.append(model(**tc.kwargs(x, torch.tensor(sigma * 1000)), return_dict=False)[0])
                x = x - 0.1 * outs[-1]
        return outs

    expected = run(_diffusers(tc.model.eval(), config))
    model = copy.deepcopy(tc.model).eval()
    fd.enable_cache(model, config)
    got = run(model)
    computed = int(fd.cache_state(model, "cond")["num_computed"])
    assert 2 < computed < 10
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- the rule, against diffusers' own gate ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(changes=st.lists(st.floats(0.0, 0.6), min_size=2, max_size=14), threshold=st.floats(0.0, 1.0),
       max_consecutive=st.integers(0, 3), jumps=st.sets(st.integers(1, 13), max_size=2),
       retention=st.integers(0, 2), cache_end=st.integers(0, 2), nan_at=st.integers(-1, 13))
def test_the_rule_equals_diffusers_gate(changes, threshold, max_consecutive, jumps, retention, cache_end,
                                        nan_at) -> None:
    """fastcache's plan and device gate against diffusers' `SeaCacheSharedState.resolve_gate` fed the same
    indicators, with the hook's bookkeeping of consecutive skips: the same call computes or skips, over random
    changes, thresholds, retained and last steps, skipped steps (the history restarts) and a NaN indicator."""
    kwargs = dict(threshold=threshold, retention_steps=retention, cache_end_steps=cache_end,
                  max_consecutive_cached=max_consecutive)
    ours, theirs = sea_cache.SeaCacheConfig(**kwargs), diffusers.SeaCacheConfig(**kwargs)
    shared, context = diffusers_sea_cache.SeaCacheSharedState(), diffusers_sea_cache.SeaCacheContextState()
    steps = len(changes) + len(jumps) + 1
    step, indicator, state = 0, torch.ones(2, 3, 4), None
    for i, change in enumerate(changes):
        step += 2 if i in jumps else (1 if i else 0)
        if i:
            indicator = indicator * (1 + change)
        if i == nan_at:
            indicator = indicator * float("nan")
        # diffusers: its gate, then the leader's skip and the tail's record (consecutive skips)
        metadata = diffusers_sea_cache._SeaCacheForwardMetadata(step, 0.5, steps)
        expected = not shared.resolve_gate(context, metadata, [indicator], theirs)
        context.consecutive_cached = context.consecutive_cached + 1 if expected else 0
        # fastcache
        plan = sea_cache.plan(ours, dict(step_index=step, sigma=0.5, num_inference_steps=steps), torch.device("cpu"))
        measure = indicator[None]
        if state is None or plan.force_compute:
            skip = False
            state = dict(accumulated=torch.zeros(1, dtype=torch.float64),
                         consecutive=torch.zeros((), dtype=torch.int64))
        else:
            change_t = sea_cache.relative_change(measure, state["indicator"])
            gate = sea_cache.gate(ours, state["accumulated"], state["consecutive"], state["last_step"], plan.step,
                                  change_t, torch.tensor(True))
            skip = bool(gate.skip)
            state.update(accumulated=gate.accumulated, consecutive=gate.consecutive)
        state.update(indicator=measure, last_step=plan.step)
        assert skip == expected, (i, step)


def test_the_filter_equals_diffusers_per_sample() -> None:
    latents = torch.randn(3, 4, 2, 8, 6, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    for sigma in (0.0, 0.3, 1.0):
        got = sea_cache.sea_filter(latents.movedim(1, -1), torch.tensor([sigma], dtype=torch.float64), 3.0)
        for sample, out in zip(latents, got, strict=True):
            expected = diffusers_sea_cache._apply_sea_filter(sample.movedim(0, -1), sigma, 3.0)
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_order_one_extrapolates_linearly_from_the_two_last_computed_steps() -> None:
    config = sea_cache.SeaCacheConfig(residual_order=1)
    first = sea_cache.keep(config, torch.full((2,), 1.0), None, torch.tensor(2), torch.tensor(False))
    torch.testing.assert_close(sea_cache.reuse(config, first, torch.tensor(3)), torch.full((2,), 1.0))
    second = sea_cache.keep(config, torch.full((2,), 3.0), first, torch.tensor(4), torch.tensor(True))
    # latest 3 at step 4, previous 1 at step 2: at step 5, 3 + (3 - 1) * (5 - 4) / (4 - 2) = 4
    torch.testing.assert_close(sea_cache.reuse(config, second, torch.tensor(5)), torch.full((2,), 4.0))
    restarted = sea_cache.keep(config, torch.full((2,), 3.0), first, torch.tensor(9), torch.tensor(False))
    torch.testing.assert_close(sea_cache.reuse(config, restarted, torch.tensor(10)), torch.full((2,), 3.0))


# -- never a non-finite reuse; bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1])
def test_a_non_finite_cached_residual_is_never_reused(wan, order) -> None:
    """A NaN from the last block lands in the cached residual; every later call that would skip computes
    instead (refused on the device, no sync) and is counted. At order 1 the NaN residual is also the previous
    entry the next extrapolation reads: the call after it computes too."""
    tc = case("wan")
    model = copy.deepcopy(wan)
    fd.enable_cache(model, fd.SeaCacheConfig(threshold=1e9, residual_order=order, max_consecutive_cached=0,
                                             retention_steps=0, cache_end_steps=0))
    fired = []

    def nan_once(module, args, output):
        if fired:
            return output
        fired.append(True)
        return output * float("nan")

    handle = model.blocks[-1].ffn.register_forward_hook(nan_once)
    outs = []
    with torch.no_grad():
        for i, t in enumerate((900.0, 800.0, 700.0, 600.0)):
            with model.cache_context("cond", step_index=i, sigma=t / 1000, num_inference_steps=4):
                outs.append(model(**tc.kwargs(tc.latent * (1 + 0.01 * i), torch.tensor(t)), return_dict=False)[0])
    state = fd.cache_state(model, "cond")
    handle.remove()
    assert not torch.isfinite(outs[0]).all()
    assert all(torch.isfinite(o).all() for o in outs[1:])
    refused = 1 + order
    assert int(state["nonfinite"]) == refused and int(state["num_computed"]) == 1 + refused
    assert bool(state["skipped"])


def test_bad_input_is_refused_before_any_compute(wan) -> None:
    for field, value in (("residual_order", 2), ("threshold", -1.0), ("max_consecutive_cached", 1.5),
                         ("power_exp", 0.0), ("retention_steps", -1), ("raw_vision_callback", 3)):
        with pytest.raises((ValueError, TypeError), match=field):
            fd.SeaCacheConfig(**{field: value})
    with pytest.raises(TypeError, match="drop-in only"):
        fastcache.make(fd.SeaCacheConfig())
    with pytest.raises(ValueError, match="raw_vision_callback"):  # no adapter for Flux's tokens
        fd.enable_cache(copy.deepcopy(case("flux").model), fd.SeaCacheConfig())
    tc = case("wan")
    model = copy.deepcopy(wan)
    fd.enable_cache(model, fd.SeaCacheConfig())
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(RuntimeError, match="step_index"), model.cache_context("cond"):  # FluxPipeline's usage
        model(**tc.kwargs(tc.latent, torch.tensor(900.0)))
    for info, match in ((dict(step_index=5, sigma=0.5, num_inference_steps=5), "step_index"),
                        (dict(step_index=0, sigma=1.5, num_inference_steps=5), "sigma")):
        with pytest.raises(ValueError, match=match), model.cache_context("cond", **info):
            pass
    with pytest.raises(RuntimeError, match="step_index"), torch.no_grad():  # a call outside any context
        model(**tc.kwargs(tc.latent, torch.tensor(900.0)))
    assert not calls
    assert fd.cache_state(model, "cond") is None
    with torch.no_grad():  # a second call in one context has no step of its own; the next context runs as usual
        with pytest.raises(RuntimeError, match="once per"), model.cache_context("cond", **info_at(0)):
            model(**tc.kwargs(tc.latent, torch.tensor(900.0)))
            model(**tc.kwargs(tc.latent, torch.tensor(900.0)))
        with model.cache_context("cond", **info_at(1)):
            model(**tc.kwargs(tc.latent, torch.tensor(800.0)))
    assert int(fd.cache_state(model, "cond")["count"]) == 2


def info_at(step: int) -> dict:
    return dict(step_index=step, sigma=1 - step / 5, num_inference_steps=5)
