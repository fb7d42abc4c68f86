"""MagCache and TaylorSeer in the engine: their plans against transcriptions of diffusers' hooks (property
tests), and their steps on the reference DiT: compiled = eager with 0 conds and one graph per step variant,
interleaving, saving, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcache
from fastcache.methods import mag_cache, taylorseer
from fastcache.models.dit import cfg_inputs, sampling_timesteps
from fastcache.testing import CompileCounter
from tests.test_engine import LABELS, NULL, denoise, max_diff, noise, tiny_dit

STEPS = 10
PLANNED = {
    "mag": lambda: fastcache.MagCacheConfig(mag_ratios=[1.0, 1.02, 1.01, 1.0, 0.99, 1.0, 1.01, 0.98, 0.99, 1.0],
                                            num_inference_steps=STEPS, retention_ratio=0.1),
    "taylor": lambda: fastcache.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=2,
                                                      taylor_factors_dtype=torch.float32),
    "taylor-lite": lambda: fastcache.TaylorSeerCacheConfig(use_lite_mode=True, cache_interval=3,
                                                           disable_cache_before_step=2),
}


# -- plans ---------------------------------------------------------------------------------------------------

def test_doc_examples() -> None:
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    flux = fastcache.make(fastcache.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS)).plan(range(28))
    assert str(flux) == "blocks: CCCCCCSCSCSSSCSSSCSSSCSSCSCC"
    assert str(fastcache.make(fastcache.TaylorSeerCacheConfig()).plan(range(20))) == "forecast: CCCPCPPPPCPPPPCPPPPC"


def mag_transcription(ratios: list[float], steps: int, threshold: float, max_skip: int, retention: float) -> str:
    """diffusers' MagCacheHeadHook, step by step, in float32 arithmetic (numpy), with its own resampling."""
    if len(ratios) != steps:
        scale = (len(ratios) - 1) / (steps - 1) if steps > 1 else 0.0
        ratios = [ratios[int(np.round(np.float32(i) * np.float32(scale)))] for i in range(steps)] if steps > 1 \
            else ratios[-1:]
    row, residual = "", False
    acc_ratio, acc_steps, acc_err = np.float32(1.0), 0, np.float32(0.0)
    for step in range(steps):
        skip = False
        if step >= int(retention * steps + 0.5):
            acc_ratio = np.float32(acc_ratio * np.float32(ratios[step]))
            acc_steps += 1
            acc_err = np.float32(acc_err + np.float32(abs(np.float32(1.0) - acc_ratio)))
            skip = residual and acc_err <= np.float32(threshold) and acc_steps <= max_skip
            if not skip:
                acc_ratio, acc_steps, acc_err = np.float32(1.0), 0, np.float32(0.0)
        residual = residual or not skip
        row += "S" if skip else "C"
    return row


@settings(max_examples=150, deadline=None)
@given(ratios=st.lists(st.floats(0.75, 1.25, width=32), min_size=2, max_size=40), steps=st.integers(2, 40),
       threshold=st.floats(0.0, 0.3), max_skip=st.integers(1, 5), retention=st.floats(0.0, 0.6))
def test_mag_plan_equals_the_transcription(ratios, steps, threshold, max_skip, retention) -> None:
    config = fastcache.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps, threshold=threshold,
                                      max_skip_steps=max_skip, retention_ratio=retention)
    row = fastcache.make(config).plan(range(steps)).rows["blocks"]
    assert row == mag_transcription(ratios, steps, threshold, max_skip, retention)
    assert row[0] == "C" and "S" * (max_skip + 1) not in row
    assert "S" not in row[:int(retention * steps + 0.5)]


@settings(max_examples=150, deadline=None)
@given(interval=st.integers(1, 6), before=st.integers(1, 6), after=st.one_of(st.none(), st.integers(0, 30)),
       order=st.integers(0, 3), steps=st.integers(1, 30))
