"""The engine on the reference DiT: explicit state, interleaving, semantics against step-by-step references,
and bad input. Compile behaviour is in test_compile.py."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

import fastcache
from fastcache.models.dit import DiT, DiTConfig, cfg_inputs, sampling_timesteps
from fastcache.protocol import forward

NULL = 10


def tiny_dit(video: bool = False, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    cfg = DiTConfig(sample_size=8, hidden_size=32, num_heads=2, depth=3, num_frames=3 if video else 1,
                    temporal_attention=video)
    model = DiT(cfg).eval()
    with torch.no_grad():  # the zero-initialised adaLN gates would make every block the identity
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model


def noise(video: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 1, 3, 8, 8) if video else (2, 1, 8, 8), generator=g)


LABELS = torch.tensor([3, 7])

METHODS: dict[str, Callable[[bool], Any]] = {
    "pab": lambda video: fastcache.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=3 if video else None,
        cross_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(100, 900)),
    "fastercache": lambda video: fastcache.FasterCacheConfig(
        temporal_attention_block_skip_range=2 if video else None, tensor_format="BCFHW" if video else "BCHW",
        unconditional_batch_skip_range=3, unconditional_batch_timestep_skip_range=(-1, 900),
        spatial_attention_timestep_skip_range=(-1, 900), temporal_attention_timestep_skip_range=(-1, 900)),
    "fbc": lambda video: fastcache.FirstBlockCacheConfig(threshold=0.06),
    # rescaling = the raw relative change (the published fits are for full-size models)
    "teacache": lambda video: fastcache.TeaCacheConfig(threshold=0.3, coefficients=(0, 0, 0, 1, 0)),
    # F1B1 on the 3-block model, TaylorSeer forecasting the skipped block's residual
    "dbcache": lambda video: fastcache.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2,
                                                     residual_diff_threshold=0.2, max_continuous_cached_steps=3,
                                                     taylorseer_order=1),
}


def denoise(model: DiT, config: Any, x: torch.Tensor, steps: int = 10, step_fn: Callable | None = None,
            device_decisions: bool = False) -> tuple[list[torch.Tensor], Any]:
    """A CFG Euler loop; returns every step's model output and the final state."""
    method = fastcache.make(config)
    timesteps = sampling_timesteps(steps)
    state = method.init(model, cfg_inputs(x, timesteps[0], LABELS, NULL))
    plan = method.plan(timesteps)
    step_fn = step_fn or (lambda s, i, d: method.step(model, s, i, d))
    outs = []
    for i, t in enumerate(timesteps):
        out, state = step_fn(state, cfg_inputs(x, t, LABELS, NULL), None if device_decisions else plan[i])
        outs.append(out)
        u, c = out.chunk(2)
        t_next = timesteps[i + 1] if i + 1 < steps else torch.tensor(0.0)
        x = x + (t_next - t) / 1000 * (u + 3.0 * (c - u))
    return outs, state


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("name", METHODS)
def test_state_keeps_its_structure_and_dtypes(name: str, video: bool) -> None:
    model, config = tiny_dit(video), METHODS[name](video)
    method = fastcache.make(config)
    timesteps = sampling_timesteps(6)
    x = noise(video, 0)
    state = method.init(model, cfg_inputs(x, timesteps[0], LABELS, NULL))
    leaves0, spec0 = tree_flatten(state)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves0)
    plan = method.plan(timesteps)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            _, state = method.step(model, state, cfg_inputs(x, t, LABELS, NULL), plan[i])
            leaves, spec = tree_flatten(state)
            assert spec == spec0
            assert [(x.shape, x.dtype, x.device) for x in leaves] == [(x.shape, x.dtype, x.device) for x in leaves0]
    assert int(state.count) == len(timesteps)


@pytest.mark.parametrize("name", METHODS)
def test_interleaved_generations_equal_sequential_ones(name: str) -> None:
    """Two generations on one model, each with its own state, step by step in turn."""
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    timesteps = sampling_timesteps(8)
    xs = [noise(False, 1), noise(False, 2)]
    with torch.no_grad():
        sequential = [denoise(model, config, x, 8)[0] for x in xs]
        initial = [method.init(model, cfg_inputs(x, timesteps[0], LABELS, NULL)) for x in xs]
        snapshots = [tree_map(torch.clone, s) for s in initial]
        states = list(initial)
        plan = method.plan(timesteps)
        interleaved: list[list[torch.Tensor]] = [[], []]
        for i, t in enumerate(timesteps):
            for k in (0, 1):
                out, states[k] = method.step(model, states[k], cfg_inputs(xs[k], t, LABELS, NULL), plan[i])
                interleaved[k].append(out)
                # same inputs as `denoise` sees: advance x with the same Euler update
                u, c = out.chunk(2)
                t_next = timesteps[i + 1] if i + 1 < 8 else torch.tensor(0.0)
                xs[k] = xs[k] + (t_next - t) / 1000 * (u + 3.0 * (c - u))
    for k in (0, 1):
        assert max_diff(sequential[k], interleaved[k]) == 0.0
    # a state is a value: no step wrote into the initial one, so it can start any number of generations
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(initial), tree_leaves(snapshots)))
    assert max_diff(sequential[0], sequential[1]) > 0  # the two generations really differ


