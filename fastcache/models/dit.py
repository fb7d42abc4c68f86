"""A small, readable diffusion transformer: the engine's test bed and the demo's embedded model.

Images are (B, C, H, W); videos are (B, C, F, H, W) (the BCFHW layout). Each block is DiT-style:
adaLN-Zero modulation from the timestep, spatial self-attention over the patches of each frame, an optional
temporal self-attention over the frames of each patch, cross-attention to the condition tokens (a class
label here), and an MLP. The model predicts the rectified-flow velocity `noise - x0` at timestep
t in [0, 1000] (t = 1000 is pure noise), the convention the caches' timestep ranges use.

It meets `fastcache.protocol.CacheableModel`; `forward` is the plain uncached call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcache.protocol import Attend, AttentionSite, Aux, Inputs, Streams, call_attention, forward


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 1
    sample_size: int = 16
    patch_size: int = 2
    hidden_size: int = 96
    num_heads: int = 4
    depth: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    condition_tokens: int = 4
    num_frames: int = 1
    temporal_attention: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, cross: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.is_cross_attention = cross
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(d, cfg.num_heads)
        self.norm_t = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) if cfg.temporal_attention else None
        self.attn_temporal = Attention(d, cfg.num_heads) if cfg.temporal_attention else None
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.attn2 = Attention(d, cfg.num_heads, cross=True)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, int(d * cfg.mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(d * cfg.mlp_ratio), d))
        # shift/scale/gate for spatial attention and MLP, plus shift/scale/gate for temporal attention
        self.adaln = nn.Linear(d, 9 * d)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)


class DiT(nn.Module):
    """Reference DiT. Inputs: `x` (B, C, H, W) or (B, C, F, H, W), `timestep` (B,) in [0, 1000], `label` (B,)
    class indices where `num_classes` is the null (unconditional) label used for classifier-free guidance."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.num_blocks = cfg.depth
        self.num_patches = (cfg.sample_size // p) ** 2
        self.patch_embed = nn.Linear(cfg.in_channels * p * p, d)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, d) * 0.02)
        self.frame_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, d)) if cfg.num_frames > 1 else None
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, cfg.condition_tokens * d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaln_out = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.in_channels * p * p)
        nn.init.zeros_(self.adaln_out.weight)
        nn.init.zeros_(self.adaln_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # -- the CacheableModel protocol -------------------------------------------------------------------
    def cache_sites(self) -> list[AttentionSite]:
        sites = []
        for i in range(self.num_blocks):
            sites.append(AttentionSite(f"blocks.{i}.attn1", "spatial"))
            if self.cfg.temporal_attention:
                sites.append(AttentionSite(f"blocks.{i}.attn_temporal", "temporal"))
            sites.append(AttentionSite(f"blocks.{i}.attn2", "cross"))
        return sites

    def cache_timestep(self, inputs: Inputs) -> Tensor:
        return inputs["timestep"][0]

    def embed(self, inputs: Inputs) -> tuple[Streams, Aux]:
        x, timestep, label = inputs["x"], inputs["timestep"], inputs["label"]
        cfg, p = self.cfg, self.cfg.patch_size
        video = x.dim() == 5
        if video:  # BCFHW -> (B*F, C, H, W): frames are patchified like images
            b, c, f, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        else:
            b, c, h, w = x.shape
            f = 1
        tokens = x.unfold(2, p, p).unfold(3, p, p)  # (BF, C, H/p, W/p, p, p)
        tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(b * f, (h // p) * (w // p), c * p * p)
        hidden = self.patch_embed(tokens) + self.pos_embed
        hidden = hidden.view(b, f, -1, cfg.hidden_size)
        if self.frame_embed is not None:
            hidden = hidden + self.frame_embed[:, :f]
        # sinusoids in fp32 (a bf16 angle of t ~ 1000 is off by several radians), then the model's dtype
        temb = F.silu(self.time_mlp(timestep_embedding(timestep, cfg.hidden_size).to(self.pos_embed.dtype)))
        context = self.label_embed(label).view(b, cfg.condition_tokens, cfg.hidden_size)
        aux = {"temb": temb, "context": context, "frames": f, "height": h, "width": w, "video": video}
        return (hidden,), aux

    def block(self, index: int, streams: Streams, aux: Aux, attend: Attend) -> Streams:
        blk: Block = self.blocks[index]
        (hidden,) = streams
        b, f, n, d = hidden.shape
        (shift1, scale1, gate1, shift_t, scale_t, gate_t, shift3, scale3, gate3) = (
            blk.adaln(aux["temb"]).chunk(9, dim=-1))

        x = modulate(blk.norm1(hidden).view(b, f * n, d), shift1, scale1).view(b * f, n, d)
        attn = attend(f"blocks.{index}.attn1", blk.attn1, x)
        hidden = hidden + gate1[:, None, None] * attn.view(b, f, n, d)

        if blk.attn_temporal is not None:
            x = modulate(blk.norm_t(hidden).view(b, f * n, d), shift_t, scale_t).view(b, f, n, d)
            x = x.transpose(1, 2).reshape(b * n, f, d)
            attn = attend(f"blocks.{index}.attn_temporal", blk.attn_temporal, x)
            hidden = hidden + gate_t[:, None, None] * attn.view(b, n, f, d).transpose(1, 2)

        x = blk.norm2(hidden).view(b, f * n, d)
        attn = attend(f"blocks.{index}.attn2", blk.attn2, x, aux["context"])
        hidden = hidden + attn.view(b, f, n, d)

        x = modulate(blk.norm3(hidden).view(b, f * n, d), shift3, scale3)
        hidden = hidden + gate3[:, None, None] * blk.mlp(x).view(b, f, n, d)
        return (hidden,)

    def modulated_input(self, streams: Streams, aux: Aux) -> Tensor:
        """Block 0's timestep-modulated input, `norm1(x) * (1 + scale) + shift` (TeaCache's indicator)."""
        (hidden,) = streams
        b, f, n, d = hidden.shape
        shift, scale = self.blocks[0].adaln(aux["temb"]).chunk(9, dim=-1)[:2]
        return modulate(self.blocks[0].norm1(hidden).view(b, f * n, d), shift, scale)

    def head(self, streams: Streams, aux: Aux) -> Tensor:
        (hidden,) = streams
        cfg, p = self.cfg, self.cfg.patch_size
        b, f, n, d = hidden.shape
        shift, scale = self.adaln_out(aux["temb"]).chunk(2, dim=-1)
        x = modulate(self.norm_out(hidden).view(b, f * n, d), shift, scale)
        x = self.proj_out(x)  # (B, F*N, C*p*p)
        h, w = aux["height"], aux["width"]
        x = x.view(b, f, h // p, w // p, cfg.in_channels, p, p)
        x = x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, cfg.in_channels, h, w)
        return x.permute(0, 2, 1, 3, 4) if aux["video"] else x[:, 0]

    # -- plain call ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, timestep: Tensor, label: Tensor, attend: Attend = call_attention) -> Tensor:
        return forward(self, {"x": x, "timestep": timestep, "label": label}, attend)


def cfg_inputs(x: Tensor, timestep: Tensor | float, label: Tensor, null_label: int) -> dict[str, Tensor]:
    """Batched classifier-free guidance inputs in the [uncond; cond] order the caches expect."""
    b = x.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
    return {
        "x": torch.cat([x, x]),
        "timestep": torch.cat([t, t]),
        "label": torch.cat([torch.full_like(label, null_label), label]),
    }


def sampling_timesteps(num_steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Rectified-flow Euler timesteps 1000 -> 1000/num_steps (the next one is implied, 0 at the end)."""
    return torch.linspace(1000.0, 0.0, num_steps + 1, device=device)[:-1]
