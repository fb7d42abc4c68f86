"""The drop-in front door: diffusers' cache entry points, with fastcache's graph-safe engine behind them."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from fastcache.diffusers._families import coverage, family_of
from fastcache.diffusers._runtime import (
    BATCHED_KWARGS,
    SESSION_ATTR,
    Session,
    context_parallel_hooks_only,
    install,
)
from fastcache.methods import mag_cache, teacache
from fastcache.methods.db_cache import DBCacheConfig
from fastcache.methods.faster_cache import MODULE_CALLBACK_FIELDS, TENSOR_FORMATS, FasterCacheConfig, ModuleCallback
from fastcache.methods.first_block_cache import FirstBlockCacheConfig
from fastcache.methods.mag_cache import MagCacheConfig
from fastcache.methods.pyramid_attention_broadcast import PyramidAttentionBroadcastConfig
from fastcache.methods.sea_cache import SeaCacheConfig
from fastcache.methods.taylorseer import TaylorSeerCacheConfig
from fastcache.methods.teacache import TeaCacheConfig

# the configs that mirror diffusers' own (translated by name), then the methods diffusers lacks
DIFFUSERS_CONFIGS = (PyramidAttentionBroadcastConfig, FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                     TaylorSeerCacheConfig, SeaCacheConfig)
FASTCACHE_CONFIGS = (*DIFFUSERS_CONFIGS, DBCacheConfig, TeaCacheConfig)
_BY_DIFFUSERS_NAME = {cls.__name__: cls for cls in DIFFUSERS_CONFIGS}


# -- configs ------------------------------------------------------------------------------------------------

def to_fastcache_config(config: Any) -> Any:
    """fastcache's config for `config`: returned as is, or translated field by field from diffusers' own."""
    if isinstance(config, FASTCACHE_CONFIGS):
        return config
    cls = type(config)
    target = _BY_DIFFUSERS_NAME.get(cls.__name__) if cls.__module__.startswith("diffusers") else None
    if target is None or not dataclasses.is_dataclass(config):
        names = ", ".join(c.__name__ for c in FASTCACHE_CONFIGS)
        raise TypeError(f"config: fastcache supports {names} (fastcache's or diffusers' own), "
                        f"got {cls.__module__}.{cls.__name__}")
    known = {f.name for f in dataclasses.fields(target)}
    kwargs = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "_unconditional_conditional_input_kwargs_identifiers":
            # the family table knows each model's batched inputs; accept diffusers' default and the one
            # extension its users need (SD3's pooled_projections)
            if tuple(value) not in (BATCHED_KWARGS, (*BATCHED_KWARGS, "pooled_projections")):
                raise ValueError(f"config.{f.name}: fastcache splits diffusers' default batched inputs "
                                 f"{BATCHED_KWARGS}, got {tuple(value)}")
            continue
        if f.name in MODULE_CALLBACK_FIELDS and value is not None:
            # diffusers' callbacks take a module: the drop-in evaluates them on the host at each call
            kwargs[f.name] = ModuleCallback(value)
            continue
        if f.name not in known:
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                raise ValueError(f"config.{f.name}: not supported by fastcache ({cls.__name__}), got {value!r}")
            continue
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return target(**kwargs)


# -- targets ------------------------------------------------------------------------------------------------

def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "components") and hasattr(obj, "transformer")


def _unwrap(model: Any) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile'd module: the module it wraps


def _targets(model_or_pipeline: Any) -> list[nn.Module]:
    """The transformers a call names: a pipeline's denoisers, or the (unwrapped) model itself."""
    if _is_pipeline(model_or_pipeline):
        return _denoisers(model_or_pipeline)
    return [_unwrap(model_or_pipeline)]


def _check_not_cached_by_diffusers(model: nn.Module) -> None:
    if getattr(model, "_cache_config", None) is not None:
        raise ValueError(f"model: {type(model).__name__} already has diffusers' own cache hooks "
                         f"({type(model._cache_config).__name__}); call its disable_cache() first")
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None) and not context_parallel_hooks_only(registry):
            raise ValueError(f"model: module {name or type(model).__name__!r} has diffusers hooks "
                             f"({', '.join(registry.hooks)}); remove them before enabling fastcache")


