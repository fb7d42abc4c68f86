"""Per family, what the drop-in's tests compare against: diffusers' own hooks wherever they run, and why not
where they do not (the reason is the test's documentation and the README's table). Adding a family to the
tests is its tiny case (`fastcache.diffusers._tiny`) plus, where diffusers fails, a line here."""

from __future__ import annotations

from fastcache.diffusers._families import FAMILIES
from fastcache.diffusers._tiny import CASES, case

# diffusers' hooks look a block up by its exact class ("Model class ... not registered")
NOT_REGISTERED = "a block class is not in diffusers' TransformerBlockRegistry"
# families with a block class diffusers' hooks do not know (FirstBlockCache and MagCache both fail there)
UNREGISTERED = ("chroma", "bria", "longcatimage", "ovisimage", "glmimage", "nucleusmoe", "chronoedit", "skyreelsv2",
                "helios", "wananimate", "hunyuanvideo15", "minimaxh3", "sanawmrefiner", "acestep", "qwenimage21",
                "kandinsky6", "ltx2")
# diffusers' FirstBlockCache fails on these; fastcache's own hook-based reference instead
FBC_NO_ORACLE = {
    "flux2": "the streams change shape between its block lists (text and image concatenated)",
    "latte": "the stream is reshaped between its spatial and temporal blocks",
    "sd3": "its last block returns no text stream (None - Tensor)",
    "kandinsky5": "its head hook asks the block for 'hidden_states' (the registry names 'visual_embed'): ValueError",
    "cosmos3": "its head hook asks the block for 'hidden_states' (the registry names 'gen_seq'): ValueError",
    **dict.fromkeys(UNREGISTERED, NOT_REGISTERED),
}
# diffusers' MagCache / TaylorSeer hooks cannot run on these (the drop-in only has to cache something there);
# Allegro's block is registered for diffusers' FirstBlockCache by the parity tests only
MAG_NO_ORACLE = {
    "sd3": "SD3Transformer2DModel has no CacheMixin in diffusers",
    **dict.fromkeys(("allegro", *UNREGISTERED), NOT_REGISTERED),
    "cosmos3": "its skip asks the block for 'encoder_hidden_states' (the registry names 'und_seq'): KeyError",
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


def _timestep_passed(fam) -> str:
    known = {(1.0, 0.0): "t", (1000.0, 0.0): "t / 1000", (-1.0, 1000.0): "1000 - t", (1.0, 1.0): "t - 1",
             (-1000.0, 1000.0): "1 - t / 1000"}
    return known.get((fam.timestep_scale, fam.timestep_offset), f"(t - {fam.timestep_offset}) / {fam.timestep_scale}")


def readme_table() -> str:
    """The README's families x methods table: for each tiny case (one per supported transformer), what each
    method is checked against. `=` diffusers' own hook, step by step; `ref` fastcache's own reference (diffusers'
    hook fails, a numbered note says how); `runs` no oracle (diffusers' hook fails): it caches and compiles;
    `distilled` FasterCache's attention approximation alone (its pipelines never batch CFG), `=` diffusers;
    `no` refused at enable_cache, with the reason in a note."""
    from fastcache.diffusers._families import METHODS, coverage

    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    rows = ["| transformer | timestep passed | " + " | ".join(METHODS) + " | fullgraph |",
            "|---|---|" + "---|" * (len(METHODS) + 1)]
    for name in sorted(CASES, key=class_of):
        fam = family(name)
        cells = []
        for method, cell in coverage(fam).items():
            if cell.startswith("no: "):
                cells.append("no " + note(f"{method}: {cell[4:]}"))
                continue
            if method in ("DBCache", "TeaCache"):
                cells.append("ref " + note("DBCache, TeaCache: diffusers has no such hook; equal to a host-side "
                                           "transcription of the rule (DBCache also equals cache-dit 1.5.3 itself "
                                           "on Flux)"))
                continue
            missing = {"FirstBlockCache": FBC_NO_ORACLE, "MagCache": MAG_NO_ORACLE,
                       "TaylorSeer": TAYLOR_NO_ORACLE}.get(method, {}).get(name)
            kind = "ref" if method == "FirstBlockCache" else "runs"
            text = f"{kind} " + note(f"diffusers' hook fails: {missing}") if missing else "="
            cells.append(f"distilled {text} " + note(f"{method}: {cell[11:]}") if cell.startswith("distilled")
                         else text)
        graph = "no " + note(f"fullgraph: {NO_FULLGRAPH[name]}") if name in NO_FULLGRAPH else "0 breaks"
        rows.append(f"| {fam.model_class} | {_timestep_passed(fam)} | " + " | ".join(cells) + f" | {graph} |")
    return "\n".join(rows + [""] + [f"[{i + 1}] {text}  " for i, text in enumerate(notes)]).rstrip() + "\n"
