"""The drop-in at run time: one session per transformer, instance-level forward wrappers, tensor state.

Why it compiles with `fullgraph=True` and few host syncs:
- PAB and FasterCache decide on the host when they can: a context's entry (`cache_context`, eager, outside the
  compiled forward) evaluates their rules for that call from the host call count and the timestep (the config's
  `current_timestep_callback`, or the running pipeline's scheduler), and hands the decision over in
  `Session.pending`. The compiled forward reads it as a Python value: dynamo guards on it, one graph per
  distinct decision, no `torch.cond`, no sync. Where no timestep is known on the host, the same rules run on
  the device from the model's own `timestep` argument, with a `torch.cond` per hooked site.
- FirstBlockCache, DBCache and TeaCache decide from data, once per call: the middle blocks of a segment return
  their input and record their call, and the segment's last middle block takes one `torch.cond` that replays
  them all or adds the cached residual (one sync per segment on a GPU, not one per block; `_segments`).
- Every other per-step value the wrappers read is a tensor (counters, cached outputs, residuals); the other
  Python values are structural (whether the context has a state, its input shape), so graphs stay few.

Context switching (`cache_context`) and pipeline scopes run eagerly, outside the compiled forward: they swap
which state the single `slot` holds, so the context name itself is never read (and never guarded on)
inside the graph. No branch of a `torch.cond` mutates Python state: wrappers store results after it returns.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fastcache import kernels
from fastcache.control import all_finite, branch, canonical, count_misses, guard_reuse
from fastcache.cuda_graphs import out_of_cuda_graph_pool
from fastcache.diffusers._families import BlockIO, Family
from fastcache.methods import faster_cache, pyramid_attention_broadcast
from fastcache.methods.db_cache import DBCacheConfig
from fastcache.methods.faster_cache import FasterCacheConfig, FasterCacheDecision
from fastcache.methods.first_block_cache import FirstBlockCacheConfig
from fastcache.methods.mag_cache import MagCacheConfig
from fastcache.methods.pyramid_attention_broadcast import PABDecision, PyramidAttentionBroadcastConfig
from fastcache.methods.sea_cache import SeaCacheConfig
from fastcache.methods.taylorseer import TaylorSeerCacheConfig
from fastcache.methods.teacache import TeaCacheConfig

SESSION_ATTR = "_fastcache_session"
FINITE_FLAGS = ("finite", "windows_finite", "deltas_finite")  # the state's flags of cached values reused if finite
# the block-range methods (`_segments`)
BLOCK_CONFIGS = (FirstBlockCacheConfig, DBCacheConfig, TeaCacheConfig, SeaCacheConfig)
# diffusers' names for the batched [uncond; cond] inputs of the denoiser (FasterCache cuts them in half)
BATCHED_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask")


# -- small helpers on call arguments ---------------------------------------------------------------------

def _positions(module: nn.Module) -> dict[str, int]:
    params = list(inspect.signature(type(module).forward).parameters)[1:]  # drop self
    return {name: index for index, name in enumerate(params)}


def _arg(positions: dict[str, int], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = positions.get(name)
    return args[index] if index is not None and index < len(args) else None


def _split_tensors(args: tuple, kwargs: dict) -> tuple[tuple[Tensor, ...], Callable[[tuple], tuple]]:
    """The tensor leaves of (args, kwargs), and how to put other tensors in their place (for torch.cond). Run
    eagerly, a branch is a plain call (`_cond` reads the decision): nothing is split, `rebuild` gives the call's
    own arguments back (flattening every block's arguments cost an eager call tens of microseconds)."""
    if not torch.compiler.is_compiling():
        return (), lambda tensors: (args, kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    def rebuild(tensors: tuple) -> tuple:
        new = list(leaves)
        for i, t in zip(where, tensors):
            new[i] = t
        return tree_unflatten(new, spec)

    return tuple(leaves[i] for i in where), rebuild


def _dense(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A torch.cond branch whose tensor outputs are contiguous: the two branches of a cond must agree on
    strides, and a block's outputs are often views (Flux slices its joint stream) while a reused or
    passed-through value has its input's strides (torch 2.13 fails merging them: KeyError in _bound_stride)."""
    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        if sum(isinstance(x, Tensor) for x in tree_flatten(out)[0]) > 1:
            # several outputs may be views of one tensor (CogVideoX splits its joint attention output),
            # which cond refuses as output aliasing: give each its own storage
            return tree_map(lambda x: x.clone(memory_format=torch.contiguous_format)
                            if isinstance(x, Tensor) else x, out)
        return tree_map(lambda x: canonical(x) if isinstance(x, Tensor) else x, out)

    return wrapped


def _own(tree: Any) -> Any:
    """A stored copy whose tensors share no storage: a tuple output is often views of one tensor
    (CogVideoX splits its joint attention output), and such state would reach the next call's torch.cond
    as aliasing operands, which it refuses."""
    if sum(isinstance(x, Tensor) for x in tree_flatten(tree)[0]) > 1:
        return tree_map(lambda x: x.clone(memory_format=torch.contiguous_format)
                        if isinstance(x, Tensor) else x, tree)
    return tree


def _cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], operands: tuple) -> Any:
    if isinstance(pred, bool):
        return branch(pred, true_fn, false_fn, operands)
    if not torch.compiler.is_compiling():
        # eager: one host read is cheaper than eager torch.cond, which traces its branches on every call
        # (measured 2-10x slower per generation on the tiny models)
        return branch(bool(pred), true_fn, false_fn, operands)
    return branch(pred, _dense(true_fn), _dense(false_fn), operands)


def _add(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a + b


def _sub(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


# What a compiled forward reads that changes from call to call (the active context's state and the decision planned
# for the call) lives in this module-level dict, one entry per Session, not on an object reached through the model:
# dynamo takes every tensor it reaches through the model (the closure of its wrapped forward included) for a static
# input, and CUDA graph trees re-record a graph whenever a static input moves (an H100 run recorded 76 graphs for 3
# dynamo graphs: the state is new every call). tests/test_diffusers_compile.py checks the static inputs.
_LIVE: dict[int, dict[str, Any]] = {}
_KEYS = itertools.count()


class Slot:
    """The active context's state and the call's planned decision; `cache_context` swaps them eagerly, the
    compiled forward reads and writes them (through `_LIVE`)."""

    def __init__(self) -> None:
        self.key = next(_KEYS)
        _LIVE[self.key] = {"state": None, "pending": None}
        weakref.finalize(self, _LIVE.pop, self.key, None)

    @property
    def state(self) -> Any:
        return _LIVE[self.key]["state"]

    @state.setter
    def state(self, value: Any) -> None:
        _LIVE[self.key]["state"] = value

    @property
    def pending(self) -> Any:
        return _LIVE[self.key]["pending"]

    @pending.setter
    def pending(self, value: Any) -> None:
        _LIVE[self.key]["pending"] = value


@dataclass
class Scratch:
    """Values passed between wrappers within one forward: a fresh one per call (`Session.begin_call`)."""

    state: Any = None
    new: dict = field(default_factory=dict)
    decision: Any = None
    # the block-range methods (FirstBlockCache, DBCache, TeaCache; `_segments`), per segment where keyed
    skip: Any = False  # whether the middle blocks are skipped: bool or 0-dim bool tensor
    operands: tuple = ()  # per-call tensors the middle's branches read
    segment_inputs: dict = field(default_factory=dict)  # the streams the segment's first block took
    starts: dict = field(default_factory=dict)  # the streams the segment's first middle block took
    passed: dict = field(default_factory=dict)  # the streams the last block returned
    deferred: dict = field(default_factory=dict)  # middle block calls waiting for the segment's last
    misses: list = field(default_factory=list)  # PAB, FasterCache: reuses asked for on non-finite cached values
    model_call: tuple = ((), {})  # the transformer's own (args, kwargs): SeaCache reads its input latents


# The hand-off of a planned decision from the eager context entry to the compiled forward (`Session.pending`).
# The forward reads it (dynamo guards on its value: one graph per distinct decision) and writes a marker back,
# so the context exit knows how many calls the entry saw.
DEVICE = "device"  # entered, but no timestep known on the host: the forward decides on the device
CONSUMED = "consumed"  # one call took the entry's decision
SEVERAL = "several"  # a second call inside one entry: it decided on the device, and host counts are lost


class HostSide:
    """A block's compiled forward (`_compiled_call_impl`) with a block-range method's rule run eagerly around it
    (`Session.intercept_compiled_blocks`); called traced (an enclosing compiled graph) or outside a transformer
    call, it is the compiled forward alone."""

    def __init__(self, impl: Callable[..., Any], run: Callable[..., Any]) -> None:
        self.impl, self.run = impl, run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.impl(*args, **kwargs)
        return self.run(*args, **kwargs)


@dataclass(frozen=True)
class Wrapped:
    """One forward fastcache replaced: where it went, and what to put back."""

    module: nn.Module
    wrapper: Callable[..., Any]
    original: Callable[..., Any] | None  # the forward a diffusers hook chain called (wrapped beneath it)
    had: bool  # the module had an instance-level forward before (restored as it was)
    previous: Any


CONTEXT_PARALLEL_HOOKS = ("cp_input---", "cp_output---")  # the name prefixes of diffusers' split/gather hooks


def context_parallel_hooks_only(registry: Any) -> bool:
    return all(name.startswith(CONTEXT_PARALLEL_HOOKS) for name in getattr(registry, "hooks", {}))


def context_parallel_group(model: nn.Module) -> Any:
    """The process group of the model's diffusers context parallelism (`enable_parallelism`), None without."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    return None if mesh is None or mesh.size() == 1 else mesh.get_group()


def _innermost_hook(module: nn.Module) -> Any:
    """The innermost link of the module's diffusers hook chain (it calls the module's own forward), or None."""
    registry = getattr(module, "_diffusers_hook", None)
    refs = getattr(registry, "_fn_refs", None)
    return refs[0] if refs else None


class Session:
    """Everything fastcache attached to one transformer; `disable_cache` undoes exactly this."""

    def __init__(self, model: nn.Module, family: Family, config: Any) -> None:
        self.model = model
        self.family = family
        self.config = config
        self.slot = Slot()
        # the running forward's Scratch, under the key "call" between begin_call and end_call (see `scratch`)
        self._call: dict[str, Scratch] = {}
        # per pipeline call: context name -> (state, calls made with it, counted on the host)
        self.scopes: list[dict[str | None, tuple[Any, int]]] = [{}]
        self.active: str | None = None
        # what the active context's entry said of the loop (`cache_context(name, step_index=, sigma=, ...)`)
        self.context_info: dict[str, Any] = {}
        # the context states of the last pipeline call, once it returned (a calibration run's results)
        self.last_scope: dict[str | None, tuple[Any, int]] = {}
        self.calls = 0  # the active context's host call count
        self.wrapped: list[Wrapped] = []
        self.sites: dict[str, str] = {}  # attention module name -> kind
        self.pipelines: list[Any] = []
        self.pipeline: Any = None  # the pipeline whose call is running (its scheduler knows the timesteps)
        # Planned decisions: PAB's and FasterCache's rules depend only on the call count and the timestep, so
        # when the timestep is known on the host at a context's entry the decision is made there, eagerly.
        # DBCache's warm-up and TeaCache's last step are planned too (at every context entry, from the call count)
        self.plannable = isinstance(config, (PyramidAttentionBroadcastConfig, FasterCacheConfig, DBCacheConfig,
                                             TeaCacheConfig, SeaCacheConfig))
        # FirstBlockCache, DBCache, TeaCache: the rule of `_segments` (set by `install`)
        self.block_rule: Any = None
        # MagCache and TaylorSeer read only the call count: always planned, at every context entry
        self.step_indexed = isinstance(config, (MagCacheConfig, TaylorSeerCacheConfig))
        # every call needs its entry's plan (these and SeaCache, planned from the loop's step): a second call in
        # one context is refused, never moved to the device
        self.needs_plan = self.step_indexed or isinstance(config, SeaCacheConfig)
        self.schedule: Any = None  # their decisions by call count (`_planned.HostSchedule`), made on first use
        # FasterCache with CFG off (a pipeline called with guidance_scale <= 1): the batch holds separate
        # prompts, not [uncond; cond]; run as for a guidance-distilled model (attention approximation only)
        self.cfg_off = False
        # PAB's and FasterCache's host decisions by (cfg_off, call count, timestep), made once (`host_decision`)
        self.host_decisions: dict[tuple[bool, int, float], tuple] = {}
        # diffusers' module callbacks (FasterCache weights) run on the host at each context entry: the rules on
        # the device see the config without them, and the forward takes their values (`host_weights`)
        self.module_callbacks = {name: value.fn for name in faster_cache.MODULE_CALLBACK_FIELDS
                                 if isinstance(value := getattr(config, name, None), faster_cache.ModuleCallback)}
        self.host_weights: dict[str, float] | None = None
        self._warned_weights = False
        if self.module_callbacks:
            config = dataclasses.replace(config, **dict.fromkeys(self.module_callbacks))
        self.device_config = config
        self.distilled_config = (dataclasses.replace(config, is_guidance_distilled=True)
                                 if isinstance(config, FasterCacheConfig) else None)
        # the attention kinds a planned run ever reuses, from the running pipeline's whole schedule (None: not
        # known, cache every hooked site): a kind the plan always computes is not cached at all
        self.cached_kinds: frozenset[str] | None = None
        self.decided_on: str | None = None  # "host" or "device": where the last call's decision was made
        self._host_timesteps: tuple[Any, list[float]] | None = None
        # the block-range methods: whether each block's output goes straight to the next block (checked on first
        # calls; where it does not, one cond per middle block instead of per segment)
        self.chained = True
        # the context-parallel and the CFG-parallel process groups (`follow_parallelism`), and the sum over both
        self.groups: tuple[Any, Any] = (None, None)
        self.reduce: Any = None
        self.cfg: Any = None  # CFG parallelism (`fastcache.distributed.enable_cfg_parallel`): a `CfgGroup`
        self.restarted = False  # set by a forward that met a new input shape (see denoiser_wrapper)
        # attention processors the forward pre-traces before any torch.cond (`_prewarm`); none where the
        # method takes no cond (its decisions planned on the host)
        self.processors: tuple[Any, ...] = ()
        # the block-range methods under regional compilation (`compile_repeated_blocks`): per wrapped block, how to
        # run its rule eagerly around the block's compiled forward (`_segments.block_wrapper`), and whether a
        # compiled block forward is being entered from there (its traced wrapper then runs the block alone)
        self.host_sides: list[tuple[nn.Module, Callable[[Callable[..., Any]], Callable[..., Any]]]] = []
        self.passthrough = False

    # -- installing wrappers --
    def wrap(self, module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace the module's forward with `make(forward)`. Beneath diffusers' context-parallel hooks where the
        module has them (`enable_parallelism` first): fastcache's wrappers always see the local shards."""
        inner = _innermost_hook(module)
        if inner is not None:
            original = inner.forward
            inner.forward = wrapper = make(original)
            self.wrapped.append(Wrapped(module, wrapper, original, False, None))
            return
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        module.forward = wrapper = make(module.forward)
        self.wrapped.append(Wrapped(module, wrapper, None, had, previous))

    def intercept_compiled_blocks(self) -> None:
        """Eagerly, at each transformer call: a wrapped block compiled on its own (`module.compile()`, as
        diffusers' `compile_repeated_blocks` does) gets the method's rule around its compiled forward, so the
        compiled graph holds the block alone (no torch.cond; shared by the blocks of a class) and the call's one
        decision is read on the host, once, where the first middle block would run."""
        for block, make in self.host_sides:
            impl = block.__dict__.get("_compiled_call_impl")
            if impl is not None and not isinstance(impl, HostSide):
                block._compiled_call_impl = HostSide(impl, make(self._entering(impl)))

    def _entering(self, impl: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.passthrough = True
            try:
                return impl(*args, **kwargs)
            finally:
                self.passthrough = False

        return call

    def unwrap_all(self) -> None:
        for block, _ in self.host_sides:
            impl = block.__dict__.get("_compiled_call_impl")
            if isinstance(impl, HostSide):
                block._compiled_call_impl = impl.impl
        self.host_sides.clear()
        for w in reversed(self.wrapped):
            # hooks added over fastcache's wrapper later (`enable_parallelism` after `enable_cache`) stay
            inner = next((ref for ref in getattr(getattr(w.module, "_diffusers_hook", None), "_fn_refs", ())
                          if ref.forward is w.wrapper), None)
            restored = w.original if w.original is not None else (
                w.previous if w.had else type(w.module).forward.__get__(w.module))
            if inner is not None:
                inner.forward = restored
            elif w.had:
                w.module.forward = w.previous
            else:
                del w.module.forward
        self.wrapped.clear()

    # -- contexts and scopes (eager) --
    def _store(self) -> None:
        self.scopes[-1][self.active] = (self.slot.state, self.calls)

    def _load(self, name: str | None) -> None:
        self.active = name
        self.slot.state, self.calls = self.scopes[-1].get(name, (None, 0))

    # -- parallelism: diffusers' context parallelism (`enable_parallelism`, before or after `enable_cache`) splits
    # the sequence, fastcache's CFG parallelism (`fastcache.distributed.enable_cfg_parallel`) the batch --
    def follow_parallelism(self) -> None:
        """Eagerly, at each context entry (and each eager call): when the model's parallel groups change, check
        that every rank holds the same config and make the data-dependent rules sum over the groups."""
        groups = (context_parallel_group(self.model), None if self.cfg is None else self.cfg.group)
        if all(a is b for a, b in zip(groups, self.groups)):
            return
        from fastcache.distributed import chain, check_same_config, sum_over

        device = next(self.model.parameters(), torch.empty(0)).device
        for group in groups:
            if group is not None:
                check_same_config(self.config, group, device)
        # states made for another world size hold other shards: none is carried over
        self.scopes[-1] = {}
        self.slot.state, self.calls = None, 0
        self.groups = groups
        sequence, batch = (None if group is None else sum_over(group) for group in groups)
        self.reduce = chain(sequence, batch)
        if self.block_rule is not None:
            rule = self.block_rule
            rule.reduce, rule.sequence_sum, rule.batch_sum = self.reduce, sequence, batch

    @property
    def parallel(self) -> str | None:
        """Which groups the ranks form, in words (None on one process)."""
        names = [name for name, group in zip(("context-parallel", "CFG-parallel"), self.groups) if group is not None]
        return " and ".join(names) or None

    @contextmanager
    def context(self, name: str | None, **info: Any) -> Iterator[None]:
        """A named context; `info` is what diffusers' `cache_context(name, **kwargs)` says of the denoising loop
        (`step_index`, `sigma`, `num_inference_steps`: SeaCache plans each call from them)."""
        self.follow_parallelism()
        previous, previous_info = self.active, self.context_info
        self._store()
        self._load(name)
        self.context_info = info
        try:
            self._plan_next_call()  # may refuse the entry: the previous context is active again all the same
            entry = self.slot.state
            try:
                yield
            finally:
                self._count_calls()
                self.slot.state = out_of_cuda_graph_pool(self.slot.state, entry)
        finally:
            self._store()
            self._load(previous)
            self.context_info = previous_info

    @contextmanager
    def scope(self) -> Iterator[None]:
        """A fresh set of context states for one pipeline call; the outer set comes back afterwards."""
        self._store()
        previous = self.active
        self.scopes.append({})
        self._load(None)
        try:
            yield
        finally:
            self._store()
            ended = self.scopes.pop()
            if any(state is not None for state, _ in ended.values()):  # else the pipeline reset it at its end
                self.last_scope = ended
            self._load(previous)

    def __deepcopy__(self, memo: dict) -> Session:
        # a copied model would keep forwards that close over the original's modules
        raise TypeError(f"copy.deepcopy of a {type(self.model).__name__} with fastcache enabled: call "
                        "fastcache.disable_cache(model) first, copy, then enable_cache on each")

    @contextmanager
    def running(self, pipeline: Any) -> Iterator[None]:
        """One pipeline call: fresh context states, and the pipeline's scheduler as the timestep source."""
        previous, self.pipeline = self.pipeline, pipeline
        try:
            with self.scope():
                yield
        finally:
            self.pipeline = previous

    def end_generation(self) -> None:
        """A pipeline's end-of-call `_reset_stateful_cache()`: its context states stay readable (`last_scope`)."""
        self._store()
        self.last_scope = self.scopes[-1]
        self.scopes[-1] = {}
        self.slot.state, self.calls = None, 0

    def reset(self) -> None:
        """`reset_cache`: every context state, and what a calibration run recorded."""
        self.end_generation()
        self.last_scope = {}
        if self.block_rule is not None:
            self.block_rule.reset()

    def state(self, name: str | None) -> Any:
        """The state of a context in the current scope (for inspection and tests)."""
        self._store()
        return self.scopes[-1].get(name, (None, 0))[0]

    # -- planned decisions (eager, at a context's entry) --
    def _plan_next_call(self) -> None:
        self.pending = None
        if self.step_indexed:
            self._check_step_count()
            if self.schedule is None:
                from fastcache.diffusers._planned import HostSchedule

                device = next(self.model.parameters(), torch.empty(0)).device
                self.schedule = HostSchedule(self.config, device)
            self.pending = self.schedule.decision(self.calls)
            return
        if self.block_rule is not None:
            self.pending = (self.block_rule.plan(self.calls, self.pipeline, self.context_info) if self.plannable
                            else None)
            return
        if self.distilled_config is not None:
            self.cfg_off = self.pipeline is not None and not _runs_cfg(self.pipeline)
        if self.module_callbacks:
            self._evaluate_module_callbacks()
        if not self.plannable:
            return
        t = self.host_timestep()
        self.pending = DEVICE if t is None else self._host_decision(self.calls, t)
        if self.calls == 0:
            self.cached_kinds = None if t is None else self._kinds_reused_over_the_schedule()

    def _kinds_reused_over_the_schedule(self) -> frozenset[str] | None:
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if not isinstance(timesteps, Tensor) or timesteps.dim() != 1:
            return None
        config, host = self.method_config(), self._host_copy(timesteps)
        decisions = [self._host_decision(i, t) for i, t in enumerate(host)]
        if isinstance(config, PyramidAttentionBroadcastConfig):
            return frozenset(pyramid_attention_broadcast.reused_kinds(decisions))
        return frozenset(kind for kind in faster_cache.CACHED_KINDS
                         if any(getattr(d, f"approx_{kind}") for d in decisions))

    def _host_decision(self, calls: int, t: float) -> tuple:
        """`host_decision` of the method's config, remembered: each is some thirty small CPU tensor ops (~100 us),
        and a generation meets the same (call, timestep) pairs as the one before it."""
        key = (self.cfg_off, calls, t)
        decision = self.host_decisions.get(key)
        if decision is None:
            if len(self.host_decisions) >= 4096:  # many schedules: start over rather than grow
                self.host_decisions.clear()
            decision = self.host_decisions[key] = host_decision(self.method_config(), calls, t)
        return decision

    def caches(self, kind: str) -> bool:
        """Whether sites of this kind keep their output: every hooked kind, unless the whole schedule is known
        and never reuses it. A planned reuse of a kind not cached (a timestep outside the schedule) computes."""
        return self.cached_kinds is None or kind in self.cached_kinds

    def _check_step_count(self) -> None:
        """MagCache's ratios are per step index: a pipeline running another step count than the config's
        `num_inference_steps` is refused before any compute (two-denoiser pipelines split the steps: not checked)."""
        if not isinstance(self.config, MagCacheConfig) or self.calls or self.pipeline is None:
            return
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if getattr(self.pipeline, "transformer_2", None) is not None or not isinstance(timesteps, Tensor):
            return
        if len(timesteps) != self.config.num_inference_steps:
            raise ValueError(f"MagCacheConfig.num_inference_steps: {self.config.num_inference_steps}, but the "
                             f"pipeline runs {len(timesteps)} steps; set num_inference_steps={len(timesteps)} (the "
                             "ratios are resampled to it)")

    @property
    def pending(self) -> Any:
        """The decision planned at the context's entry for the next call, or a marker (DEVICE, CONSUMED, SEVERAL)."""
        return self.slot.pending

    @pending.setter
    def pending(self, value: Any) -> None:
        self.slot.pending = value

    @property
    def scratch(self) -> Scratch | None:
        """The running forward's scratch. It lives in a dict that is never reassigned, not in an attribute: under
        torch.compile, dynamo (torch 2.13) replays an attribute written both before and after a torch.cond with
        its value from before the cond, so a cleared attribute kept the call's block calls and tensors alive,
        rebuilt by ~1000 bytecodes after every call (tests/test_diffusers_compile.py checks nothing is left)."""
        return self._call.get("call")

    def begin_call(self, state: Any) -> Scratch:
        scratch = self._call["call"] = Scratch(state=state)
        return scratch

    def end_call(self) -> None:
        self._call.clear()

    def method_config(self) -> Any:
        """The config the rules run with: FasterCache with CFG off runs as guidance-distilled; diffusers' module
        callbacks are left out (their values come from `host_weights`)."""
        return self.distilled_config if self.cfg_off else self.device_config

    def _evaluate_module_callbacks(self) -> None:
        """diffusers calls its weight callbacks with the attention module (attention weight) or the denoiser
        (frequency weights) and uses the float they return: done here, eagerly. The compiled forward reads the
        floats, so a constant compiles once; a value that changes recompiles at every new value."""
        values = self.module_callback_values()
        if self.host_weights is not None and values != self.host_weights and not self._warned_weights:
            self._warned_weights = True
            changed = ", ".join(n for n in values if values[n] != self.host_weights.get(n))
            warnings.warn(f"fastcache: diffusers' {changed} returned a new value: under torch.compile each new "
                          "value is a new graph (a recompile). fastcache.FasterCacheConfig takes callbacks of the "
                          "timestep tensor, which never recompile", stacklevel=4)
        self.host_weights = values

    def module_callback_values(self) -> dict[str, float]:
        """Each module callback called as diffusers calls it: the attention weight with a hooked attention
        module, the frequency weights with the denoiser."""
        attention = next(iter(self.sites), None)
        values = {}
        for name, fn in self.module_callbacks.items():
            hooked = name == "attention_weight_callback" and attention is not None
            values[name] = float(fn(self.model.get_submodule(attention) if hooked else self.model))
        return values

    def _count_calls(self) -> None:
        if self.restarted:  # the call met a new input shape and started the context's state afresh
            self.calls, self.restarted = 0, False
        if self.pending == CONSUMED:
            self.calls += 1
        elif self.pending == SEVERAL and self.needs_plan:
            pass  # refused in the forward already
        elif self.pending == SEVERAL:
            # the host no longer knows this context's call count: decide on the device from now on
            self.plannable = False
            where = "every call" if self.block_rule is not None else "per attention site"
            warnings.warn("fastcache: the transformer was called several times inside one cache_context; its "
                          f"planned decisions move to the device (torch.cond, a host sync {where} on GPU)",
                          stacklevel=3)
        self.pending = None

    def plan_outside_context(self) -> bool:
        """A call outside any cache_context (eight diffusers pipelines make such calls, the README lists them):
        run eagerly, it is its own entry of the default context, planned here. A
        compiled forward cannot plan (it would guard on the call count and recompile every call): there the
        planned methods need `cache_context` around each call."""
        # is_compiling first: traced, nothing else is read (the context's name must never become a guard)
        if torch.compiler.is_compiling() or self.active is not None or self.pending is not None:
            return False
        self._plan_next_call()
        return True

    def take_planned(self) -> Any:
        """Inside the forward: the decision planned at the context's entry, or None (decide on the device)."""
        pending = self.pending
        if isinstance(pending, tuple):
            self.pending = CONSUMED
            self.decided_on = "host"
            return pending
        if pending == DEVICE:
            self.pending = CONSUMED
        elif pending == CONSUMED:
            self.pending = SEVERAL
        self.decided_on = "device"
        return None

    def host_timestep(self) -> float | None:
        """The denoising timestep (0..1000) on the host, without a sync where possible: the config's
        `current_timestep_callback` (diffusers' usage), else the running pipeline's scheduler; None if
        neither is known (the forward then reads the model's own `timestep` argument on the device)."""
        callback = getattr(self.config, "current_timestep_callback", None)
        scheduler = getattr(self.pipeline, "scheduler", None)
        if callback is not None:
            value = callback()
            if value is None:
                return None
            if isinstance(value, Tensor):
                found = self._scheduler_lookup(scheduler, value)
                return found if found is not None else float(value.max())  # max over per-token timesteps
            return float(value)
        if scheduler is None or not hasattr(scheduler, "step_index"):
            return None
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, Tensor):
            return None
        index = scheduler.step_index
        current = getattr(self.pipeline, "_current_timestep", None)
        if index is None and self.calls and isinstance(current, Tensor):
            # called before, yet the scheduler never stepped: the pipeline steps copies of it (SkyReels-V2's
            # diffusion forcing, one per frame) and its current timestep is a row of per-frame timesteps
            found = self._scheduler_lookup(scheduler, current)
            return found if found is not None else float(current.max())  # the noisiest frame (Family.timestep)
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        host = self._host_copy(timesteps)
        return host[index] if index < len(host) else None

    def _host_copy(self, timesteps: Tensor) -> list[float]:
        # one device-to-host copy per schedule, not per call
        key = (timesteps.untyped_storage().data_ptr(), timesteps.storage_offset(), timesteps.numel())
        if self._host_timesteps is None or self._host_timesteps[0] != key:
            self._host_timesteps = (key, timesteps.float().tolist())
        return self._host_timesteps[1]

    def _scheduler_lookup(self, scheduler: Any, value: Tensor) -> float | None:
        """`pipe.current_timestep` is an element of the scheduler's timesteps (a view into its storage): read
        it from the host copy instead of syncing on the device tensor."""
        timesteps = getattr(scheduler, "timesteps", None)
        if (not isinstance(timesteps, Tensor) or value.numel() != 1 or timesteps.dim() != 1
                or value.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr()):
            return None
        index = (value.storage_offset() - timesteps.storage_offset()) // max(timesteps.stride(0), 1)
        host = self._host_copy(timesteps)
        return host[index] if 0 <= index < len(host) else None


WEIGHT_FIELDS = {"attention_weight_callback": "w_attention", "low_frequency_weight_callback": "w_low",
                 "high_frequency_weight_callback": "w_high"}


def _runs_cfg(pipeline: Any) -> bool:
    """Whether a running pipeline batches CFG: its `do_classifier_free_guidance`, else `guidance_scale > 1`
    (CogVideoX has only the latter)."""
    flag = getattr(pipeline, "do_classifier_free_guidance", None)
    if isinstance(flag, bool):
        return flag
    scale = getattr(pipeline, "_guidance_scale", None)
    return scale is None or float(scale) > 1.0


def host_decision(config: Any, calls: int, t: float) -> tuple:
    """The rules of `config` for call number `calls` at timestep `t`, as Python bools (what a compiled forward
    specialises on). Evaluated with the same fp32 comparisons as on the device."""
    count, time = torch.tensor(calls), torch.tensor(t, dtype=torch.float32)
    if isinstance(config, PyramidAttentionBroadcastConfig):
        return PABDecision(*(bool(flag) for flag in pyramid_attention_broadcast.decide(config, count, time)))
    d = faster_cache.decide(config, count, time)
    return PlannedFasterCache(bool(d.skip_uncond), bool(d.approx_spatial), bool(d.approx_temporal))


class PlannedFasterCache(NamedTuple):
    skip_uncond: bool
    approx_spatial: bool
    approx_temporal: bool


# -- attention classification (diffusers' rule: identifiers searched in module names, cross flag) -----------

def classify_sites(model: nn.Module, config: Any) -> dict[str, tuple[nn.Module, str]]:
    from diffusers.hooks._common import _ATTENTION_CLASSES

    enabled = config.enabled_kinds()
    prefilter = None
    if isinstance(config, FasterCacheConfig):
        prefilter = faster_cache.SPATIAL_IDENTIFIERS + faster_cache.TEMPORAL_IDENTIFIERS
    attention = [name for name, module in model.named_modules() if isinstance(module, _ATTENTION_CLASSES)]
    for kind in enabled:
        field_name = f"{kind}_attention_block_identifiers"
        idents = getattr(config, field_name)
        if not any(re.search(p, name) for p in idents for name in attention):
            some = ", ".join(attention[:4]) + (", ..." if len(attention) > 4 else "")
            raise ValueError(f"config.{field_name}: {idents} match no attention module of {type(model).__name__} "
                             f"(its attention modules: {some})")
    sites: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _ATTENTION_CLASSES):
            continue
        if prefilter is not None and not any(re.search(p, name) for p in prefilter):
            continue
        cross = bool(getattr(module, "is_cross_attention", False))
        for kind in enabled:  # precedence: spatial, temporal, cross
            idents = getattr(config, f"{kind}_attention_block_identifiers")
            if any(re.search(p, name) for p in idents) and cross == (kind == "cross"):
                sites[name] = (module, kind)
                break
    return sites


# -- the wrappers -------------------------------------------------------------------------------------------

def _output_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def denoiser_wrapper(session: Session) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The transformer's forward: read the active state, run the method, store the new state."""
    model, family, config = session.model, session.family, session.config
    positions = _positions(model)
    slot = session.slot

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return run(*args, **kwargs)
            session.intercept_compiled_blocks()
            session.follow_parallelism()
            if session.parallel is None:
                return run(*args, **kwargs)
            try:
                return run(*args, **kwargs)
            except RuntimeError as error:
                if not _collective_failure(error):
                    raise
                import torch.distributed as dist

                raise RuntimeError(
                    f"fastcache: a collective of the {session.parallel} group failed on rank {dist.get_rank()} of "
                    f"{dist.get_world_size()} during a {type(model).__name__} call: a peer rank "
                    "died, or hung past the process group's timeout (init_process_group(timeout=...)); the "
                    f"generation cannot go on. Cause: {error}") from error

        def run(*args: Any, **kwargs: Any) -> Any:
            state = slot.state
            # a zero-byte record of the input: a new shape, dtype or device (a new resolution, or a call that
            # failed half-way) starts the context afresh instead of meeting the old state
            spec = _spec(_arg(positions, family.hidden_arg, args, kwargs))
            if state is not None and not _same_spec(state["spec"], spec):
                state = None
                session.restarted = True
            timestep = _arg(positions, family.timestep_arg, args, kwargs)
            if not isinstance(timestep, Tensor):
                timestep = torch.as_tensor(timestep if timestep is not None else 0.0)
            device = timestep.device  # of the counters (the denoising timestep itself: only where a rule reads it)
            _prewarm(session.processors)
            scratch = session.begin_call(state)
            scratch.model_call = (args, kwargs)
            implicit = session.plan_outside_context()
            planned = session.take_planned()
            if planned is None and session.reduce is not None and state is not None and session.block_rule is None:
                # decided on the device (PAB, FasterCache): every rank reuses only what every rank may reuse
                from fastcache.distributed import agreed_flags

                flags = {key: state[key] for key in FINITE_FLAGS if key in state}
                state = scratch.state = {**state, **agreed_flags(flags, session.reduce)}
            if isinstance(config, FasterCacheConfig):
                out, new = _faster_cache_forward(session, original, positions, state, family.timestep(timestep),
                                                 planned, args, kwargs)
            elif session.step_indexed:
                if planned is None:
                    raise RuntimeError(f"{type(config).__name__}: fastcache plans each call at its cache_context "
                                       f"entry from the context's call count; call {type(model).__name__} once per "
                                       "`with model.cache_context(name):`, as most diffusers pipelines do (a call "
                                       "outside any context is planned on its own only when run eagerly)")
                scratch.decision = planned
                out = _call_own_half(session, original, positions, args, kwargs)
                new = dict(scratch.new)
            else:
                if isinstance(config, PyramidAttentionBroadcastConfig):
                    scratch.decision = (None if state is None else planned if planned is not None
                                        else pyramid_attention_broadcast.decide(config, state["count"],
                                                                                family.timestep(timestep)))
                else:
                    scratch.decision = planned
                    # a planned call (DBCache's warm-up, TeaCache's last step) computes with no cond
                    session.decided_on = "host" if planned is not None and planned.force_compute else "device"
                out = _call_own_half(session, original, positions, args, kwargs)
                new = dict(scratch.new)
                if session.block_rule is not None:
                    session.block_rule.after_call(state, new, _output_tensor(out))
            count = (torch.zeros((), dtype=torch.int64, device=device) if state is None else state["count"])
            new["count"], new["spec"] = count + 1, spec
            if session.block_rule is None:  # the block-range methods count their refused skips themselves
                before = torch.zeros((), dtype=torch.int64, device=device) if state is None else state["nonfinite"]
                new["nonfinite"] = count_misses(before, scratch.misses)
            # canonical strides for every state tensor: the next call guards on them (a size-1 batch dim
            # keeps arbitrary strides, which recompiled FasterCache twice), and inductor asserts them
            # (eagerly no graph reads the state: left as it is)
            slot.state = (tree_map(lambda x: canonical(x) if isinstance(x, Tensor) else x, new)
                          if torch.compiler.is_compiling() else new)
            session.end_call()
            if implicit:
                session._count_calls()
            return out

        return forward

    return make


def _call_own_half(session: Session, original: Callable[..., Any], positions: dict[str, int], args: tuple,
                   kwargs: dict) -> Any:
    """The model call; under CFG parallelism each rank runs its part of the batched [uncond; cond] call (the
    cond half on rank 0) and the outputs are all-gathered, so every rank returns the whole batch."""
    cfg = session.cfg
    if cfg is None:
        return original(*args, **kwargs)
    batch = _arg(positions, "hidden_states", args, kwargs).shape[0]
    cfg.check_batch(batch)
    names = BATCHED_KWARGS + session.family.extra_batched_kwargs
    part_args, part_kwargs = _batch_part(names, args, kwargs, batch, cfg.part, cfg.size)
    return_dict = part_kwargs.pop("return_dict", True) if "return_dict" in positions else None
    if return_dict is not None:
        part_kwargs["return_dict"] = False
    out = original(*part_args, **part_kwargs)
    sample = cfg.gather(_output_tensor(out))
    if return_dict is None:
        return sample
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)


