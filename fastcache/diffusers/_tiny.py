"""Tiny random-weight diffusers transformers, one per supported family, and their call arguments.

For tests and the benchmark: no download, built from configs. `case(name, scale)` returns a `TinyCase`:
the model, the latent to denoise and `kwargs(latent, t)`, the transformer's arguments at scheduler
timestep `t` (0..1000), converted to the family's own convention (Flux passes t / 1000, Mochi 1000 - t).
`scale` widens the models for the benchmark (head dim 16 * scale, hidden size = heads * 16 * scale) and `layers`
deepens them (blocks per block list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class TinyCase:
    name: str
    model: nn.Module
    latent: Tensor
    kwargs: Callable[[Tensor, Tensor], dict[str, Any]]
    cfg_batched: bool = False


def _ts(t: Tensor, batch: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    return (t * scale + offset).float().expand(batch)


def _modulate(model: nn.Module) -> None:
    """Random modulation weights where the model initialises them to zero (zero gates: every block an identity)."""
    for name, p in model.named_parameters():
        if "modulation" in name and not p.any():
            nn.init.normal_(p, std=0.2)


def case(name: str, scale: int = 1, frames: int = 2, size: int = 8, text: int = 8, seed: int = 0,
         layers: int = 2, heads: int = 2) -> TinyCase:
    import diffusers as d

    torch.manual_seed(seed)
    hd = 16 * scale
    dim = heads * hd
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    if name == "flux":
        m = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                                     attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        s = size * size
        img = torch.zeros(s, 3)
        img[:, 1], img[:, 2] = torch.arange(s) // size, torch.arange(s) % size
        enc, pooled = rnd(1, text, 32), rnd(1, 32)
        return TinyCase(name, m, rnd(1, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=_ts(t, 1, 1e-3),
            img_ids=img, txt_ids=torch.zeros(text, 3), guidance=None))
    if name == "flux2":
        m = d.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                                      attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                      timestep_guidance_channels=32, axes_dims_rope=(hd // 4,) * 4,
                                      guidance_embeds=False)
        s = size * size
        img = torch.zeros(1, s, 4)
        img[0, :, 1], img[0, :, 2] = torch.arange(s) // size, torch.arange(s) % size
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 1, 1e-3), img_ids=img,
            txt_ids=torch.zeros(1, text, 4)))
    if name == "cogvideox":
        m = d.CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                          out_channels=4, time_embed_dim=32, text_embed_dim=32, num_layers=layers,
                                          sample_width=size, sample_height=size, sample_frames=4 * frames - 3,
                                          patch_size=2, max_text_seq_length=text)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, frames, 4, size, size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2)), cfg_batched=True)
    if name == "hunyuanvideo":
        m = d.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                             attention_head_dim=hd, num_layers=layers, num_single_layers=layers,
                                             num_refiner_layers=1, patch_size=2, text_embed_dim=32,
                                             pooled_projection_dim=32,
                                             rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc, pooled = rnd(1, text, 32), rnd(1, 32)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc,
            encoder_attention_mask=torch.ones(1, text), pooled_projections=pooled,
            guidance=torch.full((1,), 6000.0)))
    if name == "wan":
        m = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                    in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=2 * dim,
                                    num_layers=layers, rope_max_seq_len=32)
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc))
    if name == "ltx":
        m = d.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=heads,
                                         attention_head_dim=hd, cross_attention_dim=dim, num_layers=layers,
                                         caption_channels=32)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, frames * size * size, 8), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2), encoder_attention_mask=torch.ones(2, text),
            num_frames=frames, height=size, width=size), cfg_batched=True)
    if name == "mochi":
        m = d.MochiTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=hd, num_layers=layers,
                                      pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                      max_sequence_length=text)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2, -1.0, 1000.0),
            encoder_attention_mask=torch.ones(2, text)), cfg_batched=True)
    if name == "latte":
        m = d.LatteTransformer3DModel(num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                      out_channels=4, num_layers=layers, cross_attention_dim=dim, sample_size=size,
                                      patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                      norm_type="ada_norm_single", caption_channels=32, video_length=frames)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2)), cfg_batched=True)
    if name == "allegro":
        m = d.AllegroTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=hd,
                                        in_channels=4, out_channels=4, num_layers=layers, cross_attention_dim=dim,
                                        sample_height=size, sample_width=size, sample_frames=frames,
                                        caption_channels=32)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2)), cfg_batched=True)
    if name == "cogview4":
        m = d.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                         attention_head_dim=hd, num_attention_heads=heads, text_embed_dim=32,
                                         time_embed_dim=32, condition_dim=8, pos_embed_max_size=2 * size,
                                         sample_size=2 * size, rope_axes_dim=(hd // 2, hd // 2))
        enc = rnd(1, text, 32)
        hw = torch.tensor([[2 * size * 8, 2 * size * 8]], dtype=torch.float32)
        return TinyCase(name, m, rnd(1, 4, 2 * size, 2 * size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 1), original_size=hw, target_size=hw,
            crop_coords=torch.zeros(1, 2)))
    if name == "sd3":
        m = d.SD3Transformer2DModel(sample_size=2 * size, patch_size=2, in_channels=4, num_layers=layers,
                                    attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                    caption_projection_dim=dim, pooled_projection_dim=32, out_channels=4,
                                    pos_embed_max_size=2 * size)
        enc, pooled = rnd(2, text, 32), rnd(2, 32)
        return TinyCase(name, m, rnd(2, 4, 2 * size, 2 * size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=_ts(t, 2)),
            cfg_batched=True)
    if name == "qwenimage":
        m = d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                          attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                          axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, size * size, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=torch.ones(1, text),
            timestep=_ts(t, 1, 1e-3), img_shapes=[(1, size, size)]))
    if name == "chroma":  # Flux's blocks, no pooled text, a distilled-guidance approximator
        m = d.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                                       attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                       axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8), approximator_num_channels=8,
                                       approximator_hidden_dim=32, approximator_layers=1)
        s = size * size
        img = torch.zeros(s, 3)
        img[:, 1], img[:, 2] = torch.arange(s) // size, torch.arange(s) % size
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 1, 1e-3), img_ids=img,
            txt_ids=torch.zeros(text, 3)))
    if name == "kandinsky5":  # text-encoder blocks, then the cached visual-decoder blocks; (B, T, H, W, C) latents
        m = d.Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32,
                                           out_visual_dim=4, model_dim=dim, ff_dim=2 * dim, num_text_blocks=layers,
                                           num_visual_blocks=layers, axes_dims=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        _modulate(m)
        enc, pooled = rnd(1, text, 32), rnd(1, 16)
        pos = [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)]
        return TinyCase(name, m, rnd(1, frames, size, size, 4), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=_ts(t, 1),
            visual_rope_pos=pos, text_rope_pos=torch.arange(text)))
    if name == "acestep":  # 1-D audio tokens (B, T, C), a context latent concatenated on the channels
        m = d.AceStepTransformer1DModel(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=1, head_dim=hd, in_channels=16,
                                        audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=4,
                                        encoder_hidden_size=32)
        enc, ctx = rnd(2, text, 32), rnd(2, 2 * size, 8)
        return TinyCase(name, m, rnd(2, 2 * size, 8), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 2, 1e-3), timestep_r=_ts(t, 2, 1e-3), encoder_hidden_states=enc,
            context_latents=ctx), cfg_batched=True)
    if name == "qwenimage21":  # one joint text+image stream; each image slot of img_mask is 2x2 latent tokens
        m = d.QwenImage21Transformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=layers,
                                            attention_head_dim=hd, num_attention_heads=heads, context_in_dim=32,
                                            axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc = rnd(1, text, 32)
        valid = torch.ones(1, text, dtype=torch.bool)
        mask = torch.cat([~valid, torch.ones(1, size * size // 4, dtype=torch.bool)], 1)  # text slots, image slots
        return TinyCase(name, m, rnd(1, size * size, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=valid, timestep=_ts(t, 1, 1e-3),
            img_shapes=[[(1, size, size)]], img_mask=mask))
    if name == "kandinsky6":  # fused video+audio blocks (streams `vis`, `aud`), text blocks per modality
        m = d.Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16,
                                           time_dim=32, model_dim=dim, ff_dim=2 * dim, num_text_blocks=layers,
                                           num_visual_blocks=layers, axes_dims=(hd // 4, 3 * hd // 8, 3 * hd // 8),
                                           visual_cond=False, in_audio_dim=8, out_audio_dim=8, ca_rope=True,
                                           cross_gates=True, fix_modulation=True, text_token_padding=True)
        enc, pooled, audio = rnd(1, text, 32), rnd(1, 16), rnd(1, 2 * size, 8)
        return TinyCase(name, m, rnd(1, frames, size, size, 4), lambda x, t: dict(
            hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=enc, pooled_projections=pooled,
            timestep=_ts(t, 1), encoder_attention_mask=torch.ones(1, text, dtype=torch.bool)))
    if name == "ltx2":  # video and audio token streams through the same blocks, CFG batched
        m = d.LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=heads,
                                          attention_head_dim=hd, cross_attention_dim=dim, audio_in_channels=8,
                                          audio_out_channels=8, audio_num_attention_heads=heads,
                                          audio_attention_head_dim=hd, audio_cross_attention_dim=dim,
                                          num_layers=layers, caption_channels=32)
        enc, audio, audio_frames = rnd(2, text, 32), rnd(2, 2 * size, 8), 2 * size
        return TinyCase(name, m, rnd(2, frames * size * size, 8), lambda x, t: dict(
            hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=enc, audio_encoder_hidden_states=enc,
            timestep=_ts(t, 2), sigma=_ts(t, 2), encoder_attention_mask=torch.ones(2, text),
            audio_encoder_attention_mask=torch.ones(2, text), num_frames=frames, height=size, width=size,
            audio_num_frames=audio_frames), cfg_batched=True)
    raise ValueError(f"name: unknown tiny case {name!r}; known: {', '.join(CASES)}")


CASES = ("flux", "flux2", "cogvideox", "hunyuanvideo", "wan", "ltx", "mochi", "latte", "allegro", "cogview4",
         "sd3", "qwenimage", "chroma", "kandinsky5", "acestep", "qwenimage21", "kandinsky6", "ltx2")


def denoise(model: Any, tc: TinyCase, timesteps: Tensor, contexts: tuple[str, ...] = ("cond",),
            set_context: Callable[[str], Any] | None = None, clock: dict | None = None,
            observe: Callable[[int], None] | None = None) -> list[Tensor]:
    """A plain Euler-like loop through `model` (the transformer, maybe compiled): each step calls it once per
    cache context (the CFG passes, as pipelines run them) and returns every output in call order.

    `set_context(name)` selects a context (default: the model's `cache_context`, none if it has none);
    `clock["t"]` holds the current timestep (for diffusers' `current_timestep_callback`); `observe(i)` runs
    after step `i`.
    """
    if set_context is None:
        set_context = getattr(model, "cache_context", None) or (lambda name: contextlib.nullcontext())
    x, outs = tc.latent.clone(), []
    for i, t in enumerate(timesteps):
        if clock is not None:
            clock["t"] = t
        for name in contexts:
            with torch.no_grad(), set_context(name):
                outs.append(model(**tc.kwargs(x, t), return_dict=False)[0])
        if observe is not None:
            observe(i)
        out = outs[-1]
        if out.dim() == x.dim() == 3 and out.shape[1] > x.shape[1]:  # a joint text+image output: its image tokens
            out = out[:, -x.shape[1]:]
        x = x - 0.05 * out
    return outs


def fbc_threshold(tc: TinyCase, timesteps: Tensor, contexts: tuple[str, ...] = ("cond",),
                  quantile: float = 0.5) -> float:
    """A FirstBlockCache threshold for `tc` that skips about `1 - quantile` of the steps after the first: the
    midpoint between two neighbouring observed ratios (random weights give no natural scale, and a
    threshold away from every observed ratio keeps eager and compiled decisions equal)."""
    import copy

    from fastcache.diffusers._api import cache_state, disable_cache, enable_cache
    from fastcache.methods.first_block_cache import FirstBlockCacheConfig

    model = copy.deepcopy(tc.model)
    enable_cache(model, FirstBlockCacheConfig(threshold=0.0))
    ratios: list[float] = []

    def record(i: int) -> None:
        if i > 0:
            ratios.extend(float(cache_state(model, name)["ratio"]) for name in contexts)

    denoise(model, tc, timesteps, contexts, observe=record)
    disable_cache(model)
    ratios.sort()
    k = min(max(int(len(ratios) * quantile), 1), len(ratios) - 1)
    return (ratios[k - 1] + ratios[k]) / 2
