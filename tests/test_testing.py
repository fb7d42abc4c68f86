"""fastcache.testing.CompileCounter counts graphs and torch.cond nodes (host syncs on a GPU) per compiled call."""

from __future__ import annotations

import pytest
import torch

from fastcache.testing import CompileCounter


def _nested(x: torch.Tensor) -> torch.Tensor:
    def outer_true(x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.mean() > 1, lambda y: y * 2, lambda y: y * 3, (x,))

    return torch.cond(x.sum() > 0, outer_true, lambda y: y - 1, (x,))


def test_counts_top_level_and_nested_conds_per_call() -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    plain = torch.compile(lambda x: x + 1, fullgraph=True, backend=counter)
    nested = torch.compile(_nested, fullgraph=True, backend=counter)
    x = torch.randn(8)
    plain(x)
    torch.testing.assert_close(nested(x), _nested(x))
    nested(-x.abs())
    assert counter.conds_per_graph == [0, 2]
    assert counter.conds_per_call == [0, 2, 2]
    assert counter.graphs == 2 and counter.max_conds_per_call == 2


def test_rejects_an_unknown_inner_backend() -> None:
    with pytest.raises(ValueError, match="inner"):
        CompileCounter("cudagraphs")
