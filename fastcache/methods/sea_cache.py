"""SeaCache: skip the whole block stack while a spectrally filtered view of the input latents barely changes,
with diffusers' semantics (`diffusers/hooks/sea_cache.py`, 0.42.1).

Each call knows where the denoising loop is from its `cache_context(name, step_index=, sigma=,
num_inference_steps=)` (diffusers' WanPipeline passes them). The indicator is the model's input latents, per
sample `(T, H, W, C)`, passed through SEA's filter: a Wiener-like gain per frequency axis,
`(1 - sigma) P / ((1 - sigma)^2 P + sigma^2)` with a clean-signal power prior `P = 1 / |f|^power_exp`,
normalised to unit mean, applied in the 3-D Fourier domain over (T, H, W). Between consecutive steps of one
context the relative L1 change of the indicator (per sample, averaged over the batch) accumulates; the call skips
every block while the sum stays below `threshold`, and computes (resetting the sum) otherwise. Forced to compute:
the first `retention_steps` steps, the last `cache_end_steps`, a step that does not follow the context's previous
one (the history starts over), a context's first call, and the call after `max_consecutive_cached` skips in a row.
A skip adds the residual of the block stack (`out - in`) of the last computed step (`residual_order=0`), or its
linear extrapolation from the last two computed steps to this step (`residual_order=1`).

Where the loop is (step, sigma, step count) is host data: the first/last steps are planned at the context's entry
(no torch.cond); every other call decides on the device from the indicator, one torch.cond per call. Unlike
diffusers (which runs uncached with a warning), a call whose context lacks the step metadata, or a model with no
way to read its latents, is refused with an error naming the fix; a cached residual holding a NaN or an Inf is
never reused (computed and counted in `nonfinite`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastcache import _validate

SIGMA_EPS = 1e-6  # diffusers clamps sigma into [eps, 1 - eps] before the filter
POWER_EPS = 1e-16  # the guards in SEA's gain and in the relative L1 change


@dataclass(frozen=True)
class SeaCacheConfig:
    """diffusers' field names and defaults. `raw_vision_callback(model, args, kwargs)` returns the visual
    latents of the generated output, one `(C, T, H, W)` tensor per sample (all of one shape); fastcache has it
    built in for Wan text-to-video (`WanTransformer3DModel` with `in_channels == out_channels`)."""

    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0
    raw_vision_callback: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _validate.threshold("threshold", self.threshold))
        if isinstance(self.residual_order, bool) or self.residual_order not in (0, 1):
            raise ValueError(f"residual_order: must be 0 or 1, got {self.residual_order!r}")
        _validate.int_at_least("retention_steps", self.retention_steps, 0)
        _validate.int_at_least("cache_end_steps", self.cache_end_steps, 0)
        _validate.int_at_least("max_consecutive_cached", self.max_consecutive_cached, 0)
        object.__setattr__(self, "power_exp", _validate.positive_number("power_exp", self.power_exp))
        _validate.callback("raw_vision_callback", self.raw_vision_callback)


class SeaCachePlan(NamedTuple):
    """One call's host data, made at its context's entry: whether it computes with no choice to make (a retained
    or a last step), and the step index and sigma as tensors (graph inputs: no recompile per step)."""

    force_compute: bool
    step: Tensor  # 0-dim int64
    sigma: Tensor  # (1,) fp64


def plan(config: SeaCacheConfig, info: dict[str, Any], device: torch.device) -> SeaCachePlan:
    """The call's plan from its cache_context's `step_index`, `sigma` and `num_inference_steps`."""
    missing = [name for name in ("step_index", "sigma", "num_inference_steps") if info.get(name) is None]
    if missing:
        raise RuntimeError(f"SeaCache: each call needs its place in the denoising loop, passed as "
                           f"`transformer.cache_context(name, step_index=i, sigma=float(scheduler.sigmas[i]), "
                           f"num_inference_steps=n)` (diffusers' WanPipeline does); missing {', '.join(missing)}")
    step, sigma, steps = (_host_number(info[name]) for name in ("step_index", "sigma", "num_inference_steps"))
    if step != int(step) or steps != int(steps) or not 0 <= step < steps:
        raise ValueError(f"cache_context: step_index must be an int in [0, num_inference_steps), got step_index="
                         f"{info['step_index']!r}, num_inference_steps={info['num_inference_steps']!r}")
    if not (math.isfinite(sigma) and 0.0 <= sigma <= 1.0):
        raise ValueError(f"cache_context: sigma must be a number in [0, 1], got {info['sigma']!r}")
    step, steps = int(step), int(steps)
    forced = step < config.retention_steps or step >= steps - config.cache_end_steps
    return SeaCachePlan(forced, torch.tensor(step, dtype=torch.int64, device=device),
                        torch.tensor([sigma], dtype=torch.float64, device=device))


def _host_number(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"cache_context: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()  # diffusers does the same; pipelines pass Python numbers
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"cache_context: expected a number, got {value!r}")
    return float(value)


# -- the indicator ----------------------------------------------------------------------------------------------

def sea_filter(latents: Tensor, sigma: Tensor, power_exp: float) -> Tensor:
    """SEA's filtered latents: `latents` is `(B, T, H, W, C)`; the gain is applied over (T, H, W) in fp32, as
    diffusers does per sample, and the result is cast back to the latents' dtype. `sigma` is a (1,) fp64 tensor
    (the scalar arithmetic in fp64, each result cast to fp32 where it meets a tensor, as Python floats are)."""
    dtype = latents.dtype
    spectrum = torch.fft.fftn(latents.contiguous().float(), dim=(1, 2, 3))
    sigma = sigma.clamp(SIGMA_EPS, 1.0 - SIGMA_EPS)
    signal, noise = 1.0 - sigma, sigma
    gain = None
    for axis in (1, 2, 3):
        frequencies = torch.fft.fftfreq(latents.shape[axis], device=latents.device, dtype=torch.float32)
        clean = 1.0 / (frequencies.abs().pow(power_exp) + POWER_EPS)
        axis_gain = signal.float() * clean / (signal.square().float() * clean + noise.square().float() + POWER_EPS)
        shape = [1] * 5
        shape[axis] = -1
        gain = axis_gain.reshape(shape) if gain is None else gain * axis_gain.reshape(shape)
    # SEA's density normalisation (unit mean gain), so that distances compare across steps
    mean = gain.mean()
    gain = torch.where(torch.isfinite(mean) & (mean > 0), gain / mean, gain)
    # the real gain scales the real and imaginary parts as real tensors: no complex elementwise op in a compiled
    # graph (inductor generates no code for those); the FFTs run as library calls
    filtered = torch.view_as_complex(torch.view_as_real(spectrum) * gain.unsqueeze(-1))
    return torch.view_as_real(torch.fft.ifftn(filtered, dim=(1, 2, 3)))[..., 0].to(dtype)


def relative_change(current: Tensor, previous: Tensor) -> Tensor:
    """Per sample, `mean|current - previous| / (mean|previous| + 1e-16)` in fp32; `(B,)`."""
    dims = tuple(range(1, current.dim()))
    previous = previous.float()
    return (current.float() - previous).abs().mean(dims) / (previous.abs().mean(dims) + POWER_EPS)


# -- the rule -----------------------------------------------------------------------------------------------------
# Host data and float accumulators are 1-element tensors, not 0-dim ones: dynamo reads a 0-dim CPU fp64 input as a
# Python float, and specialising it again restarted every compile (measured, torch 2.13)

class Gate(NamedTuple):
    skip: Tensor  # 0-dim bool: reuse the residual
    refused: Tensor  # 0-dim bool: small enough to skip, but the cached residual is not finite (computed)
    accumulated: Tensor  # (1,) fp64: the change summed since the last computed call
    consecutive: Tensor  # 0-dim int64: skips in a row
    adjacent: Tensor  # 0-dim bool: this call's step follows the context's previous one (else the history restarts)
    distance: Tensor  # (1,) fp64: this call's change (inf when not adjacent)


def gate(config: SeaCacheConfig, accumulated: Tensor, consecutive: Tensor, last_step: Tensor, step: Tensor,
         change: Tensor, cached_finite: Tensor) -> Gate:
    """The skip decision of a call that is not forced to compute, on the device. `change` is the per-sample
    relative change of the indicator; diffusers sums the per-sample floats in fp64 and divides by their number."""
    adjacent = (step == last_step + 1).reshape(())
    distance = torch.where(adjacent, change.double().mean(), float("inf")).reshape(1)
    candidate = accumulated + distance
    small = (torch.isfinite(candidate) & (candidate < config.threshold)).reshape(())
    if config.max_consecutive_cached:
        small = small & (consecutive < config.max_consecutive_cached)
    wanted = adjacent & small
    skip = wanted & cached_finite
    return Gate(skip, wanted & ~cached_finite, torch.where(skip, candidate, torch.zeros_like(candidate)),
                torch.where(skip, consecutive + 1, torch.zeros_like(consecutive)), adjacent, distance)


# -- the residual history -----------------------------------------------------------------------------------------

def keep(config: SeaCacheConfig, residual: Tensor, old: tuple | None, step: Tensor, continues: Tensor) -> tuple:
    """What a computed call keeps of the hidden stream's residual: order 0, `(residual,)`; order 1, `(latest,
    previous, steps)`, `steps` = fp64 [latest step, previous step, whether there is a previous entry].
    `continues`: the history goes on (the step followed the previous one); else it starts over here."""
    if config.residual_order == 0:
        return (residual,)
    step = step.double().reshape(1)
    if old is None:  # no previous entry (a distinct tensor: an alias in the state would be a guard, a recompile)
        return (residual, torch.zeros_like(residual), torch.cat((step, step.new_zeros(2))))
    latest, _, steps = old
    return (residual, latest, torch.cat((step, steps[:1], continues.double().reshape(1))))


def reuse(config: SeaCacheConfig, kept: tuple, step: Tensor) -> Tensor:
    """The residual a skipped call adds: the latest, or its linear extrapolation to `step` from the two latest
    computed steps (diffusers' `latest + (latest - previous) * (step - s1) / (s1 - s0)`, in fp64 scalars)."""
    if config.residual_order == 0:
        return kept[0]
    latest, previous, steps = kept
    latest_step, previous_step, has_previous = steps.unbind()
    two = (has_previous > 0) & (latest_step != previous_step)
    scale = (step.double().reshape(()) - latest_step) / torch.where(two, latest_step - previous_step, 1.0)
    return torch.where(two, latest + (latest - previous) * scale, latest)
