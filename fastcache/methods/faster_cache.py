"""FasterCache: skip the unconditional CFG half and extrapolate attention, with diffusers semantics.

Denoiser level (batched CFG, inputs [uncond; cond]): the unconditional half is skipped iff `count > 0`, the
timestep is in the open range and `count % N_uncond != 0` (never for guidance-distilled models). On a full
step the difference `u - c` of the two output halves is split into its low- and high-frequency parts
(`dL = lowpass(u - c)`, `dH = (u - c) - dL`) and kept. On a skip step only the conditional half runs;
the deltas are first scaled by the frequency weights (which therefore compound over consecutive skips) and
stored back, and `uncond = c + dL + dH`. This is diffusers' FFT formula in real space: the low-pass is
linear, so `ifft(LF(c) + dLF + HF(c) + dHF) = c + dL + dH`, and a skip step needs no FFT at all.

Attention level (spatial and temporal sites): inside the timestep range a site computes iff
`count > 0 and count % N == 0`; otherwise it approximates `F_k + w * (F_k - F_{k-1})` from the last two
outputs it saw (conditional halves). As in diffusers an approximation needs the halved batch of a skip step
(or a guidance-distilled model). Fixed on purpose: the first call always computes (diffusers reads an empty
cache and crashes for guidance-distilled models); state is per CFG branch, not shared between passes.

Every decision depends only on the call count and the timestep: planned ahead, or evaluated on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from fastcache import _validate, kernels
from fastcache.control import Flag, all_finite, branch, count_misses, guard_reuse, in_open_range, select
from fastcache.engine import (
    AttentionSchedule,
    Plan,
    TensorMeta,
    as_timesteps,
    batch_halves,
    check_optional_decision,
    check_planned_reuse,
    letters,
    trace,
    zeros_like_meta,
)
from fastcache.protocol import (
    CacheableModel,
    Inputs,
    check_inputs,
    check_model,
    check_sites,
    check_state,
    forward,
    input_spec,
)

TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")
CACHED_KINDS = ("spatial", "temporal")
SPATIAL_IDENTIFIERS = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
TEMPORAL_IDENTIFIERS = ("^temporal_transformer_blocks.*attn",)

WeightCallback = Callable[[Tensor], Tensor | float]
MODULE_CALLBACK_FIELDS = ("attention_weight_callback", "low_frequency_weight_callback",
                          "high_frequency_weight_callback")


@dataclass(frozen=True)
class ModuleCallback:
    """A weight callback in diffusers' form: it takes a module and returns a Python float
    (`attention_weight_callback=lambda _: 0.3`). The diffusers drop-in evaluates it on the host at each call
    (with the hooked attention module, or the denoiser for the frequency weights), so a constant compiles to a
    constant; the engine has no module to give it and needs a callback of the timestep instead."""

    fn: Callable[[Any], float]

    def __call__(self, module: Any) -> float:
        return self.fn(module)


@dataclass(frozen=True)
class FasterCacheConfig(AttentionSchedule):
    """diffusers' field names and defaults.

    The weight callbacks take the current timestep (a tensor, 0..1000 convention) and return a weight; they
    are evaluated for a whole schedule at once when planning, so write them with tensor ops
    (`torch.where`), not Python `if`. Defaults as in diffusers: attention weight 0.5; frequency weights
    `alpha if lo < t < hi else 1`. `tensor_format` names the layout of the model output; the frequency split
    acts on its last two dims (H, W), which all three layouts share.
    """

    spatial_attention_block_skip_range: int | None = 2
    temporal_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[float, float] = (-1, 681)
    temporal_attention_timestep_skip_range: tuple[float, float] = (-1, 681)
    low_frequency_weight_update_timestep_range: tuple[float, float] = (99, 901)
    high_frequency_weight_update_timestep_range: tuple[float, float] = (-1, 301)
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = 5
    unconditional_batch_timestep_skip_range: tuple[float, float] = (-1, 641)
    spatial_attention_block_identifiers: tuple[str, ...] = SPATIAL_IDENTIFIERS
    temporal_attention_block_identifiers: tuple[str, ...] = TEMPORAL_IDENTIFIERS
    attention_weight_callback: WeightCallback | None = None
    low_frequency_weight_callback: WeightCallback | None = None
    high_frequency_weight_callback: WeightCallback | None = None
    tensor_format: str = "BCFHW"
    is_guidance_distilled: bool = False
    current_timestep_callback: Callable[[], Any] | None = None

    KINDS = CACHED_KINDS

    def __post_init__(self) -> None:
        for kind in CACHED_KINDS:
            _validate.skip_range(f"{kind}_attention_block_skip_range", self.skip_range(kind), allow_none=True)
        _validate.skip_range("unconditional_batch_skip_range", self.unconditional_batch_skip_range,
                             allow_none=False)
        for field in ("spatial_attention_timestep_skip_range", "temporal_attention_timestep_skip_range",
                      "low_frequency_weight_update_timestep_range", "high_frequency_weight_update_timestep_range",
                      "unconditional_batch_timestep_skip_range"):
            object.__setattr__(self, field, _validate.timestep_range(field, getattr(self, field)))
        for field in ("spatial_attention_block_identifiers", "temporal_attention_block_identifiers"):
            object.__setattr__(self, field, _validate.identifiers(field, getattr(self, field)))
        for field in ("alpha_low_frequency", "alpha_high_frequency"):
            _validate.positive_number(field, getattr(self, field))
        for field in ("attention_weight_callback", "low_frequency_weight_callback",
                      "high_frequency_weight_callback", "current_timestep_callback"):
            _validate.callback(field, getattr(self, field))
        _validate.choice("tensor_format", self.tensor_format, TENSOR_FORMATS)
        _validate.boolean("is_guidance_distilled", self.is_guidance_distilled)


class FasterCacheDecision(NamedTuple):
    first: Flag  # the first call: seeds both slots of every attention window
    skip_uncond: Flag  # run the conditional half only and reconstruct the unconditional one
    approx_spatial: Flag  # approximate spatial attention (only where the batch is halved, or distilled)
    approx_temporal: Flag
    w_low: Tensor  # 0-dim fp32 weights; tensors so that new values never recompile
    w_high: Tensor
    w_attention: Tensor


class FasterCacheState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    windows: dict[str, tuple[Any, Any]]  # site -> (F_{k-1}, F_k), conditional halves
    windows_finite: dict[str, tuple[Tensor, Tensor]]  # site -> bools, whether each slot is all finite
    d_low: Tensor  # fp32 low-frequency part of (uncond - cond) output; empty for distilled models
    d_high: Tensor
    deltas_finite: Tensor  # bool, whether d_low and d_high are all finite
    nonfinite: Tensor  # int64, skips or approximations the rules asked for on non-finite cached values
    spec: dict[str, Tensor]


def _weight(callback: WeightCallback | None, default: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    if isinstance(callback, ModuleCallback):
        raise TypeError("FasterCacheConfig: a ModuleCallback (diffusers' callback of a module) is evaluated by the "
                        "diffusers drop-in only; the engine needs a callback of the timestep tensor")
    value = default(t) if callback is None else callback(t)
    return torch.as_tensor(value, dtype=torch.float32, device=t.device).expand(t.shape).clone()


def decide(config: FasterCacheConfig, count: Tensor, t: Tensor) -> FasterCacheDecision:
    """diffusers' rules, vectorised: one step (0-dim count and t) or a whole schedule at once."""
    distilled = config.is_guidance_distilled
    skip_uncond = ((count > 0) & in_open_range(t, config.unconditional_batch_timestep_skip_range)
                   & (count % config.unconditional_batch_skip_range != 0) & (not distilled))
    approx = []
    for kind in CACHED_KINDS:
        n = config.skip_range(kind)
        if n is None:
            approx.append(torch.zeros_like(skip_uncond))
            continue
        rule = in_open_range(t, config.timestep_range(kind)) & (count > 0) & (count % n != 0)
        approx.append(rule if distilled else rule & skip_uncond)
    return FasterCacheDecision(count == 0, skip_uncond, approx[0], approx[1], *weights(config, t))


