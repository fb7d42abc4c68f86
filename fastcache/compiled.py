"""A cache method's step, compiled the way a GPU wants it: `fastcache.compile_step`.

    method = fastcache.make(fastcache.FirstBlockCacheConfig(threshold=0.1))
    step = fastcache.compile_step(method, model, mode="reduce-overhead")
    state, plan = method.init(model, inputs), method.plan(timesteps)
    for i, t in enumerate(timesteps):
        out, state = step(state, inputs_at(t), plan[i])

It is `torch.compile(lambda s, i, d: method.step(model, s, i, d), fullgraph=True, **options)` plus what a
compiled step needs on a GPU and what a user would otherwise write by hand:

- The data-dependent methods (FirstBlockCache, TeaCache, DBCache) run as split steps (design (b) of the
  GPU-first work): a compiled head (embed, the blocks before the decision, the decision), one host read of the
  decision, then a compiled tail for that value (no read on a planned compute). No `torch.cond`, so their graphs
  can be CUDA-graphed (inductor skips CUDA graphs for a graph holding a cond, and lowers the cond to a host read
  anyway). A FirstBlockCache skip call then runs graphs holding the first block's and the head's parameters only:
  measured on CPU (bench/results/fbc_overhead_cpu.md), a skip costs what the model cut to its first block costs
  (the one-cond step 8% more), a compute call 0.6-1.4% more than the one-cond step (a second graph call).
  `split=False` keeps the one-cond step.
- Under CUDA graphs (`mode="reduce-overhead"` or `"max-autotune"`), each step starts a cudagraph-trees
  generation (`torch.compiler.cudagraph_mark_step_begin`, so the tail may read the head's outputs), and the new
  state is copied out of the graphs' memory pool (`fastcache.out_of_cuda_graph_pool`): a later step would
  overwrite it there. The step's output stays in the pool until the next step: clone it to keep it longer.
- CUDA graphs asked for where the inputs are not on a CUDA device: a warning at the first step, and the step
  compiles without them (reduce-overhead becomes the default mode, max-autotune max-autotune-no-cudagraphs),
  never a failure mid-generation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from fastcache.cuda_graphs import out_of_cuda_graph_pool
from fastcache.engine import CacheMethod, _methods, forced_compute
from fastcache.protocol import CacheableModel, Inputs

# torch.compile's modes that CUDA-graph, and the mode each becomes where there are no CUDA graphs (None: default)
CUDA_GRAPHS_MODE: dict[str, str | None] = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}


class CompiledStep:
    """`step(state, inputs, decision) -> (output, new state)`, as `method.step(model, ...)` computes it."""

    def __init__(self, method: CacheMethod, module: Any, model: CacheableModel, split: bool,
                 options: dict[str, Any]) -> None:
        # module: the method's module (check_decision; head_step and tail_step where split)
        self.method, self.module, self.model, self.split, self.options = method, module, model, split, options
        self.cuda_graphs: bool | None = None  # known at the first step, from the inputs' device
        self._step: Callable[..., tuple[Tensor, Any]] | None = None

    def __call__(self, state: Any, inputs: Inputs, decision: Any = None) -> tuple[Tensor, Any]:
        # a wrong decision is a clear TypeError here, not dynamo's "Observed exception" from inside the trace
        self.module.check_decision(decision)
        if self._step is None:
            self._step = self._build(inputs)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out, new = self._step(state, inputs, decision)
        return out, (out_of_cuda_graph_pool(new, state) if self.cuda_graphs else new)

    def _build(self, inputs: Inputs) -> Callable[..., tuple[Tensor, Any]]:
        options = dict(self.options)
        self.cuda_graphs = _asks_for_cuda_graphs(options)
        device = next((x.device for x in tree_leaves(dict(inputs)) if isinstance(x, Tensor)), None)
        if self.cuda_graphs and (device is None or device.type != "cuda"):
            options = _without_cuda_graphs(options)
            warnings.warn(f"compile_step: CUDA graphs need inputs on a CUDA device (got {device}); compiling "
                          f"with mode={options.get('mode')!r} instead", stacklevel=3)
            self.cuda_graphs = False
        method, model = self.method, self.model
        if not self.split:
            return torch.compile(lambda s, i, d: method.step(model, s, i, d), **options)
        config, module = method.config, self.module
        head = torch.compile(lambda s, i, d: module.head_step(config, model, s, i, d), **options)
        tail = torch.compile(lambda s, h, skip: module.tail_step(config, model, s, h, skip), **options)

        def split_step(state: Any, inputs: Inputs, decision: Any) -> tuple[Tensor, Any]:
            h = head(state, inputs, decision)
            return tail(state, h, False if forced_compute(decision) else bool(h.skip))  # the step's one host read

        return split_step


def compile_step(method: CacheMethod, model: CacheableModel, *, split: bool | None = None,
                 **compile_options: Any) -> CompiledStep:
    """`method.step` for `model`, compiled with `torch.compile(fullgraph=True, **compile_options)` (see the
    module's docstring). `split`: the split step of a data-dependent method (None: yes for FirstBlockCache,
    TeaCache and DBCache, the methods that have one)."""
    if not isinstance(method, CacheMethod):
        raise TypeError(f"method: expected a fastcache.make(config) result, got {type(method).__name__}")
    module = _methods()[type(method.config)][0]
    has_split = hasattr(module, "head_step")
    if split is None:
        split = has_split
    if not isinstance(split, bool):
        raise TypeError(f"split: expected True, False or None, got {split!r}")
    if split and not has_split:
        raise ValueError(f"split: only FirstBlockCache, TeaCache and DBCache have a split step (head_step, "
                         f"tail_step); got {type(method.config).__name__}: pass split=False or None")
    mode = compile_options.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise TypeError(f"mode: expected a torch.compile mode string, got {mode!r}")
    compile_options.setdefault("fullgraph", True)
    return CompiledStep(method, module, model, split, compile_options)


def _asks_for_cuda_graphs(options: dict[str, Any]) -> bool:
    return options.get("mode") in CUDA_GRAPHS_MODE or bool((options.get("options") or {}).get("triton.cudagraphs"))


def _without_cuda_graphs(options: dict[str, Any]) -> dict[str, Any]:
    """The same compile options, less CUDA graphs: max-autotune keeps its autotuning, reduce-overhead (which is
    CUDA graphs only) becomes the default mode."""
    options = dict(options)
    mode = CUDA_GRAPHS_MODE.get(options.pop("mode", None))
    if mode is not None:
        options["mode"] = mode
    if options.get("options"):
        options["options"] = {k: v for k, v in options["options"].items() if k != "triton.cudagraphs"}
    return options
