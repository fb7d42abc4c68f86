"""MagCache and TaylorSeer through the drop-in, against diffusers' own hooks: step by step on tiny Flux, CogVideoX
and Wan (their configs given as diffusers' own objects), eager and under torch.compile(fullgraph=True), where
the decisions are planned on the host at each cache_context entry (0 torch.cond, 0 graph breaks, <= 3 graphs
in a 12-step run)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._tiny import CASES as CASES_ALL  # noqa: E402
from fastcache.diffusers._tiny import case, denoise  # noqa: E402
from fastcache.testing import CompileCounter  # noqa: E402
from tests._families import MAG_NO_ORACLE, MAG_REFUSED, NO_FULLGRAPH, TAYLOR_NO_ORACLE  # noqa: E402
from tests.test_diffusers_lifecycle import nan_once_hook  # noqa: E402

STEPS = 12
TIMESTEPS = torch.linspace(1000, 1000 / STEPS, STEPS)
# the tiny models' attention modules as TaylorSeer's cache_identifiers (diffusers' defaults end in "attn", which
# matches Flux's modules but not CogVideoX's or Wan's `attn1` / `attn2`: there diffusers caches nothing)
ATTENTION = {"flux": None, "cogvideox": (r"transformer_blocks\.\d+\.attn1",), "wan": (r"blocks\.\d+\.attn\d",)}
RATIOS = [1.0] + [1.0 + 0.004 * i for i in range(1, STEPS)]


def _config(method: str, name: str):
    if method == "mag":
        return diffusers.MagCacheConfig(mag_ratios=RATIOS, num_inference_steps=STEPS, threshold=0.1)
    if method == "taylor":
        return diffusers.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=2,
                                               taylor_factors_dtype=torch.float32, cache_identifiers=ATTENTION[name])
    if method == "taylor-bf16":  # diffusers' default factor dtype
        return diffusers.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                               cache_identifiers=ATTENTION[name])
    return diffusers.TaylorSeerCacheConfig(use_lite_mode=True, cache_interval=3, disable_cache_before_step=2)


CASES = [(name, method) for name in ("flux", "cogvideox", "wan")
         for method in ("mag", "taylor", "taylor-bf16", "lite")]


@pytest.mark.parametrize(("name", "method"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_parity_with_diffusers_eager_and_compiled(name: str, method: str, dynamo) -> None:
    tc = case(name)
    tc.model.eval()
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    uncached = denoise(copy.deepcopy(tc.model), tc, TIMESTEPS, contexts)

    theirs = copy.deepcopy(tc.model)
    theirs.enable_cache(_config(method, name))
    reference = denoise(theirs, tc, TIMESTEPS, contexts)

    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, _config(method, name))
    eager = denoise(ours, tc, TIMESTEPS, contexts)
    assert fd.decided_on(ours) == "host"
    fd.reset_cache(ours)
    counter = CompileCounter("aot_eager")
    compiled = denoise(torch.compile(ours, fullgraph=True, backend=counter), tc, TIMESTEPS, contexts)

    def gap(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    assert gap(eager, reference) <= 1e-5, "eager parity with diffusers' hooks"
    assert gap(compiled, reference) <= 1e-4, "compiled parity with diffusers eager"
    assert gap(eager, uncached) > 1e-5, "the cache must have changed the outputs"
    assert dynamo.graph_breaks == 0
    assert 1 <= counter.graphs <= 3 and counter.max_conds_per_call == 0, counter.conds_per_graph


def test_taylorseer_forecast_steps_do_not_run_the_forecast_modules() -> None:
    """On a forecast step the attention modules are not called: counted on Flux, 12 steps, diffusers' schedule
    CCPCPPCPPCPP (before=2, interval=3)."""
    tc = case("flux")
    model = copy.deepcopy(tc.model.eval())
    calls = []
    first = next(m for n, m in model.named_modules() if n.endswith(".attn"))
    handles = [first.to_q.register_forward_pre_hook(lambda *_: calls.append(1))]  # inside the module's forward
    fd.enable_cache(model, _config("taylor", "flux"))
    denoise(model, tc, TIMESTEPS, ("cond",))
    for h in handles:
        h.remove()
    plan = "CCPCPPCPPCPP"
    assert len(calls) == plan.count("C")


def test_magcache_refuses_a_pipeline_step_count_other_than_its_config() -> None:
    from tests.test_diffusers_pipeline import _pipeline

    pipe = _pipeline()
    fd.enable_cache(pipe, diffusers.MagCacheConfig(mag_ratios=RATIOS, num_inference_steps=STEPS))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 32), height=32, width=32,
             num_inference_steps=STEPS - 2, guidance_scale=1.0, generator=g, output_type="pt")


def test_magcache_calibration_records_the_ratios_as_data() -> None:
    """calibrate=True computes every step and records diffusers' ratio per step in the state: the same values
    diffusers prints at the end of its calibration run."""
    import io
    from contextlib import redirect_stdout

    tc = case("flux")
    tc.model.eval()
    config = diffusers.MagCacheConfig(calibrate=True, num_inference_steps=STEPS)
    theirs = copy.deepcopy(tc.model)
    theirs.enable_cache(config)
    printed = io.StringIO()
    with redirect_stdout(printed):
        denoise(theirs, tc, TIMESTEPS, ("cond",))
    expected = eval(printed.getvalue().strip().splitlines()[-1])  # diffusers prints the list
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, diffusers.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    denoise(ours, tc, TIMESTEPS, ("cond",))
    tensor, values = fd.calibrated_ratios(ours, "cond")
    assert tensor.shape == (STEPS,) and values[0] == 1.0
    torch.testing.assert_close(tensor.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_a_second_call_in_one_context_is_refused_by_name() -> None:
    tc = case("flux")
    model = copy.deepcopy(tc.model.eval())
    fd.enable_cache(model, _config("mag", "flux"))
    with torch.no_grad(), model.cache_context("cond"):
        model(**tc.kwargs(tc.latent, TIMESTEPS[0]), return_dict=False)
        with pytest.raises(RuntimeError, match="cache_context"):
            model(**tc.kwargs(tc.latent, TIMESTEPS[0]), return_dict=False)


EVERY_ATTENTION = (r"(transformer_blocks|single_transformer_blocks|blocks|temporal_transformer_blocks)\.\d+\.attn\d?",
                   # Kandinsky's text, visual and fused blocks, AceStep's layers
                   r"(\w+_)?(transformer_blocks|layers)\.\d+\.((\w+_dec_block\.)?(\w+_)?(self|cross)_att(n|ention)|attn)",
                   r"transformer_blocks\.\d+\.(audio_|audio_to_video_|video_to_audio_)attn\d?")  # LTX-2's audio
OTHER_FAMILIES = [n for n in CASES_ALL if n not in ("flux", "cogvideox", "wan")]


def _every_attention_config() -> diffusers.TaylorSeerCacheConfig:
    return diffusers.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                           taylor_factors_dtype=torch.float32, cache_identifiers=EVERY_ATTENTION)


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _caches_and_equals_diffusers(name: str, config: Callable[[], object], has_oracle: bool) -> None:
    """The drop-in with `config()` changes the outputs and, where diffusers' hook runs on the family
    (`has_oracle`), equals it step by step (eager)."""
    tc = case(name)
    tc.model.eval()
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, config())
    got = denoise(ours, tc, TIMESTEPS, contexts)
    uncached = denoise(copy.deepcopy(tc.model), tc, TIMESTEPS, contexts)
    assert _gap(got, uncached) > 1e-5, "the cache must have changed the outputs"
    if has_oracle:
        theirs = copy.deepcopy(tc.model)
        theirs.enable_cache(config())
        assert _gap(got, denoise(theirs, tc, TIMESTEPS, contexts)) <= 1e-5


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_taylorseer_on_every_other_family_equals_diffusers(name: str) -> None:
    """Every attention module forecast (diffusers' default identifiers miss `attn1`-style names); where diffusers'
    hook cannot run (tests/_families.py says why) the drop-in only has to cache something."""
    _caches_and_equals_diffusers(name, _every_attention_config, name not in TAYLOR_NO_ORACLE)


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_magcache_on_every_other_family_equals_diffusers_or_is_refused_before_any_compute(name: str) -> None:
    """Every other family runs MagCache exactly as diffusers' hook (eager), except where it is refused at
    enable_cache, naming why (Latte: its hidden states change layout between its spatial and temporal blocks,
    and diffusers fails mid-generation there). Where diffusers' hook cannot run, it only has to cache something."""
    if name in MAG_REFUSED:
        model = copy.deepcopy(case(name).model)
        with pytest.raises(ValueError, match=MAG_REFUSED[name]):
            fd.enable_cache(model, _config("mag", name))
        assert fd.cache_state(model) is None  # nothing half-enabled
        return
    _caches_and_equals_diffusers(name, lambda: _config("mag", name), name not in MAG_NO_ORACLE)


@pytest.mark.parametrize("name", [n for n in OTHER_FAMILIES if n not in NO_FULLGRAPH])
def test_every_other_family_captures_the_planned_methods_fullgraph(name: str, dynamo) -> None:
    """MagCache (where not refused) and TaylorSeer under torch.compile(fullgraph=True) (dynamo capture, run
    eagerly): 0 graph breaks, at most 3 graphs, 0 torch.cond, outputs equal to eager."""
    tc = case(name)
    tc.model.eval()
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    for config in ([] if name in MAG_REFUSED else [_config("mag", name)]) + [_every_attention_config()]:
        model = copy.deepcopy(tc.model)
        fd.enable_cache(model, config)
        eager = denoise(model, tc, TIMESTEPS, contexts)
        fd.reset_cache(model)
        counter = CompileCounter("eager")
        compiled = denoise(torch.compile(model, fullgraph=True, backend=counter), tc, TIMESTEPS, contexts)
        assert dynamo.graph_breaks == 0, type(config).__name__
        assert 1 <= counter.graphs <= 3 and counter.max_conds_per_call == 0, counter.conds_per_graph
        assert _gap(compiled, eager) <= 1e-6, type(config).__name__
        torch._dynamo.reset()


@pytest.mark.parametrize("method", ["mag", "taylor"])
def test_a_planned_reuse_of_a_non_finite_value_is_counted(method: str) -> None:
    """A NaN inside the first attention at call 0 reaches MagCache's residual and TaylorSeer's factors; a planned
    skip or forecast cannot be refused without a branch on data, so it is counted in `nonfinite` (0 without)."""
    tc = case("flux")
    counts = []
    for poison in (False, True):
        model = copy.deepcopy(tc.model.eval())
        fd.enable_cache(model, _config(method, "flux"))
        first = next(m for n, m in model.named_modules() if n.endswith(".attn"))
        handle = first.to_out[0].register_forward_hook(nan_once_hook()) if poison else None
        denoise(model, tc, TIMESTEPS, ("cond",))
        counts.append(int(fd.cache_state(model, "cond")["nonfinite"]))
        if handle is not None:
            handle.remove()
    assert counts[0] == 0 and counts[1] >= 1, counts


@pytest.mark.parametrize(("name", "method"), [("flux", "taylor"), ("cogvideox", "mag")])
def test_inductor_fullgraph_matches_diffusers(name: str, method: str, dynamo) -> None:
    """The same bar with inductor itself (the other compiled cases capture with aot_eager)."""
    tc = case(name)
    tc.model.eval()
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    theirs = copy.deepcopy(tc.model)
    theirs.enable_cache(_config(method, name))
    reference = denoise(theirs, tc, TIMESTEPS, contexts)
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, _config(method, name))
    counter = CompileCounter("inductor")
    compiled = denoise(torch.compile(ours, fullgraph=True, backend=counter), tc, TIMESTEPS, contexts)
    assert max(float((a - b).abs().max()) for a, b in zip(compiled, reference)) <= 1e-4
    assert dynamo.graph_breaks == 0 and 1 <= counter.graphs <= 3 and counter.max_conds_per_call == 0


