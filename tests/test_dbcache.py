"""DBCache (FnBn) and TaylorSeer on DBCache in the engine: the rule against cache-dit 1.5.3 itself and a host
transcription of it, FBC as F1B0, the Taylor bookkeeping, non-finite residuals, bad configs
(compile counts: tests/test_compile.py; generic engine checks: tests/test_engine.py's METHODS)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcache
from fastcache.methods import db_cache
from fastcache.models.dit import cfg_inputs
from tests.test_engine import LABELS, NULL, denoise, max_diff, noise, tiny_dit


def cache_dit_decisions(config: fastcache.DBCacheConfig, ratios: list[float], finite: list[bool]) -> list[bool]:
    """cache_dit 1.5.3's rule, transcribed from `CachedContextManager.can_cache` and `CachedContext.mark_step_begin`
    / `add_cached_step` with Python lists and ints (one context, no CFG split, no mask)."""
    cached_steps: list[int] = []
    continuous = 0
    has_buffer = False
    out = []
    for step, (diff, ok) in enumerate(zip(ratios, finite)):
        if not cached_steps or cached_steps[-1] != step - 1:  # mark_step_begin: a computed step ends a streak
            continuous = 0
        if step in range(0, config.max_warmup_steps, config.warmup_interval):
            can = False
        elif config.max_cached_steps >= 0 and len(cached_steps) >= config.max_cached_steps:
            can = False
        elif config.max_continuous_cached_steps >= 0 and continuous >= config.max_continuous_cached_steps:
            can = False
        elif config.residual_diff_threshold <= 0.0:
            can = False
        elif config.residual_diff_threshold >= 1.0:
            can = has_buffer
        else:
            can = has_buffer and diff < config.residual_diff_threshold
        can = can and ok  # fastcache: never over non-finite residuals
        if can:
            continuous += 1
            cached_steps.append(step)
        else:
            has_buffer = True  # a computed step sets the Fn buffer
        out.append(can)
    return out


def device_decisions(config: fastcache.DBCacheConfig, ratio_at: Callable[[int, list[bool]], torch.Tensor],
                     finite: list[bool]) -> list[bool]:
    """fastcache's rule (`db_cache.cache_rule`, warm-up from the plan) over `len(finite)` calls, with the state
    bookkeeping of `db_cache.step`; `ratio_at(step, skipped so far)` gives each call's relative change."""
    state = fastcache.make(config).init(tiny_dit(), cfg_inputs(noise(False, 0), 500.0, LABELS, NULL))
    warm = set(config.warmup_steps())
    out: list[bool] = []
    for step, ok in enumerate(finite):
        state = state._replace(factors_finite=torch.tensor(ok))
        skip = False
        if step not in warm:
            rule = db_cache.cache_rule(config, state, ratio_at(step, out))
            skip = bool(rule.skip)
            state = state._replace(continuous=rule.continuous, num_cached=rule.num_cached)
        if not skip:
            state = state._replace(num_computed=state.num_computed + 1, continuous=torch.tensor(0))
        state = state._replace(count=state.count + 1)
        out.append(skip)
    return out


@settings(max_examples=150, deadline=None)
@given(ratios=st.lists(st.floats(0, 0.5, width=32), min_size=1, max_size=25),
       finite=st.lists(st.booleans(), min_size=25, max_size=25),
       threshold=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3, 1.0, 1.5]),
       warmup=st.integers(0, 5), interval=st.integers(1, 3), max_cached=st.integers(-1, 6),
       max_continuous=st.integers(-1, 4))
def test_the_rule_equals_a_transcription_of_cache_dit(ratios, finite, threshold, warmup, interval, max_cached,
                                                       max_continuous):
    config = fastcache.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                     max_warmup_steps=warmup, warmup_interval=interval,
                                     max_cached_steps=max_cached, max_continuous_cached_steps=max_continuous)
    finite = finite[:len(ratios)]
    ours = device_decisions(config, lambda step, _: torch.tensor(ratios[step], dtype=torch.float32), finite)
    assert ours == cache_dit_decisions(config, ratios, finite)


CACHE_DIT_CASES = [  # (threshold, warm-up, interval, max cached, max continuous)
    (0.1, 0, 1, -1, -1), (0.15, 3, 1, -1, -1), (0.2, 4, 2, -1, 2), (0.15, 2, 1, 4, -1), (0.3, 1, 1, -1, 1),
    (0.0, 2, 1, -1, -1), (1.0, 3, 2, -1, 3), (0.25, 0, 1, 6, 2),
]


