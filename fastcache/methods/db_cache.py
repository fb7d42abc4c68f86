"""DBCache (cache-dit's Dual Block Cache, FnBn), optionally with TaylorSeer forecasting the skipped residual.

Every call runs the first `Fn_compute_blocks` blocks. Their residual `r = H_Fn - H_in` (hidden stream) is
compared with the same residual of the last computed call: `diff = mean|r - r_ref| / mean|r_ref|`. When the
call may be cached, the middle blocks are skipped and each stream gets `H_Fn + R_mid`, the middle residual
(`H_mid - H_Fn`) of the last computed call, or with `taylorseer_order` 1-2 its Taylor forecast from the
residuals of the last computed calls (finite differences over the steps between them, TaylorSeer's update);
the last `Bn_compute_blocks` blocks always run. FBC is F1B0.

cache-dit's rules (cache_dit 1.5.3, `CachedContextManager.can_cache`, `CachedContext.mark_step_begin` /
`add_cached_step`; tested against that package itself), in order:
- warm-up: steps `range(0, max_warmup_steps, warmup_interval)` compute (planned: no cond on those steps);
- `max_cached_steps >= 0` and that many calls already cached: compute;
- `max_continuous_cached_steps >= 0` and that many calls in a row just before this one cached: compute;
- `residual_diff_threshold <= 0`: compute; `>= 1`: cache whenever a reference exists; else cache iff
  `diff < residual_diff_threshold`.

The decision depends on data, so it stays on the device: one `torch.cond` per call (none on warm-up steps), no
host sync. A cached residual (or Taylor factor) holding a NaN or Inf is never used: the call computes (counted
in `nonfinite`). The difference is pooled over the whole batch, as in cache-dit and FBC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastcache import _validate, kernels
from fastcache.control import Flag, all_finite, branch
from fastcache.engine import Plan, as_timesteps, check_optional_decision, counted_fraction, forced_compute, trace
from fastcache.methods import taylorseer
from fastcache.protocol import (
    CacheableModel,
    Inputs,
    Streams,
    call_attention,
    check_inputs,
    check_model,
    check_state,
    input_spec,
)


@dataclass(frozen=True)
class DBCacheConfig:
    """cache-dit's field names and defaults (F8B0, 8 warm-up steps, threshold 0.08). -1 means no limit.
    `taylorseer_order`: 0 reuses the middle residual; 1 or 2 forecasts it (cache-dit's DBCache + TaylorSeer)."""

    Fn_compute_blocks: int = 8  # noqa: N815 - cache-dit's names
    Bn_compute_blocks: int = 0  # noqa: N815
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int = 0

    def __post_init__(self) -> None:
        _validate.int_at_least("Fn_compute_blocks", self.Fn_compute_blocks, 1)
        _validate.int_at_least("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        object.__setattr__(self, "residual_diff_threshold",
                           _validate.threshold("residual_diff_threshold", self.residual_diff_threshold))
        _validate.int_at_least("max_warmup_steps", self.max_warmup_steps, 0)
        _validate.int_at_least("warmup_interval", self.warmup_interval, 1)
        _validate.int_at_least("max_cached_steps", self.max_cached_steps, -1)
        _validate.int_at_least("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.taylorseer_order not in (0, 1, 2) or isinstance(self.taylorseer_order, bool):
            raise ValueError(f"taylorseer_order: must be 0 (no forecast), 1 or 2, got {self.taylorseer_order!r}")

    def warmup_steps(self) -> range:
        return range(0, self.max_warmup_steps, self.warmup_interval)


FIRST_DERIVATIVE_STEP = 3  # cache-dit's TaylorSeer: the first step whose update forms a derivative


class DBCacheDecision(NamedTuple):
    force_compute: bool  # a warm-up step: compute, no cond


class DBCacheState(NamedTuple):
    count: Tensor  # int64, calls made with this state (the step index of the next call)
    num_computed: Tensor  # int64, calls that ran the middle blocks
    skipped: Tensor  # bool, whether the last call skipped them
    ratio: Tensor  # fp32, the last call's relative Fn residual change (inf when there was no reference)
    ref_residual: Tensor  # the Fn residual of the last computed call (hidden stream)
    factors: tuple[tuple[Tensor, ...], ...]  # per stream: (R_mid, and with TaylorSeer its derivatives)
    factors_finite: Tensor  # bool: a NaN or Inf there is never used
    orders: Tensor  # int64, Taylor orders the last update left (1 + derivatives formed)
    last_computed: Tensor  # int64, step of the last computed call (-1: none)
    num_cached: Tensor  # int64, calls cached (cache-dit's len(cached_steps))
    continuous: Tensor  # int64, calls cached in a row just before the next one
    nonfinite: Tensor  # int64, calls that would have been cached but computed over non-finite residuals
    spec: dict[str, Tensor]


def plan(config: DBCacheConfig, timesteps: Tensor | Sequence[float], device: torch.device | str | None = None
         ) -> Plan:
    """Warm-up steps compute ('C'); the others decide on the device ('?')."""
    del device
    n = len(as_timesteps(timesteps))
    warm = set(config.warmup_steps())
    forced = [i in warm for i in range(n)]
    return Plan(tuple(DBCacheDecision(f) for f in forced), {"blocks": "".join("C" if f else "?" for f in forced)})


def check_blocks(config: DBCacheConfig, num_blocks: int, model_name: str) -> None:
    """Fn + Bn must leave at least one of the model's blocks to cache (shared by the engine and the drop-in)."""
    if config.Fn_compute_blocks + config.Bn_compute_blocks >= num_blocks:
        raise ValueError(f"Fn_compute_blocks + Bn_compute_blocks: {config.Fn_compute_blocks} + "
                         f"{config.Bn_compute_blocks} leaves none of {model_name}'s num_blocks={num_blocks} blocks "
                         "to cache; it must be less than num_blocks")


def init(config: DBCacheConfig, model: CacheableModel, inputs: Inputs) -> DBCacheState:
    check_model(model)
    check_blocks(config, model.num_blocks, type(model).__name__)
    tr = trace(model, inputs)  # blocks keep each stream's shape: the head's streams give every residual's
    device = tr.output.device
    int64 = dict(dtype=torch.int64, device=device)
    return DBCacheState(
        count=torch.zeros((), **int64),
        num_computed=torch.zeros((), **int64),
        skipped=torch.zeros((), dtype=torch.bool, device=device),
        ratio=torch.full((), float("inf"), device=device),
        ref_residual=tr.head_streams[0].zeros(),
        factors=tuple(tuple(meta.zeros() for _ in range(config.taylorseer_order + 1)) for meta in tr.head_streams),
        factors_finite=torch.ones((), dtype=torch.bool, device=device),
        orders=torch.zeros((), **int64),
        last_computed=torch.full((), -1, **int64),
        num_cached=torch.zeros((), **int64),
        continuous=torch.zeros((), **int64),
        nonfinite=torch.zeros((), **int64),
        spec=input_spec(inputs),
    )


class CacheRule(NamedTuple):
    skip: Tensor  # bool: cache this call
    refused: Tensor  # bool: it could be cached, but the stored residuals are not finite
    continuous: Tensor  # int64: calls cached in a row, this one included (0 if it computes)
    num_cached: Tensor


class Counters(NamedTuple):
    """The state's step bookkeeping: what the rule and TaylorSeer's offsets read (a `DBCacheState` has them all;
    the drop-in keeps them in its dict state)."""

    count: Tensor
    num_computed: Tensor
    num_cached: Tensor
    continuous: Tensor
    factors_finite: Tensor
    last_computed: Tensor
    orders: Tensor


def in_warmup(config: DBCacheConfig, count: Tensor) -> Tensor:
    """Whether call `count` is a warm-up step, on the device (a plan makes the same test on the host)."""
    return (count < config.max_warmup_steps) & (count % config.warmup_interval == 0)


def cache_rule(config: DBCacheConfig, state: DBCacheState | Counters, ratio: Tensor) -> CacheRule:
    """cache-dit's `can_cache` and its cached-step bookkeeping on the device. A warm-up step never caches (a plan
    also knows it on the host, and then takes no cond at all)."""
    has_reference = state.num_computed > 0
    no, yes = torch.zeros_like(has_reference), torch.ones_like(has_reference)
    full = state.num_cached >= config.max_cached_steps if config.max_cached_steps >= 0 else no
    limit = config.max_continuous_cached_steps
    streak = state.continuous >= limit if limit >= 0 else no
    threshold = config.residual_diff_threshold
    similar = no if threshold <= 0 else yes if threshold >= 1 else ratio < threshold
    may = ~in_warmup(config, state.count) & ~full & ~streak & has_reference & similar
    skip, refused = may & state.factors_finite, may & ~state.factors_finite
    return CacheRule(skip, refused, torch.where(skip, state.continuous + 1, torch.zeros_like(state.continuous)),
                     state.num_cached + skip.long())


def taylor_decision(config: DBCacheConfig, state: DBCacheState | Counters,
                    compute: bool) -> taylorseer.TaylorSeerDecision:
    """TaylorSeer's bookkeeping for the middle residual, on the device (the step offsets are data here)."""
    order = config.taylorseer_order
    device = state.count.device
    since = (state.count - state.last_computed).float()
    held = torch.arange(order + 1, device=device) < state.orders
    if compute:
        # cache-dit 1.5.3 forms derivatives only from the update at step 3 on (its per-stream Taylor state is made
        # at the first update, one step behind the step count, and differentiates past its own step 1): the same
        # here, so its outputs are reproduced exactly
        grows = held[:order] & (state.last_computed >= 0) & (state.count >= FIRST_DERIVATIVE_STEP)
        delta = torch.where(state.last_computed >= 0, since, torch.ones_like(since))
        return taylorseer.TaylorSeerDecision(True, torch.zeros(order + 1, device=device), grows, delta)
    powers = torch.stack([since ** j / math.factorial(j) for j in range(order + 1)])
    coefficients = torch.where(held, powers, torch.zeros_like(powers))
    return taylorseer.TaylorSeerDecision(False, coefficients, torch.zeros(order, dtype=torch.bool, device=device),
                                         torch.ones((), device=device))


def taylor_counters(config: DBCacheConfig, state: DBCacheState | Counters, computed: Tensor) -> tuple[Tensor, Tensor]:
    """(orders, last_computed) after a call: a computed call forms one more Taylor order (up to the config's) and
    becomes the last computed step."""
    grown = torch.clamp(torch.where(state.last_computed >= 0, state.orders + 1, 1), max=config.taylorseer_order + 1)
    return (torch.where(computed, grown, state.orders),
            torch.where(computed, state.count, state.last_computed))


class DBCacheHead(NamedTuple):
    """What a step's head leaves for its tail: the streams after the first Fn blocks and the decision."""

    streams: Streams
    aux: Any
    residual: Tensor  # the Fn blocks' residual, hidden stream
    ratio: Tensor  # fp32 0-dim: its relative change against the reference
    rule: CacheRule  # (a planned compute: no skip, the counters reset)

    @property
    def skip(self) -> Tensor:
        return self.rule.skip


def check_decision(decision: Any) -> None:
    check_optional_decision(decision, DBCacheDecision, "DBCache")


def head_step(config: DBCacheConfig, model: CacheableModel, state: DBCacheState, inputs: Inputs,
              decision: DBCacheDecision | None = None) -> DBCacheHead:
    """The first half of a step: embed, the first Fn blocks, the skip decision (on the device)."""
    check_decision(decision)
    check_state(state, DBCacheState, "DBCache")
    check_inputs(state.spec, inputs)
    check_blocks(config, model.num_blocks, type(model).__name__)
    streams, aux = model.embed(inputs)
    h_in = streams[0]
    for index in range(config.Fn_compute_blocks):
        streams = model.block(index, streams, aux, call_attention)
    residual = streams[0] - h_in
    ratio = kernels.absmean_rel_diff(residual, state.ref_residual)
    if forced_compute(decision):  # two tensors, not one twice: a split step's tail would guard on the aliasing
        skip, refused = (torch.zeros((), dtype=torch.bool, device=state.count.device) for _ in range(2))
        rule = CacheRule(skip, refused, torch.zeros_like(state.continuous), state.num_cached)
    else:
        rule = cache_rule(config, state, ratio)
    return DBCacheHead(streams, aux, residual, ratio, rule)


def tail_step(config: DBCacheConfig, model: CacheableModel, state: DBCacheState, head: DBCacheHead,
              skip: Flag) -> tuple[Tensor, DBCacheState]:
    """The second half: the middle blocks or their cached residual (TaylorSeer: its forecast), then the last Bn
    blocks. `skip` is `head.skip` (a torch.cond on the device), its value read on the host (a plain branch:
    `fastcache.compile_step`'s split step), or False on a planned compute."""
    fn, middle_end = config.Fn_compute_blocks, model.num_blocks - config.Bn_compute_blocks
    aux = head.aux

    def compute(streams: Streams, current: Tensor, ref: Tensor, factors: tuple, finite: Tensor) -> tuple:
        out = streams
        for index in range(fn, middle_end):
            out = model.block(index, out, aux, call_attention)
        mids = tuple(o - s for o, s in zip(out, streams))
        if config.taylorseer_order:
            taylor = taylor_decision(config, state, compute=True)
            new = tuple(taylorseer.updated(f, m, taylor, None) for f, m in zip(factors, mids))
        else:
            new = tuple((m,) for m in mids)
        return out, current, new, all_finite(new)

    def reuse(streams: Streams, current: Tensor, ref: Tensor, factors: tuple, finite: Tensor) -> tuple:
        if config.taylorseer_order:
            taylor = taylor_decision(config, state, compute=False)
            mids = tuple(taylorseer.forecast(f, taylor, s.dtype) for f, s in zip(factors, streams))
        else:
            mids = tuple(f[0] for f in factors)
        return tuple(s + m for s, m in zip(streams, mids)), ref, factors, finite

    # every tensor a branch returns is an operand (a closed-over one would alias the branch's output)
    streams, ref, factors, finite = branch(skip, reuse, compute, (head.streams, head.residual, state.ref_residual,
                                                                  state.factors, state.factors_finite))
    for index in range(middle_end, model.num_blocks):
        streams = model.block(index, streams, aux, call_attention)
    out = model.head(streams, aux)
    rule = head.rule
    computed = ~rule.skip
    orders, last_computed = taylor_counters(config, state, computed)
    return out, DBCacheState(
        count=state.count + 1, num_computed=state.num_computed + computed.long(), skipped=rule.skip,
        ratio=head.ratio, ref_residual=ref, factors=factors, factors_finite=finite, orders=orders,
        last_computed=last_computed, num_cached=rule.num_cached,
        continuous=rule.continuous, nonfinite=state.nonfinite + rule.refused.long(), spec=state.spec)


def step(config: DBCacheConfig, model: CacheableModel, state: DBCacheState, inputs: Inputs,
         decision: DBCacheDecision | None = None) -> tuple[Tensor, DBCacheState]:
    """One model call. `decision`: the plan's entry (warm-up steps compute with no cond), or None to decide
    every call on the device (the warm-up too, from the state's call count)."""
    head = head_step(config, model, state, inputs, decision)
    return tail_step(config, model, state, head, False if forced_compute(decision) else head.skip)


def computed_fraction(config: DBCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: DBCacheState) -> float:
    """Share of the model's FLOPs run, from the state's counters (one host read, after the loop)."""
    del plan
    return counted_fraction(model, inputs, state, slice(config.Fn_compute_blocks,
                                                        model.num_blocks - config.Bn_compute_blocks))
