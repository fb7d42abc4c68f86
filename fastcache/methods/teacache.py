"""TeaCache: skip every block while the accumulated, rescaled change of block 0's modulated input stays small.

`m_t` is the timestep-modulated input of block 0 (`model.modulated_input(streams, aux)`: for an adaLN model
`norm1(x) * (1 + scale) + shift`). Each call measures `rel = mean|m_t - m_prev| / mean|m_prev|`, rescales it
with a 4th-degree polynomial fitted per model (`coefficients`, highest degree first, as `numpy.polyval`) and
accumulates it: `acc += poly(rel)`. The blocks are skipped while `acc < threshold` (the output streams are the
input streams plus the residuals `blocks_out - blocks_in` of the last computed call); otherwise they run and
`acc = 0`. The first and the last step always compute (planned: the plan knows the step count). `m_prev` is
updated on every call.

The decision depends on data, so it stays on the device: one `torch.cond` per call, no host sync, except on
the planned first and last steps, which have no cond at all (one graph each kind).

Batches (fastcache's rule; TeaCache itself pools one `rel` over the whole batch, so one sample's change
decides for the others): `rel` and `acc` are kept per sample, and a call skips only if every sample may skip
(`acc_i < threshold` for all i); a call that computes resets every sample's `acc`. A sample is never served a
reuse its own accumulator refused. A NaN or Inf anywhere (`rel`, a cached residual) makes the call compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from fastcache import _validate
from fastcache.control import Flag, all_finite, branch
from fastcache.distributed import per_sample_means
from fastcache.engine import Plan, as_timesteps, check_optional_decision, counted_fraction, forced_compute, trace
from fastcache.kernels.absmean import ratio_or_inf
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

# TeaCache's published fits (rel of m_t -> rel of the output), highest degree first; data, not code.
COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "flux": (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861),
    "hunyuan-video": (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896),
    "mochi": (-3512.41319, 811.675948, -60.9400215, 2.42429681, 0.00305291719),
    "ltx-video": (21.4700694, -12.8016453, 2.31279151, 0.792487521, 0.00969274326),
    "cogvideox-2b": (-31.0658903, 25.4732368, -5.92380459, 1.75769064, -0.00361568434),
    "cogvideox-5b": (-1538.80483, 843.202495, -134.363087, 7.97131516, -0.0523162339),
    "wan2.1-t2v-1.3b": (-52186.2437, 9230.41404, -528.275948, 13.6987616, -0.0499875664),
    "wan2.1-t2v-14b": (-303318.725, 49053.7029, -2655.30556, 58.7365115, -0.315583525),
}
DEGREE = 4


def _coefficients(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        if value not in COEFFICIENTS:
            raise ValueError(f"coefficients: unknown model {value!r}; expected one of {', '.join(COEFFICIENTS)} "
                             f"or {DEGREE + 1} numbers (highest degree first)")
        return COEFFICIENTS[value]
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != DEGREE + 1:
        raise ValueError(f"coefficients: must be {DEGREE + 1} numbers (a degree-{DEGREE} polynomial, highest degree "
                         f"first) or a model name, got {value!r}")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in value):
        raise ValueError(f"coefficients: must be finite numbers, got {value!r}")
    return tuple(float(c) for c in value)


@dataclass(frozen=True)
class TeaCacheConfig:
    """`threshold`: TeaCache's `rel_l1_thresh` (on FLUX its authors report 0.25 / 0.4 / 0.6 / 0.8 for 1.5 /
    1.8 / 2.0 / 2.25x). `coefficients`: the rescaling polynomial, 5 numbers highest degree first, or the name of
    a published fit (`COEFFICIENTS`); `fastcache calibrate --method teacache` fits one for an embedded model.
    `calibrate`: the diffusers drop-in's calibration run (every call computes and records its input and output
    change; `fastcache.diffusers.calibrated_coefficients(pipe)` fits them); the engine calibrates with
    `calibrate(model, generate)`."""

    threshold: float = 0.25
    coefficients: Any = "flux"
    calibrate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _validate.threshold("threshold", self.threshold))
        object.__setattr__(self, "coefficients", _coefficients(self.coefficients))
        _validate.boolean("calibrate", self.calibrate)


class TeaCacheDecision(NamedTuple):
    force_compute: bool  # the first and the last step: compute, no cond


class TeaCacheState(NamedTuple):
    count: Tensor  # int64, calls made with this state
    num_computed: Tensor  # int64, calls that ran the blocks
    skipped: Tensor  # bool, whether the last call skipped them
    accumulated: Tensor  # fp32 (batch,), each sample's accumulated rescaled change
    previous_input: Tensor  # m_{t-1}, block 0's modulated input at the last call
    residuals: tuple[Tensor, ...]  # per stream: blocks_out - blocks_in of the last computed call
    residuals_finite: Tensor  # bool: a NaN or Inf residual is never reused
    nonfinite: Tensor  # int64, calls that would have skipped but computed because the residuals were not finite
    spec: dict[str, Tensor]


def plan(config: TeaCacheConfig, timesteps: Tensor | Sequence[float],
         device: torch.device | str | None = None) -> Plan:
    """The first and last steps compute ('C'); the others decide on the device ('?')."""
    del config, device
    n = len(as_timesteps(timesteps))
    forced = [i in (0, n - 1) for i in range(n)]
    return Plan(tuple(TeaCacheDecision(f) for f in forced), {"blocks": "".join("C" if f else "?" for f in forced)})


def _check_model(model: CacheableModel) -> None:
    check_model(model)
    if not callable(getattr(model, "modulated_input", None)):
        raise TypeError(f"model: TeaCache reads block 0's timestep-modulated input, but {type(model).__name__} has "
                        "no modulated_input(streams, aux) method")


def init(config: TeaCacheConfig, model: CacheableModel, inputs: Inputs) -> TeaCacheState:
    if config.calibrate:
        raise ValueError("calibrate: TeaCacheConfig(calibrate=True) is the diffusers drop-in's calibration run; the "
                         "engine fits coefficients with fastcache.methods.teacache.calibrate(model, generate)")
    _check_model(model)
    tr = trace(model, inputs)
    device = tr.output.device
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:  # shapes only, no compute
        modulated = model.modulated_input(*model.embed({k: mode.from_tensor(v) for k, v in inputs.items()}))
        shape, dtype = tuple(modulated.shape), modulated.dtype
    torch.clear_autocast_cache()  # as in `trace`: no fake weight casts left in autocast's cache
    return TeaCacheState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        num_computed=torch.zeros((), dtype=torch.int64, device=device),
        skipped=torch.zeros((), dtype=torch.bool, device=device),
        accumulated=torch.zeros(shape[0], dtype=torch.float32, device=device),
        previous_input=torch.zeros(shape, dtype=dtype, device=device),
        residuals=tuple(meta.zeros() for meta in tr.head_streams),  # blocks keep each stream's shape
        residuals_finite=torch.ones((), dtype=torch.bool, device=device),
        nonfinite=torch.zeros((), dtype=torch.int64, device=device),
        spec=input_spec(inputs),
    )


def relative_change(current: Tensor, previous: Tensor) -> Tensor:
    """Per sample (dim 0), `mean|current - previous| / mean|previous|` in fp32; `+inf` where the reference is
    all zeros or a mean overflows (never a small change); NaN stays NaN."""
    return ratio_or_inf(*per_sample_means(current, previous))


def rescale(coefficients: Sequence[float], rel: Tensor) -> Tensor:
    """`numpy.polyval(coefficients, rel)` on the device (Horner, fp32)."""
    out = torch.full_like(rel, coefficients[0])
    for c in coefficients[1:]:
        out = out * rel + c
    return out


def skip_rule(config: TeaCacheConfig, accumulated: Tensor, rel: Tensor, has_reference: Tensor,
              cached_finite: Tensor, everywhere: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The rule on the device, shared by the engine and the drop-in: `(new accumulated, skip, refused)`.
    Every sample accumulates its rescaled change; the call may skip iff a reference exists and every sample's
    total stays under the threshold (a NaN never does); it skips only over finite residuals, else the skip is
    refused (counted by the caller). A computing call resets the accumulators. `everywhere`: where the batch is
    split over ranks (CFG parallelism), `(small, finite)` on every rank from this rank's (`fastcache.distributed`)."""
    total = accumulated + rescale(config.coefficients, rel)
    small = (total < config.threshold).all()
    if everywhere is not None:
        small, cached_finite = everywhere(small, cached_finite)
    small = small & has_reference
    skip = small & cached_finite
    return torch.where(skip, total, torch.zeros_like(total)), skip, small & ~cached_finite