@pytest.mark.parametrize("case", CACHE_DIT_CASES)
def test_the_rule_equals_cache_dit_itself(case) -> None:
    """cache-dit 1.5.3's own `CachedContextManager`, driven the way its DBCache blocks drive it (mark the step,
    `can_cache` on the Fn residual, then `add_cached_step` or `set_Fn_buffer`), against fastcache's rule on the
    same residual tensors (fastcache's reference residual updated on computed calls, its ratio from
    `absmean_rel_diff`)."""
    from cache_dit.caching.cache_contexts.cache_config import DBCacheConfig as CacheDitConfig
    from cache_dit.caching.cache_contexts.cache_manager import CachedContextManager

    from fastcache import kernels

    threshold, warmup, interval, max_cached, max_continuous = case
    kwargs = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                  max_warmup_steps=warmup, warmup_interval=interval, max_cached_steps=max_cached,
                  max_continuous_cached_steps=max_continuous)
    manager = CachedContextManager("fastcache-test")
    manager.new_context(name="c", cache_config=CacheDitConfig(**kwargs))
    manager.set_context("c")
    g = torch.Generator().manual_seed(int(threshold * 100) + warmup)
    base = torch.randn(2, 16, 8, generator=g)
    residuals = [base + torch.rand((), generator=g) ** 2 * 0.4 * torch.randn(2, 16, 8, generator=g) for _ in range(20)]
    theirs = []
    for r in residuals:
        manager.mark_step_begin()
        if manager.can_cache(r, prefix="t_Fn_residual"):
            manager.add_cached_step()
            theirs.append(True)
        else:
            manager.set_Fn_buffer(r, prefix="t_Fn_residual")
            theirs.append(False)

    def ratio_at(step: int, skipped: list[bool]) -> torch.Tensor:  # against the last computed call's residual
        computed = [i for i, skip in enumerate(skipped) if not skip]
        reference = residuals[computed[-1]] if computed else torch.zeros_like(base)
        return kernels.absmean_rel_diff(residuals[step], reference)

    ours = device_decisions(fastcache.DBCacheConfig(**kwargs), ratio_at, [True] * len(residuals))
    assert ours == theirs
    assert any(theirs) or threshold <= 0  # the case exercises caching


def test_fbc_is_f1b0_without_warmup() -> None:
    model = tiny_dit()
    with torch.no_grad():
        fbc, fbc_state = denoise(model, fastcache.FirstBlockCacheConfig(threshold=0.06), noise(False, 0), 12)
        f1b0, db_state = denoise(model, fastcache.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                                max_warmup_steps=0, residual_diff_threshold=0.06),
                                 noise(False, 0), 12)
    assert max_diff(fbc, f1b0) == 0.0
    assert int(fbc_state.num_computed) == int(db_state.num_computed) < 12


@pytest.mark.parametrize("order", [0, 1, 2])
def test_the_last_blocks_always_run_and_the_middle_is_skipped(order: int) -> None:
    """F1B1 on 3 blocks: a cached call runs blocks 0 and 2 and not block 1; the counters add up."""
    model = tiny_dit()
    calls = {i: 0 for i in range(3)}
    block = model.block

    def counting(index, streams, aux, attend):
        calls[index] += 1
        return block(index, streams, aux, attend)

    model.block = counting
    config = fastcache.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2,
                                     residual_diff_threshold=0.3, taylorseer_order=order)
    with torch.no_grad():
        outs, state = denoise(model, config, noise(False, 0), 12)
    computed = int(state.num_computed)
    assert 2 <= computed < 12 and int(state.num_cached) == 12 - computed
    # init traces each block once on fake tensors; then every call runs blocks 0 and 2, block 1 only when computing
    assert calls == {0: 12 + 1, 1: computed + 1, 2: 12 + 1}
    assert all(torch.isfinite(o).all() for o in outs)


def test_taylorseer_bookkeeping_follows_its_update_rule() -> None:
    """Order 2: computes at steps 0 and 3 hold orders 1 then 2; a forecast 2 steps after step 3 weighs them
    1, k = 2 and (order 2 not formed yet) 0; the next compute forms order 2 with delta = steps since step 3."""
    config = fastcache.DBCacheConfig(Fn_compute_blocks=1, taylorseer_order=2)
    model = tiny_dit()
    state = fastcache.make(config).init(model, cfg_inputs(noise(False, 0), 500.0, LABELS, NULL))
    first = db_cache.taylor_decision(config, state, compute=True)
    assert not first.grows.any() and float(first.delta) == 1.0
    state = state._replace(count=torch.tensor(5), last_computed=torch.tensor(3), orders=torch.tensor(2))
    forecast = db_cache.taylor_decision(config, state, compute=False)
    assert forecast.coefficients.tolist() == [1.0, 2.0, 0.0]
    update = db_cache.taylor_decision(config, state, compute=True)
    assert update.grows.tolist() == [True, True] and float(update.delta) == 2.0


