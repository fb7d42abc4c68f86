"""Planned schedules: the documented examples, invariants over random configs, and diffusers' own hooks as
the oracle for every decision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcache
from fastcache.methods import faster_cache, pyramid_attention_broadcast

TIMESTEPS = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]


def test_pab_examples_from_the_semantics_doc() -> None:
    for n, expected in ((2, "CCCRCRCRCC"), (3, "CCCCRRCRRC")):
        cfg = fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n)
        assert fastcache.make(cfg).plan(TIMESTEPS).rows == {"spatial": expected}


def test_fastercache_examples_from_the_semantics_doc() -> None:
    plan = fastcache.make(fastcache.FasterCacheConfig()).plan(TIMESTEPS)
    assert plan.rows == {"uncond": "FFFFSFSSSS", "spatial": "CCCCCCCACA"}
    assert str(plan) == "uncond: FFFFSFSSSS\nspatial: CCCCCCCACA"
    # frequency weights: alpha inside the open ranges (99, 901) and (-1, 301), else 1
    assert [float(d.w_low) for d in plan] == pytest.approx([1.0] + [1.1] * 9)
    assert [float(d.w_high) for d in plan] == pytest.approx([1.0] * 7 + [1.1] * 3)
    assert plan.variants() == len({(d.first, d.skip_uncond, d.approx_spatial) for d in plan})


timestep_lists = st.lists(st.integers(-5, 1005), min_size=1, max_size=40)
ranges = st.tuples(st.integers(-10, 1000), st.integers(1, 600)).map(lambda p: (p[0], p[0] + p[1]))
skip_ranges = st.integers(1, 6)


def diffusers_pab_transcription(n: int, lo: float, hi: float, timesteps: list[int]) -> str:
    """diffusers' PyramidAttentionBroadcastHook.new_forward, step by step, with a Python counter."""
    out, cache, iteration = "", None, 0
    for t in timesteps:
        compute = cache is None or iteration == 0 or not (lo < t < hi) or iteration % n == 0
        out += "C" if compute else "R"
        cache = "x"
        iteration += 1
    return out


@settings(max_examples=200, deadline=None)
@given(n=skip_ranges, bounds=ranges, timesteps=timestep_lists)
def test_pab_plan_properties(n: int, bounds: tuple[int, int], timesteps: list[int]) -> None:
    cfg = fastcache.PyramidAttentionBroadcastConfig(cross_attention_block_skip_range=n,
                                                    cross_attention_timestep_skip_range=bounds)
    row = fastcache.make(cfg).plan(timesteps).rows["cross"]
    lo, hi = bounds
    assert row == diffusers_pab_transcription(n, lo, hi, timesteps)
    assert row[0] == "C"  # the first call computes, so every reuse has a computed value behind it
    assert all(c == "C" for c, t in zip(row, timesteps) if not lo < t < hi)
    assert "R" * n not in row  # never more than N-1 reuses in a row


def diffusers_fastercache_transcription(cfg: fastcache.FasterCacheConfig, timesteps: list[int]) -> tuple[str, str]:
    """diffusers' FasterCacheDenoiserHook and FasterCacheBlockHook decisions, with the iteration-0 fix."""
    uncond, spatial = "", ""
    lo, hi = cfg.unconditional_batch_timestep_skip_range
    alo, ahi = cfg.spatial_attention_timestep_skip_range
    for it, t in enumerate(timesteps):
        skip = it > 0 and lo < t < hi and it % cfg.unconditional_batch_skip_range != 0
        uncond += "S" if skip else "F"
        approx = alo < t < ahi and not (it > 0 and it % cfg.spatial_attention_block_skip_range == 0)
        approx = approx and it > 0 and (skip or cfg.is_guidance_distilled)
        spatial += "A" if approx else "C"
    return uncond, spatial


@settings(max_examples=200, deadline=None)
@given(n=skip_ranges, n_uncond=skip_ranges, b_attn=ranges, b_uncond=ranges, timesteps=timestep_lists,
       distilled=st.booleans())
