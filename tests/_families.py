"""Per family, what the drop-in's tests compare against: diffusers' own hooks wherever they run, and why not
where they do not (the reason is the test's documentation and the README's table). Adding a family to the
tests is its tiny case (`fastcache.diffusers._tiny`) plus, where diffusers fails, a line here."""

from __future__ import annotations

from fastcache.diffusers._families import FAMILIES
from fastcache.diffusers._tiny import CASES, case

# diffusers' FirstBlockCache fails on these; fastcache's own hook-based reference instead
FBC_NO_ORACLE = {
    "flux2": "the streams change shape between its block lists (text and image concatenated)",
    "latte": "the stream is reshaped between its spatial and temporal blocks",
    "sd3": "its last block returns no text stream (None - Tensor)",
    "chroma": "its block classes are not in diffusers' TransformerBlockRegistry",
    "bria": "its single block class is not in diffusers' TransformerBlockRegistry",
    "longcatimage": "its block classes are not in diffusers' TransformerBlockRegistry",
    "ovisimage": "its block classes are not in diffusers' TransformerBlockRegistry",
    "glmimage": "its block class is not in diffusers' TransformerBlockRegistry",
    "nucleusmoe": "its block class is not in diffusers' TransformerBlockRegistry",
    "chronoedit": "its block class (its own copy of WanTransformerBlock) is not in diffusers' TransformerBlockRegistry",
    "skyreelsv2": "its block class is not in diffusers' TransformerBlockRegistry",
    "helios": "its block class is not in diffusers' TransformerBlockRegistry",
    "wananimate": "its block class (its own copy of WanTransformerBlock) is not in diffusers' TransformerBlockRegistry",
    "hunyuanvideo15": "its block class is not in diffusers' TransformerBlockRegistry",
    "minimaxh3": "its block class is not in diffusers' TransformerBlockRegistry",
    "sanawmrefiner": "its block class is not in diffusers' TransformerBlockRegistry",
    "acestep": "its block class is not in diffusers' TransformerBlockRegistry",
    "qwenimage21": "its block class is not in diffusers' TransformerBlockRegistry",
    "kandinsky6": "its block class is not in diffusers' TransformerBlockRegistry",
    "ltx2": "its block class is not in diffusers' TransformerBlockRegistry",
    "kandinsky5": "its head hook asks the block for 'hidden_states' (the registry names 'visual_embed'): ValueError",
}
# diffusers' MagCache / TaylorSeer hooks cannot run on these (the drop-in only has to cache something there)
MAG_NO_ORACLE = {
    "allegro": "its block class is not in diffusers' TransformerBlockRegistry",
    "sd3": "SD3Transformer2DModel has no CacheMixin in diffusers",
    "chroma": "its block classes are not in diffusers' TransformerBlockRegistry",
    "bria": "its single block class is not in diffusers' TransformerBlockRegistry",
    "longcatimage": "its block classes are not in diffusers' TransformerBlockRegistry",
    "ovisimage": "its block classes are not in diffusers' TransformerBlockRegistry",
    "glmimage": "its block class is not in diffusers' TransformerBlockRegistry",
    "nucleusmoe": "its block class is not in diffusers' TransformerBlockRegistry",
    "chronoedit": "its block class (its own copy of WanTransformerBlock) is not in diffusers' TransformerBlockRegistry",
    "skyreelsv2": "its block class is not in diffusers' TransformerBlockRegistry",
    "helios": "its block class is not in diffusers' TransformerBlockRegistry",
    "wananimate": "its block class (its own copy of WanTransformerBlock) is not in diffusers' TransformerBlockRegistry",
    "hunyuanvideo15": "its block class is not in diffusers' TransformerBlockRegistry",
    "minimaxh3": "its block class is not in diffusers' TransformerBlockRegistry",
    "sanawmrefiner": "its block class is not in diffusers' TransformerBlockRegistry",
    "acestep": "its block class is not in diffusers' TransformerBlockRegistry",
    "qwenimage21": "its block class is not in diffusers' TransformerBlockRegistry",
    "kandinsky6": "its block class is not in diffusers' TransformerBlockRegistry",
    "ltx2": "its block class is not in diffusers' TransformerBlockRegistry",
}
TAYLOR_NO_ORACLE = {
    "sd3": "SD3Transformer2DModel has no CacheMixin in diffusers",
}
# block classes whose diffusers TransformerBlockRegistry entry misplaces the streams: fastcache's table overrides it
REGISTRY_WRONG = {
    "BriaTransformerBlock": "it returns (encoder_hidden_states, hidden_states); diffusers registers (0, None)",
}
# diffusers' own forward breaks the graph here, cached or not: no fullgraph capture to test (checked by
# test_diffusers_compile.py::test_no_fullgraph_families_break_the_graph_uncached)
NO_FULLGRAPH = {
    "hunyuanvideo15": "its forward branches on data (`if torch.all(image_embeds == 0)`)",
    "qwenimage21": "its forward reads img_mask on the host (.tolist() for the rope positions)",
}
# MagCache refused at enable_cache (why: the error message names it)
MAG_REFUSED = {"latte": "reshapes its hidden states"}

_CLASSES: dict[str, str] = {}


def class_of(name: str) -> str:
    if name not in _CLASSES:
        _CLASSES[name] = type(case(name).model).__name__
    return _CLASSES[name]


def family(name: str):
    return FAMILIES[class_of(name)]


# FasterCache runs its CFG half only where the pipelines batch CFG, and its frequency split needs an image or
# video layout (LTX returns tokens: refused)
FASTERCACHE = [n for n in CASES if family(n).cfg_batched and family(n).layout is not None]
