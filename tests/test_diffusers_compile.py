"""The drop-in under `torch.compile(transformer, fullgraph=True)`: no graph break, a bounded number of graphs,
outputs equal to eager fastcache.

Bound: 2 graphs per (model, method), whatever the number of steps and contexts: a context's first call
(no state yet: everything computes and the state is created) and every later call (state present: the
decisions are tensors, skipping is torch.cond). Context names are switched eagerly, outside the graph, so
cond/uncond passes share both graphs. Every case compiles with the default inductor backend; outputs agree
with eager to 1e-5 (inductor fuses and reorders float arithmetic).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from torch._dynamo.utils import counters  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._families import FAMILIES  # noqa: E402
from fastcache.diffusers._tiny import CASES as CASES_ALL  # noqa: E402
from fastcache.diffusers._tiny import TinyCase, case, denoise  # noqa: E402

TIMESTEPS = torch.linspace(1000, 0, 10)
MAX_GRAPHS = 2


def _config(method: str, distilled: bool = False):
    if method == "fbc":
        return fd.FirstBlockCacheConfig(threshold=0.4)
    if method == "pab":
        return fd.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  cross_attention_block_skip_range=3)
    return fd.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=3,
                                tensor_format="BFCHW", is_guidance_distilled=distilled)


def _loop(model, tc: TinyCase, contexts: tuple[str, ...]) -> list[torch.Tensor]:
    return denoise(model, tc, TIMESTEPS, contexts)  # separate CFG passes, as Wan/Flux pipelines run them


CASES = [
    ("flux", "fbc", "inductor", ("cond",)),
    ("flux", "pab", "inductor", ("cond",)),
    ("flux", "fc-distilled", "inductor", ("cond",)),
    ("cogvideox", "fbc", "inductor", ("cond_uncond",)),
    ("cogvideox", "pab", "inductor", ("cond_uncond",)),
    ("cogvideox", "fc", "inductor", ("cond_uncond",)),
    ("wan", "fbc", "inductor", ("cond", "uncond")),
    ("wan", "pab", "inductor", ("cond", "uncond")),
    ("wan", "fc-distilled", "inductor", ("cond", "uncond")),
]


@pytest.mark.parametrize(("name", "method", "backend", "contexts"), CASES,
                         ids=[f"{n}-{m}-{b}" for n, m, b, _ in CASES])
def test_fullgraph_compile(name: str, method: str, backend: str, contexts: tuple[str, ...]) -> None:
    tc = case(name)
    model = tc.model.eval()
    config = _config(method.split("-")[0], distilled=method.endswith("distilled"))
    if method.startswith("fc") and name != "cogvideox":
        config = fd.FasterCacheConfig(spatial_attention_block_skip_range=2, is_guidance_distilled=True,
                                      tensor_format="BCFHW")
    fd.enable_cache(model, config)
    eager = _loop(model, tc, contexts)
    fd.reset_cache(model)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    outs = _loop(compiled, tc, contexts)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    fd.reset_cache(model)  # a second generation: fresh states, the same two graphs
    again = _loop(compiled, tc, contexts)
    fd.disable_cache(model)

    assert breaks == 0
    assert 1 <= graphs <= MAX_GRAPHS, f"{graphs} graphs"
    assert counters["stats"]["unique_graphs"] == graphs, "the second generation recompiled"
    atol = 0.0 if backend == "aot_eager" else 1e-5
    for a, b, c in zip(eager, outs, again, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
        torch.testing.assert_close(c, a, atol=atol, rtol=0)


BACKEND = "eager"  # dynamo capture only, run eagerly
FASTERCACHE_FAMILIES = ("cogvideox", "mochi", "latte", "allegro", "sd3")  # batched CFG, image/video output
# the families not compiled with inductor above (those three are, with every method)
OTHER_FAMILIES = [n for n in CASES_ALL if n not in ("flux", "cogvideox", "wan")]
EVERY_FAMILY = ([(n, "fbc") for n in OTHER_FAMILIES] + [(n, "pab") for n in OTHER_FAMILIES]
                + [(n, "fc") for n in FASTERCACHE_FAMILIES if n in OTHER_FAMILIES])


@pytest.mark.parametrize(("name", "method"), EVERY_FAMILY, ids=[f"{n}-{m}" for n, m in EVERY_FAMILY])
def test_every_family_captures_fullgraph(name: str, method: str) -> None:
    """The other 9 families x each method they support (all 12 with the inductor cases above): fullgraph
    capture with 0 breaks and <= 2 graphs, outputs equal to eager. Dynamo's own backend ("eager") keeps this
    fast; graph breaks, recompiles and torch.cond's branch rules (no None outputs, the traced attention
    processors) are all decided at capture."""
    tc = case(name)
    model = tc.model.eval()
    if method == "fc":
        config = fd.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=3,
                                      tensor_format=FAMILIES[type(model).__name__].layout)
    else:
        config = _config(method)
    contexts = ("cond_uncond",) if tc.cfg_batched else ("cond",)
    fd.enable_cache(model, config)
    eager = _loop(model, tc, contexts)
    fd.reset_cache(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = _loop(torch.compile(model, fullgraph=True, backend=BACKEND), tc, contexts)
    fd.disable_cache(model)
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= counters["stats"]["unique_graphs"] <= MAX_GRAPHS
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
