"""TaylorSeer: forecast module outputs from finite-difference Taylor factors, with diffusers' semantics.

Steps are counted from 0. A step computes iff `step < disable_cache_before_step`, or
`(step - disable_cache_before_step - 1) % cache_interval == 0` (Python modulo), or
`step >= disable_cache_after_step`; every other step forecasts. A computed step updates each forecast output's
factors: `F_0 = y`, `F_{j+1} = (F_j(new) - F_j(old)) / d` for the orders the previous update had (up to
`max_order`), `d` the steps since that update; they are stored in `taylor_factors_dtype`. A forecast step
`k` steps after the last update returns `sum_j F_j k^j / j!` over the orders held, without running the module.

What is forecast: every attention site of the model (diffusers hooks attention modules by default); sites
named by `skip_predict_identifiers` return zeros on forecast steps instead (diffusers' "inactive" modules).
`use_lite_mode` forecasts the model's output and runs nothing on forecast steps (diffusers' lite mode forecasts
`proj_out` and zeroes the blocks). In the drop-in, the identifiers are diffusers' module-name regexes.

Every decision depends only on the step index: planned on the host (`plan`). The step offsets and the orders
held travel in the decision as small tensors, so a compiled step has two variants (compute, forecast), no
torch.cond and no sync; a forecast from factors holding a NaN or Inf cannot be refused without a branch on data,
so it is counted in the state's `nonfinite`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from fastcache import _validate
from fastcache.control import all_finite, canonical, count_misses
from fastcache.engine import Plan, TensorMeta, as_timesteps, check_planned_decision, check_planned_reuse, trace
from fastcache.protocol import (
    CacheableModel,
    Inputs,
    check_inputs,
    check_model,
    check_state,
    forward,
    input_spec,
)

SPATIAL_IDENTIFIERS = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
TEMPORAL_IDENTIFIERS = ("^temporal_transformer_blocks.*attn",)
LITE_CACHE_IDENTIFIERS = ("^proj_out$",)
LITE_SKIP_IDENTIFIERS = ("^[^.]*block[^.]*\\.[^.]+$",)


@dataclass(frozen=True)
class TaylorSeerCacheConfig:
    """diffusers' field names and defaults. `cache_identifiers` / `skip_predict_identifiers`: regexes
    (`re.fullmatch`) on module names in the drop-in, on attention site names in the engine; None: diffusers'
    attention identifiers (drop-in) or every site (engine)."""

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: torch.dtype | None = torch.bfloat16
    skip_predict_identifiers: tuple[str, ...] | None = None
    cache_identifiers: tuple[str, ...] | None = None
    use_lite_mode: bool = False

    def __post_init__(self) -> None:
        _validate.skip_range("cache_interval", self.cache_interval, allow_none=False)
        for name in ("disable_cache_before_step", "max_order"):
            _validate.int_at_least(name, getattr(self, name), 0)
        after = self.disable_cache_after_step
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise ValueError(f"disable_cache_after_step: must be an int >= 0 or None, got {after!r}")
        dtype = self.taylor_factors_dtype
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"taylor_factors_dtype: must be a floating torch.dtype or None, got {dtype!r}")
        for name in ("skip_predict_identifiers", "cache_identifiers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _validate.identifiers(name, getattr(self, name)))
        _validate.boolean("use_lite_mode", self.use_lite_mode)


class TaylorSeerDecision(NamedTuple):
    compute: bool  # run the forecast modules (and update their factors), else forecast them
    coefficients: Tensor  # fp32 (max_order + 1,): k^j / j! for the orders held at a forecast step, else 0
    grows: Tensor  # bool (max_order,): an update may form order j + 1 (the previous update held order j)
    delta: Tensor  # fp32 0-dim: steps since the previous update (1 where there is none)


class TaylorSeerState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    factors: dict[str, tuple[Any, ...]]  # forecast site (or "output") -> (F_0, ..., F_max_order), each like its output
    templates: dict[str, Any]  # hooked site (or "output") -> zero-byte tensors: its outputs' shapes and dtypes
    finite: dict[str, Tensor]  # forecast site -> bool, whether its factors are all finite
    nonfinite: Tensor  # int64, forecasts made from non-finite factors (counted: a plan cannot branch on data)
    spec: dict[str, Tensor]


def computes(config: TaylorSeerCacheConfig, step: int) -> bool:
    before, after = config.disable_cache_before_step, config.disable_cache_after_step
    return (step < before or (step - before - 1) % config.cache_interval == 0
            or (after is not None and step >= after))


def decisions(config: TaylorSeerCacheConfig, calls: int, device: torch.device | str = "cpu"
              ) -> list[TaylorSeerDecision]:
    """The rule for calls 0..calls-1, with the factor bookkeeping diffusers does at run time made ahead."""
    out, last_update, orders = [], None, 0  # orders: how many factors the last update left
    for step in range(calls):
        compute = computes(config, step)
        coefficients = [0.0] * (config.max_order + 1)
        grows = [False] * config.max_order
        delta = 1.0
        if compute:
            if last_update is not None:
                delta = float(step - last_update)
                grows = [j < orders for j in range(config.max_order)]
            orders = 1 + sum(grows)
            last_update = step
        else:
            if last_update is None:
                raise ValueError(f"TaylorSeerCacheConfig: step {step} forecasts before any step computed "
                                 "(disable_cache_before_step=0 with cache_interval > 1); diffusers fails there too")
            k = step - last_update
            coefficients = [k ** j / math.factorial(j) if j < orders else 0.0 for j in range(config.max_order + 1)]
        out.append(TaylorSeerDecision(compute, torch.tensor(coefficients, dtype=torch.float32, device=device),
                                      torch.tensor(grows, dtype=torch.bool, device=device),
                                      torch.tensor(delta, dtype=torch.float32, device=device)))
    return out


def plan(config: TaylorSeerCacheConfig, timesteps: Tensor | Sequence[float],
         device: torch.device | str | None = None) -> Plan:
    """The decisions of every step (row: C computed, P predicted); their tensors are made on `device` (default:
    the timesteps' device, CPU for a list) once."""
    if device is None:
        device = timesteps.device if isinstance(timesteps, Tensor) else torch.device("cpu")
    n = len(as_timesteps(timesteps))
    ds = decisions(config, n, device)
    return Plan(tuple(ds), {"forecast": "".join("C" if d.compute else "P" for d in ds)})


def forecast_sites(config: TaylorSeerCacheConfig, model: CacheableModel) -> dict[str, bool]:
    """Engine: site name -> True if forecast, False if it returns zeros on forecast steps ("inactive")."""
    sites = {}
    for site in model.cache_sites():
        inactive = any(re.fullmatch(p, site.name) for p in config.skip_predict_identifiers or ())
        active = config.cache_identifiers is None or any(re.fullmatch(p, site.name) for p in config.cache_identifiers)
        if inactive or active:
            sites[site.name] = not inactive
    return sites


def template_of(out: Any) -> Any:
    """Zero-byte tensors that record the shapes and dtypes of a module's output (tensors or TensorMetas)."""
    return tree_map(lambda x: torch.empty((*x.shape, 0), dtype=x.dtype, device=x.device), out,
                    is_leaf=lambda x: isinstance(x, TensorMeta))


def zeros_from_template(template: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped as the recorded output, in its dtype or `dtype`: an inactive module's forecast, or factors."""
    return tree_map(lambda t: t.new_zeros(t.shape[:-1], dtype=dtype or t.dtype), template)


def _factors_like(template: Any, config: TaylorSeerCacheConfig) -> tuple[Any, ...]:
    return tuple(zeros_from_template(template, config.taylor_factors_dtype) for _ in range(config.max_order + 1))


def init(config: TaylorSeerCacheConfig, model: CacheableModel, inputs: Inputs) -> TaylorSeerState:
    check_model(model)
    tr = trace(model, inputs)
    if config.use_lite_mode:
        templates = {"output": template_of(tr.output)}
        active = ["output"]
    else:
        sites = forecast_sites(config, model)
        templates = {name: template_of(tr.site_outputs[name]) for name in sites}
        active = [name for name, forecast_it in sites.items() if forecast_it]
    factors = {name: _factors_like(templates[name], config) for name in active}
    device = tr.output.device
    finite = {name: torch.ones((), dtype=torch.bool, device=device) for name in active}
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return TaylorSeerState(zero, factors, templates, finite, zero.clone(), input_spec(inputs))


def updated(factors: tuple[Tensor, ...], y: Tensor, decision: TaylorSeerDecision,
            dtype: torch.dtype | None) -> tuple[Tensor, ...]:
    """New factors of one output tensor `y` (diffusers' update; orders the previous update lacked stay 0)."""
    new = [y]
    for j in range(len(factors) - 1):
        difference = (new[j] - factors[j].to(y.dtype)) / decision.delta
        new.append(torch.where(decision.grows[j], difference, torch.zeros_like(difference)))
    # contiguous strides: the next call guards on them (a model output is often a permuted view)
    return tuple(canonical(f if dtype is None else f.to(dtype)) for f in new)


def forecast(factors: tuple[Tensor, ...], decision: TaylorSeerDecision, dtype: torch.dtype) -> Tensor:
    """sum_j F_j k^j / j! over the orders held, in the output's dtype (diffusers' order of additions)."""
    out = torch.zeros_like(factors[0], dtype=dtype)
    for j, factor in enumerate(factors):
        out = out + factor.to(dtype) * decision.coefficients[j]
    return out


def update_tree(factors: tuple[Any, ...], y: Any, decision: TaylorSeerDecision, dtype: torch.dtype | None
                ) -> tuple[Any, ...]:
    """`updated` for every tensor of an output (a module may return a tuple of tensors)."""
    leaves, spec = tree_flatten(y)
    per_order = [tree_leaves(f) for f in factors]
    per_leaf = [updated(tuple(order[i] for order in per_order), leaf, decision, dtype) for i, leaf in enumerate(leaves)]
    return tuple(tree_unflatten([leaf[j] for leaf in per_leaf], spec) for j in range(len(factors)))


def forecast_tree(factors: tuple[Any, ...], template: Any, decision: TaylorSeerDecision) -> Any:
    leaves, spec = tree_flatten(template)
    per_order = [tree_leaves(f) for f in factors]
    return tree_unflatten([forecast(tuple(order[i] for order in per_order), decision, t.dtype)
                           for i, t in enumerate(leaves)], spec)


def check_decision(decision: Any) -> None:
    check_planned_decision(decision, TaylorSeerDecision, "TaylorSeer")


def step(config: TaylorSeerCacheConfig, model: CacheableModel, state: TaylorSeerState, inputs: Inputs,
         decision: TaylorSeerDecision | None = None) -> tuple[Tensor, TaylorSeerState]:
    """One model call with the plan's entry for it (TaylorSeer is always planned: its rule reads no data)."""
    check_state(state, TaylorSeerState, "TaylorSeer")
    check_inputs(state.spec, inputs)
    check_planned_decision(decision, TaylorSeerDecision, "TaylorSeer")
    check_planned_reuse(state.count, not decision.compute, "TaylorSeer")
    dtype, new, new_finite, misses = config.taylor_factors_dtype, dict(state.factors), dict(state.finite), []

    def run(name: str, fn: Callable[[], Any]) -> Any:
        """A forecast module: compute and update its factors, or forecast it (inactive: zeros)."""
        if decision.compute:
            out = fn()
            if name in state.factors:
                new[name] = update_tree(state.factors[name], out, decision, dtype)
                new_finite[name] = all_finite(new[name])
            return out
        if name in state.factors:
            misses.append(~state.finite[name])
            return forecast_tree(state.factors[name], state.templates[name], decision)
        return zeros_from_template(state.templates[name])

    if config.use_lite_mode:
        out = run("output", lambda: forward(model, inputs))
    else:
        def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
            if site not in state.templates:
                return fn(*args)
            return run(site, lambda: fn(*args))

        out = forward(model, inputs, attend)
    return out, TaylorSeerState(state.count + 1, new, state.templates, new_finite,
                                count_misses(state.nonfinite, misses), state.spec)


def computed_fraction(config: TaylorSeerCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: TaylorSeerState | None = None) -> float:
    """Share of the model's FLOPs run over the planned steps (a forecast module costs nothing)."""
    del state
    tr = trace(model, inputs)
    if config.use_lite_mode:
        saved = tr.total_flops
    else:
        saved = sum(tr.site_flops[name] for name in forecast_sites(config, model))
    return 1.0 - saved * sum(not d.compute for d in plan) / (tr.total_flops * len(plan))
