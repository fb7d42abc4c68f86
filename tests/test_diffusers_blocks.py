"""The drop-in's DBCache and TeaCache (methods diffusers lacks) on diffusers transformers and pipelines.

Oracles: cache-dit 1.5.3 itself on the tiny Flux (`cache_dit.enable_cache(transformer, ...)`, step by step, exact);
on every family, a host-side transcription of each rule written with forward hooks on the uncached model
(`_reference_model`, on `tests/_block_reference.py`). Compile: fullgraph with 0 breaks on Flux, Wan and CogVideoX,
one torch.cond per call (none on the calls planned on the host: DBCache's warm-up, TeaCache's last step), outputs
equal to eager.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._families import FAMILIES, coverage  # noqa: E402
from fastcache.diffusers._runtime import SESSION_ATTR  # noqa: E402
from fastcache.diffusers._segments import block_roles, teacache_input, teacache_input_kind  # noqa: E402
from fastcache.diffusers._tiny import CASES, TinyCase, case, denoise, observed_threshold  # noqa: E402
from fastcache.testing import CompileCounter  # noqa: E402
from tests._block_reference import reference_model, relative_change  # noqa: E402
from tests._families import family  # noqa: E402

TIMESTEPS = torch.linspace(1000, 0, 10)
IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # TeaCache rescaling rel -> rel: thresholds in the tiny models' own units


def _contexts(tc: TinyCase) -> tuple[str, ...]:
    return ("cond_uncond",) if tc.cfg_batched else ("cond",)


def _num_blocks(tc: TinyCase) -> int:
    return len(block_roles(tc.model, FAMILIES[type(tc.model).__name__], 1, 0))


def _dbcache(tc: TinyCase, contexts: tuple[str, ...], **fields) -> fd.DBCacheConfig:
    """F1, B1 where the model has more than 2 blocks, 2 warm-up steps, and a threshold between two of the tiny
    model's observed ratios (random weights give no natural scale)."""
    never = fd.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.0,
                             max_warmup_steps=0)
    threshold = observed_threshold(tc, never, lambda state: [float(state["ratio"])], TIMESTEPS, contexts)
    base = dict(Fn_compute_blocks=1, Bn_compute_blocks=1 if _num_blocks(tc) > 2 else 0,
                residual_diff_threshold=threshold, max_warmup_steps=2)
    return fd.DBCacheConfig(**{**base, **fields})


def _teacache(tc: TinyCase, contexts: tuple[str, ...]) -> fd.TeaCacheConfig:
    never = fd.TeaCacheConfig(threshold=0.0, coefficients=IDENTITY)
    threshold = observed_threshold(tc, never, lambda state: state["rel"].tolist(), TIMESTEPS, contexts, 0.6)
    return fd.TeaCacheConfig(threshold=threshold, coefficients=IDENTITY)


# -- cache-dit itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fn", "bn", "order"), [(1, 0, 0), (2, 1, 0), (1, 1, 1), (1, 2, 2)])
def test_dbcache_equals_cache_dit_on_flux(fn: int, bn: int, order: int) -> None:
    """cache-dit 1.5.3 on the tiny Flux transformer (its own patched blocks and context manager, TaylorSeer as its
    calibrator on both streams) against fastcache's drop-in: equal outputs at every step, and both cached."""
    cache_dit = pytest.importorskip("cache_dit")
    from cache_dit import TaylorSeerCalibratorConfig

    tc = case("flux")
    tc.model.eval()
    config = _dbcache(tc, ("cond",), Fn_compute_blocks=fn, Bn_compute_blocks=bn, taylorseer_order=order)
    theirs_model = copy.deepcopy(tc.model)
    fields = dict(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=config.residual_diff_threshold,
                  max_warmup_steps=config.max_warmup_steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    cache_dit.enable_cache(theirs_model, cache_config=cache_dit.DBCacheConfig(**fields), calibrator_config=calibrator)
    theirs = denoise(theirs_model, tc, TIMESTEPS, set_context=lambda name: contextlib.nullcontext())
    ours_model = copy.deepcopy(tc.model)
    fd.enable_cache(ours_model, config)
    ours = denoise(ours_model, tc, TIMESTEPS)
    computed = int(fd.cache_state(ours_model, "cond")["num_computed"])
    uncached = denoise(tc.model, tc, TIMESTEPS)
    assert 2 < computed < len(TIMESTEPS)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, uncached)) > 1e-4