@pytest.mark.parametrize("name", ["pab", "fastercache"])
def test_planned_and_on_device_decisions_give_the_same_outputs(name: str) -> None:
    model, config = tiny_dit(True), METHODS[name](True)
    with torch.no_grad():
        planned, _ = denoise(model, config, noise(True, 0))
        on_device, _ = denoise(model, config, noise(True, 0), device_decisions=True)
    assert max_diff(planned, on_device) == 0.0


# -- step-by-step references written straight from diffusers' rules -------------------------------------

def reference_pab(model: DiT, config: fastcache.PyramidAttentionBroadcastConfig, x: torch.Tensor,
                  steps: int) -> list[torch.Tensor]:
    """Per-site Python counters and caches, like diffusers' hook."""
    kinds = {s.name: s.kind for s in model.cache_sites()}
    caches: dict[str, torch.Tensor] = {}
    counters: dict[str, int] = {}

    def attend_at(t: float) -> Callable[..., Any]:
        def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
            n = config.skip_range(kinds[site])
            if n is None:
                return fn(*args)
            it = counters.get(site, 0)
            lo, hi = config.timestep_range(kinds[site])
            compute = site not in caches or it == 0 or not (lo < t < hi) or it % n == 0
            caches[site] = fn(*args) if compute else caches[site]
            counters[site] = it + 1
            return caches[site]
        return attend

    return _reference_loop(model, x, steps, lambda inputs, t: forward(model, inputs, attend_at(t)))


def _reference_loop(model: DiT, x: torch.Tensor, steps: int,
                    call: Callable[[dict, float], torch.Tensor]) -> list[torch.Tensor]:
    timesteps = sampling_timesteps(steps)
    outs = []
    for i, t in enumerate(timesteps):
        out = call(cfg_inputs(x, t, LABELS, NULL), float(t))
        outs.append(out)
        u, c = out.chunk(2)
        t_next = timesteps[i + 1] if i + 1 < steps else torch.tensor(0.0)
        x = x + (t_next - t) / 1000 * (u + 3.0 * (c - u))
    return outs