def test_calls_outside_any_cache_context_are_planned_eagerly_and_refused_compiled() -> None:
    """Some pipelines (Bria, GLM-Image, NucleusMoE-Image, ChronoEdit, Framepack, SANA-WM) call the transformer
    outside any cache_context. Run eagerly, each call is planned as its own entry of the default context:
    MagCache equals diffusers' hook (which runs without a context), TaylorSeer equals itself run with contexts.
    Compiled, a call cannot plan without recompiling every call: refused, naming cache_context."""
    import contextlib

    tc = case("flux")
    tc.model.eval()

    def no_context(name: str):
        return contextlib.nullcontext()

    uncached = denoise(copy.deepcopy(tc.model), tc, TIMESTEPS, ("cond",), no_context)
    theirs = copy.deepcopy(tc.model)
    theirs.enable_cache(_config("mag", "flux"))
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, _config("mag", "flux"))
    got = denoise(ours, tc, TIMESTEPS, ("cond",), no_context)
    assert _gap(got, denoise(theirs, tc, TIMESTEPS, ("cond",), no_context)) <= 1e-5
    assert _gap(got, uncached) > 1e-5 and fd.decided_on(ours) == "host"

    with_contexts = copy.deepcopy(tc.model)
    fd.enable_cache(with_contexts, _config("taylor", "flux"))
    fd.enable_cache(ours_t := copy.deepcopy(tc.model), _config("taylor", "flux"))
    assert _gap(denoise(ours_t, tc, TIMESTEPS, ("cond",), no_context),
                denoise(with_contexts, tc, TIMESTEPS, ("cond",))) == 0.0

    fd.reset_cache(ours)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="cache_context"):
        denoise(compiled, tc, TIMESTEPS[:1], ("cond",), no_context)