class TeaCacheHead(NamedTuple):
    """What a step's head leaves for its tail: the embedded streams, the decision and its bookkeeping."""

    streams: Streams
    aux: Any
    modulated: Tensor  # the first block's modulated input, this call's reference for the next
    accumulated: Tensor  # fp32 0-dim: the rescaled change accumulated since the last computed call
    skip: Tensor  # bool 0-dim (false on a planned compute)
    refused: Tensor  # bool 0-dim: small enough to skip, but the cached residuals are not finite


def check_decision(decision: Any) -> None:
    check_optional_decision(decision, TeaCacheDecision, "TeaCache")


def head_step(config: TeaCacheConfig, model: CacheableModel, state: TeaCacheState, inputs: Inputs,
              decision: TeaCacheDecision | None = None) -> TeaCacheHead:
    """The first half of a step: embed, the first block's modulated input, the skip decision (on the device)."""
    check_decision(decision)
    check_state(state, TeaCacheState, "TeaCache")
    check_inputs(state.spec, inputs)
    streams, aux = model.embed(inputs)
    modulated = model.modulated_input(streams, aux)
    if forced_compute(decision):  # two tensors, not one twice: a split step's tail would guard on the aliasing
        skip, refused = (torch.zeros((), dtype=torch.bool, device=state.count.device) for _ in range(2))
        return TeaCacheHead(streams, aux, modulated, torch.zeros_like(state.accumulated), skip, refused)
    rel = relative_change(modulated, state.previous_input)
    accumulated, skip, refused = skip_rule(config, state.accumulated, rel, state.count > 0, state.residuals_finite)
    return TeaCacheHead(streams, aux, modulated, accumulated, skip, refused)


