"""The drop-in adapters of the methods whose every decision depends on the step index only: MagCache and
TaylorSeer. Their rules live in `fastcache.methods.mag_cache` / `taylorseer`, shared with the engine; here they
are only attached to diffusers' blocks and modules.

The decision of a call is made on the host at its `cache_context` entry, from the context's call count (the
`Session` plans it), and the compiled forward specialises on it: no torch.cond, no sync. MagCache's decision is a
bool (two graph variants: compute, skip); TaylorSeer's carries small tensors (the step offset, the orders held)
so that its forecast steps share one graph however far they are from the last update.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_true
from torch.utils._pytree import tree_map

from fastcache.control import all_finite
from fastcache.diffusers._families import block_io
from fastcache.diffusers._runtime import _as_output, _input_streams, _positions, _streams
from fastcache.methods import mag_cache, taylorseer
from fastcache.methods.mag_cache import MagCacheConfig
from fastcache.methods.taylorseer import TaylorSeerCacheConfig

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class HostSchedule:
    """Each call's planned decision, by the context's call count: MagCache's rule per cycle of
    `num_inference_steps` calls; TaylorSeer's decisions made once on the model's device, extended as calls go."""

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config, self.device = config, device
        self.table: list[Any] = []

    def decision(self, calls: int) -> Any:
        if isinstance(self.config, MagCacheConfig):
            if not self.table:
                self.table = [mag_cache.MagCacheDecision(s)
                              for s in mag_cache.skips(self.config, self.config.num_inference_steps)]
            return self.table[calls % len(self.table)]
        if calls >= len(self.table):
            self.table = taylorseer.decisions(self.config, max(2 * len(self.table), calls + 1, 32), self.device)
        return self.table[calls]


# -- MagCache -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MagRole:
    head: bool  # the first block: skipped as `hidden + residual`, and records the blocks' input
    tail: bool  # the last block: measures the residual on computed calls


def mag_cache_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers' choice of blocks: every block of the model's child ModuleLists named as transformer blocks, in
    definition order."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    blocks = [(f"{name}.{i}", block) for name, child in model.named_children()
              if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList)
              for i, block in enumerate(child)]
    if not blocks:
        raise ValueError(f"model: MagCache found no transformer block lists in {type(model).__name__}")
    for name, block in blocks:
        if block_io(block) is None:
            raise TypeError(f"model: block {name} ({type(block).__name__}) has no MagCache entry in fastcache")
    return blocks


def mag_cache_roles(model: nn.Module) -> list[tuple[nn.Module, MagRole]]:
    blocks = [block for _, block in mag_cache_blocks(model)]
    return [(block, MagRole(head=i == 0, tail=i == len(blocks) - 1)) for i, block in enumerate(blocks)]


def _same_shape(a: Tensor, b: Tensor) -> bool:
    """`a.shape == b.shape`, where a data-dependent size (compiled Framepack slices its text stream by its mask's
    sum, and its single blocks split the joint stream by that length) that may equal the other is taken as equal
    and checked at run time: such a size has no value to guard on while tracing."""
    if a.dim() != b.dim() or not all(guard_or_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)):
        return False
    for x, y in zip(a.shape, b.shape, strict=True):
        torch._check(x == y)
    return True


def blocks_residual(out: Tensor, blocks_in: Tensor) -> Tensor:
    """diffusers' residual of the blocks: the difference, or, for a 3-D output holding extra leading tokens (a
    text stream concatenated in front), that of its trailing tokens."""
    if _same_shape(out, blocks_in):
        return out - blocks_in
    if (out.dim() == 3 and blocks_in.dim() == 3 and out.shape[0] == blocks_in.shape[0]
            and out.shape[2] == blocks_in.shape[2] and out.shape[1] >= blocks_in.shape[1]):
        return out[:, -blocks_in.shape[1]:] - blocks_in
    raise ValueError(f"MagCache: the last block's output {tuple(out.shape)} and the first block's input "
                     f"{tuple(blocks_in.shape)} do not line up; fastcache cannot apply a residual here")


def with_residual(hidden: Tensor, residual: Tensor) -> Tensor:
    """A skipped call's hidden stream: its input plus the stored residual (diffusers' shape rule)."""
    if _same_shape(residual, hidden):
        return hidden + residual
    if hidden.dim() == 3 and residual.dim() == 3 and hidden.shape[0] == residual.shape[0] and \
            hidden.shape[2] == residual.shape[2] and hidden.shape[1] > residual.shape[1]:
        extra = hidden.shape[1] - residual.shape[1]
        return torch.cat([hidden[:, :extra], hidden[:, extra:] + residual], dim=1)
    raise ValueError(f"MagCache: hidden states {tuple(hidden.shape)} and the stored residual "
                     f"{tuple(residual.shape)} do not line up")


def mag_cache_wrapper(session: Any, block: nn.Module, role: MagRole) -> Wrapper:
    """One block under MagCache: on a planned skip it runs nothing (the head adds the residual, the others
    pass their inputs through); on a computed call the tail measures the residual against the head's input.
    The second stream passes through a skip (diffusers' rule: text, dropped after the blocks), except where it
    is audio the model outputs (`Family.audio_stream`: LTX-2, Kandinsky 6): it gets a residual of its own."""
    config = session.config
    io = block_io(block)
    positions = _positions(block)
    audio = session.family.audio_stream

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            scratch = session.scratch
            if scratch is None:  # called on its own, outside the transformer's forward: nothing cached
                return original(*args, **kwargs)
            state, skip = scratch.state, scratch.decision.skip
            inputs = _input_streams(io, positions, args, kwargs)
            if role.head:
                scratch.starts[0] = inputs[0]
                scratch.starts[1] = inputs[1] if audio else None
            if skip:
                if role.head:  # a planned skip cannot be refused on data: a non-finite residual is counted
                    scratch.misses.append(~state["residual_finite"])
                    scratch.new.update(residual=state["residual"], residual_finite=state["residual_finite"])
                    streams = (with_residual(inputs[0], state["residual"]), *inputs[1:])
                    if state.get("audio_residual") is not None and inputs[1] is not None:
                        scratch.new["audio_residual"] = state["audio_residual"]
                        streams = (streams[0], inputs[1] + state["audio_residual"])
                    return _as_output(io, streams)
                return _as_output(io, inputs)
            out = original(*args, **kwargs)
            if role.tail:
                streams = _streams(io, out)
                residual = blocks_residual(streams[0], scratch.starts[0])
                if config.calibrate:
                    _record_ratio(scratch, state, residual, config)
                kept: Any = residual
                if audio and streams[1] is not None and scratch.starts[1] is not None:
                    scratch.new["audio_residual"] = streams[1] - scratch.starts[1]
                    kept = (residual, scratch.new["audio_residual"])
                scratch.new["residual"], scratch.new["residual_finite"] = residual, all_finite(kept)
            return out

        return forward

    return make


def _record_ratio(scratch: Any, state: Any, residual: Tensor, config: MagCacheConfig) -> None:
    steps = config.num_inference_steps
    if state is None:  # a context's first call: step 0 of a generation (the engine's rule records 1.0)
        ratios = torch.zeros(steps, dtype=torch.float32, device=residual.device)
        count, previous = torch.zeros((), dtype=torch.int64, device=residual.device), residual
    else:
        ratios, count, previous = state["ratios"], state["count"], state["residual"]
    scratch.new["ratios"] = mag_cache.record_ratio(ratios, count, residual, previous, steps)


# -- TaylorSeer ---------------------------------------------------------------------------------------------

def taylorseer_modules(model: nn.Module, config: TaylorSeerCacheConfig) -> dict[str, tuple[nn.Module, bool]]:
    """Module name -> (module, forecast it: True; zeros on forecast steps: False), by diffusers' rules
    (`re.fullmatch` on the names; lite mode: `proj_out` forecast, every block zeroed)."""
    inactive = list(config.skip_predict_identifiers or ())
    active = list(config.cache_identifiers or ())
    active = active or list(taylorseer.SPATIAL_IDENTIFIERS + taylorseer.TEMPORAL_IDENTIFIERS)
    if config.use_lite_mode:
        active, inactive = list(taylorseer.LITE_CACHE_IDENTIFIERS), list(taylorseer.LITE_SKIP_IDENTIFIERS)
    found = {}
    for name, module in model.named_modules():
        is_inactive = any(re.fullmatch(p, name) for p in inactive)
        if is_inactive or any(re.fullmatch(p, name) for p in active):
            found[name] = (module, not is_inactive)
    if not found:
        warnings.warn(f"fastcache: TaylorSeer's identifiers match no module of {type(model).__name__} (as in "
                      "diffusers, nothing is cached); set cache_identifiers", stacklevel=4)
    return found


def taylorseer_wrapper(session: Any, name: str, active: bool) -> Wrapper:
    """One module under TaylorSeer: compute and update its factors, or forecast it (inactive: zeros)."""
    config = session.config

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            scratch = session.scratch
            if scratch is None:  # called on its own, outside the transformer's forward: nothing cached
                return original(*args, **kwargs)
            state, decision = scratch.state, scratch.decision
            factors = scratch.new.setdefault("factors", {})
            templates = scratch.new.setdefault("templates", {})
            if decision.compute:
                out = original(*args, **kwargs)
                templates[name] = taylorseer.template_of(out)
                if active:
                    old = (state or {}).get("factors", {}).get(name)
                    if old is None:  # the first update: no earlier factors (their orders are not held)
                        old = tuple(tree_map(torch.zeros_like, out) for _ in range(config.max_order + 1))
                    factors[name] = taylorseer.update_tree(old, out, decision, config.taylor_factors_dtype)
                    scratch.new.setdefault("finite", {})[name] = all_finite(factors[name])
                return out
            templates[name] = state["templates"][name]
            if not active:
                return taylorseer.zeros_from_template(state["templates"][name])
            factors[name] = state["factors"][name]
            scratch.new.setdefault("finite", {})[name] = state["finite"][name]
            scratch.misses.append(~state["finite"][name])  # counted: a planned forecast cannot be refused
            return taylorseer.forecast_tree(state["factors"][name], state["templates"][name], decision)

        return forward

    return make
