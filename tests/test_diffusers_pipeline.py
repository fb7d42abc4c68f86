"""A tiny FluxPipeline assembled from random-weight components (no download), called unmodified with
fastcache enabled on the pipeline and the transformer compiled with fullgraph=True."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # FluxPipeline imports it (unused here)

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._tiny import case  # noqa: E402
from fastcache.methods.faster_cache import plan as fc_plan  # noqa: E402


def _pipeline() -> FluxPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=case("flux").model.eval())


STEPS = 10


def _call(pipe: FluxPipeline, computed: list[int] | None = None) -> torch.Tensor:
    """One unmodified pipeline call; `computed` receives FBC's count of computed steps after the last step."""
    def record(pipe: FluxPipeline, step: int, timestep: torch.Tensor, kwargs: dict) -> dict:
        if computed is not None and step == STEPS - 1:
            computed.append(int(fd.cache_state(pipe.transformer, "cond")["num_computed"]))
        return kwargs

    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32,
                num_inference_steps=STEPS, guidance_scale=1.0, generator=g, output_type="pt",
                callback_on_step_end=record).images


def test_flux_pipeline_compiled_fullgraph(dynamo) -> None:
    pipe = _pipeline()
    reference = _call(pipe)  # uncached
    fd.enable_cache(pipe, fd.FirstBlockCacheConfig(threshold=0.3))
    eager_computed: list[int] = []
    eager = _call(pipe, eager_computed)
    assert _call(pipe).equal(eager), "a second call must start from fresh states"
    assert 1 < eager_computed[0] < STEPS, "the threshold must give both computed and skipped steps"
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)  # default backend: inductor
    computed: list[int] = []
    compiled = _call(pipe, computed)
    again = _call(pipe, computed)
    assert dynamo.graph_breaks == 0
    assert dynamo.graphs == 2  # the first call of a context, then one graph for every other call
    assert computed == eager_computed * 2, "compiled decisions must equal eager ones"
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=0)
    pipe.transformer = pipe.transformer._orig_mod
    fd.disable_cache(pipe)
    assert type(pipe) is FluxPipeline
    assert _call(pipe).equal(reference), "disable_cache must restore the original forward exactly"


def test_two_pipelines_sharing_a_transformer_do_not_share_state() -> None:
    a = _pipeline()
    b = FluxPipeline(**{**a.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    fd.enable_cache(a, fd.FirstBlockCacheConfig(threshold=0.3))
    fd.enable_cache(b, fd.FirstBlockCacheConfig(threshold=0.3))  # same transformer, same config: allowed
    alone = _call(a)
    states_seen = []

    def interleave(pipe, step, timestep, kwargs):  # run pipeline b in the middle of pipeline a's loop
        if step == 3:
            states_seen.append(_call(b))
        return kwargs

    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    mixed = a(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32, num_inference_steps=10,
              guidance_scale=1.0, generator=g, output_type="pt", callback_on_step_end=interleave).images
    assert mixed.equal(alone)
    assert states_seen[0].equal(alone)
    fd.disable_cache(a)
    fd.disable_cache(b)


@pytest.mark.parametrize("usage", ["diffusers-callback", "fastcache-scheduler"])
def test_flux_pipeline_pab_is_planned_on_the_host_without_a_sync(usage: str, monkeypatch, dynamo) -> None:
    """PAB on an unmodified FluxPipeline: the decisions are made on the host at each cache_context entry, from
    the scheduler's timesteps (copied to the host once per schedule), so the compiled forward holds no
    torch.cond. With diffusers' usage verbatim (`current_timestep_callback=lambda: pipe.current_timestep`, a
    tensor) the value is found in that host copy instead of being read from the tensor (a sync on GPU).
    Outputs equal diffusers' own PAB hooks on the same pipeline."""
    import diffusers

    from fastcache.diffusers._runtime import Session
    from fastcache.testing import CompileCounter

    pipe = _pipeline()
    uncached = _call(pipe)
    config = diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 900),
        current_timestep_callback=lambda: pipe.current_timestep)
    pipe.transformer.enable_cache(config)
    expected = _call(pipe)
    pipe.transformer.disable_cache()
    assert (expected - uncached).abs().max() > 1e-4, "PAB reused nothing: the comparison would prove nothing"
    if usage == "fastcache-scheduler":
        config = fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=(100, 900))
    found: list[float | None] = []
    lookup = Session._scheduler_lookup
    monkeypatch.setattr(Session, "_scheduler_lookup", lambda self, s, v: found.append(lookup(self, s, v)) or found[-1])
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("a host read of a timestep tensor"))
    fd.enable_cache(pipe, config)
    eager = _call(pipe)
    assert fd.decided_on(pipe.transformer) == "host"
    counter = CompileCounter("eager")
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counter)
    compiled = _call(pipe)
    pipe.transformer = pipe.transformer._orig_mod
    fd.disable_cache(pipe)
    torch.testing.assert_close(eager, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=0)
    assert counter.max_conds_per_call == 0 and counter.graphs <= 3, counter.conds_per_graph
    if usage == "diffusers-callback":
        assert len(found) == 2 * STEPS and None not in found, found