_METHOD_OF = {FirstBlockCacheConfig: "FirstBlockCache", PyramidAttentionBroadcastConfig: "PAB",
              FasterCacheConfig: "FasterCache", MagCacheConfig: "MagCache", TaylorSeerCacheConfig: "TaylorSeer",
              DBCacheConfig: "DBCache", TeaCacheConfig: "TeaCache", SeaCacheConfig: "SeaCache"}


def _check_applicable(model: nn.Module, config: Any) -> None:
    family = family_of(model)
    name = type(model).__name__
    method = _METHOD_OF[type(config)]
    why = family.refusal(method)
    if why is not None:
        others = ", ".join(m for m, cell in coverage(family).items() if m != method and not cell.startswith("no"))
        raise ValueError(f"config: fastcache does not run {method} on {name}: it {why}; use {others}")
    if not family.temporal and isinstance(config, (PyramidAttentionBroadcastConfig, FasterCacheConfig)):
        if config.skip_range("temporal") is not None:
            raise ValueError(f"config.temporal_attention_block_skip_range: {name} has no temporal attention, "
                             f"got {config.skip_range('temporal')}")
    if isinstance(config, FasterCacheConfig) and not config.is_guidance_distilled:
        if not family.cfg_batched:
            raise ValueError(f"config: FasterCache skips the unconditional half of a batched [uncond; cond] "
                             f"call, but {name}'s pipelines run CFG as separate passes; use "
                             "is_guidance_distilled=True (attention approximation only)")
        if family.layout is None:
            raise ValueError(f"config.tensor_format: {name} returns tokens last (B, S, C), which FasterCache's "
                             f"frequency split does not support (allowed: {', '.join(TENSOR_FORMATS)})")
        if config.tensor_format != family.layout:
            raise ValueError(f"config.tensor_format: {name} returns {family.layout}, got "
                             f"{config.tensor_format!r}")


def _session(model: Any) -> Session | None:
    return _unwrap(model).__dict__.get(SESSION_ATTR)


def enable_cache(model_or_pipeline: Any, config: Any) -> None:
    """Enable a cache method on a diffusers transformer, or on a pipeline's transformer.

    Args:
        model_or_pipeline: a supported diffusers transformer (see `SUPPORTED_MODELS`), possibly wrapped by
            torch.compile, or a pipeline: then every denoiser it calls is cached (`transformer`, and
            `transformer_2` where it has one, each with its own states), every call of the pipeline starts
            from fresh cache states (and restores the previous ones at its end), and its scheduler gives the
            timesteps that PAB and FasterCache plan with.
        config: fastcache's or diffusers' `PyramidAttentionBroadcastConfig`, `FasterCacheConfig`,
            `FirstBlockCacheConfig`, `MagCacheConfig`, `TaylorSeerCacheConfig` or `SeaCacheConfig`; or fastcache's
            `DBCacheConfig`
            (cache-dit's DBCache, optionally with TaylorSeer) or `TeaCacheConfig`.

    Raises:
        ValueError / TypeError: already enabled, cached by diffusers' hooks, unknown model class, a method or
            field the model cannot support. Nothing is left half-enabled.

    Example:
        >>> fastcache.enable_cache(pipe, FirstBlockCacheConfig(threshold=0.1))
        >>> pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        >>> image = pipe(prompt_embeds=..., pooled_prompt_embeds=...).images[0]
    """
    if _is_pipeline(model_or_pipeline):
        pipe = model_or_pipeline
        if type(pipe).__dict__.get("_fastcache_scoped"):
            raise ValueError(f"pipeline: fastcache is already enabled on this {type(pipe).__name__}")
        fc_config = to_fastcache_config(config)
        models = _denoisers(pipe)
        for model in models:  # check every denoiser before enabling any
            session = _session(model)
            if session is not None and session.config != fc_config:  # shared with another pipeline: same method
                raise ValueError("pipeline: its transformer already has fastcache enabled with a different config "
                                 f"({type(session.config).__name__}); disable it first")
        enabled = []
        try:
            for model in models:
                if _session(model) is None:
                    enable_cache(model, fc_config)
                    enabled.append(model)
        except BaseException:
            for model in enabled:
                disable_cache(model)
            raise
        _scope_pipeline(pipe, [_session(model) for model in models])
        return
    model = _unwrap(model_or_pipeline)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_pipeline: expected a diffusers transformer or pipeline, "
                        f"got {type(model_or_pipeline).__name__}")
    if _session(model) is not None:
        raise ValueError(f"model: fastcache is already enabled on this {type(model).__name__}; "
                         "call fastcache.disable_cache first")
    family = family_of(model)
    config = to_fastcache_config(config)
    _check_not_cached_by_diffusers(model)
    _check_applicable(model, config)
    session = Session(model, family, config)
    install(session)
    # Instance attributes (not class patches): the pipelines' `transformer.cache_context(name)` and their
    # end-of-call `_reset_stateful_cache()` reach fastcache's session.
    model.__dict__[SESSION_ATTR] = session
    model.__dict__["cache_context"] = lambda name, **kwargs: session.context(name, **kwargs)
    model.__dict__["_reset_stateful_cache"] = lambda recurse=True: session.end_generation()
    model.__dict__["enable_cache"] = lambda *args, **kwargs: _refuse_diffusers_cache(model)


