"""The drop-in's lifecycle off the happy path: copies, shared and replaced transformers, diffusers' own
enable_cache, a new shape after a failed call, subclasses, identifiers that match nothing. Each case either
works as a user would expect or fails before any compute with an error that says what to do."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._tiny import case  # noqa: E402
from tests.test_diffusers_pipeline import _call, _pipeline  # noqa: E402

FBC = fd.FirstBlockCacheConfig(threshold=0.3)


def test_deepcopy_of_an_enabled_transformer_is_refused() -> None:
    """A copy would run the original's wrapped modules (the wrappers are closures over them): refuse it."""
    model = case("wan").model.eval()
    fd.enable_cache(model, FBC)
    with pytest.raises(TypeError, match="deepcopy.*disable_cache"):
        copy.deepcopy(model)
    fd.disable_cache(model)
    copy.deepcopy(model)  # fine once disabled


def test_disabling_one_pipeline_leaves_a_sharing_pipeline_running_uncached() -> None:
    a = _pipeline()
    b = FluxPipeline(**{**a.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    uncached = _call(b)
    fd.enable_cache(a, FBC)
    fd.enable_cache(b, FBC)
    fd.disable_cache(a)  # the transformer they share is no longer cached
    assert _call(b).equal(uncached)
    fd.disable_cache(b)
    assert type(b) is FluxPipeline


def test_replacing_the_transformer_after_enable_runs_the_new_one_uncached() -> None:
    pipe = _pipeline()
    fd.enable_cache(pipe, FBC)
    pipe.transformer = case("flux").model.eval()  # the same weights as _pipeline()'s, no cache
    assert _call(pipe).equal(_call(_pipeline()))
    fd.disable_cache(pipe)


def test_diffusers_enable_cache_after_fastcache_is_refused() -> None:
    model = case("wan").model.eval()
    fd.enable_cache(model, FBC)
    with pytest.raises(ValueError, match="fastcache"):
        model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.3))
    fd.disable_cache(model)
    model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.3))  # diffusers' own, once fastcache is off
    model.disable_cache()


def test_a_new_shape_in_a_context_starts_that_context_afresh() -> None:
    """A call that failed half-way, or a new resolution or batch in the same context, must not meet the old
    state: the context starts again, as a first call (before: `absmean_sums: b has shape ...`)."""
    tc = case("wan")
    model = tc.model.eval()
    big = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    fd.enable_cache(model, FBC)
    with torch.no_grad():
        with model.cache_context("cond"):
            model(**tc.kwargs(tc.latent, torch.tensor(900.0)))
        with model.cache_context("cond"):
            out = model(**tc.kwargs(big, torch.tensor(800.0)))[0]
        fd.reset_cache(model)
        with model.cache_context("cond"):
            fresh = model(**tc.kwargs(big, torch.tensor(800.0)))[0]
    fd.disable_cache(model)
    assert out.equal(fresh)


def test_disable_on_a_pipeline_with_nothing_enabled_is_an_error() -> None:
    with pytest.raises(ValueError, match="not enabled"):
        fd.disable_cache(_pipeline())


def test_a_subclass_of_a_supported_transformer_is_supported() -> None:
    base = case("wan").model.eval()
    subclass = type("MyWan", (type(base),), {})
    model = subclass.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    fd.enable_cache(model, FBC)
    fd.disable_cache(model)


@pytest.mark.parametrize(("config", "field"), [
    (fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                        spatial_attention_block_identifiers=("no_such_block",)),
     "spatial_attention_block_identifiers"),
    (fd.FasterCacheConfig(spatial_attention_block_skip_range=2, is_guidance_distilled=True, tensor_format="BCFHW",
                          spatial_attention_block_identifiers=("^nothing.*attn",)),
     "spatial_attention_block_identifiers"),
])
def test_identifiers_that_match_no_attention_module_are_errors(config, field: str) -> None:
    model = case("wan").model.eval()
    with pytest.raises(ValueError, match=field):
        fd.enable_cache(model, config)
    assert "forward" not in model.__dict__  # nothing left half-enabled