def _cogvideox_pipeline():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=case("cogvideox").model.eval(),
                             scheduler=CogVideoXDDIMScheduler())


def _cogvideox_call(pipe, prompts: int, guidance_scale: float) -> torch.Tensor:
    embeds = torch.randn(prompts, 8, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=guidance_scale,
                num_frames=5, height=64, width=64, num_inference_steps=8, output_type="latent",
                max_sequence_length=8, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("prompts", [1, 2])
def test_fastercache_with_cfg_off_runs_as_guidance_distilled(prompts: int) -> None:
    """CogVideoXPipeline with guidance_scale=1 batches separate prompts, not [uncond; cond]: FasterCache must not
    rebuild one prompt from another (2 prompts) nor crash (1 prompt, an odd batch). The drop-in detects CFG off
    and runs the attention approximation only, exactly as with is_guidance_distilled=True."""
    pipe = _cogvideox_pipeline()
    config = fd.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=2,
                                  spatial_attention_timestep_skip_range=(-1, 1001),
                                  unconditional_batch_timestep_skip_range=(-1, 1001), tensor_format="BFCHW")
    uncached = _cogvideox_call(pipe, prompts, 1.0)
    fd.enable_cache(pipe, config)
    out = _cogvideox_call(pipe, prompts, 1.0)
    fd.disable_cache(pipe)
    fd.enable_cache(pipe, dataclasses.replace(config, is_guidance_distilled=True))
    distilled = _cogvideox_call(pipe, prompts, 1.0)
    fd.disable_cache(pipe)
    assert out.equal(distilled)
    assert 0 < (out - uncached).abs().max() < 0.5 * uncached.abs().max()


def test_fastercache_refuses_an_odd_batch_before_any_compute() -> None:
    tc = case("cogvideox")
    model = tc.model.eval()
    fd.enable_cache(model, fd.FasterCacheConfig(tensor_format="BFCHW"))
    kwargs = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v
              for k, v in tc.kwargs(tc.latent, torch.tensor(500.0)).items()}
    with pytest.raises(ValueError, match="is_guidance_distilled"), model.cache_context("cond_uncond"):
        model(**kwargs)
    fd.disable_cache(model)


def test_wan22_two_denoisers_are_both_cached_each_with_its_own_state() -> None:
    """Wan 2.2 A14B runs `transformer` above the boundary timestep and `transformer_2` below it: enable_cache on
    the pipeline caches both (before: `transformer_2` was left uncached without a word), each with its own
    states, and equals caching each transformer by hand with the same per-pipeline-call resets."""
    from diffusers import WanPipeline

    def pipeline() -> WanPipeline:
        return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                           transformer=case("wan", seed=0).model.eval(), transformer_2=case("wan", seed=1).model.eval(),
                           boundary_ratio=0.5)

    def run(pipe: WanPipeline) -> torch.Tensor:
        embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, guidance_scale=3.0, num_frames=5,
                    height=64, width=64, num_inference_steps=10, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    config = fd.FirstBlockCacheConfig(threshold=0.3)
    pipe = pipeline()
    fd.enable_cache(pipe, config)
    computed = {}

    def record(p, step, timestep, kwargs):
        for name in ("transformer", "transformer_2"):
            state = fd.cache_state(getattr(p, name), "cond")
            computed[name] = None if state is None else int(state["num_computed"])
        return kwargs

    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    cached = pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, guidance_scale=3.0, num_frames=5, height=64,
                  width=64, num_inference_steps=10, output_type="latent", generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=record).frames
    fd.disable_cache(pipe)
    assert set(computed) == {"transformer", "transformer_2"} and all(computed.values()), computed

    by_hand = pipeline()  # the same two transformers, each enabled on its own
    fd.enable_cache(by_hand.transformer, config)
    fd.enable_cache(by_hand.transformer_2, config)
    expected = run(by_hand)
    assert cached.equal(expected)
    assert not cached.equal(run(pipeline())), "FBC must have skipped something"


def _guide_config(pipe, **changes):
    """diffusers' caching guide, verbatim (FasterCache on CogVideoX), with `changes` applied."""
    import diffusers

    fields = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                  current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.3,
                  unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
                  tensor_format="BFCHW")
    return diffusers.FasterCacheConfig(**{**fields, **changes})


