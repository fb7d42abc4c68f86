"""The drop-in's front door: config translation, errors on bad input, nothing half-enabled, exact restore."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import fastcache.diffusers as fd  # noqa: E402
from fastcache.diffusers._families import coverage  # noqa: E402
from fastcache.diffusers._runtime import SESSION_ATTR  # noqa: E402
from fastcache.diffusers._tiny import CASES, case  # noqa: E402
from tests._families import family  # noqa: E402


def test_import_fastcache_does_not_import_diffusers() -> None:
    code = "import sys, fastcache; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diffusers_configs_translate_field_by_field() -> None:
    cfg = diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3,
                                                    spatial_attention_timestep_skip_range=(50, 700))
    ours = fd.to_fastcache_config(cfg)
    assert isinstance(ours, fd.PyramidAttentionBroadcastConfig)
    assert ours.spatial_attention_block_skip_range == 3 and ours.spatial_attention_timestep_skip_range == (50, 700)
    assert fd.to_fastcache_config(diffusers.FirstBlockCacheConfig(threshold=0.2)).threshold == 0.2


def test_unsupported_methods_are_errors_naming_the_supported_ones() -> None:
    """diffusers' TextKVCache is not built (README: why); its config is refused by name. The other six translate
    field by field."""
    with pytest.raises(TypeError, match="MagCacheConfig.*SeaCacheConfig.*TextKVCacheConfig"):
        fd.to_fastcache_config(diffusers.TextKVCacheConfig())
    sea = fd.to_fastcache_config(diffusers.SeaCacheConfig(threshold=0.1, residual_order=0))
    assert isinstance(sea, fd.SeaCacheConfig) and (sea.threshold, sea.residual_order) == (0.1, 0)
    mag = fd.to_fastcache_config(diffusers.MagCacheConfig(mag_ratios=[1.0] * 28))
    assert isinstance(mag, fd.MagCacheConfig) and mag.num_inference_steps == 28
    taylor = fd.to_fastcache_config(diffusers.TaylorSeerCacheConfig(cache_identifiers=["a"]))
    assert isinstance(taylor, fd.TaylorSeerCacheConfig) and taylor.cache_identifiers == ("a",)


def _snapshot(model: torch.nn.Module) -> dict:
    return {name: dict(vars(m)) .get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize(("name", "config", "match"), [
    ("flux", fd.PyramidAttentionBroadcastConfig(temporal_attention_block_skip_range=2), "no temporal attention"),
    ("wan", fd.FasterCacheConfig(tensor_format="BCFHW"), "separate passes"),
    ("cogvideox", fd.FasterCacheConfig(tensor_format="BCFHW"), "returns BFCHW"),
    ("ltx", fd.FasterCacheConfig(tensor_format="BCFHW"), "tokens last"),
])
def test_inapplicable_configs_are_refused_without_side_effects(name: str, config, match: str) -> None:
    model = case(name).model
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        fd.enable_cache(model, config)
    assert _snapshot(model) == before and SESSION_ATTR not in vars(model)


_REFUSED = [(name, method) for name in CASES for method, cell in coverage(family(name)).items()
            if cell.startswith("no: ")]
_CONFIGS = {"FasterCache": lambda: fd.FasterCacheConfig(is_guidance_distilled=True),
            "MagCache": lambda: fd.MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4),
            "TeaCache": lambda: fd.TeaCacheConfig()}


@pytest.mark.parametrize(("name", "method"), _REFUSED, ids=[f"{n}-{m}" for n, m in _REFUSED])
def test_every_refused_cell_of_the_coverage_table_is_refused_by_name(name: str, method: str) -> None:
    """Each "no" of fastcache.diffusers' coverage (the README's table) is an error at enable_cache naming the
    method, the model and the reason, with no side effect."""
    model = case(name).model
    before = _snapshot(model)
    why = coverage(family(name))[method][4:]
    with pytest.raises(ValueError, match=re.escape(f"{method} on {type(model).__name__}: it {why}")):
        fd.enable_cache(model, _CONFIGS[method]())
    assert _snapshot(model) == before and SESSION_ATTR not in vars(model)


def test_unknown_model_names_class_and_supported_ones() -> None:
    with pytest.raises(TypeError, match=r"Linear.*FluxTransformer2DModel"):
        fd.enable_cache(torch.nn.Linear(2, 2), fd.FirstBlockCacheConfig())


def test_enable_twice_and_diffusers_hooks_are_errors() -> None:
    tc = case("wan")
    model = tc.model
    fd.enable_cache(model, fd.FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="already enabled"):
        fd.enable_cache(model, fd.FirstBlockCacheConfig())
    fd.disable_cache(model)
    model.enable_cache(diffusers.FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="diffusers' own cache hooks"):
        fd.enable_cache(model, fd.FirstBlockCacheConfig())
    model.disable_cache()


def test_disable_restores_the_original_forward_bit_for_bit() -> None:
    tc = case("cogvideox")
    model = tc.model.eval()
    before = _snapshot(model)
    t = torch.tensor(500.0)
    with torch.no_grad():
        ref = model(**tc.kwargs(tc.latent, t), return_dict=False)[0]
    fd.apply_faster_cache(model, fd.FasterCacheConfig(tensor_format="BFCHW"))
    with torch.no_grad(), model.cache_context("cond_uncond"):
        model(**tc.kwargs(tc.latent, t), return_dict=False)
    fd.disable_cache(model)
    assert _snapshot(model) == before
    assert "cache_context" not in vars(model) and "_reset_stateful_cache" not in vars(model)
    with torch.no_grad():
        assert model(**tc.kwargs(tc.latent, t), return_dict=False)[0].equal(ref)


def test_return_dict_and_contexts_are_separate_states() -> None:
    tc = case("wan")
    model = tc.model.eval()
    fd.apply_pyramid_attention_broadcast(model, diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 0))
    with torch.no_grad():
        with fd.cache_context(model, "cond"):
            out = model(**tc.kwargs(tc.latent, torch.tensor(500.0)))
        with model.cache_context("uncond"):
            model(**tc.kwargs(tc.latent, torch.tensor(500.0)))
            model(**tc.kwargs(tc.latent, torch.tensor(400.0)))
    assert hasattr(out, "sample")
    assert int(fd.cache_state(model, "cond")["count"]) == 1
    assert int(fd.cache_state(model, "uncond")["count"]) == 2
    fd.disable_cache(model)


# CacheMixin transformers fastcache does not cover yet, and why
NOT_YET: dict[str, str] = {}


def test_supported_models_are_every_cached_diffusers_transformer_each_with_a_tiny_case() -> None:
    """Every transformer the installed diffusers exports with CacheMixin (its ControlNets aside), plus SD3 (which has
    none), and each has a tiny case."""
    from diffusers.models.cache_utils import CacheMixin

    cached = {name for name in dir(diffusers) if "Transformer" in name
              and isinstance(cls := getattr(diffusers, name), type) and issubclass(cls, CacheMixin)}
    cached -= set(NOT_YET)
    assert cached and cached <= set(fd.SUPPORTED_MODELS), sorted(cached - set(fd.SUPPORTED_MODELS))
    assert set(fd.SUPPORTED_MODELS) - cached == {"SD3Transformer2DModel"}
    assert len(fd.SUPPORTED_MODELS) == len(CASES)
    built = {type(case(name).model).__name__ for name in CASES}
    assert built == set(fd.SUPPORTED_MODELS)


def test_apply_functions_are_diffusers_names_for_enable_cache() -> None:
    import fastcache

    model = case("wan").model.eval()
    fastcache.apply_first_block_cache(model, diffusers.FirstBlockCacheConfig(threshold=0.2))
    assert fd.cache_state(model, None) is None and SESSION_ATTR in model.__dict__
    fd.disable_cache(model)
    with pytest.raises(TypeError, match="FirstBlockCacheConfig"):
        fastcache.apply_first_block_cache(model, diffusers.PyramidAttentionBroadcastConfig())


def test_skipped_blocks_really_do_not_run() -> None:
    """FirstBlockCache skipping: every block after the first returns its input and records its call, and one
    torch.cond (eager: one host read) decides; on a skip none of those blocks' attention or feed-forward runs."""
    tc = case("wan", layers=3)
    model = tc.model.eval()
    runs = {i: 0 for i in range(len(model.blocks))}
    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_hook(lambda m, a, o, i=i: runs.__setitem__(i, runs[i] + 1))
    fd.enable_cache(model, fd.FirstBlockCacheConfig(threshold=1e9))  # skip whenever a reference exists
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            with model.cache_context("cond"):
                model(**tc.kwargs(tc.latent, torch.tensor(t)))
    fd.disable_cache(model)
    assert runs == {0: 3, 1: 1, 2: 1}, runs


def test_block_layouts_derived_from_diffusers_registry_agree_with_the_table() -> None:
    """A block class fastcache's table lacks gets its layout from diffusers' TransformerBlockRegistry: the rule is
    checked on every class both know (a wrong rule would misplace the hidden and text streams)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from fastcache.diffusers import _families
    from tests._families import REGISTRY_WRONG

    TransformerBlockRegistry._register()
    both = [cls for cls in TransformerBlockRegistry._registry if cls.__name__ in _families.BLOCKS]
    assert len(both) >= 12
    table = dict(_families.BLOCKS)
    try:
        for cls in both:
            del _families.BLOCKS[cls.__name__]
            block = cls.__new__(cls)  # the layout depends on the class only
            # where diffusers' entry is wrong (tests/_families.py says how), the table must be what overrides it
            agrees = _families.block_io(block) == table[cls.__name__]
            assert agrees != (cls.__name__ in REGISTRY_WRONG), cls.__name__
            _families.BLOCKS[cls.__name__] = table[cls.__name__]
    finally:
        _families.BLOCKS.clear()
        _families.BLOCKS.update(table)