def test_taylorseer_plan_follows_diffusers_rule(interval, before, after, order, steps) -> None:
    config = fastcache.TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                             disable_cache_after_step=after, max_order=order)
    plan = fastcache.make(config).plan(range(steps))
    last, held = None, 0
    for step, d in enumerate(plan):
        compute = step < before or (step - before - 1) % interval == 0 or (after is not None and step >= after)
        assert d.compute == compute
        if compute:
            grown = 0 if last is None else min(held, order)  # each update can add one order, up to max_order
            assert d.grows.tolist() == [j < grown for j in range(order)]
            assert float(d.delta) == (1.0 if last is None else step - last)
            last, held = step, 1 + grown
        else:
            k = step - last
            expected = [k ** j / math.factorial(j) if j < held else 0.0 for j in range(order + 1)]
            assert d.coefficients.tolist() == pytest.approx(expected)


# -- steps ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("name", PLANNED)
def test_compiled_fullgraph_equals_eager_with_no_cond(name: str, video: bool, dynamo) -> None:
    model, config = tiny_dit(video), PLANNED[name]()
    method = fastcache.make(config)
    with torch.no_grad():
        eager, _ = denoise(model, config, noise(video, 0), STEPS)
        uncached, _ = denoise(model, fastcache.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1), noise(video, 0), STEPS)
        counter = CompileCounter("aot_eager")
        step = torch.compile(lambda s, i, d: method.step(model, s, i, d), fullgraph=True, backend=counter)
        compiled, _ = denoise(model, config, noise(video, 0), STEPS, step_fn=step)
    plan = method.plan(sampling_timesteps(STEPS))
    assert dynamo.graph_breaks == 0 and counter.max_conds_per_call == 0
    assert 1 <= counter.graphs <= plan.variants() <= 2, str(plan)
    assert max_diff(eager, compiled) <= 1e-6
    assert max_diff(eager, uncached) > 1e-4  # it cached something
    assert 0 < method.computed_fraction(model, cfg_inputs(noise(video, 0), 500.0, LABELS, NULL), plan) < 1


@pytest.mark.parametrize("name", PLANNED)
def test_interleaved_generations_and_a_saved_state(name: str, tmp_path) -> None:
    model, config = tiny_dit(), PLANNED[name]()
    method = fastcache.make(config)
    timesteps = sampling_timesteps(STEPS)
    plan = method.plan(timesteps)
    xs = [noise(False, 0), noise(False, 1)]
    with torch.no_grad():
        alone = [denoise(model, config, x, STEPS)[0] for x in xs]
        states = [method.init(model, cfg_inputs(x, timesteps[0], LABELS, NULL)) for x in xs]
        together: list[list[torch.Tensor]] = [[], []]
        for i, t in enumerate(timesteps):
            for g in (0, 1):
                out, states[g] = method.step(model, states[g], cfg_inputs(xs[g], t, LABELS, NULL), plan[i])
                together[g].append(out)
                u, c = out.chunk(2)
                t_next = timesteps[i + 1] if i + 1 < STEPS else torch.tensor(0.0)
                xs[g] = xs[g] + (t_next - t) / 1000 * (u + 3.0 * (c - u))
        assert all(max_diff(a, b) == 0.0 for a, b in zip(alone, together))
        torch.save(states[0], tmp_path / "state.pt")
        loaded = fastcache.load_state(tmp_path / "state.pt")
        nxt = cfg_inputs(noise(False, 0), 100.0, LABELS, NULL)
        assert method.step(model, loaded, nxt, plan[-1])[0].equal(method.step(model, states[0], nxt, plan[-1])[0])


