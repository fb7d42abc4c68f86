"""TeaCache in the engine: decisions against host transcriptions of the published rule, fastcache's batch rule,
non-finite values, and bad configs (compile counts: tests/test_compile.py; generic engine checks:
tests/test_engine.py's METHODS)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcache
from fastcache.methods import teacache
from fastcache.models.dit import cfg_inputs, sampling_timesteps
from fastcache.protocol import forward
from tests.test_engine import LABELS, NULL, denoise, max_diff, noise, tiny_dit

LINEAR = (0.0, 0.0, 0.0, 1.0, 0.0)  # rescaling = the raw relative change


def host_rule(coefficients, threshold: float, rels: list[list[float]], forced: list[bool]) -> list[bool]:
    """TeaCache's loop as published (`acc += poly1d(coefficients)(rel)`, skip while `acc < thresh`, the first
    and forced steps compute with `acc = 0`), one accumulator per sample, in float32 like the device, and
    fastcache's batch rule: skip only if every sample may. Returns which calls skipped."""
    poly = np.poly1d(np.asarray(coefficients, dtype=np.float32))
    acc = np.zeros(len(rels[0]), dtype=np.float32)
    skipped = []
    for i, rel in enumerate(rels):
        if i == 0 or forced[i]:
            acc[:] = 0
            skipped.append(False)
            continue
        total = acc + poly(np.asarray(rel, dtype=np.float32)).astype(np.float32)
        skip = bool(np.all(total < np.float32(threshold)))
        acc = total if skip else np.zeros_like(acc)
        skipped.append(skip)
    return skipped


def device_rule(config: fastcache.TeaCacheConfig, rels: list[list[float]], forced: list[bool]) -> list[bool]:
    acc = torch.zeros(len(rels[0]))
    skipped = []
    for i, rel in enumerate(rels):
        if forced[i]:
            acc = torch.zeros_like(acc)
            skipped.append(False)
            continue
        acc, skip, _ = teacache.skip_rule(config, acc, torch.tensor(rel, dtype=torch.float32),
                                          torch.tensor(i > 0), torch.tensor(True))
        skipped.append(bool(skip))
    return skipped


@settings(max_examples=200, deadline=None)
@given(rels=st.lists(st.lists(st.floats(0, 2, width=32), min_size=2, max_size=2), min_size=2, max_size=30),
       threshold=st.floats(0, 3, width=32), coefficients=st.sampled_from([LINEAR, *teacache.COEFFICIENTS.values()]),
       forced_last=st.booleans())
def test_the_device_rule_equals_a_host_transcription_of_teacache(rels, threshold, coefficients, forced_last):
    config = fastcache.TeaCacheConfig(threshold=threshold, coefficients=coefficients)
    forced = [i == 0 or (forced_last and i == len(rels) - 1) for i in range(len(rels))]
    assert device_rule(config, rels, forced) == host_rule(coefficients, threshold, rels, forced)


def test_a_generation_skips_where_the_published_rule_says_on_its_own_modulated_inputs() -> None:
    """End to end: the engine's skips over a 12-step CFG generation equal the host rule applied to the
    modulated inputs recorded from the same calls (float64 relative changes; margins checked)."""
    model, steps = tiny_dit(), 12
    timesteps = sampling_timesteps(steps)
    recorded: list[torch.Tensor] = []
    original = model.modulated_input
    stepping = [False]  # not init's shape-only runs

    def record(streams, aux):
        out = original(streams, aux)
        if stepping[0]:
            recorded.append(out.detach().double())
        return out

    model.modulated_input = record
    for threshold in (0.05, 0.2):
        recorded.clear()
        config = fastcache.TeaCacheConfig(threshold=threshold, coefficients=LINEAR)
        method = fastcache.make(config)
        skipped: list[bool] = []

        def step(state, inputs, decision, method=method, skipped=skipped):
            stepping[0] = True
            out, state = method.step(model, state, inputs, decision)
            stepping[0] = False
            skipped.append(bool(state.skipped))
            return out, state

        with torch.no_grad():
            denoise(model, config, noise(False, 0), steps, step_fn=step)
        rels = [[0.0] * recorded[0].shape[0]] + [
            ((cur - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1)).tolist()
            for prev, cur in zip(recorded, recorded[1:])]
        forced = [i in (0, steps - 1) for i in range(steps)]
        assert skipped == host_rule(LINEAR, threshold, rels, forced)
        assert 0 < sum(skipped) < steps - 2, (threshold, skipped)  # both kinds happen
    del timesteps