def _batch_part(names: tuple[str, ...], args: tuple, kwargs: dict, batch: int, part: int,
                parts: int) -> tuple[tuple, dict]:
    """Part `part` of `parts` equal slices of the batched inputs (positional tensors and the batched kwargs)."""
    size = batch // parts

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
            return value[part * size:(part + 1) * size]
        return value

    return tuple(cut(v) for v in args), {n: cut(v) if n in names else v for n, v in kwargs.items()}


def _collective_failure(error: BaseException) -> bool:
    """Whether an error came from the communication backend (a dead or hung peer), not from the model."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        marker in text for marker in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out"))


def _spec(hidden: Any) -> Any:
    if isinstance(hidden, (list, tuple)):  # one latent per item (Cosmos 3)
        return tuple(_spec(h) for h in hidden)
    return hidden.new_empty((0, *hidden.shape)) if isinstance(hidden, Tensor) else None


def _same_spec(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(_same_spec(x, y) for x, y in zip(a, b)))
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def pab_wrapper(session: Session, name: str, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One attention module under PAB: compute or reuse its output. A cached output holding a NaN or Inf is
    never reused on the device (its finiteness joins the cond's predicate) and always counted in the state's
    `nonfinite`; a planned reuse is a plain `if` (refusing it would be a branch on data: a host sync)."""
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            scratch = session.scratch
            if scratch is None:  # called on its own, outside the transformer's forward: nothing cached
                return original(*args, **kwargs)
            state = scratch.state
            if not session.caches(kind) or (state is not None and name not in state.get("cache", {})):
                return original(*args, **kwargs)  # a kind this run never reuses: nothing to keep
            if state is None:  # the first call of a context computes (diffusers: the cache is empty)
                out = original(*args, **kwargs)
                scratch.new.setdefault("cache", {})[name] = _own(out)
                scratch.new.setdefault("finite", {})[name] = all_finite(out)
                return out
            compute, finite = getattr(scratch.decision, kind), state["finite"][name]
            reuses = guard_reuse(not compute if isinstance(compute, bool) else ~compute, finite, scratch.misses)
            tensors, rebuild = _split_tensors(args, kwargs)
            out = _cond(reuses, lambda cached, *ts: cached, lambda cached, *ts: _call(original, rebuild(ts)),
                        (state["cache"][name], *tensors))
            scratch.new.setdefault("cache", {})[name] = out
            # computed: its own check; reused: finite by the predicate (planned: the flag it had)
            scratch.new.setdefault("finite", {})[name] = (finite if reuses is True else all_finite(out))
            return out

        return forward

    return make