def test_fastercache_plan_properties(n: int, n_uncond: int, b_attn: tuple[int, int], b_uncond: tuple[int, int],
                                     timesteps: list[int], distilled: bool) -> None:
    cfg = fastcache.FasterCacheConfig(
        spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=b_attn,
        unconditional_batch_skip_range=n_uncond, unconditional_batch_timestep_skip_range=b_uncond,
        is_guidance_distilled=distilled)
    plan = fastcache.make(cfg).plan(timesteps)
    uncond, spatial = diffusers_fastercache_transcription(cfg, timesteps)
    assert plan.rows["spatial"] == spatial
    assert plan.rows.get("uncond", uncond if not distilled else None) == (None if distilled else uncond)
    assert plan.rows["spatial"][0] == "C" and "A" * n not in plan.rows["spatial"]
    if not distilled:  # an approximation needs the halved batch of a skip step
        assert all(u == "S" for u, a in zip(uncond, spatial) if a == "A")
    # the frequency weights, transcribed from diffusers' default callbacks: alpha inside the open range, else 1
    for d, t in zip(plan, timesteps):
        (llo, lhi), (hlo, hhi) = (cfg.low_frequency_weight_update_timestep_range,
                                  cfg.high_frequency_weight_update_timestep_range)
        assert float(d.w_low) == pytest.approx(cfg.alpha_low_frequency if llo < t < lhi else 1.0)
        assert float(d.w_high) == pytest.approx(cfg.alpha_high_frequency if hlo < t < hhi else 1.0)
        assert float(d.w_attention) == 0.5


@settings(max_examples=25, deadline=None)
@given(n=skip_ranges, bounds=ranges, timesteps=timestep_lists)
def test_device_decisions_equal_the_plan(n: int, bounds: tuple[int, int], timesteps: list[int]) -> None:
    pab = fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n,
                                                    spatial_attention_timestep_skip_range=bounds)
    fc = fastcache.FasterCacheConfig(spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=bounds)
    pab_plan, fc_plan = fastcache.make(pab).plan(timesteps), fastcache.make(fc).plan(timesteps)
    for i, t in enumerate(timesteps):
        count, tt = torch.tensor(i), torch.tensor(float(t))
        on_device = pyramid_attention_broadcast.decide(pab, count, tt)
        assert tuple(bool(x) for x in on_device) == tuple(pab_plan[i])
        d = faster_cache.decide(fc, count, tt)
        p = fc_plan[i]
        assert (bool(d.first), bool(d.skip_uncond), bool(d.approx_spatial)) == (p.first, p.skip_uncond,
                                                                                p.approx_spatial)
        assert float(d.w_low) == float(p.w_low) and float(d.w_high) == float(p.w_high)


def test_fbc_plan_is_left_to_the_device() -> None:
    plan = fastcache.make(fastcache.FirstBlockCacheConfig()).plan(TIMESTEPS)
    assert list(plan) == [None] * 10 and str(plan) == "blocks: " + "?" * 10


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


@settings(max_examples=30, deadline=None)
@given(n=skip_ranges, bounds=ranges, timesteps=timestep_lists)
def test_pab_plan_equals_diffusers_hook(n: int, bounds: tuple[int, int], timesteps: list[int]) -> None:
    """The installed diffusers hook is the oracle: record when it really calls the attention."""
    hooks = pytest.importorskip("diffusers.hooks.pyramid_attention_broadcast")
    from diffusers.hooks import HookRegistry

    current = {"t": None}
    module = _Counting()
    hook = hooks.PyramidAttentionBroadcastHook(bounds, n, lambda: current["t"])
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "pab")
    observed = ""
    for t in timesteps:
        current["t"] = t
        before = module.calls
        module(torch.ones(1))
        observed += "C" if module.calls > before else "R"
    cfg = fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n,
                                                    spatial_attention_timestep_skip_range=bounds)
    assert fastcache.make(cfg).plan(timesteps).rows["spatial"] == observed


near_bounds = st.tuples(st.sampled_from([100.0, 640.0, 641.0, 681.0, 800.0]),
                        st.floats(-2.0, 2.0, allow_nan=False).map(lambda e: round(e, 6)))


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(near_bounds, min_size=1, max_size=8), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_planned_and_on_device_decisions_agree_near_the_bounds(offsets, dtype) -> None:
    """One rounding rule: timesteps rounded to the dtype they come in, compared in fp32, when planned and on
    the device. Before: PAB (100, 800) at t=100.000001 reused when planned (fp64) and computed on the device
    (fp32); FasterCache at a bf16 t=639 skipped when planned and not on the device (bf16 comparison)."""
    t = torch.tensor([b + e for b, e in offsets], dtype=getattr(torch, dtype))
    count = torch.arange(len(t))
    pab_cfg = fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                        spatial_attention_timestep_skip_range=(100, 800))
    fc_cfg = fastcache.FasterCacheConfig(unconditional_batch_skip_range=2, tensor_format="BCHW")
    pab_plan = pyramid_attention_broadcast.plan(pab_cfg, t)
    fc_plan = faster_cache.plan(fc_cfg, t)
    for i in range(len(t)):
        on_device = pyramid_attention_broadcast.decide(pab_cfg, count[i], t[i])
        assert pab_plan[i].spatial == bool(on_device.spatial), (float(t[i]), i)
        d = faster_cache.decide(fc_cfg, count[i], t[i])
        assert (fc_plan[i].skip_uncond, fc_plan[i].approx_spatial) == (bool(d.skip_uncond), bool(d.approx_spatial))