def tail_step(config: TeaCacheConfig, model: CacheableModel, state: TeaCacheState, head: TeaCacheHead,
              skip: Flag) -> tuple[Tensor, TeaCacheState]:
    """The second half: every block, or the cached residuals. `skip` is `head.skip` (a torch.cond on the
    device), its value read on the host (a plain branch: `fastcache.compile_step`'s split step), or False on a
    planned compute."""
    del config

    def compute(streams: Streams, residuals: Streams, n: Tensor, finite: Tensor) -> tuple:
        out = run_blocks(model, 0, streams, head.aux, call_attention)
        new = tuple(o - s for o, s in zip(out, streams))
        return out, new, n + 1, all_finite(new)

    def reuse(streams: Streams, residuals: Streams, n: Tensor, finite: Tensor) -> tuple:
        return tuple(s + r for s, r in zip(streams, residuals)), residuals, n, finite

    out_streams, residuals, num_computed, finite = branch(
        skip, reuse, compute, (head.streams, state.residuals, state.num_computed, state.residuals_finite))
    out = model.head(out_streams, head.aux)
    return out, TeaCacheState(state.count + 1, num_computed, head.skip, head.accumulated, head.modulated, residuals,
                              finite, state.nonfinite + head.refused.long(), state.spec)


def step(config: TeaCacheConfig, model: CacheableModel, state: TeaCacheState, inputs: Inputs,
         decision: TeaCacheDecision | None = None) -> tuple[Tensor, TeaCacheState]:
    """One model call. `decision`: the plan's entry (the first and last steps compute, with no cond), or None
    to decide every call on the device (then the last step is not known and may skip)."""
    head = head_step(config, model, state, inputs, decision)
    return tail_step(config, model, state, head, False if forced_compute(decision) else head.skip)


# -- calibration ------------------------------------------------------------------------------------------------

def calibrate(model: CacheableModel, generate: Callable[[Callable[[Inputs], Tensor]], Any]) -> tuple[float, ...]:
    """Fit the rescaling polynomial of a model from uncached runs (TeaCache's own procedure): `generate(denoise)`
    runs any sampling loop that calls `denoise(inputs)` -> output for every model call, in order. Each pair of
    consecutive calls gives, per sample, the relative change of block 0's modulated input (x) and of the model's
    output (y); the fit is `numpy.polyfit(x, y, 4)`, highest degree first (`TeaCacheConfig(coefficients=...)`).
    Run several seeds in one batch, or `generate` several loops: every consecutive pair counts (a new
    generation's first call is paired with nothing: inputs of another shape or a restart are not pairs)."""
    _check_model(model)
    if model.num_blocks < 2:
        raise ValueError(f"model: TeaCache calibration needs at least 2 blocks, got num_blocks={model.num_blocks}")
    pairs: list[tuple[Tensor, Tensor]] = []
    previous: list[Tensor | None] = [None, None]

    @torch.no_grad()
    def denoise(inputs: Inputs) -> Tensor:
        streams, aux = model.embed(inputs)
        modulated = model.modulated_input(streams, aux)
        out = model.head(run_blocks(model, 0, streams, aux, call_attention), aux)
        if previous[0] is not None and previous[0].shape == modulated.shape:
            pairs.append((relative_change(modulated, previous[0]), relative_change(out, previous[1])))
        previous[:] = [modulated, out]
        return out

    generate(denoise)
    return fit_coefficients(torch.cat([x for x, _ in pairs]) if pairs else torch.empty(0),
                            torch.cat([y for _, y in pairs]) if pairs else torch.empty(0))


def fit_coefficients(x: Tensor, y: Tensor) -> tuple[float, ...]:
    """`numpy.polyfit(x, y, 4)` over the finite pairs, highest degree first."""
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep].double().cpu().numpy(), y[keep].double().cpu().numpy()
    if len(x) < DEGREE + 1:
        raise ValueError(f"calibration: {len(x)} finite (input, output) change pairs; a degree-{DEGREE} fit needs at "
                         f"least {DEGREE + 1} (run more steps or samples)")
    return tuple(float(c) for c in np.polyfit(x, y, DEGREE))


def computed_fraction(config: TeaCacheConfig, model: CacheableModel, inputs: Inputs, plan: Plan,
                      state: TeaCacheState) -> float:
    """Share of the model's FLOPs run, from the state's counters (one host read, after the loop); the modulated
    input of a skipped call (part of block 0's first layers) is not counted."""
    del config, plan
    return counted_fraction(model, inputs, state, slice(None))
