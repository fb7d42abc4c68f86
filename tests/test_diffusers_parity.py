"""fastcache's drop-in against diffusers' own hooks, step by step, on tiny random-weight models (eager, fp32).

Each case runs the same 10-step loop (timesteps 1000 -> 0) through diffusers' hooks on one copy of the model
and through fastcache on another, and compares every step's output (max abs diff <= 1e-5). Where diffusers
cannot run a method (FirstBlockCache on Flux2 and Latte: their streams change shape between block lists;
Allegro's block class is not registered in diffusers), the test says so and checks fastcache against its
own reference instead.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
from diffusers.hooks import apply_faster_cache as d_apply_faster_cache  # noqa: E402
from diffusers.hooks import apply_first_block_cache as d_apply_first_block_cache  # noqa: E402
from diffusers.hooks import apply_pyramid_attention_broadcast as d_apply_pab  # noqa: E402
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._families import coverage  # noqa: E402
from fastcache.diffusers._tiny import CASES, TinyCase, case, denoise, fbc_threshold  # noqa: E402
from fastcache.methods import pyramid_attention_broadcast as pab  # noqa: E402
from tests._block_reference import reference_model, relative_change  # noqa: E402
from tests._families import FASTERCACHE, FBC_NO_ORACLE, family  # noqa: E402

TIMESTEPS = torch.linspace(1000, 0, 10)
ATOL = 1e-5


def _loop(model: torch.nn.Module, tc: TinyCase, ctx: str, clock: dict, set_ctx, observe=None) -> list[torch.Tensor]:
    return denoise(model, tc, TIMESTEPS, (ctx,), set_ctx, clock, observe)


class _DiffusersContext:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, name: str):
        model = self.model

        class _Ctx:
            def __enter__(self) -> None:
                _set_cache_context(model, CacheContext(name))

            def __exit__(self, *exc) -> None:
                _set_cache_context(model, None)

        return _Ctx()


def _context_name(tc: TinyCase) -> str:
    return "cond_uncond" if tc.cfg_batched else "cond"


def _max_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]


def _pab_config(name: str, clock: dict) -> diffusers.PyramidAttentionBroadcastConfig:
    return diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
        temporal_attention_block_skip_range=2 if family(name).temporal else None,
        current_timestep_callback=lambda: clock["t"])


def _fc_config(name: str, clock: dict, distilled: bool = False) -> diffusers.FasterCacheConfig:
    fam = family(name)
    config = diffusers.FasterCacheConfig(
        spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=2 if fam.temporal else None,
        unconditional_batch_skip_range=3, tensor_format=fam.layout or "BCFHW",
        is_guidance_distilled=distilled, current_timestep_callback=lambda: clock["t"])
    # diffusers cuts only its default input names; a family that batches more (SD3's pooled text) names them
    config._unconditional_conditional_input_kwargs_identifiers = (
        *config._unconditional_conditional_input_kwargs_identifiers, *fam.extra_batched_kwargs)
    return config


@pytest.fixture(scope="module", autouse=True)
def _register_allegro_in_diffusers():
    """diffusers' FirstBlockCache has no entry for Allegro's block: register one so its hooks can serve as
    the oracle (fastcache supports Allegro without it)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_allegro import AllegroTransformerBlock

    TransformerBlockRegistry._register()
    had = AllegroTransformerBlock in TransformerBlockRegistry._registry
    if not had:
        TransformerBlockRegistry.register(AllegroTransformerBlock, TransformerBlockMetadata(0, None))
    yield
    if not had:
        TransformerBlockRegistry._registry.pop(AllegroTransformerBlock, None)