def _prewarm(processors: tuple[Any, ...]) -> None:
    # diffusers' attention forwards call inspect.signature(self.processor.__call__); dynamo traces that at
    # the top level of a graph but not first inside a torch.cond branch (torch 2.13: "'Signature' object
    # has no attribute '_parameters'"), so the traced forward evaluates it once per attention processor,
    # before any branch. The processors are found once, eagerly: walking the module tree in the graph
    # guarded on every submodule's attributes (a third of a tiny Flux call's guard time).
    if not torch.compiler.is_compiling():
        return
    for processor in processors:
        inspect.signature(processor.__call__)


def _call(fn: Callable[..., Any], args_kwargs: tuple) -> Any:
    args, kwargs = args_kwargs
    return fn(*args, **kwargs)


# -- block streams (the block-range methods, MagCache) ---------------------------------------------------------

def _streams(io: BlockIO, out: Any) -> tuple:
    if io.hidden is None:
        return (out,)
    return (out[io.hidden], out[io.encoder] if io.encoder is not None else None)


def _input_streams(io: BlockIO, positions: dict[str, int], args: tuple, kwargs: dict) -> tuple:
    return tuple(_arg(positions, name, args, kwargs) for name in io.stream_args)


def _as_output(io: BlockIO, streams: tuple) -> Any:
    if io.hidden is None:
        return streams[0]
    out = [None, None]
    out[io.hidden] = streams[0]
    out[io.encoder if io.encoder is not None else 1 - io.hidden] = streams[1]
    return tuple(out)


