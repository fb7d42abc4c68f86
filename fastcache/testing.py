"""Count what a compiled call costs on the host: graphs, graph breaks and `torch.cond` nodes.

On CUDA, inductor runs every `torch.cond` as `if pred.item():` (a device-to-host sync) and refuses to
CUDA-graph a graph that holds one, so the number of cond nodes a compiled call executes is the number of
host syncs it makes. `CompileCounter` is a dynamo backend that records, for every graph dynamo captures,
how many cond nodes it holds (nested ones included), and for every call of a compiled graph, that count:

    counter = CompileCounter()                       # or CompileCounter("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ...                                              # run the loop
    counter.graphs, counter.conds_per_call, counter.max_conds_per_call

It works on CPU: the structure of the graph, not a GPU, decides the syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

COND = torch.ops.higher_order.cond


def count_conds(gm: fx.GraphModule) -> int:
    """`torch.cond` nodes in `gm`, counting those inside cond branches (subgraph modules) too."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is COND:
            total += 1
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            total += count_conds(child)
    return total


class CompileCounter:
    """A dynamo backend that counts graphs and `torch.cond` nodes, then hands each graph to `inner`.

    Args:
        inner: "eager" (run the captured graph as is: capture only, fast), "aot_eager", or "inductor".
    """

    def __init__(self, inner: str = "eager") -> None:
        if inner not in ("eager", "aot_eager", "inductor"):
            raise ValueError(f"inner: one of 'eager', 'aot_eager', 'inductor', got {inner!r}")
        self.inner = inner
        self.conds_per_graph: list[int] = []
        self.conds_per_call: list[int] = []

    @property
    def graphs(self) -> int:
        return len(self.conds_per_graph)

    @property
    def max_conds_per_call(self) -> int:
        return max(self.conds_per_call, default=0)

    @property
    def calls(self) -> int:
        return len(self.conds_per_call)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        conds = count_conds(gm)
        self.conds_per_graph.append(conds)
        compiled = self._compile(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.conds_per_call.append(conds)
            return compiled(*args)

        return run

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if self.inner == "eager":
            return gm.forward
        if self.inner == "aot_eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._functorch.aot_autograd import make_boxed_func

            return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
