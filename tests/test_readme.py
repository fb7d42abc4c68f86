"""The README's functional tour runs as written (it compiles with fullgraph=True)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_readme_tour_runs(dynamo) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    scope: dict = {}
    exec(compile(tour, "README.md", "exec"), scope)
    assert str(scope["plan"]).startswith("spatial: CCC")
    assert dynamo.graph_breaks == 0
    assert dynamo.graphs == scope["plan"].variants() == 2
    assert 0.5 < scope["method"].computed_fraction(scope["model"], scope["cfg_inputs"](
        scope["x"], 0.0, scope["labels"], 10), scope["plan"], scope["state"]) < 1.0


SWAPS = {
    "fastercache": 'fastcache.FasterCacheConfig(tensor_format="BCHW")',
    "fbc": "fastcache.FirstBlockCacheConfig(threshold=0.1)",
}


@pytest.mark.parametrize("name", SWAPS)
def test_readme_tour_runs_with_the_other_configs_swapped_in(name: str, dynamo) -> None:
    """"Swap the config ...: the loop stays the same." Only the config line changes (and the backend, to
    aot_eager: capture is what is checked here, inductor is the first tour's)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    pab = "fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)"
    assert pab in tour and "fullgraph=True)" in tour
    tour = tour.replace(pab, SWAPS[name]).replace("fullgraph=True)", 'fullgraph=True, backend="aot_eager")')
    scope: dict = {}
    exec(compile(tour, "README.md", "exec"), scope)
    assert dynamo.graph_breaks == 0
    graphs, variants = dynamo.graphs, scope["plan"].variants()
    assert graphs == (1 if name == "fbc" else variants), (graphs, variants)
    fraction = scope["method"].computed_fraction(scope["model"], scope["cfg_inputs"](
        scope["x"], 0.0, scope["labels"], 10), scope["plan"], scope["state"])
    assert 0.0 < fraction < 1.0  # it cached something


def test_readme_compile_step_line_runs_in_the_tour(dynamo) -> None:
    """The paragraph after the tour: its `compile_step` line in place of the tour's torch.compile line, with
    FirstBlockCache swapped in, runs the loop unchanged. On this CPU it warns that CUDA graphs need a CUDA device
    and compiles without them, as a split step: no graph break, a head and a tail per decision value."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    line = re.search(r'`(step = fastcache\.compile_step\(method, model, mode="reduce-overhead"\))`', readme)
    assert line is not None, "the README no longer shows the compile_step line"
    compile_line = "step = torch.compile(lambda s, i, d: method.step(model, s, i, d), fullgraph=True)"
    pab = "fastcache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)"
    assert compile_line in tour and pab in tour
    tour = tour.replace(pab, SWAPS["fbc"]).replace(compile_line, line.group(1)[:-1] + ', backend="aot_eager")')
    scope: dict = {}
    with pytest.warns(UserWarning, match="CUDA graphs need inputs on a CUDA device"):
        exec(compile(tour, "README.md", "exec"), scope)
    assert scope["step"].split and dynamo.graph_breaks == 0
    assert 2 <= dynamo.graphs <= 3
    assert 0 < int(scope["state"].num_computed) < len(scope["timesteps"])  # it skipped some steps


def test_readme_families_table_is_the_one_the_tests_check() -> None:
    """The families x methods table in the README is generated from fastcache's coverage and the tests' oracles
    (tests/_families.py): regenerate it with `readme_table()` when either changes."""
    pytest.importorskip("diffusers")
    from tests._families import readme_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = re.search(r"<!-- families table: begin -->\n(.*?)<!-- families table: end -->", readme, re.S)
    assert table is not None, "the README has no families table"
    assert table.group(1) == readme_table(), "regenerate the README's families table: " + readme_table()