def _with_streams(io: BlockIO, positions: dict[str, int], args: tuple, kwargs: dict, streams: tuple) -> tuple:
    """(args, kwargs) with the block's stream arguments replaced by `streams`."""
    args, kwargs = list(args), dict(kwargs)
    for name, value in zip(io.stream_args, streams):
        index = positions.get(name)
        if name not in kwargs and index is not None and index < len(args):
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# -- FasterCache --------------------------------------------------------------------------------------------

def fastercache_attention_wrapper(session: Session, name: str, kind: str) -> Callable[..., Any]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            scratch = session.scratch
            if scratch is None:  # called on its own, outside the transformer's forward: nothing cached
                return original(*args, **kwargs)
            # The conditional half runs first and records every site's window; a second call in the same
            # forward is the unconditional half of a full step (inside torch.cond): plain attention, since
            # the windows keep conditional halves only. (A membership test, not a mode flag: Python
            # attribute writes around torch.cond are not reliably seen inside its branches.)
            if name in scratch.new.get("windows", {}):
                return original(*args, **kwargs)
            state, decision = scratch.state, scratch.decision
            if not session.caches(kind) or (state is not None and name not in state.get("windows", {})):
                return original(*args, **kwargs)  # a kind this run never approximates: no window
            if state is None:
                out = original(*args, **kwargs)
                # both slots hold the first output, as in diffusers, but as distinct tensors: an aliased
                # pair would be guarded on and recompile the third call
                window = (tree_map(torch.clone, out), _own(out))
                ok = all_finite(out)
                window_finite = (ok.clone(), ok)
            else:
                prev, last = state["windows"][name]
                prev_ok, last_ok = state["windows_finite"][name]
                # an approximation from a window holding a NaN or Inf: computed on the device, counted always
                approx = guard_reuse(getattr(decision, f"approx_{kind}"), prev_ok & last_ok, scratch.misses)
                tensors, rebuild = _split_tensors(args, kwargs)
                out = _cond(approx,
                            lambda prv, lst, *ts: tree_map(
                                lambda x, y: kernels.extrapolate(x, y, decision.w_attention), lst, prv),
                            lambda prv, lst, *ts: _call(original, rebuild(ts)),
                            (prev, last, *tensors))
                window, window_finite = (last, out), (last_ok, all_finite(out))
            scratch.new.setdefault("windows", {})[name] = window
            scratch.new.setdefault("windows_finite", {})[name] = window_finite
            return out

        return forward

    return make