def test_per_token_timesteps_decide_at_the_denoising_timestep() -> None:
    """Wan 2.2 TI2V passes one timestep per token, the conditioning frame's tokens at 0. Without a callback the
    drop-in decides on the device from the model's `timestep` argument: the maximum over tokens, not its first
    element (which made PAB compute at every step). Same outputs as diffusers' PAB with the pipeline's callback."""
    tc = case("wan", frames=2)
    tokens = 2 * (8 // 2) * (8 // 2)  # frames x patches (patch 1x2x2)
    clock: dict = {}

    def per_token(t: torch.Tensor) -> dict:
        kwargs = tc.kwargs(tc.latent, t)
        timestep = torch.full((1, tokens), float(t))
        timestep[:, : tokens // 2] = 0.0  # the first frame is the (clean) conditioning frame
        return {**kwargs, "timestep": timestep}

    def run(model) -> list[torch.Tensor]:
        outs, x = [], tc.latent.clone()
        for t in torch.linspace(1000, 0, 10):
            clock["t"] = t
            with torch.no_grad(), model.cache_context("cond"):
                outs.append(model(**{**per_token(t), "hidden_states": x}, return_dict=False)[0])
            x = x - 0.05 * outs[-1]
        return outs

    model = tc.model.eval()
    model.enable_cache(diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: clock["t"]))
    expected = run(model)
    model.disable_cache()
    fd.enable_cache(model, fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2))
    got = run(model)
    where = fd.decided_on(model)
    fd.disable_cache(model)
    uncached = run(model)
    assert where == "device"
    assert max((a - b).abs().max() for a, b in zip(expected, uncached)) > 1e-4, "PAB must have reused something"
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def nan_once_hook():
    """A forward hook that turns the first output it sees into NaN (a transient overflow), then passes through."""
    fired: list[bool] = []

    def hook(module, args, output):
        if fired:
            return output
        fired.append(True)
        return output * float("nan")

    return hook


def test_fbc_never_reuses_a_nan_from_a_later_block() -> None:
    """A NaN from the last block's feed-forward lands in the cached residual; the first block's ratio does not
    see it, and every later call used to reuse it. Now the skip is refused on the device (no sync) and counted."""
    tc = case("wan")
    model = tc.model.eval()
    nan_once = nan_once_hook()

    fd.enable_cache(model, fd.FirstBlockCacheConfig(threshold=1e9))  # skip whenever allowed
    handle = model.blocks[-1].ffn.register_forward_hook(nan_once)
    outs = []
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0):
            with model.cache_context("cond"):
                outs.append(model(**tc.kwargs(tc.latent, torch.tensor(t)), return_dict=False)[0])
    state = fd.cache_state(model, "cond")
    handle.remove()
    fd.disable_cache(model)
    assert not torch.isfinite(outs[0]).all()
    assert all(torch.isfinite(o).all() for o in outs[1:])
    assert int(state["nonfinite"]) == 1 and int(state["num_computed"]) == 2 and bool(state["skipped"])


@pytest.mark.parametrize("path", ["device", "planned"])
@pytest.mark.parametrize("name, method", [("wan", "pab"), ("cogvideox", "fastercache")])
def test_pab_and_fastercache_never_reuse_a_nan_attention_output_on_the_device(name: str, method: str,
                                                                              path: str) -> None:
    """The first block's attention returns NaN once (inside the attention module, so the NaN is what gets
    cached). PAB and FasterCache used to reuse it until their next computed step. On the device (no timestep on
    the host) each reuse or skip over a non-finite cached value computes instead (the finiteness joins the cond
    it already had) and is counted in `nonfinite`; planned (timestep on the host) the reuse is a plain `if`,
    so it is only counted (refusing it would be a host sync)."""
    tc = case(name)
    model = tc.model.eval()
    nan_once = nan_once_hook()

    clock = {"t": 500.0}
    callback = (lambda: clock["t"]) if path == "planned" else None
    config = (diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                        current_timestep_callback=callback)
              if method == "pab" else
              diffusers.FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=callback,
                                          tensor_format="BFCHW"))
    fd.enable_cache(model, config)
    first_attention = next(m for n, m in model.named_modules() if n.endswith("blocks.0.attn1"))
    handle = first_attention.to_out[0].register_forward_hook(nan_once)
    ctx = "cond_uncond" if tc.cfg_batched else "cond"
    outs = []
    with torch.no_grad():
        for _ in range(4):
            with model.cache_context(ctx):
                outs.append(model(**tc.kwargs(tc.latent, torch.tensor(clock["t"])), return_dict=False)[0])
    state = fd.cache_state(model, ctx)
    where = fd.decided_on(model)
    handle.remove()
    fd.disable_cache(model)
    assert where == ("host" if path == "planned" else "device")
    assert not torch.isfinite(outs[0]).all()
    assert int(state["nonfinite"]) >= 1
    if path == "device":
        assert all(torch.isfinite(o).all() for o in outs[1:])
    else:
        assert not torch.isfinite(outs[1]).all()