def test_a_batch_skips_only_when_every_sample_may() -> None:
    """One sample barely changes, the other a lot: fastcache computes for both (TeaCache's pooled mean would
    skip, serving the changing sample a stale output); each sample keeps its own accumulator."""
    config = fastcache.TeaCacheConfig(threshold=0.5, coefficients=LINEAR)
    acc, yes = torch.zeros(2), torch.tensor(True)
    rel = torch.tensor([0.01, 0.9])
    assert rel.mean() < config.threshold  # the pooled rule would skip
    new, skip, refused = teacache.skip_rule(config, acc, rel, yes, yes)
    assert not skip and not refused and torch.equal(new, torch.zeros(2))
    new, skip, _ = teacache.skip_rule(config, acc, torch.tensor([0.01, 0.2]), yes, yes)
    assert skip and torch.allclose(new, torch.tensor([0.01, 0.2]))  # accumulated per sample


def test_threshold_zero_computes_every_call_and_equals_the_uncached_model() -> None:
    model = tiny_dit()
    config = fastcache.TeaCacheConfig(threshold=0.0, coefficients=LINEAR)
    with torch.no_grad():
        cached, state = denoise(model, config, noise(False, 0), 8)
        uncached, _ = denoise(model, config, noise(False, 0), 8,
                              step_fn=lambda s, i, d: (forward(model, i), s))
    assert int(state.num_computed) == 8
    assert max_diff(cached, uncached) == 0.0


def _state_after_one_call(config: fastcache.TeaCacheConfig):
    model = tiny_dit()
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    with torch.no_grad():
        _, state = method.step(model, method.init(model, inputs), inputs, None)
    return model, method, inputs, state


def test_non_finite_residuals_are_never_reused_and_are_counted() -> None:
    config = fastcache.TeaCacheConfig(threshold=1e6, coefficients=LINEAR)  # would always skip
    model, method, inputs, state = _state_after_one_call(config)
    with torch.no_grad():
        _, skipping = method.step(model, state, inputs, None)
        assert bool(skipping.skipped) and int(skipping.num_computed) == 1
        poisoned = state._replace(residuals=tuple(torch.full_like(r, math.nan) for r in state.residuals),
                                  residuals_finite=torch.tensor(False))
        out, after = method.step(model, poisoned, inputs, None)
    assert not bool(after.skipped) and int(after.num_computed) == 2 and int(after.nonfinite) == 1
    assert torch.isfinite(out).all() and bool(after.residuals_finite)


def test_a_non_finite_modulated_input_makes_the_call_compute() -> None:
    config = fastcache.TeaCacheConfig(threshold=1e6, coefficients=LINEAR)
    model, method, inputs, state = _state_after_one_call(config)
    with torch.no_grad():
        _, after = method.step(model, state._replace(previous_input=torch.full_like(state.previous_input, math.nan)),
                               inputs, None)
    assert not bool(after.skipped) and int(after.num_computed) == 2