def test_taylorseer_forecasts_a_linear_residual_exactly() -> None:
    """With a middle residual that moves linearly in the step, an order-1 forecast reproduces it (a plain
    reuse does not). As in cache-dit, an update before step 3 forms no derivative."""
    config = fastcache.DBCacheConfig(Fn_compute_blocks=1, taylorseer_order=1)
    r0, r1 = torch.full((2, 3), 1.0), torch.full((2, 3), 1.5)
    state = fastcache.make(config).init(tiny_dit(), cfg_inputs(noise(False, 0), 500.0, LABELS, NULL))
    from fastcache.methods import taylorseer

    factors = tuple(torch.zeros(2, 3) for _ in range(2))
    s1 = state._replace(count=torch.tensor(1))
    factors = taylorseer.updated(factors, r0, db_cache.taylor_decision(config, s1, compute=True), None)
    s2 = state._replace(count=torch.tensor(2), last_computed=torch.tensor(1), orders=torch.tensor(1))
    assert not db_cache.taylor_decision(config, s2, compute=True).grows.any()  # cache-dit: not before step 3
    s3 = s2._replace(count=torch.tensor(3))
    factors = taylorseer.updated(factors, r1, db_cache.taylor_decision(config, s3, compute=True), None)
    s5 = state._replace(count=torch.tensor(6), last_computed=torch.tensor(3), orders=torch.tensor(2))
    predicted = taylorseer.forecast(factors, db_cache.taylor_decision(config, s5, compute=False), torch.float32)
    assert torch.allclose(predicted, torch.full((2, 3), 1.5 + 3 * 0.25))


def test_non_finite_middle_residuals_are_never_reused_and_are_counted() -> None:
    config = fastcache.DBCacheConfig(Fn_compute_blocks=1, max_warmup_steps=1, residual_diff_threshold=1.0)
    model = tiny_dit()
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    with torch.no_grad():
        _, state = method.step(model, method.init(model, inputs), inputs, None)
        _, cached = method.step(model, state, inputs, None)
        assert bool(cached.skipped)
        poisoned = state._replace(factors=tuple(tuple(torch.full_like(f, math.nan) for f in fs)
                                                for fs in state.factors), factors_finite=torch.tensor(False))
        out, after = method.step(model, poisoned, inputs, None)
    assert not bool(after.skipped) and int(after.nonfinite) == 1 and torch.isfinite(out).all()


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(Fn_compute_blocks=0), "Fn_compute_blocks"),
    (dict(Bn_compute_blocks=-1), "Bn_compute_blocks"),
    (dict(residual_diff_threshold=-0.1), "residual_diff_threshold"),
    (dict(residual_diff_threshold=math.inf), "residual_diff_threshold"),
    (dict(residual_diff_threshold=math.nan), "residual_diff_threshold"),
    (dict(max_warmup_steps=-1), "max_warmup_steps"),
    (dict(warmup_interval=0), "warmup_interval"),
    (dict(max_cached_steps=-2), "max_cached_steps"),
    (dict(max_continuous_cached_steps=1.5), "max_continuous_cached_steps"),
    (dict(taylorseer_order=3), "taylorseer_order"),
    (dict(taylorseer_order=True), "taylorseer_order"),
])
def test_bad_configs_name_the_field(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        fastcache.DBCacheConfig(**kwargs)


def test_more_compute_blocks_than_the_model_has_is_refused_before_any_compute() -> None:
    model = tiny_dit()  # 3 blocks
    method = fastcache.make(fastcache.DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=2))
    with pytest.raises(ValueError, match="Fn_compute_blocks \\+ Bn_compute_blocks"):
        method.init(model, cfg_inputs(noise(False, 0), 500.0, LABELS, NULL))
    with pytest.raises(TypeError, match="decision"):
        ok = fastcache.make(fastcache.DBCacheConfig(Fn_compute_blocks=1))
        inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
        ok.step(model, ok.init(model, inputs), inputs, True)