# -- every family against a host-side transcription ---------------------------------------------------------------

def _reference_model(tc: TinyCase, config) -> torch.nn.Module:
    """The rule of `config`, decided on the host (`tests/_block_reference.py`): DBCache compares the front residual
    with the last computed call's and applies cache-dit's counters; TeaCache accumulates the relative change of
    block 0's modulated input per sample (numpy's polyval) and skips while every sample stays under the
    threshold."""
    mem: dict = {"ref": None, "count": 0, "cached": 0, "streak": 0, "acc": None}

    def decide_dbcache(residual: torch.Tensor) -> bool:
        step, ref = mem["count"], mem["ref"]
        mem["count"] += 1
        warm = step < config.max_warmup_steps and step % config.warmup_interval == 0
        skip = (not warm and ref is not None and relative_change(residual, ref) < config.residual_diff_threshold
                and (config.max_cached_steps < 0 or mem["cached"] < config.max_cached_steps)
                and (config.max_continuous_cached_steps < 0 or mem["streak"] < config.max_continuous_cached_steps))
        mem["cached"] += skip
        mem["streak"] = mem["streak"] + 1 if skip else 0
        if not skip:
            mem["ref"] = residual
        return skip

    def decide_teacache(block, io, positions, args, kwargs) -> bool:
        modulated = teacache_input(block, teacache_input_kind(block), io, positions, args, kwargs)
        previous, mem["ref"] = mem["ref"], modulated
        if previous is None:
            mem["acc"] = np.zeros(modulated.shape[0])
            return False
        m, p = modulated.double().flatten(1), previous.double().flatten(1)
        rel = ((m - p).abs().mean(1) / p.abs().mean(1)).numpy()
        total = mem["acc"] + np.polyval(config.coefficients, rel)
        skip = bool((total < config.threshold).all())
        mem["acc"] = total if skip else np.zeros_like(total)
        return skip

    if isinstance(config, fd.TeaCacheConfig):
        return reference_model(tc, 0, 0, decide_before=decide_teacache)
    return reference_model(tc, config.Fn_compute_blocks, config.Bn_compute_blocks, decide_after=decide_dbcache)


BLOCK_METHODS = [(n, m) for n in CASES for m in ("DBCache", "TeaCache")
                 if not coverage(family(n))[m].startswith("no")]


@pytest.mark.parametrize(("name", "method"), BLOCK_METHODS, ids=[f"{n}-{m}" for n, m in BLOCK_METHODS])
def test_every_family_equals_the_host_transcription(name: str, method: str) -> None:
    tc = case(name)
    tc.model.eval()
    contexts = _contexts(tc)
    config = _dbcache(tc, contexts) if method == "DBCache" else _teacache(tc, contexts)
    model = copy.deepcopy(tc.model)
    fd.enable_cache(model, config)
    skipped: list[bool] = []
    ours = denoise(model, tc, TIMESTEPS, contexts,
                   observe=lambda i: skipped.append(bool(fd.cache_state(model, contexts[0])["skipped"])))
    reference = denoise(_reference_model(tc, config), tc, TIMESTEPS, contexts,
                        set_context=lambda name: contextlib.nullcontext())
    assert any(skipped) and not all(skipped), f"{name} {method}: decisions {skipped} must mix skip and compute"
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, s=step: f"{name} {method} step {s}: {m}")


def test_teacache_reads_flux_block_0_modulated_input_as_teacache_does() -> None:
    """TeaCache's FLUX port: `transformer_blocks[0].norm1(hidden_states, emb=temb)[0]`, captured here by a hook on
    the block's norm, is what the drop-in keeps as the previous modulated input."""
    tc = case("flux")
    model = copy.deepcopy(tc.model).eval()
    seen = []
    handle = model.transformer_blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    fd.enable_cache(model, fd.TeaCacheConfig(threshold=0.0))
    with torch.no_grad():
        model(**tc.kwargs(tc.latent, TIMESTEPS[0]), return_dict=False)
    handle.remove()
    assert len(seen) == 2  # the drop-in's read, then the block's own
    torch.testing.assert_close(fd.cache_state(model, None)["previous"], seen[1], atol=0, rtol=0)