def _halves(names: tuple[str, ...], args: tuple, kwargs: dict, batch: int) -> tuple[tuple, tuple]:
    """(uncond, cond) halves of the batched inputs: positional tensors and diffusers' batched kwargs."""
    return _batch_part(names, args, kwargs, batch, 0, 2), _batch_part(names, args, kwargs, batch, 1, 2)


def _faster_cache_forward(session: Session, original: Callable[..., Any], positions: dict[str, int], state: Any,
                          t: Tensor, planned: PlannedFasterCache | None, args: tuple,
                          kwargs: dict) -> tuple[Any, dict]:
    config, scratch = session.method_config(), session.scratch
    hidden = _arg(positions, "hidden_states", args, kwargs)
    if not config.is_guidance_distilled and hidden.shape[0] % 2:
        raise ValueError(f"FasterCacheConfig: a batch of {hidden.shape[0]} is not [uncond; cond] halves: is CFG off? "
                         "enable_cache on the pipeline (it then detects guidance_scale <= 1) or set "
                         "is_guidance_distilled=True")
    return_dict = kwargs.pop("return_dict", True) if "return_dict" in positions else None
    if return_dict is not None:
        kwargs["return_dict"] = False
    if state is None:  # planned-as-Python first call: compute both halves, seed every window
        decision = FasterCacheDecision(True, False, False, False, *faster_cache.weights(config, t))
    elif planned is not None:  # the host's flags (Python bools: no torch.cond); the weights stay tensors
        decision = FasterCacheDecision(False, *planned, *faster_cache.weights(config, t))
    else:
        decision = faster_cache.decide(config, state["count"], t)
    if session.module_callbacks:  # diffusers' callbacks of a module: their floats, evaluated at the entry
        weights = session.host_weights
        if weights is None:  # called outside any cache_context: evaluate them here (traced)
            weights = session.module_callback_values()
        decision = decision._replace(**{WEIGHT_FIELDS[name]: torch.full((), value, device=t.device)
                                        for name, value in weights.items()})
    if state is not None and not config.is_guidance_distilled:
        decision = _guard_deltas(decision, state["deltas_finite"], scratch.misses)
    scratch.decision = decision

    if config.is_guidance_distilled:
        out = original(*args, **kwargs)
        new = dict(scratch.new)
        sample = _output_tensor(out)
    else:
        batch = hidden.shape[0]
        (u_args, u_kwargs), (c_args, c_kwargs) = _halves(BATCHED_KWARGS + session.family.extra_batched_kwargs, args,
                                                        kwargs, batch)
        if session.cfg is not None:
            cond, computed, new = _faster_cache_halves_on_two_ranks(session, original, state, decision, hidden,
                                                                    (u_args, u_kwargs), (c_args, c_kwargs))
            u_tensors, rebuild = (computed,), None
        else:
            # The conditional half always runs, at the top level of the graph (its attention windows update
            # there); the unconditional half runs inside torch.cond only on full steps, with plain attention.
            cond = _output_tensor(original(*c_args, **c_kwargs))
            new = dict(scratch.new)
            u_tensors, rebuild = _split_tensors(u_args, u_kwargs)

        def full(cond: Tensor, d_low: Tensor, d_high: Tensor, *ts: Tensor) -> tuple:
            # CFG parallelism: the uncond half came from rank 1, in the operands
            uncond = ts[0] if session.cfg is not None else _output_tensor(_call(original, rebuild(ts)))
            low, high = kernels.frequency_split((uncond - cond).float())
            return uncond, low, high

        def skip(cond: Tensor, d_low: Tensor, d_high: Tensor, *ts: Tensor) -> tuple:
            return kernels.fastercache_uncond(cond, d_low, d_high, decision.w_low, decision.w_high)

        if state is None:
            zeros = torch.zeros(cond.shape, dtype=torch.float32, device=cond.device)
            uncond, d_low, d_high = full(cond, zeros, zeros, *u_tensors)
        else:
            uncond, d_low, d_high = _cond(decision.skip_uncond, skip, full,
                                          (cond, state["d_low"], state["d_high"], *u_tensors))
        new.update(d_low=d_low, d_high=d_high, deltas_finite=all_finite((d_low, d_high)))
        sample = torch.cat([uncond, cond])
    if return_dict is None:
        return sample, new
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample), new
    return (sample,), new