def weights(config: FasterCacheConfig, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(w_low, w_high, w_attention)` at t (one step or a whole schedule): the config's callbacks, or diffusers'
    defaults (alpha inside the update range, else 1; attention 0.5)."""
    def alpha(bounds: tuple[float, float], value: float) -> Callable[[Tensor], Tensor]:
        return lambda t: torch.where(in_open_range(t, bounds), value, 1.0)

    return (_weight(config.low_frequency_weight_callback,
                    alpha(config.low_frequency_weight_update_timestep_range, config.alpha_low_frequency), t),
            _weight(config.high_frequency_weight_callback,
                    alpha(config.high_frequency_weight_update_timestep_range, config.alpha_high_frequency), t),
            _weight(config.attention_weight_callback, lambda t: torch.full_like(t, 0.5), t))


def plan(config: FasterCacheConfig, timesteps: Tensor | Sequence[float], device: torch.device | str | None = None
         ) -> Plan:
    """The decisions of every step. Their weights are 0-dim tensors on `device` (default: the timesteps' device,
    CPU for a list): the kernels read them from the data's device, so plan on the device the model runs on
    (made once here, never copied per step)."""
    if device is None:
        device = timesteps.device if isinstance(timesteps, Tensor) else torch.device("cpu")
    t = as_timesteps(timesteps)
    d = decide(config, torch.arange(len(t)), t)
    w_low, w_high, w_attention = (w.to(device) for w in (d.w_low, d.w_high, d.w_attention))
    decisions = tuple(
        FasterCacheDecision(bool(d.first[i]), bool(d.skip_uncond[i]), bool(d.approx_spatial[i]),
                            bool(d.approx_temporal[i]), w_low[i], w_high[i], w_attention[i])
        for i in range(len(t)))
    rows = {} if config.is_guidance_distilled else {"uncond": letters(d.skip_uncond, "S", "F")}
    for kind, flags in zip(CACHED_KINDS, (d.approx_spatial, d.approx_temporal)):
        if config.skip_range(kind) is not None:
            rows[kind] = letters(flags, "A", "C")
    return Plan(decisions, rows)


def approximated_kinds(decisions: Sequence[FasterCacheDecision]) -> set[str]:
    """The kinds of attention that some planned decision approximates (the others never read their window)."""
    return {kind for d in decisions for kind in CACHED_KINDS if getattr(d, f"approx_{kind}") is True}


def init(config: FasterCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan | None = None
         ) -> FasterCacheState:
    """The state before the first call. With `plan`, attention windows are kept only for the kinds that plan
    ever approximates; such a state then takes that plan's decisions only."""
    check_model(model)
    if config.is_guidance_distilled:
        cond_inputs = dict(inputs)
    else:
        _, cond_inputs = batch_halves(inputs)
    tr = trace(model, cond_inputs)
    fmt_dims = {"BCFHW": 5, "BFCHW": 5, "BCHW": 4}[config.tensor_format]
    if not config.is_guidance_distilled and len(tr.output.shape) != fmt_dims:
        raise ValueError(f"tensor_format: {config.tensor_format!r} needs a {fmt_dims}-D model output, "
                         f"got shape {tr.output.shape}; allowed formats: {', '.join(TENSOR_FORMATS)}")
    device = tr.output.device
    delta = TensorMeta(tr.output.shape if not config.is_guidance_distilled else (0,), torch.float32, device)
    windows, windows_finite = {}, {}
    kinds = set(CACHED_KINDS) if plan is None else approximated_kinds(plan)
    for name in (name for name, kind in config.hooked_sites(model).items() if kind in kinds):
        window = zeros_like_meta(tr.site_outputs[name])
        windows[name] = (window, tree_map(torch.clone, window))
        windows_finite[name] = (_true(device), _true(device))
    return FasterCacheState(torch.zeros((), dtype=torch.int64, device=device), windows, windows_finite,
                            delta.zeros(), delta.zeros(), _true(device),
                            torch.zeros((), dtype=torch.int64, device=device), input_spec(inputs))


def _true(device: torch.device) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=device)


def second_half_copy(x: Tensor) -> Tensor:
    """A new tensor holding `x[n // 2:]` (the conditional half of an [uncond; cond] batch).

    A copy, not a view, so that the window does not keep the whole batch alive and a cond branch returns
    a tensor at storage offset 0 as the other branch does. Not `.clone()`: inductor (torch 2.11-2.13) removes a
    clone whose size and strides equal its source's as a no-op without comparing storage offsets, and the
    merged cond then fails on the slice's offset. A gather over the half's indices always materialises."""
    half = x.shape[0] // 2
    return x.index_select(0, torch.arange(half, x.shape[0], device=x.device))


def _first_or(first: Flag, new: Tensor, latest: Tensor) -> Tensor:
    """A copy of `new` on the first call, else `latest`."""
    return new.clone() if first is True else select(first, new, latest)


class _Windows(NamedTuple):
    """The attention windows a step reads (`old`) and writes (`new`), and the non-finite misses it meets."""

    old: dict[str, tuple[Any, Any]]
    old_finite: dict[str, tuple[Tensor, Tensor]]
    new: dict[str, tuple[Any, Any]]
    new_finite: dict[str, tuple[Tensor, Tensor]]
    misses: list[Tensor]


def _attend(sites: dict[str, str], decision: FasterCacheDecision, w: _Windows, full_batch: bool
            ) -> Callable[..., Any]:
    """An `attend` that computes or extrapolates each hooked site and slides its two-slot window.

    `full_batch`: attention sees the [uncond; cond] batch (the window keeps the second half of its outputs'
    dim 0, as diffusers does), not the conditional half only. An approximation from a window holding a NaN or
    Inf is a miss: on the device the site computes instead (the finiteness joins the cond's predicate); a
    planned approximation is a Python `if` (refusing it would be a branch on data, a host sync), so it runs
    and the miss is only counted.
    """

    def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
        kind = sites.get(site)
        if kind is None or site not in w.old:  # not hooked, or never approximated by the state's plan
            return fn(*args)
        prev, last = w.old[site]
        prev_ok, last_ok = w.old_finite[site]
        if not full_batch:
            approx = guard_reuse(getattr(decision, f"approx_{kind}"), prev_ok & last_ok, w.misses)
            out = branch(approx,
                         lambda before, latest, *a: tree_map(
                             lambda x, y: kernels.extrapolate(x, y, decision.w_attention), latest, before),
                         lambda before, latest, *a: fn(*a), (prev, last, *args))
            kept = out
        else:
            out = fn(*args)
            kept = tree_map(second_half_copy, out)
        kept_ok = all_finite(kept)
        # the first call fills both slots, as diffusers does: F_{k-1} = F_k until a second output exists (as
        # distinct tensors: slots that alias would be guarded on, and the next call would recompile)
        w.new[site] = (tree_map(lambda new, latest: _first_or(decision.first, new, latest), kept, last), kept)
        w.new_finite[site] = (_first_or(decision.first, kept_ok, last_ok), kept_ok)
        return out

    return attend


def check_decision(decision: Any) -> None:
    check_optional_decision(decision, FasterCacheDecision, "FasterCache")


def step(config: FasterCacheConfig, model: CacheableModel, state: FasterCacheState, inputs: Inputs,
         decision: FasterCacheDecision | None = None) -> tuple[Tensor, FasterCacheState]:
    """One model call on [uncond; cond] inputs. `decision`: the plan's entry, or None to decide on device."""
    check_state(state, FasterCacheState, "FasterCache")
    check_inputs(state.spec, inputs)
    check_sites(state.windows, config.hooked_sites(model),
                None if decision is None else approximated_kinds([decision]))
    if decision is None:
        decision = decide(config, state.count, model.cache_timestep(inputs))
    else:
        check_planned_reuse(state.count, any(flag is True for flag in decision[1:4]), "FasterCache")
    sites = config.hooked_sites(model)

    def windows(old: dict, old_finite: dict) -> _Windows:
        return _Windows(old, old_finite, dict(old), dict(old_finite), [])

    def result(out: Tensor, new: dict, new_finite: dict, d_low: Tensor, d_high: Tensor, deltas_finite: Tensor,
               misses: list[Tensor]) -> tuple[Tensor, FasterCacheState]:
        return out, FasterCacheState(state.count + 1, new, new_finite, d_low, d_high, deltas_finite,
                                     count_misses(state.nonfinite, misses), state.spec)

    if config.is_guidance_distilled:
        w = windows(state.windows, state.windows_finite)
        out = forward(model, inputs, _attend(sites, decision, w, False))
        return result(out, w.new, w.new_finite, state.d_low, state.d_high, state.deltas_finite, w.misses)

    # The unconditional skip rebuilds from the stored deltas: refused (on the device) when they are not finite.
    misses: list[Tensor] = []
    skip_uncond = guard_reuse(decision.skip_uncond, state.deltas_finite, misses)

    def full(old: dict, old_finite: dict, d_low: Tensor, d_high: Tensor) -> tuple:
        w = windows(old, old_finite)
        out = forward(model, inputs, _attend(sites, decision, w, True))
        uncond, cond = out.chunk(2)
        new_low, new_high = kernels.frequency_split((uncond - cond).float())
        return (out, w.new, w.new_finite, new_low, new_high, all_finite((new_low, new_high)),
                _branch_misses(w.misses, d_low))

    def skip(old: dict, old_finite: dict, d_low: Tensor, d_high: Tensor) -> tuple:
        # halve the batch inside the branch: views of the inputs made outside it would reach torch.cond as
        # operands aliasing other operands (the inputs), which aot_autograd and inductor refuse
        _, cond_inputs = batch_halves(inputs)
        w = windows(old, old_finite)
        cond = forward(model, cond_inputs, _attend(sites, decision, w, False))
        uncond, new_low, new_high = kernels.fastercache_uncond(cond, d_low, d_high, decision.w_low,
                                                               decision.w_high)
        return (torch.cat([uncond, cond]), w.new, w.new_finite, new_low, new_high,
                all_finite((new_low, new_high)), _branch_misses(w.misses, d_low))

    out, new, new_finite, d_low, d_high, deltas_finite, attention_misses = branch(
        skip_uncond, skip, full, (state.windows, state.windows_finite, state.d_low, state.d_high))
    return result(out, new, new_finite, d_low, d_high, deltas_finite, [*misses, attention_misses])


def _branch_misses(misses: list[Tensor], like: Tensor) -> Tensor:
    """The misses as one int64 count: a tensor in both branches of a cond, zero when there are none."""
    return count_misses(torch.zeros((), dtype=torch.int64, device=like.device), misses)


def computed_fraction(config: FasterCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: FasterCacheState | None = None) -> float:
    """Share of the model's FLOPs run over the planned steps."""
    del state
    full = trace(model, inputs)
    half = full if config.is_guidance_distilled else trace(model, batch_halves(inputs)[1])
    sites = config.hooked_sites(model)
    spent = 0
    for d in plan:
        tr = half if (d.skip_uncond or config.is_guidance_distilled) else full
        approx = sum(tr.site_flops[n] for n, kind in sites.items() if getattr(d, f"approx_{kind}"))
        spent += tr.total_flops - approx
    return spent / (full.total_flops * len(plan))