def test_magcache_calibration_records_each_step_ratio() -> None:
    """calibrate=True computes every step and records mean(||r_t|| / (||r_t-1|| + eps)) per step, as data."""
    model = tiny_dit()
    config = fastcache.MagCacheConfig(calibrate=True, num_inference_steps=STEPS)
    method = fastcache.make(config)
    residuals = []
    block0 = model.block

    def recording(index, streams, aux, attend):
        if index == 0:
            residuals.append(streams[0])
        out = block0(index, streams, aux, attend)
        if index == model.num_blocks - 1:
            residuals[-1] = out[0] - residuals[-1]
        return out

    with torch.no_grad():
        state = method.init(model, cfg_inputs(noise(False, 0), 1000.0, LABELS, NULL))
        model.block = recording
        _, state = denoise(model, config, noise(False, 0), STEPS)
    tensor, values = mag_cache.calibrated_ratios(state)
    assert str(method.plan(range(STEPS))) == "blocks: " + "C" * STEPS
    real = residuals[-STEPS:]  # the last STEPS calls (earlier entries are init's traces, on fake tensors)
    expected = [1.0] + [float((torch.linalg.vector_norm(r.double(), dim=-1)
                               / (torch.linalg.vector_norm(p.double(), dim=-1) + 1e-8)).mean())
                        for p, r in zip(real[:-1], real[1:])]
    torch.testing.assert_close(tensor.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert len(values) == STEPS and values[0] == 1.0


@pytest.mark.parametrize("kwargs, error, field", [
    ({}, ValueError, "mag_ratios"),
    ({"mag_ratios": [1.0, float("nan")]}, ValueError, "mag_ratios"),
    ({"mag_ratios": [1.0], "max_skip_steps": 0}, ValueError, "max_skip_steps"),
    ({"mag_ratios": [1.0], "retention_ratio": 1.5}, ValueError, "retention_ratio"),
])
def test_bad_magcache_configs_are_named(kwargs, error, field) -> None:
    with pytest.raises(error, match=field):
        fastcache.MagCacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, field", [
    ({"max_order": -1}, ValueError, "max_order"),
    ({"cache_interval": 0}, ValueError, "cache_interval"),
    ({"taylor_factors_dtype": "bfloat16"}, TypeError, "taylor_factors_dtype"),
    ({"taylor_factors_dtype": torch.int32}, TypeError, "taylor_factors_dtype"),
    ({"cache_identifiers": "attn"}, TypeError, "cache_identifiers"),
])
def test_bad_taylorseer_configs_are_named(kwargs, error, field) -> None:
    with pytest.raises(error, match=field):
        fastcache.TaylorSeerCacheConfig(**kwargs)


def test_planned_methods_refuse_a_missing_or_foreign_decision_and_a_wrong_step_count() -> None:
    model = tiny_dit()
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    mag = fastcache.make(PLANNED["mag"]())
    with pytest.raises(ValueError, match="num_inference_steps"):
        mag.plan(range(STEPS + 1))
    with torch.no_grad():
        state = mag.init(model, inputs)
        with pytest.raises(TypeError, match="plan"):
            mag.step(model, state, inputs, None)
        skip = next(d for d in mag.plan(range(STEPS)) if d.skip)
        with pytest.raises(ValueError, match=r"plan\[0\]"):
            mag.step(model, state, inputs, skip)
    taylor = fastcache.make(PLANNED["taylor"]())
    with torch.no_grad(), pytest.raises(TypeError, match="plan"):
        taylor.step(model, taylor.init(model, inputs), inputs, mag.plan(range(STEPS))[0])
    with pytest.raises(ValueError, match="forecasts before any step computed"):
        taylorseer.decisions(fastcache.TaylorSeerCacheConfig(disable_cache_before_step=0, cache_interval=3), 3)


@pytest.mark.parametrize("name", ["mag", "taylor"])
def test_a_planned_reuse_of_a_non_finite_value_is_counted(name: str) -> None:
    """A NaN in call 0's blocks reaches MagCache's residual and TaylorSeer's factors; the plan cannot refuse the
    reuse without a branch on data, so each skip or forecast over it is counted in `nonfinite` (0 otherwise)."""
    from tests.test_engine import _poison_first_attention

    config = PLANNED[name]()
    method = fastcache.make(config)
    plan = method.plan(range(STEPS))
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    counts = []
    for poison in (False, True):
        model = tiny_dit()
        with torch.no_grad():
            state = method.init(model, inputs)
            if poison:
                _poison_first_attention(model)
            for d in plan:
                _, state = method.step(model, state, inputs, d)
        counts.append(int(state.nonfinite))
    assert counts[0] == 0 and counts[1] >= 1
