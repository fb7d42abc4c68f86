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


def _image_ids(size: int) -> Tensor:
    """Flux-style position ids of a size x size token grid: (0, row, column) per token."""
    s = size * size
    ids = torch.zeros(s, 3)
    ids[:, 1], ids[:, 2] = torch.arange(s) // size, torch.arange(s) % size
    return ids


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
        s, img = size * size, _image_ids(size)
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
        s, img = size * size, _image_ids(size)
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 1, 1e-3), img_ids=img,
            txt_ids=torch.zeros(text, 3)))
    if name == "bria":  # Flux's layout without pooled text; its pipeline passes t and batches CFG
        m = d.BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                                     attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=32,
                                     axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        s, img = size * size, _image_ids(size)
        enc = rnd(2, text, 32)
        return TinyCase(name, m, rnd(2, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 2), img_ids=img,
            txt_ids=torch.zeros(text, 3)), cfg_batched=True)
    if name == "hunyuanimage":
        m = d.HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                             attention_head_dim=hd, num_layers=layers, num_single_layers=layers,
                                             num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=32,
                                             rope_axes_dim=(hd // 2, hd // 2))
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, 4, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc,
            encoder_attention_mask=torch.ones(1, text)))
    if name in ("longcatimage", "ovisimage"):  # Flux's layout; their pipelines pass t / 1000
        cls = d.LongCatImageTransformer2DModel if name == "longcatimage" else d.OvisImageTransformer2DModel
        m = cls(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers, attention_head_dim=hd,
                num_attention_heads=heads, joint_attention_dim=32,
                axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8),
                **(dict(pooled_projection_dim=32) if name == "longcatimage" else dict(out_channels=16)))
        s, img = size * size, _image_ids(size)
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, s, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=_ts(t, 1, 1e-3), img_ids=img,
            txt_ids=torch.zeros(text, 3)))
    if name == "glmimage":  # its pipeline passes t - 1
        m = d.GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                         attention_head_dim=hd, num_attention_heads=heads, text_embed_dim=32,
                                         time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=64)
        enc = rnd(1, text, 32)
        prior = torch.randint(0, 64, (1, size * size), generator=g)
        return TinyCase(name, m, rnd(1, 4, 2 * size, 2 * size), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, prior_token_id=prior,
            prior_token_drop=torch.zeros(1, size * size, dtype=torch.bool), timestep=_ts(t, 1, 1.0, -1.0),
            target_size=torch.tensor([[16.0 * size, 16.0 * size]]), crop_coords=torch.zeros(1, 2)))
    if name == "nucleusmoe":  # a single-stream DiT, text as cross-attention keys; its pipeline passes t / 1000
        # dense blocks (mlp_ratio 6: a 128-wide FFN): the MoE layers' expert loop syncs (.tolist()) and their grouped
        # matmul path traces in bf16 only, so neither captures fullgraph in fp32; caching never looks inside a block
        m = d.NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                                attention_head_dim=hd, num_attention_heads=heads,
                                                joint_attention_dim=32, mlp_ratio=6.0,
                                                axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8), moe_enabled=False)
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, size * size, 16), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=torch.ones(1, text),
            timestep=_ts(t, 1, 1e-3), img_shapes=[(1, size, size)]))
    if name == "chronoedit":  # Wan I2V-like: condition latents concatenated on channels, CLIP image tokens
        m = d.ChronoEditTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                           in_channels=12, out_channels=4, text_dim=32, freq_dim=32,
                                           ffn_dim=2 * dim, num_layers=layers, image_dim=16, added_kv_proj_dim=dim,
                                           rope_max_seq_len=32)
        enc, img, cond = rnd(1, text, 32), rnd(1, 4, 16), rnd(1, 8, frames, size, size)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=torch.cat([x, cond], dim=1), timestep=_ts(t, 1), encoder_hidden_states=enc,
            encoder_hidden_states_image=img))
    if name == "helios":  # history latents (long, mid, short) in front of the chunk, as its pipeline passes them
        m = d.HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                       in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=2 * dim,
                                       num_layers=layers, rope_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc = rnd(1, text, 32)
        idx = torch.arange(1 + 4 + 2 + 1 + frames).split([1, 4, 2, 1, frames])  # prefix, long, mid, 1x, chunk
        history = dict(indices_hidden_states=idx[4][None], indices_latents_history_long=idx[1][None],
                       indices_latents_history_mid=idx[2][None],
                       indices_latents_history_short=torch.cat([idx[0], idx[3]])[None],
                       latents_history_short=rnd(1, 4, 2, size, size), latents_history_mid=rnd(1, 4, 2, size, size),
                       latents_history_long=rnd(1, 4, 4, size, size))
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc, **history))
    if name == "skyreelsv2":  # diffusion forcing: per-frame timesteps, the first frame a denoised prefix (at 0)
        m = d.SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                           in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=2 * dim,
                                           num_layers=layers, rope_max_seq_len=32, inject_sample_info=True)
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=torch.cat([torch.zeros(1), _ts(t, frames - 1)])[None],
            encoder_hidden_states=enc, enable_diffusion_forcing=True, fps=[1]))
    if name == "wananimate":  # reference latents on channels, pose latents, a face video through its adapters
        m = d.WanAnimateTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                           in_channels=12, latent_channels=4, out_channels=4, text_dim=32,
                                           freq_dim=32, ffn_dim=2 * dim, num_layers=layers, image_dim=16,
                                           rope_max_seq_len=32, motion_encoder_size=16, motion_style_dim=8,
                                           motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_dim=4,
                                           motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
                                           inject_face_latents_blocks=2)  # a face adapter after every 2nd block
        enc, img = rnd(1, text, 32), rnd(1, 4, 16)
        ref, pose = rnd(1, 8, frames, size, size), rnd(1, 4, frames - 1, size, size)
        face = rnd(1, 3, 4 * frames - 7, 16, 16)  # its encoder takes 4 * (T - 1) - 3 face frames to T - 1
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=torch.cat([x, ref], dim=1), timestep=_ts(t, 1), encoder_hidden_states=enc,
            encoder_hidden_states_image=img, pose_hidden_states=pose, face_pixel_values=face))
    if name == "wanvace":  # control hints added after the blocks in vace_layers
        vace = sorted({0, layers - 1})
        m = d.WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=2 * dim,
                                        num_layers=layers, rope_max_seq_len=32, vace_layers=vace, vace_in_channels=8)
        enc, control = rnd(1, text, 32), rnd(1, 8, frames, size, size)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc, control_hidden_states=control,
            control_hidden_states_scale=torch.ones(len(vace))))
    if name == "hunyuanvideo15":  # text-to-video: image_embeds all zeros (the pipeline's t2v input)
        m = d.HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                               attention_head_dim=hd, num_layers=layers, num_refiner_layers=1,
                                               patch_size=2, text_embed_dim=32, text_embed_2_dim=32,
                                               image_embed_dim=32, rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc, enc2 = rnd(1, text, 32), rnd(1, 4, 32)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc, encoder_attention_mask=torch.ones(1, text),
            encoder_hidden_states_2=enc2, encoder_attention_mask_2=torch.ones(1, 4),
            image_embeds=torch.zeros(1, 4, 32)))
    if name == "framepack":  # HunyuanVideo's blocks; clean 1x/2x/4x history latents packed before the window
        m = d.HunyuanVideoFramepackTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                                      attention_head_dim=hd, num_layers=layers,
                                                      num_single_layers=layers, num_refiner_layers=1, patch_size=2,
                                                      text_embed_dim=32, pooled_projection_dim=32,
                                                      rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8),
                                                      has_image_proj=True, image_proj_dim=32, has_clean_x_embedder=True)
        enc, pooled, img = rnd(1, text, 32), rnd(1, 32), rnd(1, 4, 32)
        clean, h2, h4 = rnd(1, 4, 2, size, size), rnd(1, 4, 2, size, size), rnd(1, 4, 4, size, size)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc, encoder_attention_mask=torch.ones(1, text),
            pooled_projections=pooled, image_embeds=img, indices_latents=torch.arange(5, 5 + frames),
            guidance=torch.full((1,), 10000.0), latents_clean=clean, indices_latents_clean=torch.tensor([0, 4]),
            latents_history_2x=h2, indices_latents_history_2x=torch.tensor([2, 3]), latents_history_4x=h4,
            indices_latents_history_4x=torch.tensor([0, 1, 1, 2])))
    if name == "motifvideo":
        m = d.MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                           attention_head_dim=hd, num_layers=layers, num_single_layers=layers,
                                           patch_size=2, text_embed_dim=32,
                                           rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        enc = rnd(1, text, 32)
        return TinyCase(name, m, rnd(1, 4, frames, size, size), lambda x, t: dict(
            hidden_states=x, timestep=_ts(t, 1), encoder_hidden_states=enc, encoder_attention_mask=torch.ones(1, text)))
    if name == "minimaxh3":  # one packed sequence: text, video, audio rows; timesteps are 1 - sigma (0 = noise)
        m = d.MiniMaxH3Transformer3DModel(num_attention_heads=heads, attention_head_dim=hd, hidden_size=dim,
                                          num_layers=layers, num_refiner_layers=1, ffn_dim=2 * dim, in_channels=4,
                                          audio_in_channels=8, text_dim=32, freq_dim=32, time_embed_hidden_dim=dim,
                                          time_embed_dim=dim, rope_freq_dim=hd // 8)
        v = frames * (size // 2) ** 2
        a, n = 4, text + v + 4
        pos = torch.zeros(n, 3, dtype=torch.long)
        pos[text:text + v] = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(size // 2),
                                                        torch.arange(size // 2), indexing="ij"), -1).reshape(-1, 3)
        tags = torch.tensor([1] * text + [0] * v + [2] * a)
        rows = torch.tensor([0] * (text + v) + [1] * a)  # video and text rows at the video timestep, audio at its own
        enc, audio = rnd(1, text, 32), rnd(1, a, 8)
        return TinyCase(name, m, rnd(1, v, 16), lambda x, t: dict(
            hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=enc,
            timestep=torch.stack([1 - t / 1000, 1 - 0.8 * t / 1000]).float(), timestep_indices=rows, token_tags=tags,
            position_ids=pos, video_indices=torch.arange(text, text + v), audio_indices=torch.arange(text + v, n),
            text_indices=torch.arange(text)))
    if name == "sanawmrefiner":  # LTX-2's video blocks; tiny case without the AR refiner's KV cache
        m = d.SanaWMLTX2RefinerTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=heads,
                                                  attention_head_dim=hd, cross_attention_dim=dim,
                                                  audio_in_channels=8, audio_out_channels=8,
                                                  audio_num_attention_heads=heads, audio_attention_head_dim=8,
                                                  audio_cross_attention_dim=16, num_layers=layers, caption_channels=32)
        rope = m.build_rotary_emb_for_absolute_positions(1, list(range(3, 3 + frames)), size, size, "cpu", 24.0)
        enc, s = rnd(1, text, 32), frames * size * size
        return TinyCase(name, m, rnd(1, s, 8), lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=enc, timestep=(t * torch.ones(1, s)).float(),
            video_rotary_emb=rope, encoder_attention_mask=torch.ones(1, text)))
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
    if name == "cosmos3":  # packed sequence: text prefix (causal "und" stream), then the video patches ("gen")
        p, ch = 2, 4
        m = d.Cosmos3OmniTransformer(head_dim=hd, hidden_size=dim, intermediate_size=2 * dim, latent_channel=ch,
                                     latent_patch_size=p, num_attention_heads=heads, num_hidden_layers=layers,
                                     num_key_value_heads=1, patch_latent_dim=p * p * ch, vocab_size=64,
                                     rope_axes_dim=(hd // 8, 3 * hd // 16, 3 * hd // 16))
        grid = (frames, size // p, size // p)
        vision = frames * grid[1] * grid[2]
        ids = torch.randint(0, 64, (text,), generator=g)
        pos = torch.arange(text).expand(3, text)
        f, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        pos = torch.cat([pos, torch.stack([f.flatten(), h.flatten(), w.flatten()]) + text], 1)
        gen = torch.arange(text, text + vision)
        # the pipeline passes t per noisy vision token (torch.full), the model scales it by 1 / 1000
        return TinyCase(name, m, rnd(1, ch, frames, size, size), lambda x, t: dict(
            input_ids=ids, text_indexes=torch.arange(text), position_ids=pos, und_len=text,
            sequence_length=text + vision, vision_tokens=[x], vision_token_shapes=[grid],
            vision_sequence_indexes=gen, vision_mse_loss_indexes=gen, vision_timesteps=_ts(t, vision),
            vision_noisy_frame_indexes=[torch.arange(frames)]))
    raise ValueError(f"name: unknown tiny case {name!r}; known: {', '.join(CASES)}")


CASES = ("flux", "flux2", "cogvideox", "hunyuanvideo", "wan", "ltx", "mochi", "latte", "allegro", "cogview4",
         "sd3", "qwenimage", "chroma",
         "bria", "hunyuanimage", "longcatimage", "ovisimage", "glmimage", "nucleusmoe",
         "chronoedit", "helios", "skyreelsv2", "wananimate", "wanvace",
         "hunyuanvideo15", "framepack", "motifvideo", "minimaxh3", "sanawmrefiner",
         "kandinsky5", "acestep", "qwenimage21", "kandinsky6", "ltx2", "cosmos3")


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
                out = model(**tc.kwargs(x, t), return_dict=False)[0]
                outs.append(out[0] if isinstance(out, list) else out)  # Cosmos 3: one prediction per item
        if observe is not None:
            observe(i)
        out = outs[-1]
        if out.dim() == x.dim() == 3 and out.shape[1] > x.shape[1]:  # a joint text+image output: its image tokens
            out = out[:, -x.shape[1]:]
        x = x - 0.05 * out
    return outs


def fbc_threshold(tc: TinyCase, timesteps: Tensor, contexts: tuple[str, ...] = ("cond",),
                  quantile: float = 0.5) -> float:
    """A FirstBlockCache threshold for `tc` that skips about `1 - quantile` of the steps after the first."""
    from fastcache.methods.first_block_cache import FirstBlockCacheConfig

    return observed_threshold(tc, FirstBlockCacheConfig(threshold=0.0), lambda state: [float(state["ratio"])],
                              timesteps, contexts, quantile)


def observed_threshold(tc: TinyCase, never: Any, measures: Callable[[dict], list[float]], timesteps: Tensor,
                       contexts: tuple[str, ...] = ("cond",), quantile: float = 0.5) -> float:
    """A threshold for `tc` under which about `quantile` of the measures a run with config `never` (which never
    skips) records fall: the midpoint between two neighbouring observed values (random weights give no natural
    scale, and a threshold away from every observed value keeps eager and compiled decisions equal).
    `measures(state)` reads a call's values from a context's state (FirstBlockCache's `ratio`, TeaCache's `rel`)."""
    import copy

    from fastcache.diffusers._api import cache_state, disable_cache, enable_cache

    model = copy.deepcopy(tc.model)
    enable_cache(model, never)
    values: list[float] = []

    def record(i: int) -> None:
        if i > 0:
            values.extend(v for name in contexts for v in measures(cache_state(model, name)))

    denoise(model, tc, timesteps, contexts, observe=record)
    disable_cache(model)
    values.sort()
    k = min(max(int(len(values) * quantile), 1), len(values) - 1)
    return (values[k - 1] + values[k]) / 2