def test_the_plan_forces_the_first_and_last_steps() -> None:
    plan = fastcache.make(fastcache.TeaCacheConfig()).plan(range(6))
    assert str(plan) == "blocks: C????C"
    assert [d.force_compute for d in plan] == [True, False, False, False, False, True]
    assert plan.variants() == 2


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(threshold=-0.1), "threshold"),
    (dict(threshold=math.inf), "threshold"),
    (dict(threshold=math.nan), "threshold"),
    (dict(threshold="0.2"), "threshold"),
    (dict(coefficients=(1.0, 2.0, 3.0, 4.0)), "coefficients"),
    (dict(coefficients=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)), "coefficients"),
    (dict(coefficients=(1.0, 2.0, math.inf, 4.0, 5.0)), "coefficients"),
    (dict(coefficients=(1.0, 2.0, True, 4.0, 5.0)), "coefficients"),
    (dict(coefficients="flux-dev-2"), "coefficients"),
    (dict(coefficients=None), "coefficients"),
])
def test_bad_configs_name_the_field(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        fastcache.TeaCacheConfig(**kwargs)


def test_bad_calls_are_refused_before_any_compute() -> None:
    config = fastcache.TeaCacheConfig(coefficients=LINEAR)
    model, method, inputs, state = _state_after_one_call(config)
    with pytest.raises(TypeError, match="decision"):
        method.step(model, state, inputs, True)

    class NoIndicator(type(model)):
        modulated_input = None

    bare = NoIndicator(model.cfg)
    with pytest.raises(TypeError, match="modulated_input"):
        method.init(bare, inputs)


# -- calibration -----------------------------------------------------------------------------------------------

def _generate(model, seeds, steps=12):
    """A CFG Euler loop over `seeds` (one batch) for `teacache.calibrate`."""
    def generate(denoise):
        x = torch.cat([noise(False, s) for s in seeds])
        labels = torch.arange(x.shape[0]) % 10
        timesteps = sampling_timesteps(steps)
        for i, t in enumerate(timesteps):
            u, c = denoise(cfg_inputs(x, t, labels, NULL)).chunk(2)
            t_next = timesteps[i + 1] if i + 1 < steps else torch.tensor(0.0)
            x = x + (t_next - t) / 1000 * (u + 3.0 * (c - u))
    return generate


def _pairs(model, seeds):
    """The (input change, output change) pairs of uncached runs, recorded independently of `calibrate`."""
    xs, ys, previous = [], [], []

    def denoise(inputs):
        streams, aux = model.embed(inputs)
        m, out = model.modulated_input(streams, aux), forward(model, inputs)
        if previous:
            xs.append(teacache.relative_change(m.double(), previous[0].double()))
            ys.append(teacache.relative_change(out.double(), previous[1].double()))
        previous[:] = [m, out]
        return out

    with torch.no_grad():
        _generate(model, seeds)(denoise)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def test_calibration_fits_output_change_better_than_a_published_fit_on_held_out_runs() -> None:
    """The fitted polynomial predicts the output's relative change from the modulated input's on runs it was
    not fitted on: better than FLUX's published coefficients do on this model (what calibration is for)."""
    model = tiny_dit()
    coefficients = teacache.calibrate(model, _generate(model, [0, 1]))
    assert len(coefficients) == 5 and all(math.isfinite(c) for c in coefficients)
    x, y = _pairs(model, [5, 6])  # held out
    fitted = np.abs(np.polyval(coefficients, x) - y).mean()
    flux = np.abs(np.polyval(teacache.COEFFICIENTS["flux"], x) - y).mean()
    assert fitted < 0.5 * flux, (fitted, flux)
    assert fitted < np.abs(y - y.mean()).mean()  # and better than predicting the mean (a weak relation here)


def test_calibration_refuses_models_it_cannot_fit() -> None:
    model = tiny_dit()
    model.num_blocks = 1
    with pytest.raises(ValueError, match="num_blocks"):
        teacache.calibrate(model, _generate(model, [0]))
    model = tiny_dit()
    with pytest.raises(ValueError, match="pairs"):  # one step: no consecutive pair to fit
        teacache.calibrate(model, _generate(model, [0], steps=1))


def test_shipped_digit_coefficients_load_and_the_cli_writes_them(tmp_path) -> None:
    import json

    from fastcache import __main__ as cli
    from fastcache import calibrate

    out = tmp_path / "tea.json"
    assert cli.main(["calibrate", "--model", "image", "--method", "teacache", "--steps", "6", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["method"] == "teacache" and len(written["coefficients"]) == 5
    for kind in ("image", "video"):
        fastcache.TeaCacheConfig(coefficients=calibrate.load_teacache_coefficients(kind))  # valid fits