def test_diffusers_caching_guide_fastercache_runs_as_written_and_compiles_its_constants(dynamo) -> None:
    """The guide's FasterCacheConfig, only `pipe.transformer.enable_cache(config)` changed to
    `fastcache.enable_cache(pipe.transformer, config)`: diffusers' module-taking callbacks are accepted, the
    outputs equal diffusers' own hooks, and compiled with fullgraph=True the constant weight is a constant
    (graphs <= planned variants + 1, no torch.cond: the decisions are planned from `pipe.current_timestep`)."""
    from fastcache.testing import CompileCounter

    pipe = _cogvideox_pipeline()
    config = _guide_config(pipe)
    uncached = _cogvideox_call(pipe, 1, 6.0)
    pipe.transformer.enable_cache(config)
    expected = _cogvideox_call(pipe, 1, 6.0)
    pipe.transformer.disable_cache()
    assert (expected - uncached).abs().max() > 1e-4, "FasterCache must have changed something"

    fd.enable_cache(pipe.transformer, _guide_config(pipe))  # (diffusers filled its defaults into `config`)
    eager = _cogvideox_call(pipe, 1, 6.0)
    counter = CompileCounter("eager")
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counter)
    compiled = _cogvideox_call(pipe, 1, 6.0)
    pipe.transformer = pipe.transformer._orig_mod
    fd.disable_cache(pipe.transformer)
    atol = 2e-6 * float(expected.abs().max())  # the latents reach ~50; FFT vs real-space split, fp32
    torch.testing.assert_close(eager, expected, atol=atol, rtol=0)
    torch.testing.assert_close(compiled, expected, atol=atol, rtol=0)
    plan = fc_plan(fd.to_fastcache_config(_guide_config(pipe, attention_weight_callback=None)),
                   pipe.scheduler.timesteps)
    assert counter.max_conds_per_call == 0 and counter.graphs <= plan.variants() + 1, counter.conds_per_graph


def test_a_diffusers_weight_callback_that_changes_warns_once() -> None:
    pipe = _cogvideox_pipeline()
    weights = iter(torch.linspace(0.2, 0.4, 100).tolist())
    fd.enable_cache(pipe.transformer, _guide_config(pipe, attention_weight_callback=lambda _: next(weights)))
    with pytest.warns(UserWarning, match="attention_weight_callback returned a new value") as caught:
        _cogvideox_call(pipe, 1, 6.0)
    fd.disable_cache(pipe.transformer)
    assert sum("new value" in str(w.message) for w in caught) == 1


def test_a_planned_pipeline_run_caches_only_the_kinds_its_schedule_reuses() -> None:
    """With the pipeline's schedule known on the host, a kind of attention that no step reuses keeps no output:
    PAB whose timestep range misses every step of the schedule holds no cache at all (and equals an uncached
    run), while a range inside the schedule caches every spatial site."""
    pipe = _pipeline()
    uncached = _call(pipe)
    kept: dict[str, int] = {}

    def run(bounds: tuple[float, float]) -> torch.Tensor:
        config = fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=bounds)
        fd.enable_cache(pipe, config)

        def record(pipe, step, timestep, kwargs):
            kept[str(bounds)] = len(fd.cache_state(pipe.transformer, "cond").get("cache", {}))
            return kwargs

        g = torch.Generator().manual_seed(0)
        out = pipe(prompt_embeds=torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)),
                   pooled_prompt_embeds=torch.randn(1, 32, generator=torch.Generator().manual_seed(2)),
                   height=32, width=32, num_inference_steps=STEPS, guidance_scale=1.0, generator=g,
                   output_type="pt", callback_on_step_end=record).images
        assert fd.decided_on(pipe.transformer) == "host"
        fd.disable_cache(pipe)
        return out

    never = run((0.0, 1.0))
    assert kept[str((0.0, 1.0))] == 0 and never.equal(uncached)
    reused = run((100.0, 900.0))
    spatial = sum(1 for n, m in pipe.transformer.named_modules() if n.endswith((".attn",)) and
                  n.startswith(("transformer_blocks", "single_transformer_blocks")))
    assert kept[str((100.0, 900.0))] == spatial > 0 and not reused.equal(uncached)


def test_skyreels_diffusion_forcing_pab_is_planned_from_the_rows_it_denoises() -> None:
    """SkyReels-V2's diffusion forcing steps one copy of its scheduler per frame (its own never steps) and passes
    a row of per-frame timesteps per call (12 calls for 10 steps here, ar_step=1). PAB planned on the host from
    the pipeline reads that row (its noisiest frame, as Family.timestep), not the schedule's first timestep at
    every call (which reused nothing), and equals diffusers' PAB given that value by its callback."""
    import diffusers
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=case("skyreelsv2").model.eval(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0))
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        # guidance 1 (one context): diffusers' PAB keeps one state for the cond and uncond passes, fastcache one each
        return pipe(None, prompt_embeds=embeds, guidance_scale=1.0, num_frames=9,
                    base_num_frames=9, height=64, width=64, num_inference_steps=10, ar_step=1, causal_block_size=1,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    def config(callback) -> diffusers.PyramidAttentionBroadcastConfig:
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 900),
            current_timestep_callback=callback)

    uncached = run()
    pipe.transformer.enable_cache(config(lambda: float(pipe.current_timestep.max())))
    expected = run()
    pipe.transformer.disable_cache()
    assert (expected - uncached).abs().max() > 1e-4, "PAB reused nothing: the comparison would prove nothing"
    fd.enable_cache(pipe, config(None))  # no callback: the running pipeline gives the timestep
    ours = run()
    assert fd.decided_on(pipe.transformer) == "host"
    fd.disable_cache(pipe)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
