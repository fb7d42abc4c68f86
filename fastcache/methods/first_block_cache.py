"""FirstBlockCache (FBC): run the first block, skip the rest when its residual barely moved.

Every call runs the embedding and the first block (the head). Its residual `r = head_out - head_in`
(hidden stream) is compared with the residual of the last computed call:
`ratio = mean|r - r_ref| / mean|r_ref|`. The remaining blocks are skipped iff a reference exists and
`ratio <= threshold`; a skipped call adds the residuals the remaining blocks produced at the last computed
call (`tail_out - head_out`, one per stream). The reference and those residuals change only on computed
calls, as in diffusers.

The decision depends on data, so it stays on the device: `ratio` is a 0-dim tensor from one fused pass
(`fastcache.kernels.absmean_rel_diff`), and the skip is a `torch.cond`, so skipped blocks really do not run,
with no `.item()`, no host sync and no graph break. A NaN ratio never counts as small: the call computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastcache import _validate, kernels
from fastcache.control import Flag, all_finite, branch
from fastcache.engine import Plan, as_timesteps, counted_fraction, trace
from fastcache.protocol import (
    CacheableModel,
    Inputs,
    Streams,
    call_attention,
    check_inputs,
    check_model,
    check_state,
    input_spec,
    run_blocks,
)


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """`threshold`: skip the remaining blocks while the first block's relative residual change is at most
    this (diffusers' default 0.05)."""

    threshold: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _validate.threshold("threshold", self.threshold))


class FirstBlockCacheState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    num_computed: Tensor  # int64, calls that ran the remaining blocks
    skipped: Tensor  # bool, whether the last call skipped them
    ratio: Tensor  # fp32, the last call's relative residual change (inf when there was no reference)
    ref_residual: Tensor  # head residual of the last computed call
    tail_residuals: tuple[Tensor, ...]  # per stream: tail_out - head_out of the last computed call
    tails_finite: Tensor  # bool, whether those residuals are all finite (a NaN or Inf is never reused)
    nonfinite: Tensor  # int64, calls that would have skipped but computed because the residuals were not finite
    spec: dict[str, Tensor]


def plan(config: FirstBlockCacheConfig, timesteps: Tensor | Sequence[float],
         device: torch.device | str | None = None) -> Plan:
    """FBC decides from data on the device: every entry is None and the row shows '?'."""
    del config, device
    n = len(as_timesteps(timesteps))
    return Plan((None,) * n, {"blocks": "?" * n})


def init(config: FirstBlockCacheConfig, model: CacheableModel, inputs: Inputs) -> FirstBlockCacheState:
    del config
    check_model(model)
    if model.num_blocks < 2:
        raise ValueError(f"model: FirstBlockCache needs at least 2 blocks, got num_blocks={model.num_blocks}")
    tr = trace(model, inputs)
    device = tr.output.device
    return FirstBlockCacheState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        num_computed=torch.zeros((), dtype=torch.int64, device=device),
        skipped=torch.zeros((), dtype=torch.bool, device=device),
        ratio=torch.full((), float("inf"), device=device),
        ref_residual=tr.head_streams[0].zeros(),
        tail_residuals=tuple(meta.zeros() for meta in tr.head_streams),
        tails_finite=torch.ones((), dtype=torch.bool, device=device),
        nonfinite=torch.zeros((), dtype=torch.int64, device=device),
        spec=input_spec(inputs),
    )


class FirstBlockCacheHead(NamedTuple):
    """What the first block leaves for the rest of the step."""

    streams: Streams  # after the first block
    aux: Any  # the model's per-call values (timestep embedding, masks, ...)
    residual: Tensor  # first block's residual, hidden stream
    ratio: Tensor  # fp32 0-dim: relative change of that residual vs the reference
    skip: Tensor  # bool 0-dim: skip the remaining blocks (on the device)
    refused: Tensor  # bool 0-dim: small enough to skip, but the cached residuals are not finite


