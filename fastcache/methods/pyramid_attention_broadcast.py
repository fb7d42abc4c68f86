"""Pyramid Attention Broadcast (PAB): reuse attention outputs on a schedule.

Rule per attention site of an enabled kind (diffusers semantics): compute iff it is the first call, or the
timestep is outside the open range (lo, hi), or `count % N == 0`; otherwise return the output cached at
the last call. The phase is anchored to the absolute call count. The rule depends only on the call count
and the timestep, so it is planned ahead (`plan`); it can also be evaluated on the device
(`step(..., decision=None)`), then reuse is a `torch.cond` per site.

Fixed on purpose: diffusers shares one counter between separate cond/uncond passes; here each pass keeps
its own state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastcache import _validate
from fastcache.control import Flag, all_finite, branch, count_misses, guard_reuse, in_open_range
from fastcache.engine import (
    AttentionSchedule,
    Plan,
    as_timesteps,
    check_optional_decision,
    check_planned_reuse,
    letters,
    trace,
    zeros_like_meta,
)
from fastcache.protocol import (
    ATTENTION_KINDS,
    AttentionKind,
    CacheableModel,
    Inputs,
    check_inputs,
    check_model,
    check_sites,
    check_state,
    forward,
    input_spec,
)

SPATIAL_IDENTIFIERS = (
    "blocks", "transformer_blocks", "single_transformer_blocks", "layers", "visual_transformer_blocks")
TEMPORAL_IDENTIFIERS = ("temporal_transformer_blocks",)
CROSS_IDENTIFIERS = ("blocks", "transformer_blocks", "layers")


@dataclass(frozen=True)
class PyramidAttentionBroadcastConfig(AttentionSchedule):
    """diffusers' field names and defaults.

    `*_block_skip_range` N: reuse for N-1 calls out of N inside the timestep range (None: kind disabled; if
    all three are None, spatial N becomes 2, as in diffusers). `*_timestep_skip_range` (lo, hi): the open
    range of timesteps (0..1000 convention) where reuse is allowed. `*_block_identifiers`: regexes matched
    against module names by the diffusers front door; models that meet fastcache's protocol declare each
    attention site's kind instead. `current_timestep_callback`: optional here (the engine reads the
    timestep from the model's inputs); kept for the diffusers front door.
    """

    spatial_attention_block_skip_range: int | None = None
    temporal_attention_block_skip_range: int | None = None
    cross_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    temporal_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    cross_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    spatial_attention_block_identifiers: tuple[str, ...] = SPATIAL_IDENTIFIERS
    temporal_attention_block_identifiers: tuple[str, ...] = TEMPORAL_IDENTIFIERS
    cross_attention_block_identifiers: tuple[str, ...] = CROSS_IDENTIFIERS
    current_timestep_callback: Callable[[], Any] | None = None

    KINDS = ATTENTION_KINDS

    def __post_init__(self) -> None:
        ranges = [self.skip_range(kind) for kind in ATTENTION_KINDS]
        for kind, value in zip(ATTENTION_KINDS, ranges):
            _validate.skip_range(f"{kind}_attention_block_skip_range", value, allow_none=True)
            field = f"{kind}_attention_timestep_skip_range"
            object.__setattr__(self, field, _validate.timestep_range(field, getattr(self, field)))
            field = f"{kind}_attention_block_identifiers"
            object.__setattr__(self, field, _validate.identifiers(field, getattr(self, field)))
        _validate.callback("current_timestep_callback", self.current_timestep_callback)
        if all(r is None for r in ranges):
            warnings.warn("PyramidAttentionBroadcastConfig: no block skip range given; "
                          "using spatial_attention_block_skip_range=2 as diffusers does", stacklevel=3)
            object.__setattr__(self, "spatial_attention_block_skip_range", 2)


class PABDecision(NamedTuple):
    """Per kind: True computes the attention, False reuses the cached output (bools or 0-dim bool tensors)."""

    spatial: Flag
    temporal: Flag
    cross: Flag


class PABState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    cache: dict[str, Any]  # site name -> last attention output
    finite: dict[str, Tensor]  # site name -> bool, whether that output is all finite
    nonfinite: Tensor  # int64, site reuses the rule asked for while the cached output was not finite
    spec: dict[str, Tensor]  # zero-byte record of the inputs' shapes, dtypes and devices


def should_compute(config: PyramidAttentionBroadcastConfig, kind: AttentionKind, count: Tensor,
                   t: Tensor) -> Tensor:
    """diffusers' rule, vectorised: works on one step (0-dim) or on a whole schedule at once."""
    n = config.skip_range(kind)
    if n is None:
        return torch.ones_like(count, dtype=torch.bool)
    return (count == 0) | ~in_open_range(t, config.timestep_range(kind)) | (count % n == 0)


def decide(config: PyramidAttentionBroadcastConfig, count: Tensor, t: Tensor) -> PABDecision:
    return PABDecision(*(should_compute(config, kind, count, t) for kind in ATTENTION_KINDS))