def _faster_cache_halves_on_two_ranks(session: Session, original: Callable[..., Any], state: Any, decision: Any,
                                      hidden: Tensor, uncond_half: tuple, cond_half: tuple) -> tuple:
    """FasterCache under CFG parallelism: rank 0 runs the cond half (its attention windows update there, as on
    one process), rank 1 the uncond half with plain attention on full steps, and idles on a step that skips it;
    one all-gather gives both ranks both halves. Returns (cond, the uncond half computed or zeros, new state)."""
    cfg, scratch = session.cfg, session.scratch
    if cfg.rank == 0:
        local = _output_tensor(original(*cond_half[0], **cond_half[1]))
    elif state is None:
        local = _output_tensor(original(*uncond_half[0], **uncond_half[1]))
    else:
        # the windows keep cond halves: carried over, and their presence means plain attention
        scratch.new.update({key: dict(state[key]) for key in ("windows", "windows_finite") if key in state})
        tensors, rebuild = _split_tensors(*uncond_half)
        idle = torch.zeros(state["d_low"].shape, dtype=hidden.dtype, device=hidden.device)
        local = _cond(decision.skip_uncond, lambda z, *ts: z.clone(),
                      lambda z, *ts: _output_tensor(_call(original, rebuild(ts))), (idle, *tensors))
    new = dict(scratch.new)
    computed, cond = cfg.gather(local.float()).to(hidden.dtype).chunk(2)  # batch order: [uncond; cond]
    return cond, computed, new