def skip_decision(config: FirstBlockCacheConfig, residual: Tensor, reference: Tensor, has_reference: Flag,
                  cached_finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rule, shared by the engine and the diffusers drop-in: `(ratio, skip, refused)` as 0-dim tensors on
    the device. Small means a reference exists and `ratio <= threshold` (a NaN ratio is never small); a small
    change skips only if the cached residuals are finite, else it is refused (and counted by the caller)."""
    return skip_from_ratio(config, kernels.absmean_rel_diff(residual, reference), has_reference, cached_finite)


def skip_from_ratio(config: FirstBlockCacheConfig, ratio: Tensor, has_reference: Flag,
                    cached_finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`skip_decision` from a ratio already formed (all-reduced over a sequence-parallel group:
    `fastcache.distributed`)."""
    small = (ratio <= config.threshold) & has_reference
    return ratio, small & cached_finite, small & ~cached_finite


def skip_from_sums_on_host(config: FirstBlockCacheConfig, num: float, den: float,
                           cached_finite: bool) -> tuple[float, bool, bool]:
    """`skip_from_ratio(config, rel_diff_from_sums([num, den]), True, cached_finite)` on values read on the host,
    for a caller that reads the decision there anyway (the drop-in run eagerly): `(ratio, skip, refused)` as
    Python values, the same as the device rule's (a float32 ratio against the float32 threshold)."""
    ratio = kernels.ratio_or_inf_on_host(num, den)
    small = ratio <= kernels.to_fp32(config.threshold)  # False for NaN
    return ratio, small and cached_finite, small and not cached_finite


def check_decision(decision: Any) -> None:
    if decision is not None:
        raise TypeError(f"decision: FirstBlockCache decides on the device; pass None, got {decision!r}")


def head_step(config: FirstBlockCacheConfig, model: CacheableModel, state: FirstBlockCacheState,
              inputs: Inputs, decision: None = None) -> FirstBlockCacheHead:
    """The first half of a step: embed, first block, the skip decision (on the device; `decision` must be
    None, as in FBC's plan)."""
    check_decision(decision)
    check_state(state, FirstBlockCacheState, "FirstBlockCache")
    check_inputs(state.spec, inputs)
    streams, aux = model.embed(inputs)
    head = model.block(0, streams, aux, call_attention)
    residual = head[0] - streams[0]
    ratio, skip, refused = skip_decision(config, residual, state.ref_residual, state.count > 0, state.tails_finite)
    return FirstBlockCacheHead(head, aux, residual, ratio, skip, refused)


def tail_step(config: FirstBlockCacheConfig, model: CacheableModel, state: FirstBlockCacheState,
              head: FirstBlockCacheHead, skip: Flag) -> tuple[Tensor, FirstBlockCacheState]:
    """The second half: the remaining blocks, or the cached residuals. `skip` is `head.skip` (a torch.cond on
    the device) or its value read on the host (`bool(head.skip)`: a plain branch, so a compiled tail has no
    cond and can be CUDA-graphed, one graph per value; the read is the step's one host sync)."""
    del config

    def compute(streams: Streams, residual: Tensor, ref: Tensor, tails: Streams, n: Tensor, finite: Tensor) -> tuple:
        tail = run_blocks(model, 1, streams, head.aux, call_attention)
        new_tails = tuple(t - h for t, h in zip(tail, streams))
        return tail, residual, new_tails, n + 1, all_finite(new_tails)

    def reuse(streams: Streams, residual: Tensor, ref: Tensor, tails: Streams, n: Tensor, finite: Tensor) -> tuple:
        return tuple(h + r for h, r in zip(streams, tails)), ref, tails, n, finite

    out_streams, ref, tails, num_computed, finite = branch(
        skip, reuse, compute, (head.streams, head.residual, state.ref_residual, state.tail_residuals,
                               state.num_computed, state.tails_finite))
    out = model.head(out_streams, head.aux)
    return out, FirstBlockCacheState(state.count + 1, num_computed, head.skip, head.ratio, ref, tails, finite,
                                     state.nonfinite + head.refused.long(), state.spec)


def step(config: FirstBlockCacheConfig, model: CacheableModel, state: FirstBlockCacheState, inputs: Inputs,
         decision: None = None) -> tuple[Tensor, FirstBlockCacheState]:
    """One model call; the skip is decided on the device (`decision` must be None, as in FBC's plan): one
    torch.cond. For CUDA graphs, run `head_step` and `tail_step` as two compiled functions instead."""
    head = head_step(config, model, state, inputs, decision)
    return tail_step(config, model, state, head, head.skip)


def computed_fraction(config: FirstBlockCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: FirstBlockCacheState) -> float:
    """Share of the model's FLOPs run, from the state's counters (one host read, after the loop)."""
    del config, plan
    return counted_fraction(model, inputs, state, slice(1, None))
