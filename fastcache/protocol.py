"""The small protocol a model meets so that the engine can cache it.

A diffusion transformer, seen by the engine, is three stages and a set of attention call sites:

    streams, aux = model.embed(inputs)          # patchify, embed timestep and condition
    for i in range(model.num_blocks):
        streams = model.block(i, streams, aux, attend)
    output = model.head(streams, aux)           # final norm, projection, unpatchify

`streams` is a tuple of tensors that blocks transform, the image/video tokens first (a joint-attention
model such as Flux adds its text stream second). `aux` is a dict of tensors the blocks read but never
change (timestep modulation, condition tokens, rotary tables). Every attention call inside a block goes
through `attend(site_name, fn, *args)`, where `site_name` is one of `model.cache_sites()`: that is the only
hook the attention-level methods (PAB, FasterCache) need. Nothing in the engine knows more than this about
a model, so any transformer that can be cut this way plugs in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

AttentionKind = Literal["spatial", "temporal", "cross"]
ATTENTION_KINDS: tuple[AttentionKind, ...] = ("spatial", "temporal", "cross")

Streams = tuple[Tensor, ...]
Aux = dict[str, Any]
Inputs = Mapping[str, Tensor]


class Attend(Protocol):
    def __call__(self, site: str, fn: Callable[..., Any], *args: Any) -> Any: ...


@dataclass(frozen=True)
class AttentionSite:
    """One attention call site: a stable name and its kind."""

    name: str
    kind: AttentionKind


@runtime_checkable
class CacheableModel(Protocol):
    num_blocks: int

    def cache_sites(self) -> Sequence[AttentionSite]: ...

    def cache_timestep(self, inputs: Inputs) -> Tensor:
        """The current timestep as a 0-dim tensor in the 0..1000 convention of the timestep ranges."""
        ...

    def embed(self, inputs: Inputs) -> tuple[Streams, Aux]: ...

    def block(self, index: int, streams: Streams, aux: Aux, attend: Attend) -> Streams: ...

    def head(self, streams: Streams, aux: Aux) -> Tensor: ...


def call_attention(site: str, fn: Callable[..., Any], *args: Any) -> Any:
    """The `attend` of an uncached forward: just call the attention."""
    del site
    return fn(*args)


def run_blocks(model: CacheableModel, start: int, streams: Streams, aux: Aux, attend: Attend) -> Streams:
    for index in range(start, model.num_blocks):
        streams = model.block(index, streams, aux, attend)
    return streams


def forward(model: CacheableModel, inputs: Inputs, attend: Attend = call_attention) -> Tensor:
    """One uncached (or attention-hooked) forward through the protocol."""
    streams, aux = model.embed(inputs)
    streams = run_blocks(model, 0, streams, aux, attend)
    return model.head(streams, aux)


def check_model(model: object) -> CacheableModel:
    if not isinstance(model, CacheableModel):
        raise TypeError(
            f"model: {type(model).__name__} does not meet fastcache's CacheableModel protocol "
            "(num_blocks, cache_sites, cache_timestep, embed, block, head); for diffusers transformers "
            "use fastcache.enable_cache"
        )
    return model


AUTOCAST = "(autocast)"  # the spec entry recording the autocast dtype the state was built under


# Read once at import: dynamo in torch 2.11 cannot trace `torch.amp.is_autocast_available` (a skipped builtin),
# and the compiled step checks the autocast dtype on every call.
_AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "ipu", "maia")
                                   if torch.amp.is_autocast_available(t))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type not in _AUTOCAST_DEVICE_TYPES:  # e.g. the meta device (sizing a state)
        return None
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def input_spec(inputs: Inputs) -> dict[str, Tensor]:
    """Zero-byte tensors that remember each input's shape, dtype and device inside a state, and the autocast
    dtype in force (the cached outputs have the dtype the model computes in)."""
    spec = {name: torch.empty((*value.shape, 0), dtype=value.dtype, device=value.device)
            for name, value in inputs.items()}
    device = next(iter(inputs.values())).device
    autocast = _autocast_dtype(device)
    if autocast is not None:
        spec[AUTOCAST] = torch.empty(0, dtype=autocast, device=device)
    return spec


def check_inputs(spec: Mapping[str, Tensor], inputs: Inputs) -> None:
    """Refuse inputs that differ from those the state was built for: its cached tensors would be stale."""
    device = next(iter(inputs.values())).device
    built, now = spec.get(AUTOCAST), _autocast_dtype(device)
    if (None if built is None else built.dtype) != now:
        raise ValueError(f"state: built with autocast {None if built is None else built.dtype}, stepped with "
                         f"autocast {now}: the cached outputs would have the wrong dtype; call init under the "
                         "same torch.autocast as step")
    spec = {name: value for name, value in spec.items() if name != AUTOCAST}
    if set(spec) != set(inputs):
        raise ValueError(f"inputs: the state was built for inputs {sorted(spec)}, got {sorted(inputs)}")
    for name, value in inputs.items():
        want = spec[name]
        got = (tuple(value.shape), value.dtype, value.device)
        expected = (tuple(want.shape[:-1]), want.dtype, want.device)
        if got != expected:
            raise ValueError(
                f"inputs[{name!r}]: the state was built for shape/dtype/device {expected}, got {got}; "
                "call init again for a new shape, dtype, device or batch size"
            )


def check_state(state: object, expected: type, method: str) -> None:
    """Refuse a state made by another method's `init` (its fields would be read as something else)."""
    if not isinstance(state, expected):
        raise TypeError(f"state: {method} steps a {expected.__name__} made by its own init, "
                        f"got {type(state).__name__}")


def check_sites(cached: Mapping[str, object], sites: Mapping[str, str], reused_kinds: set[str] | None) -> None:
    """Refuse a state whose cache was built for another model's attention sites, and a decision that would reuse
    a site the state holds no cache for (a state built for a plan caches only the kinds that plan reuses).

    `reused_kinds`: the kinds this step's planned decision reuses, or None for a decision made on the device
    (which may reuse any kind, so it needs every hooked site cached)."""
    if not set(cached) <= set(sites):
        raise ValueError(f"state: its cache holds attention sites {sorted(cached)}, this model's hooked sites are "
                         f"{sorted(sites)}; call init with this model")
    missing = {kind for name, kind in sites.items() if name not in cached}
    if not missing:
        return
    if reused_kinds is None:
        raise ValueError(f"decision: None (decide on the device) needs every hooked site cached, but this state was "
                         f"built for a plan that never reuses {sorted(missing)} attention; pass that plan's "
                         "decisions, or call init without a plan")
    if reused_kinds & missing:
        raise ValueError(f"decision: reuses {sorted(reused_kinds & missing)} attention, which the plan this state "
                         "was built for never reuses (nothing is cached for it); use that plan's decisions")