# -- compile ---------------------------------------------------------------------------------------------------

COMPILED = [(n, m) for n in ("flux", "wan", "cogvideox") for m in ("DBCache+TaylorSeer", "TeaCache")]


@pytest.mark.parametrize(("name", "method"), COMPILED, ids=[f"{n}-{m}" for n, m in COMPILED])
def test_fullgraph_one_cond_per_call(name: str, method: str, dynamo) -> None:
    """Inductor, fullgraph=True: 0 graph breaks; graphs: the context's first call, the planned calls (DBCache's
    warm-up), and the device-decided ones; one torch.cond on each device-decided call (a host sync on a GPU), none
    on the others; outputs equal to eager; a second generation recompiles nothing."""
    tc = case(name)
    model = copy.deepcopy(tc.model).eval()
    contexts = ("cond", "uncond") if name == "wan" else _contexts(tc)
    config = (_dbcache(tc, contexts, taylorseer_order=1) if method.startswith("DBCache")
              else _teacache(tc, contexts))
    fd.enable_cache(model, config)
    eager = denoise(model, tc, TIMESTEPS, contexts)
    computed = int(fd.cache_state(model, contexts[0])["num_computed"])
    fd.reset_cache(model)
    counter = CompileCounter("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    outs = denoise(compiled, tc, TIMESTEPS, contexts)
    graphs = counter.graphs
    fd.reset_cache(model)
    again = denoise(compiled, tc, TIMESTEPS, contexts)
    assert 1 < computed < len(TIMESTEPS)
    assert dynamo.graph_breaks == 0
    assert graphs == (3 if method.startswith("DBCache") else 2), graphs
    assert counter.graphs == graphs, "the second generation recompiled"
    planned = len(contexts) * (config.max_warmup_steps if method.startswith("DBCache") else 1)  # incl. first calls
    per_call = counter.conds_per_call[:len(TIMESTEPS) * len(contexts)]
    assert per_call.count(0) == planned and max(per_call) == 1, per_call
    for a, b, c in zip(eager, outs, again, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


# -- pipelines and bad input ------------------------------------------------------------------------------------

def test_teacache_in_a_pipeline_computes_the_first_and_last_steps(dynamo) -> None:
    """In a pipeline the last step is known on the host (its scheduler): a threshold that skips everything else
    still computes the first and the last step of each context (TeaCache's rule), with Wan's CFG as two calls;
    compiled fullgraph, those calls take no torch.cond and every other call one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=copy.deepcopy(case("wan").model).eval())
    fd.enable_cache(pipe, fd.TeaCacheConfig(threshold=1e6, coefficients=IDENTITY))
    counter = CompileCounter("eager")
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counter)
    skipped: dict[str, list[bool]] = {"cond": [], "uncond": []}

    def record(p, step, timestep, kwargs):
        for name, flags in skipped.items():
            flags.append(bool(fd.cache_state(p.transformer, name)["skipped"]))
        return kwargs

    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, guidance_scale=3.0, num_frames=5, height=64, width=64,
         num_inference_steps=6, output_type="latent", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=record)
    fd.disable_cache(pipe)
    for flags in skipped.values():
        assert flags == [False, True, True, True, True, False], skipped
    assert dynamo.graph_breaks == 0
    assert counter.conds_per_call == [0, 0] + [1] * 8 + [0, 0], counter.conds_per_call


def test_dbcache_blocks_out_of_range_are_refused_before_any_compute() -> None:
    model = copy.deepcopy(case("wan").model)
    with pytest.raises(ValueError, match=r"Fn_compute_blocks \+ Bn_compute_blocks: 2 \+ 1 leaves none"):
        fd.enable_cache(model, fd.DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1))
    # every block always computed (tiny Wan has 2): nothing to cache, refused (it failed on the second call)
    with pytest.raises(ValueError, match=r"Fn_compute_blocks \+ Bn_compute_blocks: 1 \+ 1 leaves none"):
        fd.enable_cache(model, fd.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1))
    assert SESSION_ATTR not in vars(model) and "forward" not in vars(model)
    with pytest.raises(ValueError, match="residual_diff_threshold"):
        fd.DBCacheConfig(residual_diff_threshold=float("nan"))
    with pytest.raises(ValueError, match="coefficients"):
        fd.TeaCacheConfig(coefficients=(1.0, 2.0))
    with pytest.raises(TypeError, match="calibrate"):
        fd.TeaCacheConfig(calibrate=1)


# -- calibration -------------------------------------------------------------------------------------------------

def _wan_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=transformer)


def _run_wan(pipe, seed: int, steps: int = 5) -> torch.Tensor:
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(seed))
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, guidance_scale=3.0, num_frames=5, height=64,
                width=64, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def _reference_pairs(transformer: torch.nn.Module, run) -> tuple[np.ndarray, np.ndarray]:
    """TeaCache's calibration written with hooks on the uncached model: Wan's modulated input is block 0's `temb`
    argument (TeaCache's Wan port); consecutive calls alternate cond and uncond, so each is paired with the call
    two before it, within one pipeline call."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: dict[str, torch.Tensor] = {}
    pre = transformer.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(temb=(kwargs.get("temb", args[2] if len(args) > 2 else None))),
        with_kwargs=True)
    post = transformer.register_forward_hook(lambda m, args, out: calls.append((seen["temb"], out[0])))
    xs, ys = [], []
    for seed in (0, 1):
        calls.clear()
        run(seed)
        for (m, o), (m_prev, o_prev) in zip(calls[2:], calls[:-2]):
            xs.append(relative_change(m, m_prev))
            ys.append(relative_change(o, o_prev))
    pre.remove()
    post.remove()
    return np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)


def test_teacache_calibration_in_a_pipeline_pairs_calls_per_context_and_generation() -> None:
    """`TeaCacheConfig(calibrate=True)` on a Wan pipeline with CFG, two generations: every step computes (outputs
    equal to the uncached pipeline), and `calibrated_coefficients` is numpy's fit over the pairs a hook-based
    transcription of TeaCache's procedure collects (cond with cond, uncond with uncond, each generation apart):
    the two polynomials agree on every recorded input change."""
    transformer = copy.deepcopy(case("wan").model).eval()
    reference = _wan_pipeline(copy.deepcopy(transformer))
    pipe = _wan_pipeline(transformer)
    fd.enable_cache(pipe, fd.TeaCacheConfig(calibrate=True))
    with pytest.raises(ValueError, match="no pair of consecutive calls"):
        fd.calibrated_coefficients(pipe)
    outs = [_run_wan(pipe, seed) for seed in (0, 1)]
    coefficients = fd.calibrated_coefficients(pipe)
    x, y = _reference_pairs(reference.transformer, lambda seed: _run_wan(reference, seed))
    assert len(x) == 2 * 2 * 4  # generations x contexts x (steps - 1)
    expected = np.polyfit(x, y, 4)
    np.testing.assert_allclose(np.polyval(coefficients, x), np.polyval(expected, x), rtol=1e-3, atol=1e-6)
    for seed, out in zip((0, 1), outs):
        torch.testing.assert_close(out, _run_wan(reference, seed), atol=0, rtol=0)  # nothing skipped
    assert fd.TeaCacheConfig(coefficients=coefficients).coefficients == coefficients
    fd.reset_cache(pipe)
    with pytest.raises(ValueError, match="no pair of consecutive calls"):
        fd.calibrated_coefficients(pipe)
    fd.disable_cache(pipe)
    with pytest.raises(ValueError, match=r"TeaCacheConfig\(calibrate=True\)"):
        fd.calibrated_coefficients(pipe)


def test_magcache_calibration_through_a_pipeline_keeps_its_ratios() -> None:
    """A pipeline's context states end with its call: the last call's stay readable for `calibrated_ratios`."""
    pipe = _wan_pipeline(copy.deepcopy(case("wan").model).eval())
    fd.enable_cache(pipe, fd.MagCacheConfig(calibrate=True, num_inference_steps=5))
    _run_wan(pipe, 0)
    for name in ("cond", "uncond"):
        tensor, values = fd.calibrated_ratios(pipe.transformer, name)
        assert tensor.shape == (5,) and values[0] == 1.0 and len(set(values)) > 1