def _parity(name: str, method: str) -> dict:
    tc = case(name)
    tc.model.eval()
    ctx = _context_name(tc)
    clock: dict = {}
    d_model, f_model = copy.deepcopy(tc.model), tc.model
    info: dict = {}
    if method == "fbc":
        threshold = fbc_threshold(tc, TIMESTEPS, (ctx,))
        d_cfg, f_cfg = (diffusers.FirstBlockCacheConfig(threshold=threshold) for _ in range(2))
        d_apply = d_apply_first_block_cache
    elif method == "pab":
        d_cfg, f_cfg = _pab_config(name, clock), _pab_config(name, clock)
        d_apply = d_apply_pab
    else:
        d_cfg, f_cfg = (_fc_config(name, clock, distilled=method == "fc-distilled") for _ in range(2))
        d_apply = d_apply_faster_cache

    skipped: list[bool] = []
    fd.enable_cache(f_model, f_cfg)  # diffusers' own config object, translated
    ours = _loop(f_model, tc, ctx, clock, f_model.cache_context,
                 (lambda i: skipped.append(bool(fd.cache_state(f_model, ctx)["skipped"]))) if method == "fbc"
                 else None)
    fd.disable_cache(f_model)
    info["uncached"] = _loop(f_model, tc, ctx, clock, lambda name: contextlib.nullcontext())
    info["skipped"] = skipped
    if method == "fbc" and name in FBC_NO_ORACLE:
        info["reference"] = _fbc_reference(tc, ctx, threshold)
    else:
        d_apply(d_model, d_cfg)
        info["reference"] = _loop(d_model, tc, ctx, clock, _DiffusersContext(d_model))
    info["ours"] = ours
    return info


def _fbc_reference(tc: TinyCase, ctx: str, threshold: float) -> list[torch.Tensor]:
    return _loop(_fbc_reference_model(tc, threshold), tc, ctx, {}, lambda name: contextlib.nullcontext())


def _fbc_reference_model(tc: TinyCase, threshold: float) -> torch.nn.Module:
    """FirstBlockCache by segments, written directly with forward hooks on the uncached model
    (`tests/_block_reference.py`, front 1, back 0): the head computes and decides on its residual; on a skip
    every other block returns its input, and the last block of each segment returns its input plus that
    segment's residual from the last computed step (the segment's start is the head's output for the first
    segment, the segment's first input otherwise)."""
    mem: dict = {"ref": None}

    def decide(residual: torch.Tensor) -> bool:
        skip = relative_change(residual, mem["ref"]) <= threshold
        if not skip:
            mem["ref"] = residual
        return skip

    return reference_model(tc, 1, 0, decide_after=decide)


# FasterCache runs in full where the pipelines batch CFG; elsewhere its attention approximation alone
# (`is_guidance_distilled=True`, as diffusers documents for Flux)
PARITY = ([(n, "fbc") for n in CASES] + [(n, "pab") for n in CASES] + [(n, "fc") for n in FASTERCACHE]
          + [(n, "fc-distilled") for n in CASES
             if n not in FASTERCACHE and not coverage(family(n))["FasterCache"].startswith("no")])


@pytest.mark.parametrize(("name", "method"), PARITY, ids=[f"{n}-{m}" for n, m in PARITY])
def test_parity_with_diffusers(name: str, method: str) -> None:
    info = _parity(name, method)
    diffs = _max_diffs(info["ours"], info["reference"])
    assert max(diffs) <= ATOL, f"{name} {method}: per-step max abs diff {diffs}"
    # the cache really reused something, and that changed the outputs (parity of two no-op caches proves nothing)
    assert max(_max_diffs(info["ours"], info["uncached"])) > 1e-5, f"{name} {method}: nothing was reused"
    if method == "fbc":
        skipped = info["skipped"]
        assert any(skipped) and not all(skipped), f"{name}: FBC decisions {skipped} must mix skip and compute"
        assert not skipped[0]


def test_host_decisions_are_made_once_per_call_and_timestep(monkeypatch) -> None:
    """PAB's host decisions are remembered by (call count, timestep): a second generation over the same schedule
    makes none and decides as the first did (the same outputs, bit for bit)."""
    from fastcache.diffusers import _runtime

    made, make = [0], _runtime.host_decision

    def counted(*args):
        made[0] += 1
        return make(*args)

    monkeypatch.setattr(_runtime, "host_decision", counted)
    tc, clock = case("flux"), {}
    model = tc.model.eval()
    fd.enable_cache(model, _pab_config("flux", clock))
    first = _loop(model, tc, "cond", clock, model.cache_context)
    made_first = made[0]
    fd.reset_cache(model)
    second = _loop(model, tc, "cond", clock, model.cache_context)
    fd.disable_cache(model)
    assert made_first == len(TIMESTEPS) and made[0] == made_first
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_pab_decisions_follow_diffusers_rule() -> None:
    """The per-step decisions PAB takes on the device are diffusers' rule (as planned by the engine)."""
    cfg = fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)
    plan = pab.plan(cfg, [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100])
    assert plan.rows["spatial"] == "CCCRCRCRCC"