def _guard_deltas(decision: Any, deltas_ok: Tensor, misses: list[Tensor]) -> Any:
    """A skip of the unconditional half rebuilds it from the stored deltas: on the device it is refused when they
    are not finite (and so are the approximations, which need the halved batch of a skip); a planned skip runs
    (refusing it would be a branch on data, a host sync). Either way the miss is counted."""
    skip = guard_reuse(decision.skip_uncond, deltas_ok, misses)
    if isinstance(skip, bool):
        return decision
    return decision._replace(skip_uncond=skip, approx_spatial=decision.approx_spatial & deltas_ok,
                             approx_temporal=decision.approx_temporal & deltas_ok)


def install(session: Session) -> None:
    """Wrap the modules the method needs; on any error, unwrap what was wrapped (nothing half-enabled)."""
    model, config = session.model, session.config
    try:
        if isinstance(config, BLOCK_CONFIGS):
            from fastcache.diffusers._segments import install_blocks

            session.block_rule = install_blocks(session)
        elif isinstance(config, MagCacheConfig):
            from fastcache.diffusers import _planned

            for block, role in _planned.mag_cache_roles(model):
                session.wrap(block, _planned.mag_cache_wrapper(session, block, role))
        elif isinstance(config, TaylorSeerCacheConfig):
            from fastcache.diffusers import _planned

            for name, (module, active) in _planned.taylorseer_modules(model, config).items():
                session.wrap(module, _planned.taylorseer_wrapper(session, name, active))
        else:
            sites = classify_sites(model, config)
            for name, (module, kind) in sites.items():
                make = (pab_wrapper if isinstance(config, PyramidAttentionBroadcastConfig)
                        else fastercache_attention_wrapper)(session, name, kind)
                session.wrap(module, make)
                session.sites[name] = kind
        if not session.step_indexed:
            session.processors = tuple(p for m in model.modules() if (p := getattr(m, "processor", None)) is not None)
        session.wrap(model, denoiser_wrapper(session))
    except BaseException:
        session.unwrap_all()
        raise