DENOISERS = ("transformer", "transformer_2")  # pipeline components that enable_cache(pipe) caches
# what enable_cache sets on the transformer instance (shadowing diffusers' CacheMixin methods)
INSTANCE_ATTRS = (SESSION_ATTR, "cache_context", "_reset_stateful_cache", "enable_cache")


def _refuse_diffusers_cache(model: nn.Module) -> None:
    raise ValueError(f"model: fastcache is enabled on this {type(model).__name__}; call "
                     "fastcache.disable_cache(model) before diffusers' own enable_cache")


def disable_cache(model_or_pipeline: Any) -> None:
    """Remove every wrapper, instance attribute and state fastcache added; the forward is the original."""
    if _is_pipeline(model_or_pipeline):
        pipe = model_or_pipeline
        base = type(pipe).__dict__.get("_fastcache_base")
        cached = [model for model in _denoisers(pipe) if _session(model) is not None]
        if base is None and not cached:
            raise ValueError(f"pipeline: fastcache is not enabled on this {type(pipe).__name__} or its transformer")
        if base is not None:
            pipe.__class__ = base
        for model in cached:
            disable_cache(model)
        return
    model = _unwrap(model_or_pipeline)
    session = _session(model)
    if session is None:
        raise ValueError(f"model: fastcache is not enabled on this {type(model).__name__}")
    session.unwrap_all()
    for attr in INSTANCE_ATTRS:
        model.__dict__.pop(attr, None)


def cache_context(model: Any, name: str | None, **info: Any) -> Any:
    """`with fastcache.cache_context(transformer, "cond"):` selects the named state (same as
    `transformer.cache_context("cond")` once fastcache is enabled); `info` as diffusers' cache_context keywords
    (`step_index`, `sigma`, `num_inference_steps`, which SeaCache needs)."""
    session = _session(model)
    if session is None:
        raise ValueError(f"model: fastcache is not enabled on this {type(_unwrap(model)).__name__}")
    return session.context(name, **info)


def reset_cache(model_or_pipeline: Any) -> None:
    """Forget every context state of the current scope (the next call of each context starts afresh)."""
    targets = _targets(model_or_pipeline)
    sessions = [_session(target) for target in targets]
    if not targets or any(session is None for session in sessions):
        raise ValueError(f"model: fastcache is not enabled on this {type(_unwrap(model_or_pipeline)).__name__}")
    for session in sessions:
        session.reset()


def cache_state(model: Any, name: str | None = None) -> dict | None:
    """The state of context `name` (a dict of tensors), for inspection: counters, FBC's `skipped`..."""
    session = _session(model)
    return None if session is None else session.state(name)


def calibrated_ratios(model: Any, name: str | None = None) -> tuple[Any, list[float]]:
    """The ratios a `MagCacheConfig(calibrate=True)` run recorded in context `name`: a CPU tensor and a list to
    paste into `mag_ratios` (what diffusers prints at the end of its calibration run)."""
    session = _session(model)
    if session is None or not isinstance(session.config, MagCacheConfig) or not session.config.calibrate:
        raise ValueError("model: calibrated_ratios needs fastcache enabled with MagCacheConfig(calibrate=True)")
    state = session.state(name)
    if state is None:  # a pipeline's calibration run: its states end with the call
        state = session.last_scope.get(name, (None, 0))[0]
    if state is None or "ratios" not in state:
        raise ValueError(f"context {name!r}: no calibration call has run in it yet")
    return mag_cache.ratios_as_data(state["ratios"])