def test_fbc_restarts_when_the_streams_change_length_under_qwenimage21_kv_cache() -> None:
    """QwenImage 2.1's pipeline (use_kv_cache=True, its default) runs the whole joint sequence at the first step and
    only the target image's tokens after: the blocks' streams get shorter for the same input. FirstBlockCache
    computes that second call whole (nothing stored fits) and caches from there."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    tc = case("qwenimage21")
    tc.model.eval()

    def run(model: torch.nn.Module, skipped: list[bool] | None = None) -> list[torch.Tensor]:
        kv, x, outs = QwenImage21KVCache(len(model.transformer_blocks)), tc.latent.clone(), []
        for i, t in enumerate(TIMESTEPS):
            kwargs = dict(tc.kwargs(x, t), kv_cache=kv, kv_cache_mode="extract" if i == 0 else "cached")
            with torch.no_grad(), (model.cache_context("cond") if skipped is not None else contextlib.nullcontext()):
                outs.append(model(**kwargs, return_dict=False)[0])
            if skipped is not None:
                skipped.append(bool(fd.cache_state(model, "cond")["skipped"]))
            x = x - 0.05 * outs[-1][:, -x.shape[1]:]
        return outs

    uncached = run(copy.deepcopy(tc.model))
    model, skipped = copy.deepcopy(tc.model), []
    fd.enable_cache(model, fd.FirstBlockCacheConfig(threshold=1e9))
    ours = run(model, skipped)
    assert [tuple(o.shape[1:2]) for o in ours[:2]] == [(72,), (64,)]
    assert skipped == [False, False] + [True] * (len(TIMESTEPS) - 2)
    assert int(fd.cache_state(model, "cond")["num_computed"]) == 2
    assert max(_max_diffs(ours[:2], uncached[:2])) == 0.0
    assert max(_max_diffs(ours[2:], uncached[2:])) > 1e-5


@pytest.mark.parametrize("name", ["ltx2", "kandinsky6"])
def test_fbc_caches_the_audio_stream_too(name: str) -> None:
    """LTX-2 and Kandinsky 6 return audio next to the video: FirstBlockCache keeps a residual per stream, so a
    skipped step's audio equals the reference's (the other tests compare the video output only)."""
    tc = case(name)
    tc.model.eval()
    ctx = _context_name(tc)
    threshold = fbc_threshold(tc, TIMESTEPS, (ctx,))

    def run(model: torch.nn.Module, set_ctx) -> list[torch.Tensor]:
        x, audio = tc.latent.clone(), []
        for t in TIMESTEPS:
            with torch.no_grad(), set_ctx(ctx):
                video, sound = model(**tc.kwargs(x, t), return_dict=False)
            audio.append(sound)
            x = x - 0.05 * video
        return audio

    uncached = run(copy.deepcopy(tc.model), lambda name: contextlib.nullcontext())
    reference = run(_fbc_reference_model(tc, threshold), lambda name: contextlib.nullcontext())
    ours = copy.deepcopy(tc.model)
    fd.enable_cache(ours, fd.FirstBlockCacheConfig(threshold=threshold))
    got = run(ours, ours.cache_context)
    assert max(_max_diffs(got, reference)) <= ATOL
    assert max(_max_diffs(got, uncached)) > 1e-5, "no step was skipped"


@pytest.mark.parametrize("name", CASES)
def test_decisions_on_the_device_follow_the_denoising_timestep(name: str) -> None:
    """Every family's timestep convention (the README's "timestep passed"): PAB without a host timestep decides on
    the device from the model's own `timestep` argument, as the tiny case passes it the family's pipelines' way
    (t / 1000, 1000 - t, t - 1, per-frame with a finished prefix frame at 0, per-token). Its outputs equal PAB
    planned on the host from the scheduler's t; a wrong scale or offset, or element 0 of a per-token tensor,
    would move the timestep out of (or into) the skip range and change them."""
    tc = case(name)
    tc.model.eval()
    ctx = _context_name(tc)
    clock: dict = {}
    runs = []
    for callback in (lambda: clock["t"], None):
        model = copy.deepcopy(tc.model)
        fd.enable_cache(model, fd.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=(100, 700), current_timestep_callback=callback))
        runs.append(_loop(model, tc, ctx, clock, model.cache_context))
        assert fd.decided_on(model) == ("host" if callback else "device")
    assert max(_max_diffs(runs[1], runs[0])) <= ATOL
    uncached = _loop(tc.model, tc, ctx, clock, lambda name: contextlib.nullcontext())
    assert max(_max_diffs(runs[0], uncached)) > 1e-5, "PAB must have reused something"
@pytest.fixture
def _diffusers_stream_names_from_the_registry(monkeypatch):
    """diffusers' FirstBlockCache and MagCache hooks ask a block for "hidden_states" / "encoder_hidden_states" by
    those literal names in places, where Cosmos 3's registry entry names `gen_seq` / `und_seq`: read the
    registry's names there instead, so that diffusers' own hooks run on Cosmos 3 and can serve as the oracle."""
    from diffusers.hooks._helpers import TransformerBlockMetadata

    original = TransformerBlockMetadata._get_parameter_from_args_kwargs

    def lookup(self, identifier, args=(), kwargs=None):
        names = {"hidden_states": self.hidden_states_argument_name,
                 "encoder_hidden_states": self.encoder_hidden_states_argument_name}
        return original(self, names.get(identifier) or identifier, args, kwargs)

    monkeypatch.setattr(TransformerBlockMetadata, "_get_parameter_from_args_kwargs", lookup)


@pytest.mark.usefixtures("_diffusers_stream_names_from_the_registry")
@pytest.mark.parametrize("method", ["fbc", "mag"])
def test_cosmos3_equals_diffusers_hooks_once_they_read_the_registry_stream_names(method: str) -> None:
    """Cosmos 3's FirstBlockCache and MagCache have no oracle in the generic tests (diffusers' hooks fail on its
    stream names, tests/_families.py): with that lookup fixed, diffusers' hooks are the oracle, step by step."""
    tc = case("cosmos3")
    tc.model.eval()
    if method == "fbc":
        timesteps = TIMESTEPS
        d_cfg, f_cfg = (diffusers.FirstBlockCacheConfig(threshold=fbc_threshold(tc, timesteps)) for _ in range(2))
    else:
        timesteps = torch.linspace(1000, 1000 / 12, 12)
        ratios = [1.0] + [1.0 + 0.004 * i for i in range(1, 12)]
        d_cfg, f_cfg = (diffusers.MagCacheConfig(mag_ratios=ratios, num_inference_steps=12, threshold=0.1)
                        for _ in range(2))
    ours, theirs = copy.deepcopy(tc.model), copy.deepcopy(tc.model)
    fd.enable_cache(ours, f_cfg)
    got = denoise(ours, tc, timesteps)
    theirs.enable_cache(d_cfg)
    reference = denoise(theirs, tc, timesteps)
    uncached = denoise(tc.model, tc, timesteps, set_context=lambda name: contextlib.nullcontext())
    assert max(_max_diffs(got, reference)) <= ATOL
    assert max(_max_diffs(got, uncached)) > 1e-5, "nothing was skipped"


def test_cosmos3_a_new_latent_size_starts_its_context_afresh() -> None:
    """Cosmos 3's latent comes as a list of per-item tensors (`vision_tokens`): a new size in one context must
    start it afresh, as for every other family's `hidden_states`."""
    small, big = case("cosmos3"), case("cosmos3", size=12)  # same seed, same config: the same weights
    model = small.model.eval()
    fd.enable_cache(model, fd.FirstBlockCacheConfig(threshold=0.5))
    with torch.no_grad():
        with model.cache_context("cond"):
            model(**small.kwargs(small.latent, torch.tensor(900.0)))
        with model.cache_context("cond"):
            out = model(**big.kwargs(big.latent, torch.tensor(800.0)), return_dict=False)[0][0]
        assert int(fd.cache_state(model, "cond")["count"]) == 1
        fd.reset_cache(model)
        with model.cache_context("cond"):
            fresh = model(**big.kwargs(big.latent, torch.tensor(800.0)), return_dict=False)[0][0]
    fd.disable_cache(model)
    assert out.shape == big.latent.shape and out.equal(fresh)
