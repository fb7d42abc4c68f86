"""What fastcache needs to know about each diffusers transformer family: a table, no forward code.

A family entry names the model's block lists (grouped into segments that run back to back on the same
streams), how its `timestep` argument maps to the 0..1000 convention of the timestep ranges, the layout of
its output (for FasterCache's frequency split), whether its pipelines batch CFG as [uncond; cond], and
whether it has temporal attention. A block entry says where a block class returns its streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockIO:
    """Where a block returns its streams (tuple indices, or None for `hidden` when it returns a tensor) and the
    names of the arguments that take them (a second stream is text for most families, audio for LTX-2)."""

    hidden: int | None
    encoder: int | None = None
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"

    @property
    def stream_args(self) -> tuple[str, ...]:
        return (self.hidden_arg,) if self.hidden is None else (self.hidden_arg, self.encoder_arg)


@dataclass(frozen=True)
class Family:
    model_class: str
    # Block lists grouped in segments. Blocks of one segment run back to back (in any interleaving) on the
    # same streams, so a skipped segment is `streams + residual`; code between segments (Flux2 concatenates
    # its text and image streams before the single blocks) keeps running and gets its own residual.
    segments: tuple[tuple[str, ...], ...]
    # t_0..1000 = scale * timestep_argument + offset (Flux passes t / 1000, Mochi passes 1000 - t)
    timestep_scale: float = 1.0
    timestep_offset: float = 0.0
    layout: str | None = None  # "BCHW" | "BCFHW" | "BFCHW"; None: tokens last (no frequency split)
    cfg_batched: bool = False  # its pipelines run CFG as one [uncond; cond] batch
    temporal: bool = False  # has temporal attention sites
    # FirstBlockCache: every block is its own segment (Latte reshapes the stream between its interleaved
    # spatial and temporal blocks, so a residual only makes sense per block)
    per_block_segments: bool = False
    # FasterCache: batched inputs beyond diffusers' default names (SD3's pooled text embedding)
    extra_batched_kwargs: tuple[str, ...] = ()
    # the blocks' second stream is audio that the model outputs (Kandinsky 6, LTX-2), not text it drops: MagCache
    # skips it with a residual of its own (diffusers' rule passes the second stream through a skip unchanged)
    audio_stream: bool = False
    # the model's arguments holding its latent (a new shape, dtype or device starts a context afresh) and its
    # timestep (`timestep()` maps it to 0..1000); Cosmos 3 takes a list of per-item latents and per-token timesteps
    hidden_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    # methods refused at enable_cache on this family: (method, why), method as in METHODS
    refuses: tuple[tuple[str, str], ...] = ()

    def refusal(self, method: str) -> str | None:
        return dict(self.refuses).get(method)

    def timestep(self, value: Tensor) -> Tensor:
        """The denoising timestep as a 0-dim fp32 tensor, 0..1000, on the device (no host sync).

        Per-token timesteps (Wan 2.2 TI2V with `expand_timesteps`: the conditioning frame's tokens at 0; LTX
        conditioning: `min(t, (1 - mask) * 1000)`) and per-sample ones hold the denoising timestep as their
        largest value in the 0..1000 convention: the maximum over every element."""
        t = value.float() * self.timestep_scale + self.timestep_offset
        return t.amax() if t.dim() else t


# diffusers' FasterCache approximates only attention under `^blocks`, `^transformer_blocks`,
# `^single_transformer_blocks` or `^temporal_transformer_blocks` (a fixed pre-filter, whatever the config says)
_UNNAMED_ATTENTION = ("FasterCache", "keeps its attention outside the block lists diffusers' FasterCache filters by "
                                     "(^blocks, ^transformer_blocks, ...), so there it approximates nothing")
# TeaCache reads block 0's timestep-modulated input (`_segments.teacache_input_kind`: its adaLN `norm1` output, or its
# timestep embedding argument): these families pass their first block neither
_NO_MODULATED_INPUT = ("TeaCache", "passes its first block no timestep embedding (`temb`) to read TeaCache's "
                                   "modulated input from")

FAMILIES: dict[str, Family] = {f.model_class: f for f in (
    Family("FluxTransformer2DModel", (("transformer_blocks", "single_transformer_blocks"),), 1000.0),
    Family("Flux2Transformer2DModel", (("transformer_blocks",), ("single_transformer_blocks",)), 1000.0,
           refuses=(_NO_MODULATED_INPUT,)),
    Family("CogVideoXTransformer3DModel", (("transformer_blocks",),), layout="BFCHW", cfg_batched=True),
    Family("HunyuanVideoTransformer3DModel", (("transformer_blocks", "single_transformer_blocks"),),
           layout="BCFHW"),
    Family("WanTransformer3DModel", (("blocks",),), layout="BCFHW"),
    Family("LTXVideoTransformer3DModel", (("transformer_blocks",),), cfg_batched=True),
    Family("MochiTransformer3DModel", (("transformer_blocks",),), -1.0, 1000.0, layout="BCFHW",
           cfg_batched=True),
    Family("LatteTransformer3DModel", (("transformer_blocks", "temporal_transformer_blocks"),),
           layout="BCFHW", cfg_batched=True, temporal=True, per_block_segments=True,
           refuses=(("MagCache", "reshapes its hidden states between its spatial and temporal blocks, so no residual "
                                 "of all blocks exists (diffusers' hook fails mid-generation there)"),
                    _NO_MODULATED_INPUT)),
    Family("AllegroTransformer3DModel", (("transformer_blocks",),), layout="BCFHW", cfg_batched=True),
    Family("CogView4Transformer2DModel", (("transformer_blocks",),), layout="BCHW"),
    Family("SD3Transformer2DModel", (("transformer_blocks",),), layout="BCHW", cfg_batched=True,
           extra_batched_kwargs=("pooled_projections",)),
    Family("QwenImageTransformer2DModel", (("transformer_blocks",),), 1000.0),
    # Chroma concatenates its text and image streams before the single blocks (as Flux2): two segments
    Family("ChromaTransformer2DModel", (("transformer_blocks",), ("single_transformer_blocks",)), 1000.0),
    # Bria's single blocks take and return both streams (as Flux's): one segment; its pipeline passes t
    Family("BriaTransformer2DModel", (("transformer_blocks", "single_transformer_blocks"),), cfg_batched=True),
    Family("HunyuanImageTransformer2DModel", (("transformer_blocks", "single_transformer_blocks"),),
           layout="BCHW"),
    Family("LongCatImageTransformer2DModel", (("transformer_blocks", "single_transformer_blocks"),), 1000.0),
    Family("OvisImageTransformer2DModel", (("transformer_blocks", "single_transformer_blocks"),), 1000.0),
    Family("GlmImageTransformer2DModel", (("transformer_blocks",),), 1.0, 1.0, layout="BCHW"),  # passes t - 1
    Family("NucleusMoEImageTransformer2DModel", (("transformer_blocks",),), 1000.0),
    # Wan derivatives: their pipelines pass t (0..1000) and run CFG as two calls
    Family("ChronoEditTransformer3DModel", (("blocks",),), layout="BCFHW"),
    # the history tokens ride in front of the chunk's through the blocks (one stream)
    Family("HeliosTransformer3DModel", (("blocks",),), layout="BCFHW"),
    # diffusion forcing passes per-frame timesteps (B, F): the noisiest frame is the step's timestep
    Family("SkyReelsV2Transformer3DModel", (("blocks",),), layout="BCFHW"),
    # its face adapters add to the stream after some blocks (not blocks themselves)
    Family("WanAnimateTransformer3DModel", (("blocks",),), layout="BCFHW"),
    # the VACE blocks run first (they make the hints, not the denoised stream); the hints are added after blocks
    Family("WanVACETransformer3DModel", (("blocks",),), layout="BCFHW"),
    Family("HunyuanVideo15Transformer3DModel", (("transformer_blocks",),), layout="BCFHW"),
    # HunyuanVideo's blocks; the clean history latents are packed before the blocks and cut off after them
    Family("HunyuanVideoFramepackTransformer3DModel", (("transformer_blocks", "single_transformer_blocks"),),
           layout="BCFHW"),
    # single blocks take and return both streams (they concatenate inside): no code between the lists
    Family("MotifVideoTransformer3DModel", (("transformer_blocks", "single_transformer_blocks"),), layout="BCFHW"),
    # timesteps are 1 - sigma in 0..1 (0 = noise), one per distinct noise level of the packed sequence
    Family("MiniMaxH3Transformer3DModel", (("transformer_blocks",),), -1000.0, 1000.0),
    # the refiner passes sigma * timestep_scale_multiplier (1000) per token
    Family("SanaWMLTX2RefinerTransformer3DModel", (("transformer_blocks",),)),
    # its text blocks see only text and time (no latent): the visual blocks alone are cached; pipelines pass t
    Family("Kandinsky5Transformer3DModel", (("visual_transformer_blocks",),), refuses=(_UNNAMED_ATTENTION,)),
    # video and audio through one list of fused blocks (text blocks per modality see no latent); pipelines pass t
    Family("Kandinsky6Transformer3DModel", (("visual_transformer_blocks",),), audio_stream=True,
           refuses=(_UNNAMED_ATTENTION,)),
    # video and audio streams through one block list; pipelines pass t (conditioning tokens at 0: the max)
    Family("LTX2VideoTransformer3DModel", (("transformer_blocks",),), cfg_batched=True, audio_stream=True),
    # one joint text+image stream; pipelines pass t / 1000
    Family("QwenImage21Transformer2DModel", (("transformer_blocks",),), 1000.0, refuses=(_NO_MODULATED_INPUT,)),
    # sigmas in 0..1; CFG as one [cond; null] batch (a tokens output: no frequency split)
    Family("AceStepTransformer1DModel", (("layers",),), 1000.0, cfg_batched=True, refuses=(_UNNAMED_ATTENTION,)),
    # text ("und", causal) and video ("gen") tokens as two streams through one list of decoder layers; the pipeline
    # passes t per noisy vision token (the model scales it by 1 / 1000) and runs CFG as two calls
    Family("Cosmos3OmniTransformer", (("layers",),), hidden_arg="vision_tokens", timestep_arg="vision_timesteps",
           refuses=(_UNNAMED_ATTENTION, _NO_MODULATED_INPUT)),
)}

BLOCKS: dict[str, BlockIO] = {
    "FluxTransformerBlock": BlockIO(1, 0),
    "FluxSingleTransformerBlock": BlockIO(1, 0),
    "Flux2TransformerBlock": BlockIO(1, 0),
    "Flux2SingleTransformerBlock": BlockIO(None),
    "CogVideoXBlock": BlockIO(0, 1),
    "HunyuanVideoTransformerBlock": BlockIO(0, 1),
    "HunyuanVideoSingleTransformerBlock": BlockIO(0, 1),
    "WanTransformerBlock": BlockIO(None),  # and the copies in ChronoEdit and Wan Animate (same name)
    "LTXVideoTransformerBlock": BlockIO(None),
    "MochiTransformerBlock": BlockIO(0, 1),
    "BasicTransformerBlock": BlockIO(None),  # Latte, spatial and temporal
    "AllegroTransformerBlock": BlockIO(None),
    "CogView4TransformerBlock": BlockIO(0, 1),
    "JointTransformerBlock": BlockIO(1, 0),
    "QwenImageTransformerBlock": BlockIO(1, 0),
    "ChromaTransformerBlock": BlockIO(1, 0),
    "ChromaSingleTransformerBlock": BlockIO(None),
    # diffusers' registry has Bria's block as (0, None), but it returns (encoder, hidden) as Flux's
    "BriaTransformerBlock": BlockIO(1, 0),
    "BriaSingleTransformerBlock": BlockIO(1, 0),
    "LongCatImageTransformerBlock": BlockIO(1, 0),
    "LongCatImageSingleTransformerBlock": BlockIO(1, 0),
    "OvisImageTransformerBlock": BlockIO(1, 0),
    "OvisImageSingleTransformerBlock": BlockIO(1, 0),
    "GlmImageTransformerBlock": BlockIO(0, 1),
    "NucleusMoEImageTransformerBlock": BlockIO(None),  # text enters as keys/values, never returned
    "HeliosTransformerBlock": BlockIO(None),
    "SkyReelsV2TransformerBlock": BlockIO(None),
    "HunyuanVideo15TransformerBlock": BlockIO(0, 1),
    "MiniMaxH3TransformerBlock": BlockIO(None),
    "SanaWMLTX2RefinerTransformerBlock": BlockIO(None),
    "AceStepTransformerBlock": BlockIO(None),
    "QwenImage21TransformerBlock": BlockIO(None),
    "LTX2VideoTransformerBlock": BlockIO(0, 1, encoder_arg="audio_hidden_states"),  # (video, audio)
    "Kandinsky6FusedTransformerDecoderBlock": BlockIO(0, 1, "vis", "aud"),  # (video, audio); audio may be None
}


def block_io(block: torch.nn.Module) -> BlockIO | None:
    """Where `block` returns its streams: fastcache's table (by the class or a base class), else diffusers' own
    `TransformerBlockRegistry` metadata (a block whose metadata has no encoder index returns a tensor). None when
    neither knows the block."""
    for cls in type(block).__mro__:
        if cls.__name__ in BLOCKS:
            return BLOCKS[cls.__name__]
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        TransformerBlockRegistry._register()
        meta = TransformerBlockRegistry._registry.get(type(block))
    except (ImportError, AttributeError):
        return None
    if meta is None:
        return None
    if meta.return_encoder_hidden_states_index is None:
        return BlockIO(None, hidden_arg=meta.hidden_states_argument_name)
    return BlockIO(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index,
                   meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name)


METHODS = ("FirstBlockCache", "PAB", "FasterCache", "MagCache", "TaylorSeer", "DBCache", "TeaCache")


def coverage(family: Family) -> dict[str, str]:
    """What each method does on `family`: "yes"; "distilled: <why>" (FasterCache's attention approximation alone,
    `is_guidance_distilled=True`, where its unconditional-batch skip cannot run); or "no: <why>" (refused)."""
    cells = {}
    for method in METHODS:
        why = family.refusal(method)
        cells[method] = "yes" if why is None else f"no: {why}"
        if why is None and method == "FasterCache" and not family.cfg_batched:
            cells[method] = "distilled: its pipelines run CFG as separate calls, not one [uncond; cond] batch"
        elif why is None and method == "FasterCache" and family.layout is None:
            cells[method] = "distilled: it returns tokens, which the frequency split does not take"
    return cells


def family_of(model: torch.nn.Module) -> Family:
    """The family of `model`'s class or of its nearest supported base class (a user's subclass)."""
    name = type(model).__name__
    family = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
    if family is None:
        raise TypeError(f"model: fastcache has no adapter for {name}; supported diffusers transformers: "
                        f"{', '.join(sorted(FAMILIES))}")
    return family
