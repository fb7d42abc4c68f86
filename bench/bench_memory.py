"""Cache memory at a CogVideoX-2b shape: fastcache vs diffusers' hooks at the same config, nothing allocated.

Both transformers are built on the meta device (no weights, no data: shapes only), so the full-size model is
sized on any machine in seconds:

- the drop-in: diffusers' `CogVideoXTransformer3DModel` with CogVideoX-2b's config (30 blocks, 30 heads x 64,
  49 frames at 480x720 -> 13 latent frames of 60x90, 226 text tokens), CFG batch 2, after the calls that fill
  each cache (1 for FBC, 2 for PAB and FasterCache). diffusers: every tensor its hooks hold; fastcache: the
  context's state pytree.
- the engine: the reference DiT at a CogVideoX-2b-like shape (hidden 1920, 30 heads, 30 blocks, 13 frames of
  36x36 tokens, temporal attention), `method.state_bytes(model, inputs)`.

    python bench/bench_memory.py            # writes bench/results/memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                    text_embed_dim=4096, num_layers=30, sample_frames=49, sample_height=60, sample_width=90,
                    patch_size=2, time_embed_dim=512, max_text_seq_length=226)
GIB = 2 ** 30


def _configs(clock: dict) -> dict[str, Any]:
    """diffusers' configs as its caching guide writes them for CogVideoX (FBC at its default threshold)."""
    import diffusers

    return {
        "PAB": lambda: diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: clock["t"]),
        "FasterCache": lambda: diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: clock["t"], attention_weight_callback=lambda _: 0.3,
            tensor_format="BFCHW"),
        "FirstBlockCache": lambda: diffusers.FirstBlockCacheConfig(threshold=0.05),
    }


def _tensors(obj: Any, seen: set[int], depth: int = 0) -> list[torch.Tensor]:
    """Every tensor reachable from a hook object (its state, the states it keeps per context), modules excluded."""
    if depth > 8 or id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items if not isinstance(item, nn.Module) for t in _tensors(item, seen, depth + 1)]


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def diffusers_hook_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    found = [t for m in model.modules() if (registry := getattr(m, "_diffusers_hook", None)) is not None
             for hook in registry.hooks.values() for t in _tensors(hook, seen)]
    return _nbytes(found)


def drop_in_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    from diffusers import CogVideoXTransformer3DModel

    import fastcache.diffusers as fd

    def build() -> nn.Module:
        with torch.device("meta"):
            return CogVideoXTransformer3DModel(**COGVIDEOX_2B).to(dtype)

    def inputs() -> dict[str, torch.Tensor]:
        return dict(hidden_states=torch.empty(2, 13, 16, 60, 90, device="meta", dtype=dtype),
                    encoder_hidden_states=torch.empty(2, 226, 4096, device="meta", dtype=dtype),
                    timestep=torch.full((2,), 500, device="meta", dtype=torch.int64))

    def run(model: nn.Module, calls: int) -> None:
        with torch.no_grad():
            for _ in range(calls):
                with model.cache_context("cond_uncond"):
                    model(**inputs(), return_dict=False)

    clock = {"t": 500.0}  # inside every method's timestep range: the calls fill the caches
    rows = []
    for method, config in _configs(clock).items():
        calls = 1 if method == "FirstBlockCache" else 2
        theirs = build()
        theirs.enable_cache(config())
        run(theirs, calls)
        ours = build()
        fd.enable_cache(ours, config())
        run(ours, calls)
        state = fd.cache_state(ours, "cond_uncond")
        rows.append(dict(where="drop-in, CogVideoX-2b (diffusers' transformer)", method=method, dtype=str(dtype),
                         diffusers_bytes=diffusers_hook_bytes(theirs),
                         fastcache_bytes=_nbytes([x for x in tree_leaves(state) if isinstance(x, torch.Tensor)])))
    return rows


def engine_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    import fastcache
    from fastcache.models.dit import DiT, DiTConfig, cfg_inputs

    config = DiTConfig(in_channels=16, sample_size=72, hidden_size=1920, num_heads=30, depth=30, num_frames=13,
                       temporal_attention=True)
    with torch.device("meta"):
        model = DiT(config).to(dtype)
    x = torch.empty(1, 16, 13, 72, 72, device="meta", dtype=dtype)
    inputs = cfg_inputs(x, 500.0, torch.zeros(1, dtype=torch.int64, device="meta"), 10)
    configs = {
        "PAB": fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
        "FasterCache": fastcache.FasterCacheConfig(tensor_format="BCFHW"),
        "FirstBlockCache": fastcache.FirstBlockCacheConfig(threshold=0.05),
    }
    return [dict(where="engine, reference DiT at a CogVideoX-2b-like shape", method=name, dtype=str(dtype),
                 diffusers_bytes=None, fastcache_bytes=fastcache.make(c).state_bytes(model, inputs))
            for name, c in configs.items()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| where | method | dtype | diffusers' hooks (GiB) | fastcache (GiB) |", "|---|---|---|---|---|"]
    for r in rows:
        theirs = "-" if r["diffusers_bytes"] is None else f"{r['diffusers_bytes'] / GIB:.2f}"
        lines.append(f"| {r['where']} | {r['method']} | {r['dtype'].removeprefix('torch.')} | {theirs} | "
                     f"{r['fastcache_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args(argv)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        rows += drop_in_rows(dtype) + engine_rows(dtype)
    import diffusers

    machine = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
                   platform=platform.platform())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    text = (f"Cache memory after the calls that fill it (meta device, nothing allocated); "
            f"torch {machine['torch']}, diffusers {machine['diffusers']}.\n\n{table(rows)}\n")
    (out / "memory.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