def plan(config: PyramidAttentionBroadcastConfig, timesteps: Tensor | Sequence[float],
         device: torch.device | str | None = None) -> Plan:
    """The decisions of every step (Python bools; `device` is accepted for a uniform API and unused)."""
    del device
    t = as_timesteps(timesteps)
    count = torch.arange(len(t))
    flags = {kind: should_compute(config, kind, count, t) for kind in ATTENTION_KINDS}
    decisions = tuple(PABDecision(*(bool(flags[k][i]) for k in ATTENTION_KINDS)) for i in range(len(t)))
    rows = {kind: letters(flags[kind], "C", "R") for kind in config.enabled_kinds()}
    return Plan(decisions, rows)


def reused_kinds(decisions: Sequence[PABDecision]) -> set[str]:
    """The kinds of attention that some planned decision reuses."""
    return {kind for d in decisions for kind in ATTENTION_KINDS if getattr(d, kind) is False}


def init(config: PyramidAttentionBroadcastConfig, model: CacheableModel, inputs: Inputs,
         plan: Plan | None = None) -> PABState:
    """The state before the first call. With `plan`, only the sites of the kinds that plan ever reuses are
    cached (a kind it always computes costs no memory); such a state then takes that plan's decisions only."""
    check_model(model)
    sites = config.hooked_sites(model)
    if plan is not None:
        kinds = reused_kinds(plan)
        sites = {name: kind for name, kind in sites.items() if kind in kinds}
    outputs = trace(model, inputs).site_outputs
    device = next(iter(inputs.values())).device
    return PABState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        cache={name: zeros_like_meta(outputs[name]) for name in sites},
        finite={name: torch.ones((), dtype=torch.bool, device=device) for name in sites},
        nonfinite=torch.zeros((), dtype=torch.int64, device=device),
        spec=input_spec(inputs),
    )


def attend_with_cache(sites: dict[str, AttentionKind], decision: PABDecision, state: PABState,
                      new_cache: dict[str, Any], new_finite: dict[str, Tensor], misses: list[Tensor]
                      ) -> Callable[..., Any]:
    """An `attend` that computes or reuses each hooked site and records its output (and whether it is finite)
    in `new_cache` / `new_finite`. A reuse the rule asks for while the cached output is not finite goes in
    `misses`. On the device the site then computes (the finiteness joins the cond's predicate: no extra
    branch). A planned reuse is a plain Python `if`; refusing it would need a branch on data, one host sync,
    which planning exists to avoid. So a planned step reuses the value and the miss is only counted."""

    def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
        kind = sites.get(site)
        if kind is None or site not in state.cache:  # not hooked, or never reused by the state's plan
            return fn(*args)
        compute, cached, finite = getattr(decision, kind), state.cache[site], state.finite[site]

        def run(cached: Any, finite: Tensor, *a: Any) -> tuple[Any, Tensor]:
            out = fn(*a)
            return out, all_finite(out)

        def reuse(cached: Any, finite: Tensor, *a: Any) -> tuple[Any, Tensor]:
            return cached, finite

        reuses = guard_reuse(not compute if isinstance(compute, bool) else ~compute, finite, misses)
        out, ok = branch(reuses, reuse, run, (cached, finite, *args))
        new_cache[site], new_finite[site] = out, ok
        return out

    return attend


def check_decision(decision: Any) -> None:
    check_optional_decision(decision, PABDecision, "PAB")


def step(config: PyramidAttentionBroadcastConfig, model: CacheableModel, state: PABState, inputs: Inputs,
         decision: PABDecision | None = None) -> tuple[Tensor, PABState]:
    """One model call. `decision`: the plan's entry for this call, or None to decide on the device."""
    check_state(state, PABState, "PyramidAttentionBroadcast")
    check_inputs(state.spec, inputs)
    reused = None if decision is None else reused_kinds([decision])
    check_sites(state.cache, config.hooked_sites(model), reused)
    if decision is None:
        decision = decide(config, state.count, model.cache_timestep(inputs))
    else:
        check_planned_reuse(state.count, bool(reused), "PyramidAttentionBroadcast")
    new_cache, new_finite, misses = dict(state.cache), dict(state.finite), []
    attend = attend_with_cache(config.hooked_sites(model), decision, state, new_cache, new_finite, misses)
    out = forward(model, inputs, attend)
    return out, PABState(state.count + 1, new_cache, new_finite, count_misses(state.nonfinite, misses), state.spec)


def computed_fraction(config: PyramidAttentionBroadcastConfig, model: CacheableModel, inputs: Inputs,
                      plan: Plan, state: PABState | None = None) -> float:
    """Share of the model's FLOPs run over the planned steps (reused attention costs nothing)."""
    del state
    tr = trace(model, inputs)
    sites = config.hooked_sites(model)
    saved = sum(tr.site_flops[name] for d in plan for name, kind in sites.items() if not getattr(d, kind))
    return 1.0 - saved / (tr.total_flops * len(plan))