@pytest.mark.parametrize("name", ["ltx2", "kandinsky6"])
def test_magcache_skips_the_audio_stream_with_its_own_residual(name: str) -> None:
    """LTX-2 and Kandinsky 6 return audio next to the video, from the blocks' second stream: on a skipped step both
    streams get their residual from the last computed step (diffusers' rule passes the second stream through, as
    for text, which would return undenoised audio). Against forward hooks written here, both outputs."""
    from fastcache.diffusers._families import block_io
    from fastcache.diffusers._planned import mag_cache_blocks
    from fastcache.diffusers._runtime import _as_output, _input_streams, _positions, _streams
    from fastcache.methods import mag_cache

    tc = case(name)
    tc.model.eval()
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    config = _config("mag", name)
    plan = mag_cache.skips(fd.to_fastcache_config(config), STEPS)
    assert any(plan), plan

    def run(model: torch.nn.Module, step: list[int], cached: bool = False) -> list[tuple[torch.Tensor, ...]]:
        x, outs = tc.latent.clone(), []
        for i, t in enumerate(TIMESTEPS):
            step[0] = i
            with torch.no_grad(), (model.cache_context(contexts[0]) if cached else contextlib.nullcontext()):
                video, sound = model(**tc.kwargs(x, t), return_dict=False)
            outs.append((video, sound))
            x = x - 0.05 * video
        return outs

    reference, step, mem = copy.deepcopy(tc.model), [0], {}
    blocks = [block for _, block in mag_cache_blocks(reference)]
    for index, block in enumerate(blocks):
        io, positions = block_io(block), _positions(block)

        def forward(*args, _orig=block.forward, _io=io, _pos=positions, _head=index == 0, _index=index, **kwargs):
            ins = _input_streams(_io, _pos, args, kwargs)
            if plan[step[0]]:
                return _as_output(_io, tuple(a + r for a, r in zip(ins, mem["res"])) if _head else ins)
            if _head:
                mem["start"] = ins
            out = _orig(*args, **kwargs)
            if _index == len(blocks) - 1:
                mem["res"] = tuple(o - s for o, s in zip(_streams(_io, out), mem["start"]))
            return out

        block.forward = forward
    expected = run(reference, step)
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, config)
    got = run(ours, [0], cached=True)
    uncached = run(copy.deepcopy(tc.model), [0])
    for kind in (0, 1):  # video, audio
        assert _gap([o[kind] for o in got], [e[kind] for e in expected]) <= 1e-5, kind
        assert _gap([o[kind] for o in got], [u[kind] for u in uncached]) > 1e-5, kind