def fft_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' split: fftshift over every dim, closed disc of radius min(H, W)//5 at (H//2, W//2)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x))
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = (xx - w // 2) ** 2 + (yy - h // 2) ** 2 <= (min(h, w) // 5) ** 2
    return spectrum * mask, spectrum * ~mask


def reference_fastercache(model: DiT, config: fastcache.FasterCacheConfig, x: torch.Tensor,
                          steps: int) -> list[torch.Tensor]:
    """diffusers' FasterCache denoiser and attention hooks with complex FFT deltas and Python counters."""
    kinds = {s.name: s.kind for s in model.cache_sites()}
    windows: dict[str, list[torch.Tensor]] = {}
    counters: dict[str, int] = {}
    deltas: dict[str, torch.Tensor] = {}
    iteration = 0

    def attend_at(t: float, halved: bool, batch: int) -> Callable[..., Any]:
        def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
            kind = kinds[site]
            n = config.skip_range(kind) if kind != "cross" else None
            if n is None:
                return fn(*args)
            it = counters.get(site, 0)
            lo, hi = config.timestep_range(kind)
            approx = lo < t < hi and not (it > 0 and it % n == 0) and halved
            if approx:
                prev, last = windows[site]
                out = last + (last - prev) * 0.5
            else:
                out = fn(*args)
            kept = out[out.shape[0] // 2:] if not halved else out
            windows[site] = [windows[site][1], kept] if site in windows else [kept, kept]
            counters[site] = it + 1
            return out
        return attend

    def call(inputs: dict, t: float) -> torch.Tensor:
        nonlocal iteration
        lo, hi = config.unconditional_batch_timestep_skip_range
        skip = iteration > 0 and lo < t < hi and iteration % config.unconditional_batch_skip_range != 0
        batch = inputs["x"].shape[0]
        if skip:
            cond = forward(model, {k: v[batch // 2:] for k, v in inputs.items()}, attend_at(t, True, batch))
            lf_lo, lf_hi = config.low_frequency_weight_update_timestep_range
            hf_lo, hf_hi = config.high_frequency_weight_update_timestep_range
            deltas["low"] = deltas["low"] * (config.alpha_low_frequency if lf_lo < t < lf_hi else 1.0)
            deltas["high"] = deltas["high"] * (config.alpha_high_frequency if hf_lo < t < hf_hi else 1.0)
            low_c, high_c = fft_split(cond.float())
            uncond = torch.fft.ifft2(torch.fft.ifftshift(low_c + deltas["low"] + high_c + deltas["high"])).real
            out = torch.cat([uncond.to(cond.dtype), cond])
        else:
            out = forward(model, inputs, attend_at(t, False, batch))
            u, c = out.chunk(2)
            (low_u, high_u), (low_c, high_c) = fft_split(u.float()), fft_split(c.float())
            deltas["low"], deltas["high"] = low_u - low_c, high_u - high_c
        iteration += 1
        return out

    return _reference_loop(model, x, steps, call)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.1, 0.25, 1e9])
@pytest.mark.parametrize("cached_finite", [True, False])
def test_fbc_rule_on_host_is_the_device_rule(threshold, cached_finite):
    """The drop-in, run eagerly, reads FBC's two sums on the host and decides there: the same ratio, skip and
    refusal as the device rule, at the float32 boundaries (0.1 / 1 against 0.1, 1 / 4 against 0.25) too."""
    from fastcache.methods.first_block_cache import skip_from_ratio, skip_from_sums_on_host

    config = fastcache.FirstBlockCacheConfig(threshold=threshold)
    for num, den in [(1.0, 4.0), (0.1, 1.0), (0.0, 0.0), (3.0, 0.0), (0.0, 2.0), (float("inf"), 1.0),
                     (1.0, float("inf")), (float("nan"), 2.0), (1e30, 1e-30), (0.049, 1.0), (0.051, 1.0)]:
        sums = torch.tensor([num, den])
        ratio, skip, refused = skip_from_ratio(config, fastcache.kernels.rel_diff_from_sums(sums), True,
                                               torch.tensor(cached_finite))
        host = skip_from_sums_on_host(config, *sums.tolist(), cached_finite)
        assert (host[1], host[2]) == (bool(skip), bool(refused)), (num, den)
        assert host[0] == ratio.item() or (host[0] != host[0] and ratio.isnan()), (num, den)


def reference_fbc(model: DiT, threshold: float, x: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[bool]]:
    """FirstBlockCache with a host decision (`.item()`), as diffusers takes it."""
    ref: dict[str, Any] = {}
    skipped: list[bool] = []

    def call(inputs: dict, t: float) -> torch.Tensor:
        (h0,), aux = model.embed(inputs)
        (h1,) = model.block(0, (h0,), aux, fastcache.protocol.call_attention)
        r = h1 - h0
        skip = "r" in ref and ((r - ref["r"]).abs().mean() / ref["r"].abs().mean()).item() <= threshold
        skipped.append(skip)
        if skip:
            h = h1 + ref["tail"]
        else:
            (h,) = fastcache.protocol.run_blocks(model, 1, (h1,), aux, fastcache.protocol.call_attention)
            ref["r"], ref["tail"] = r, h - h1
        return model.head((h,), aux)

    return _reference_loop(model, x, steps, call), skipped


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_pab_matches_its_reference(video: bool) -> None:
    model, config = tiny_dit(video), METHODS["pab"](video)
    with torch.no_grad():
        ours, _ = denoise(model, config, noise(video, 0), 12)
        ref = reference_pab(model, config, noise(video, 0), 12)
    assert max_diff(ours, ref) == 0.0
    uncached = _reference_loop(model, noise(video, 0), 12, lambda i, t: forward(model, i))
    assert max_diff(ours, uncached) > 1e-4  # reuse really happened


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_fastercache_matches_diffusers_fft_formulas(video: bool) -> None:
    model, config = tiny_dit(video), METHODS["fastercache"](video)
    plan = fastcache.make(config).plan(sampling_timesteps(12))
    assert "S" in plan.rows["uncond"] and "A" in plan.rows["spatial"]
    with torch.no_grad():
        ours, _ = denoise(model, config, noise(video, 0), 12)
        ref = reference_fastercache(model, config, noise(video, 0), 12)
    assert max_diff(ours, ref) <= 1e-5


def test_fastercache_guidance_distilled_first_call_computes() -> None:
    """diffusers crashes here (empty cache at iteration 0 inside the range); fastcache computes."""
    model = tiny_dit()
    config = fastcache.FasterCacheConfig(is_guidance_distilled=True, tensor_format="BCHW",
                                       spatial_attention_timestep_skip_range=(-1, 1001))
    method = fastcache.make(config)
    timesteps = sampling_timesteps(6)
    plan = method.plan(timesteps)
    assert plan.rows == {"spatial": "CACACA"}
    inputs = {"x": noise(False, 0)[:1], "timestep": torch.tensor([600.0]), "label": LABELS[:1]}
    state = method.init(model, inputs)
    with torch.no_grad():
        out0, state = method.step(model, state, inputs, plan[0])
        assert torch.equal(out0, model(**inputs))
        out1, state = method.step(model, state, inputs, plan[1])  # approximated from [F0, F0]: equals F0's use
        assert torch.allclose(out1, out0, atol=1e-6)


def test_fbc_matches_its_host_reference_and_both_decisions_occur() -> None:
    model = tiny_dit()
    x = noise(False, 0)
    with torch.no_grad():
        threshold = 0.06  # on this model: CCSSCSCCSSSS
        ref, skipped = reference_fbc(model, threshold, x, 12)
        ours, state = denoise(model, fastcache.FirstBlockCacheConfig(threshold=threshold), x, 12)
    assert 2 <= skipped.count(False) <= 10, skipped  # computes after the first call, and skips
    assert max_diff(ours, ref) <= 1e-6
    assert int(state.num_computed) == skipped.count(False)
    assert bool(state.skipped) == skipped[-1]


def test_fbc_nan_residual_computes() -> None:
    model = tiny_dit()
    method = fastcache.make(fastcache.FirstBlockCacheConfig(threshold=1e9))
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    state = method.init(model, inputs)
    with torch.no_grad():
        _, state = method.step(model, state, inputs)
        state = state._replace(ref_residual=torch.full_like(state.ref_residual, float("nan")))
        _, state = method.step(model, state, inputs)
    assert not bool(state.skipped) and int(state.num_computed) == 2


def test_computed_fraction_counts_flops() -> None:
    model = tiny_dit()
    inputs = cfg_inputs(noise(False, 0), 1000.0, LABELS, NULL)
    tr = fastcache.trace(model, inputs)
    assert tr.total_flops > 0 and len(tr.block_flops) == 3
    pab = fastcache.make(METHODS["pab"](False))
    plan = pab.plan(sampling_timesteps(10))
    reused = sum(tr.site_flops[s.name] for d in plan for s in model.cache_sites()
                 if s.kind in ("spatial", "cross") and not getattr(d, s.kind))
    assert pab.computed_fraction(model, inputs, plan) == pytest.approx(1 - reused / (10 * tr.total_flops))
    fbc = fastcache.make(METHODS["fbc"](False))
    state = fbc.init(model, inputs)._replace(count=torch.tensor(10), num_computed=torch.tensor(4))
    expected = 1 - 6 * sum(tr.block_flops[1:]) / (10 * tr.total_flops)
    assert fbc.computed_fraction(model, inputs, fbc.plan(sampling_timesteps(10)), state) == pytest.approx(expected)


# -- bad input ------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (fastcache.PyramidAttentionBroadcastConfig, {"spatial_attention_block_skip_range": 0}, ValueError,
     "spatial_attention_block_skip_range"),
    (fastcache.PyramidAttentionBroadcastConfig, {"cross_attention_block_skip_range": 1.5}, ValueError,
     "cross_attention_block_skip_range"),
    (fastcache.PyramidAttentionBroadcastConfig, {"spatial_attention_timestep_skip_range": (800, 100)},
     ValueError, "lo < hi"),
    (fastcache.PyramidAttentionBroadcastConfig, {"temporal_attention_block_identifiers": "blocks"}, TypeError,
     "temporal_attention_block_identifiers"),
    (fastcache.PyramidAttentionBroadcastConfig, {"current_timestep_callback": 3}, TypeError,
     "current_timestep_callback"),
    (fastcache.FasterCacheConfig, {"tensor_format": "BSC"}, ValueError, "BCFHW, BFCHW, BCHW"),
    (fastcache.FasterCacheConfig, {"unconditional_batch_skip_range": None}, ValueError,
     "unconditional_batch_skip_range"),
    (fastcache.FasterCacheConfig, {"alpha_low_frequency": float("nan")}, ValueError, "alpha_low_frequency"),
    (fastcache.FasterCacheConfig, {"attention_weight_callback": 0.5}, TypeError, "attention_weight_callback"),
    (fastcache.FasterCacheConfig, {"is_guidance_distilled": 1}, TypeError, "is_guidance_distilled"),
    (fastcache.FasterCacheConfig, {"low_frequency_weight_update_timestep_range": (1, float("inf"))}, ValueError,
     "low_frequency_weight_update_timestep_range"),
    (fastcache.FirstBlockCacheConfig, {"threshold": -0.1}, ValueError, "threshold"),
    (fastcache.FirstBlockCacheConfig, {"threshold": float("nan")}, ValueError, "threshold"),
    (fastcache.FirstBlockCacheConfig, {"threshold": "0.1"}, ValueError, "threshold"),
]


@pytest.mark.parametrize("cls,kwargs,error,needle", BAD_CONFIGS)
def test_bad_config_fields_are_named(cls: type, kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cls(**kwargs)


def test_pab_without_any_range_warns_and_uses_spatial_2() -> None:
    with pytest.warns(UserWarning, match="spatial_attention_block_skip_range=2"):
        cfg = fastcache.PyramidAttentionBroadcastConfig()
    assert cfg.spatial_attention_block_skip_range == 2


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("change", ["shape", "dtype", "batch"])
def test_a_state_refuses_other_inputs(name: str, change: str) -> None:
    model = tiny_dit()
    method = fastcache.make(METHODS[name](False))
    inputs = cfg_inputs(noise(False, 0), 1000.0, LABELS, NULL)
    state = method.init(model, inputs)
    if change == "shape":
        other = cfg_inputs(torch.randn(2, 1, 16, 16), 1000.0, LABELS, NULL)
    elif change == "dtype":
        other = {**inputs, "x": inputs["x"].double()}
    else:
        other = cfg_inputs(torch.randn(4, 1, 8, 8), 1000.0, torch.tensor([1, 2, 3, 4]), NULL)
    with pytest.raises(ValueError, match=r"inputs\['(x|timestep|label)'\].*call init again"):
        method.step(model, state, other, None if name == "fbc" else method.plan([1000.0])[0])


def test_other_bad_calls() -> None:
    model = tiny_dit()
    with pytest.raises(TypeError, match="config: expected one of"):
        fastcache.make({"threshold": 0.1})
    with pytest.raises(TypeError, match="CacheableModel protocol"):
        fastcache.make(fastcache.FirstBlockCacheConfig()).init(torch.nn.Linear(2, 2), {"x": torch.ones(2)})
    fbc = fastcache.make(fastcache.FirstBlockCacheConfig())
    inputs = cfg_inputs(noise(False, 0), 1000.0, LABELS, NULL)
    with pytest.raises(TypeError, match="decision: FirstBlockCache decides on the device"):
        fbc.step(model, fbc.init(model, inputs), inputs, True)
    fc = fastcache.make(fastcache.FasterCacheConfig(tensor_format="BCFHW"))
    with pytest.raises(ValueError, match="tensor_format: 'BCFHW' needs a 5-D model output"):
        fc.init(model, inputs)
    odd = {k: v[:3] if v.dim() else v for k, v in cfg_inputs(torch.randn(2, 1, 8, 8), 1.0, LABELS, NULL).items()}
    with pytest.raises(ValueError, match="even batch"):
        fastcache.make(fastcache.FasterCacheConfig(tensor_format="BCHW")).init(model, odd)
    with pytest.raises(ValueError, match="timesteps: must hold at least one"):
        fbc.plan([])
    assert all(isinstance(x, torch.Tensor) for x in tree_leaves(fbc.init(model, inputs)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_dit_runs_in_half_precision_close_to_fp64(dtype: torch.dtype) -> None:
    """The timestep sinusoids are computed in fp32 and cast to the model's dtype (a half-precision model used
    to fail: fp32 embedding into a bf16 linear), and every method steps in that dtype."""
    model = tiny_dit()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    x = noise(False, 0)
    inputs = cfg_inputs(x, 700.0, LABELS, NULL)
    with torch.no_grad():
        exact = forward(copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v
                                                        for k, v in inputs.items()})
        half = copy.deepcopy(model).to(dtype)
        out = forward(half, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()})
        assert out.dtype == dtype
        assert (out.double() - exact).abs().max() <= 0.05 * exact.abs().max()
        for name in METHODS:
            method = fastcache.make(METHODS[name](False))
            state = method.init(half, cfg_inputs(x.to(dtype), 1000.0, LABELS, NULL))
            step_out, _ = method.step(half, state, cfg_inputs(x.to(dtype), 1000.0, LABELS, NULL), None)
            assert step_out.dtype == dtype and torch.isfinite(step_out).all()


def test_fastercache_plan_makes_its_weights_on_the_model_device() -> None:
    """The kernels read a step's weights on the data's device: a plan made for a GPU model must hold them
    there (made once when planning; a CPU weight with CUDA data was an error inside the compiled step)."""
    method = fastcache.make(METHODS["fastercache"](False))
    on_meta = method.plan([1000.0, 600.0, 200.0], device="meta")
    assert {d.w_low.device.type for d in on_meta} == {"meta"} == {d.w_attention.device.type for d in on_meta}
    default = method.plan(torch.linspace(1000, 0, 3))
    assert {d.w_high.device.type for d in default} == {"cpu"}
    assert [bool(d.skip_uncond) for d in on_meta] == [bool(d.skip_uncond) for d in method.plan([1000, 600, 200])]


def test_a_state_of_another_method_or_model_is_refused_by_name() -> None:
    model, other = tiny_dit(), tiny_dit(video=True)
    x = noise(False, 0)
    inputs = cfg_inputs(x, 500.0, LABELS, NULL)
    pab = fastcache.make(METHODS["pab"](False))
    fbc = fastcache.make(METHODS["fbc"](False))
    with pytest.raises(TypeError, match="PABState.*FirstBlockCacheState"):
        pab.step(model, fbc.init(model, inputs), inputs, None)
    video_inputs = cfg_inputs(noise(True, 0), 500.0, LABELS, NULL)
    pab_video = fastcache.make(METHODS["pab"](True))
    with pytest.raises(ValueError, match="attention sites"):
        pab_video.step(model, pab_video.init(other, video_inputs)._replace(spec=pab.init(model, inputs).spec),
                       inputs, None)


@pytest.mark.parametrize("name", METHODS)
def test_a_saved_state_loads_with_weights_only(name: str, tmp_path) -> None:
    """`torch.save(state)` then `fastcache.load_state` (torch.load with weights_only=True, the state classes
    allowed for that load only): the same state, and the next step gives the same output."""
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 900.0, LABELS, NULL)
    _, state = method.step(model, method.init(model, inputs), inputs, None)
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(tmp_path / "state.pt", weights_only=True)  # torch's own safe list is left as it was
    loaded = fastcache.load_state(tmp_path / "state.pt")
    assert type(loaded) is type(state)
    assert all(a.equal(b) for a, b in zip(tree_leaves(loaded), tree_leaves(state), strict=True))
    nxt = cfg_inputs(noise(False, 0), 800.0, LABELS, NULL)
    assert method.step(model, loaded, nxt, None)[0].equal(method.step(model, state, nxt, None)[0])


def test_fbc_never_reuses_non_finite_tail_residuals_and_counts_the_refusals() -> None:
    """A NaN from a late block lands in the cached tail residuals; the first block's ratio does not see it, so
    every later step used to reuse it (10/10 outputs NaN). Now a skip over non-finite residuals is refused on
    the device (no sync): the step computes, and `nonfinite` counts it."""
    model = tiny_dit()
    block, poisoned = model.block, []

    def nan_once_in_the_last_block(index, streams, aux, attend):
        out = block(index, streams, aux, attend)
        if index == model.num_blocks - 1 and not poisoned:
            poisoned.append(index)
            out = (out[0] * float("nan"), *out[1:])
        return out

    method = fastcache.make(fastcache.FirstBlockCacheConfig(threshold=1e9))  # skip whenever allowed
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    outs = []
    with torch.no_grad():
        state = method.init(model, inputs)
        model.block = nan_once_in_the_last_block
        for _ in range(4):
            out, state = method.step(model, state, inputs)
            outs.append(out)
    assert not torch.isfinite(outs[0]).all()  # the NaN itself
    assert all(torch.isfinite(o).all() for o in outs[1:])
    assert int(state.nonfinite) == 1 and int(state.num_computed) == 2 and bool(state.skipped)


@pytest.mark.parametrize("name", METHODS)
def test_autocast_init_leaks_nothing_and_a_mismatched_autocast_is_refused(name: str, dynamo) -> None:
    """init under torch.autocast used to leave fake tensors in autocast's weight cache (the model's next
    forward returned a FakeTensor). A state built without autocast and stepped under it (fp32 cache, bf16
    outputs) is refused by name, and the same autocast for both runs, compiled on the device too."""
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    with torch.no_grad():
        plain_state = method.init(model, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = method.init(model, inputs)
            out = forward(model, inputs)
            assert type(out) is torch.Tensor and out.dtype == torch.bfloat16
            with pytest.raises(ValueError, match="autocast"):
                method.step(model, plain_state, inputs, None)
            step = torch.compile(lambda s, i: method.step(model, s, i, None), fullgraph=True, backend="eager")
            for t in (900.0, 800.0, 700.0):
                out, state = step(state, cfg_inputs(noise(False, 0), t, LABELS, NULL))
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _poison_first_attention(model: DiT) -> None:
    """The model's first attention call returns NaN, once (a transient overflow); every later call is clean."""
    block, poisoned = model.block, []

    def poisoning(index, streams, aux, attend):
        def attend_once_nan(site, fn, *args):
            if poisoned:
                return attend(site, fn, *args)
            poisoned.append(site)
            return attend(site, lambda *a: fn(*a) * float("nan"), *args)
        return block(index, streams, aux, attend_once_nan)

    model.block = poisoning


def _steps_on_fixed_inputs(config: Any, planned: bool, calls: int) -> tuple[list[torch.Tensor], list[Any], DiT]:
    """`calls` steps on the same inputs (t=500), the first attention output of call 0 poisoned with NaN; the
    outputs and the state after each call."""
    model = tiny_dit()
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    plan = method.plan([500.0] * calls)
    outs, states = [], []
    with torch.no_grad():
        state = method.init(model, inputs)
        _poison_first_attention(model)
        for i in range(calls):
            out, state = method.step(model, state, inputs, plan[i] if planned else None)
            outs.append(out)
            states.append(state)
    return outs, states, model


@pytest.mark.parametrize("planned", [False, True], ids=["device", "planned"])
def test_pab_never_reuses_a_non_finite_attention_output_on_the_device(planned: bool) -> None:
    """Call 0's attention outputs hold NaN (the poisoned site and every site after it); call 1's rule reuses
    every hooked site. On the device each such reuse computes instead (no extra branch: the finiteness joins
    the site's cond predicate) and is counted in `nonfinite`; a planned step cannot branch on data without a
    host sync, so it reuses and only counts. Later reuses of finite outputs still happen."""
    config = METHODS["pab"](False)
    outs, states, model = _steps_on_fixed_inputs(config, planned, 4)
    state = states[-1]
    poisoned = [site for site, out in states[0].cache.items() if not torch.isfinite(out).all()]
    assert not torch.isfinite(outs[0]).all() and "blocks.0.attn1" in poisoned
    assert [site for site, ok in states[0].finite.items() if not ok] == poisoned
    assert int(state.nonfinite) == len(poisoned)  # every site reuses at call 1 (plan: spatial CRCR, cross CRRC)
    if planned:
        assert not torch.isfinite(outs[1]).all()
        return
    assert all(torch.isfinite(o).all() for o in outs[1:])
    with torch.no_grad():
        plain = forward(model, cfg_inputs(noise(False, 0), 500.0, LABELS, NULL))
    assert all(bool(ok) for ok in states[1].finite.values())  # call 1 computed the poisoned sites
    assert not outs[3].equal(plain)  # call 3 reused (spatial): reuse of finite outputs still happens


@pytest.mark.parametrize("planned", [False, True], ids=["device", "planned"])
def test_fastercache_never_reuses_non_finite_deltas_or_windows_on_the_device(planned: bool) -> None:
    """Call 0's output is NaN, so its deltas and every attention window are. Call 1's rule skips the
    unconditional half (refused on the device: the deltas are not finite); call 2 skips it again, now with
    finite deltas, and approximates spatial attention from windows whose older slot is call 0's NaN (refused
    per site); call 3 approximates from clean windows. The planned path reuses and only counts."""
    config = dataclasses.replace(METHODS["fastercache"](False), spatial_attention_block_skip_range=3,
                                 unconditional_batch_skip_range=5)
    outs, states, model = _steps_on_fixed_inputs(config, planned, 4)
    state, sites = states[-1], len(config.hooked_sites(model))
    assert not torch.isfinite(outs[0]).all()
    if planned:
        assert not torch.isfinite(outs[1]).all() and int(state.nonfinite) >= 1
        return
    assert all(torch.isfinite(o).all() for o in outs[1:])
    assert int(state.nonfinite) == 1 + sites
    assert bool(state.deltas_finite) and all(bool(a) and bool(b) for a, b in state.windows_finite.values())


@pytest.mark.parametrize("name", ["pab", "fastercache"])
def test_a_planned_reuse_on_a_state_that_never_computed_is_refused(name: str) -> None:
    """plan[k] (k > 0) handed to a fresh state's first call would reuse init's zeros (error 0.36 before): it
    raises in eager mode, naming plan[0] and decision=None."""
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    plan = method.plan([500.0] * 4)
    reuses = {"pab": lambda d: False in d, "fastercache": lambda d: True in d[1:4]}[name]
    reusing = next(d for d in plan if reuses(d))
    with torch.no_grad():
        state = method.init(model, inputs)
        with pytest.raises(ValueError, match=r"plan\[0\].*decision=None"):
            method.step(model, state, inputs, reusing)
        _, state = method.step(model, state, inputs, plan[0])
        method.step(model, state, inputs, reusing)  # a state that computed once may reuse


def test_fbc_skipped_blocks_really_do_not_run() -> None:
    """The README's claim, counted: every call runs block 0; the others run only on computed calls."""
    model = tiny_dit()
    block, calls = model.block, []

    def counting(index, streams, aux, attend):
        calls.append(index)
        return block(index, streams, aux, attend)

    model.block = counting
    with torch.no_grad():
        _, state = denoise(model, METHODS["fbc"](False), noise(False, 0), 10, device_decisions=True)
    computed = int(state.num_computed)
    assert 1 < computed < 10  # both kinds of call happened
    traced = 1  # init traces one forward (on fake tensors) to size the state
    assert calls.count(0) == 10 + traced
    assert all(calls.count(i) == computed + traced for i in range(1, model.num_blocks))


@pytest.mark.parametrize("name", METHODS)
def test_state_bytes_counts_the_state_without_allocating_it(name: str) -> None:
    model, config = tiny_dit(True), METHODS[name](True)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(True, 0), 500.0, LABELS, NULL)
    state = method.init(model, inputs)
    real = sum(x.numel() * x.element_size() for x in tree_leaves(state) if isinstance(x, torch.Tensor))
    assert method.state_bytes(model, inputs) == real > 0
    with torch.device("meta"):  # a model that was never materialised is sized the same way
        meta_model = DiT(model.cfg)
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    assert method.state_bytes(meta_model, meta_inputs) == real


@pytest.mark.parametrize("name", ["pab", "fastercache"])
def test_a_state_built_for_a_plan_caches_only_what_the_plan_reuses(name: str) -> None:
    """PAB's cross attention (range (100, 150)) and FasterCache's temporal attention (range (-1, 50)) are never
    reused over these 6 steps: a state built for the plan holds no cache for them, gives the same outputs as a
    full state, and refuses decisions it cannot serve (on-device decisions; a reuse of an uncached kind)."""
    video = True
    if name == "pab":
        config = dataclasses.replace(METHODS["pab"](video), cross_attention_timestep_skip_range=(100, 150))
        pruned_kind = "cross"
    else:
        config = dataclasses.replace(METHODS["fastercache"](video), temporal_attention_timestep_skip_range=(-1, 50))
        pruned_kind = "temporal"
    model, method = tiny_dit(video), fastcache.make(config)
    timesteps = sampling_timesteps(6)
    plan = method.plan(timesteps)
    inputs = cfg_inputs(noise(video, 0), timesteps[0], LABELS, NULL)
    full_state, state = method.init(model, inputs), method.init(model, inputs, plan)
    cached = state.cache if name == "pab" else state.windows
    assert cached and all(kind != pruned_kind for site, kind in config.hooked_sites(model).items() if site in cached)
    assert method.state_bytes(model, inputs, plan) < method.state_bytes(model, inputs)
    with torch.no_grad():
        expected, _ = denoise(model, config, noise(video, 0), 6)
        got = []
        x = noise(video, 0)
        for i, t in enumerate(timesteps):
            out, state = method.step(model, state, cfg_inputs(x, t, LABELS, NULL), plan[i])
            got.append(out)
            u, c = out.chunk(2)
            t_next = timesteps[i + 1] if i + 1 < 6 else torch.tensor(0.0)
            x = x + (t_next - t) / 1000 * (u + 3.0 * (c - u))
        assert max_diff(expected, got) == 0.0
        with pytest.raises(ValueError, match="decision: None"):
            method.step(model, state, inputs, None)
        full_plan_entry = method.plan([120.0] * 2 if name == "pab" else [10.0] * 2)[1]
        with pytest.raises(ValueError, match=pruned_kind):
            method.step(model, state, inputs, full_plan_entry)
    del full_state


@pytest.mark.parametrize("name", ["pab", "fastercache"])
def test_cached_attention_is_kept_in_the_dtype_the_model_computes_in(name: str) -> None:
    model, config = tiny_dit(), METHODS[name](False)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = method.init(model, inputs)
        _, state = method.step(model, state, inputs, None)
    attention = tree_leaves(state.cache if name == "pab" else state.windows)
    assert attention and all(x.dtype == torch.bfloat16 for x in attention)
    bf16_model = tiny_dit().to(torch.bfloat16)
    half_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    state = method.init(bf16_model, half_inputs)
    assert all(x.dtype == torch.bfloat16 for x in tree_leaves(state.cache if name == "pab" else state.windows))


def test_a_state_leaves_cuda_graphs_pool_by_copying_only_what_the_step_made() -> None:
    """mode="reduce-overhead" (`fastcache.out_of_cuda_graph_pool`, also at the drop-in's context exits): a PAB
    step that reuses its cached attention carries those tensors over; only what the step made (its counters) is
    copied, to equal values in new storage."""
    from fastcache.cuda_graphs import copy_new_tensors

    model, config = tiny_dit(), METHODS["pab"](False)
    method = fastcache.make(config)
    inputs = cfg_inputs(noise(False, 0), 500.0, LABELS, NULL)
    plan = method.plan([500.0, 500.0])
    with torch.no_grad():
        _, computed = method.step(model, method.init(model, inputs), inputs, plan[0])
        _, reused = method.step(model, computed, inputs, plan[1])
    assert plan[1].spatial is False  # the second call reuses the spatial attention
    old = {id(x) for x in tree_leaves(computed)}
    carried = [x for x in tree_leaves(reused) if isinstance(x, torch.Tensor) and id(x) in old]
    made = [x for x in tree_leaves(reused) if isinstance(x, torch.Tensor) and id(x) not in old]
    assert carried and made
    out = copy_new_tensors(reused, computed)
    assert type(out) is type(reused)
    for before, after in zip(tree_leaves(reused), tree_leaves(out)):
        if any(before is x for x in carried):
            assert after is before
        else:
            assert after is not before and after.data_ptr() != before.data_ptr() or before.numel() == 0
            assert after.dtype == before.dtype and torch.equal(after, before)
    assert copy_new_tensors(computed, computed) is computed
    # on CPU (no CUDA tensor, no CUDA graph) nothing is copied
    assert fastcache.out_of_cuda_graph_pool(reused, computed) is reused
