"""MagCache: skip every block while the calibrated residual magnitudes barely change, with diffusers' semantics.

`mag_ratios[i]` is how much the norm of the blocks' residual (`blocks_out - blocks_in`, hidden stream) changed
from step i-1 to step i, measured once on the model (`calibrate=True`) and resampled (nearest) to the step
count. From step `int(retention_ratio * num_inference_steps + 0.5)` on, each step accumulates
`acc_ratio *= ratio[i]; acc_steps += 1; acc_err += |1 - acc_ratio|` and skips iff a residual exists,
`acc_err <= threshold` and `acc_steps <= max_skip_steps`; otherwise it computes and resets the accumulators.
A skipped step runs no block at all: hidden = hidden_in + the residual of the last computed step; other streams
pass through. The step counter wraps at `num_inference_steps` (a new generation: no residual).

The decision depends only on the ratios and the step index, never on data: it is planned on the host
(`plan`), with diffusers' arithmetic (0-dim tensors in the ratios' dtype), and a compiled step specialises on it
(no torch.cond, no sync): so a skip over a residual holding a NaN or Inf cannot be refused (that would be a
branch on data); it is counted in the state's `nonfinite`. `calibrate=True` computes every step and records
the ratios in the state: `calibrated_ratios(state)` returns them as a tensor and a copy-pasteable list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastcache import _validate
from fastcache.control import all_finite
from fastcache.engine import Plan, as_timesteps, check_planned_decision, check_planned_reuse, trace
from fastcache.protocol import (
    CacheableModel,
    Inputs,
    call_attention,
    check_inputs,
    check_model,
    check_state,
    input_spec,
    run_blocks,
)

CALIBRATION_EPS = 1e-8  # diffusers' guard in ||r_t|| / (||r_{t-1}|| + eps)


@dataclass(frozen=True)
class MagCacheConfig:
    """diffusers' field names and defaults. `mag_ratios`: a 1-D tensor or list of the model's calibrated ratios
    (any length: nearest-resampled to `num_inference_steps`), required unless `calibrate=True`."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: Any = None
    calibrate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _validate.threshold("threshold", self.threshold))
        _validate.skip_range("max_skip_steps", self.max_skip_steps, allow_none=False)
        _validate.skip_range("num_inference_steps", self.num_inference_steps, allow_none=False)
        ratio = self.retention_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"retention_ratio: must be a number in [0, 1], got {ratio!r}")
        _validate.boolean("calibrate", self.calibrate)
        if self.mag_ratios is None:
            if not self.calibrate:
                raise ValueError("mag_ratios: required for MagCache (the ratios are model-dependent); run once with "
                                 "MagCacheConfig(calibrate=True) and pass fastcache.mag_cache.calibrated_ratios(state) "
                                 "(or diffusers' printed list) as mag_ratios")
            return
        ratios = self.mag_ratios if isinstance(self.mag_ratios, Tensor) else torch.tensor(self.mag_ratios)
        if ratios.dim() != 1 or len(ratios) == 0 or not ratios.is_floating_point() or not torch.isfinite(ratios).all():
            raise ValueError("mag_ratios: must be a non-empty 1-D list or tensor of finite floats, "
                             f"got {self.mag_ratios!r}")
        object.__setattr__(self, "mag_ratios", resample(ratios.cpu(), self.num_inference_steps))

    def retention_step(self) -> int:
        return int(self.retention_ratio * self.num_inference_steps + 0.5)


def resample(ratios: Tensor, length: int) -> Tensor:
    """Nearest-neighbour resampling of `ratios` to `length` entries (diffusers' rule: fp32 grid, rounded)."""
    if len(ratios) == length:
        return ratios
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    index = torch.round(torch.arange(length, dtype=torch.float32) * scale).long()
    return ratios[index]


class MagCacheDecision(NamedTuple):
    skip: bool  # run no block: add the last computed residual to the hidden stream


class MagCacheState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    residual: Tensor  # hidden stream: blocks_out - blocks_in at the last computed call
    residual_finite: Tensor  # bool, whether that residual is all finite
    nonfinite: Tensor  # int64, planned skips that added a non-finite residual (counted: a plan cannot branch)
    ratios: Tensor  # fp32 (num_inference_steps,): calibrate=True records each step's ratio here (else empty)
    spec: dict[str, Tensor]


def skips(config: MagCacheConfig, calls: int) -> list[bool]:
    """diffusers' rule for calls 0..calls-1 of one state (the step counter wraps at num_inference_steps)."""
    if config.calibrate:
        return [False] * calls
    ratios, steps = config.mag_ratios, config.num_inference_steps
    out = []
    for call in range(calls):
        step = call % steps
        if step == 0:  # a new generation: no residual, accumulators reset
            have_residual, acc_ratio, acc_steps, acc_err = False, 1.0, 0, 0.0
        skip = False
        if step >= config.retention_step():
            scale = ratios[step] if step < len(ratios) else 1.0
            acc_ratio = acc_ratio * scale  # a 0-dim tensor from here on, as in diffusers
            acc_steps += 1
            acc_err = acc_err + abs(1.0 - acc_ratio)
            skip = bool(have_residual and acc_err <= config.threshold and acc_steps <= config.max_skip_steps)
            if not skip:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        have_residual = have_residual or not skip
        out.append(skip)
    return out


