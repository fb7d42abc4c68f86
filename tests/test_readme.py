"""The README's functional tour runs as written (it compiles with fullgraph=True)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch._dynamo.utils import counters


def test_readme_tour_runs() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    torch._dynamo.reset()
    counters.clear()
    scope: dict = {}
    exec(compile(tour, "README.md", "exec"), scope)
    assert str(scope["plan"]).startswith("spatial: CCC")
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == scope["plan"].variants() == 2
    assert 0.5 < scope["method"].computed_fraction(scope["model"], scope["cfg_inputs"](
        scope["x"], 0.0, scope["labels"], 10), scope["plan"], scope["state"]) < 1.0