def calibrated_coefficients(model_or_pipeline: Any) -> tuple[float, ...]:
    """TeaCache's rescaling polynomial fitted on what a `TeaCacheConfig(calibrate=True)` run recorded since
    enable_cache (or reset_cache): every pair of consecutive calls in one context (cond and uncond apart, each
    pipeline call apart) gives, per sample, the relative change of block 0's modulated input and of the model's
    output; `numpy.polyfit(x, y, 4)` over all of them, highest degree first, for `TeaCacheConfig(coefficients=)`.
    A pipeline with two denoisers (Wan 2.2) pools both, as one config serves both."""
    sessions = [_session(target) for target in _targets(model_or_pipeline)]
    if not sessions or any(s is None or not isinstance(s.config, TeaCacheConfig) or not s.config.calibrate
                           for s in sessions):
        raise ValueError("model: calibrated_coefficients needs fastcache enabled with TeaCacheConfig(calibrate=True)")
    pairs = [pair for session in sessions for pair in session.block_rule.pairs]
    if not pairs:
        raise ValueError("model: no pair of consecutive calls recorded yet; run the pipeline (or the model twice "
                         "in one context) with TeaCacheConfig(calibrate=True) first")
    x, y = (torch.cat([pair[i] for pair in pairs]) for i in (0, 1))
    return teacache.fit_coefficients(x, y)


def decided_on(model: Any) -> str | None:
    """Where the last call's decisions were made: "host" (planned: no torch.cond, no sync), "device"
    (torch.cond), or None before any call. FirstBlockCache always decides on the device."""
    session = _session(model)
    if session is None:
        raise ValueError(f"model: fastcache is not enabled on this {type(_unwrap(model)).__name__}")
    return session.decided_on


# -- pipelines: one fresh scope per call --------------------------------------------------------------------

_SCOPED_CLASSES: dict[type, type] = {}


def _denoisers(pipe: Any) -> list[nn.Module]:
    """The pipeline's denoisers: `transformer`, and `transformer_2` where it has one (Wan 2.2 A14B)."""
    return [_unwrap(model) for name in DENOISERS if (model := getattr(pipe, name, None)) is not None]


def _scope_pipeline(pipe: Any, sessions: list[Session]) -> None:
    base = type(pipe)
    scoped = _SCOPED_CLASSES.get(base)
    if scoped is None:
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            # a denoiser replaced, or disabled through a pipeline sharing it, runs uncached
            running = [s for s in (_session(model) for model in _denoisers(self)) if s is not None]
            with contextlib.ExitStack() as stack:
                for session in running:
                    stack.enter_context(session.running(self))
                return base.__call__(self, *args, **kwargs)

        # Same name and module as the pipeline's class, so logs and save_pretrained are unchanged.
        scoped = type(base.__name__, (base,), {"__call__": __call__, "_fastcache_scoped": True,
                                                "_fastcache_base": base, "__module__": base.__module__})
        _SCOPED_CLASSES[base] = scoped
    pipe.__class__ = scoped
    for session in sessions:
        session.pipelines.append(pipe)


# -- diffusers' own function names --------------------------------------------------------------------------

def _apply(module: Any, config: Any, expected: str) -> None:
    fc = to_fastcache_config(config)
    if type(fc).__name__ != expected:
        raise TypeError(f"config: expected a {expected}, got {type(config).__name__}")
    enable_cache(module, fc)


def apply_pyramid_attention_broadcast(module: Any, config: Any) -> None:
    """diffusers' `apply_pyramid_attention_broadcast(module, config)`, graph-safe."""
    _apply(module, config, "PyramidAttentionBroadcastConfig")


def apply_faster_cache(module: Any, config: Any) -> None:
    """diffusers' `apply_faster_cache(module, config)`, graph-safe."""
    _apply(module, config, "FasterCacheConfig")


def apply_first_block_cache(module: Any, config: Any) -> None:
    """diffusers' `apply_first_block_cache(module, config)`, graph-safe."""
    _apply(module, config, "FirstBlockCacheConfig")