def plan(config: MagCacheConfig, timesteps: Tensor | Sequence[float], device: torch.device | str | None = None
         ) -> Plan:
    """The decisions of every step (row: C computed, S skipped). The ratios are per step index, so the plan
    needs `len(timesteps) == num_inference_steps`."""
    del device
    n = len(as_timesteps(timesteps))
    if n != config.num_inference_steps:
        raise ValueError(f"num_inference_steps: the config says {config.num_inference_steps}, the schedule has {n} "
                         "steps; set MagCacheConfig(num_inference_steps=...) to the schedule's length (the ratios "
                         "are resampled to it)")
    flags = skips(config, n)
    return Plan(tuple(MagCacheDecision(s) for s in flags), {"blocks": "".join("S" if s else "C" for s in flags)})


def init(config: MagCacheConfig, model: CacheableModel, inputs: Inputs) -> MagCacheState:
    check_model(model)
    tr = trace(model, inputs)
    device = tr.output.device
    steps = config.num_inference_steps if config.calibrate else 0
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return MagCacheState(zero, tr.head_streams[0].zeros(), torch.ones((), dtype=torch.bool, device=device),
                         zero.clone(), torch.zeros(steps, dtype=torch.float32, device=device), input_spec(inputs))


def calibration_ratio(residual: Tensor, previous: Tensor) -> Tensor:
    """mean over positions of ||r_t|| / (||r_{t-1}|| + eps), norms along the last dim, in fp32 (0-dim)."""
    current = torch.linalg.vector_norm(residual.float(), dim=-1)
    before = torch.linalg.vector_norm(previous.float(), dim=-1)
    return (current / (before + CALIBRATION_EPS)).mean()


def record_ratio(ratios: Tensor, count: Tensor, residual: Tensor, previous: Tensor, steps: int) -> Tensor:
    """`ratios` with call `count`'s entry set: its residual's ratio against the previous call's, or 1.0 at the
    first step of a generation (there is none before it). On the device: no sync."""
    index = count % steps
    ratio = torch.where(index == 0, torch.ones((), device=residual.device), calibration_ratio(residual, previous))
    return ratios.index_put((index.reshape(1),), ratio.reshape(1))


def check_decision(decision: Any) -> None:
    check_planned_decision(decision, MagCacheDecision, "MagCache")


def step(config: MagCacheConfig, model: CacheableModel, state: MagCacheState, inputs: Inputs,
         decision: MagCacheDecision | None = None) -> tuple[Tensor, MagCacheState]:
    """One model call with the plan's entry for it (MagCache is always planned: its rule reads no data)."""
    check_state(state, MagCacheState, "MagCache")
    check_inputs(state.spec, inputs)
    check_planned_decision(decision, MagCacheDecision, "MagCache")
    check_planned_reuse(state.count, decision.skip, "MagCache")
    streams, aux = model.embed(inputs)
    if decision.skip:
        out = model.head((streams[0] + state.residual, *streams[1:]), aux)
        return out, state._replace(count=state.count + 1, nonfinite=state.nonfinite + (~state.residual_finite).long())
    tail = run_blocks(model, 0, streams, aux, call_attention)
    residual = tail[0] - streams[0]
    ratios = state.ratios
    if config.calibrate:
        ratios = record_ratio(ratios, state.count, residual, state.residual, config.num_inference_steps)
    return model.head(tail, aux), MagCacheState(state.count + 1, residual, all_finite(residual), state.nonfinite,
                                                ratios, state.spec)


def calibrated_ratios(state: MagCacheState) -> tuple[Tensor, list[float]]:
    """The ratios a `calibrate=True` run recorded: a CPU tensor, and a list to paste into `mag_ratios` (one host
    read, after the loop)."""
    return ratios_as_data(state.ratios)


def ratios_as_data(ratios: Tensor) -> tuple[Tensor, list[float]]:
    """Recorded ratios as a CPU tensor and a list rounded for pasting (5 decimals, as diffusers' ratios)."""
    ratios = ratios.detach().cpu()
    return ratios, [round(float(r), 5) for r in ratios]


def computed_fraction(config: MagCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: MagCacheState | None = None) -> float:
    """Share of the model's FLOPs run over the planned steps (a skipped step runs embed and head only)."""
    del config, state
    tr = trace(model, inputs)
    blocks = sum(tr.block_flops)
    spent = sum(tr.total_flops - (blocks if d.skip else 0) for d in plan)
    return spent / (tr.total_flops * len(plan))
