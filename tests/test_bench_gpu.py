"""bench/bench_gpu.py's CPU smoke mode: it runs end to end and writes both sections' rows (about 45 s)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_writes_both_sections(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    units = ("flux-small-fbc,flux-small-fbc@uncached-regional+fastcache-regional,flux-small-mag,"
             "wan-small-sea@uncached-compiled+diffusers-compiled+fastcache-compiled,engine,engine-ro")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--device", "cpu",
                           "--units", units, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [u["unit"] for u in result["units"]] == units.split(",")
    assert all(u["status"] == "done" for u in result["units"]), result["units"]
    rows = {r["provider"]: r for r in result["dropin"] if r["method"] == "fbc"}
    assert set(rows) == {"uncached-compiled", "uncached-reduce-overhead", "diffusers-compiled",
                         "fastcache-compiled", "fastcache-reduce-overhead", "uncached-regional", "fastcache-regional"}
    for name in ("uncached-compiled", "diffusers-compiled", "fastcache-compiled"):
        assert rows[name]["ms_per_step"] > 0 and "error" not in rows[name], rows[name]
    assert rows["fastcache-reduce-overhead"]["error"] == "n/a on cpu"
    fastcache = rows["fastcache-compiled"]
    assert fastcache["conds_per_call"] >= 1  # FBC decides on the device
    assert 0 < fastcache["computed"] <= 1
    assert fastcache["graph_breaks"] == 0 and rows["uncached-compiled"]["graphs"] == 1
    # regional compilation: the same decisions, read on the host around blocks compiled alone
    regional = rows["fastcache-regional"]
    assert "error" not in regional and regional["ms_per_step"] > 0 and regional["graph_breaks"] == 0, regional
    assert regional["computed"] == fastcache["computed"] and regional["speedup_vs_uncached"] > 0

    mag = {r["provider"]: r for r in result["dropin"] if r["method"] == "mag"}
    assert mag["fastcache-compiled"]["conds_per_call"] == 0  # planned on the host
    assert 0 < mag["fastcache-compiled"]["computed"] < 1 and mag["fastcache-compiled"]["graph_breaks"] == 0
    assert "error" not in mag["diffusers-compiled"], mag["diffusers-compiled"]

    sea = {r["provider"]: r for r in result["dropin"] if r["method"] == "sea"}
    assert set(sea) == {"uncached-compiled", "diffusers-compiled", "fastcache-compiled"}
    assert all("error" not in r and r["ms_per_step"] > 0 for r in sea.values()), sea
    assert sea["fastcache-compiled"]["conds_per_call"] == 1  # decided on the device, once per call
    assert 0 < sea["fastcache-compiled"]["computed"] <= 1 and sea["fastcache-compiled"]["graph_breaks"] == 0
    assert sea["fastcache-compiled"]["max_diff_vs_diffusers"] < 1e-4  # the same decisions as diffusers' hook

    engine = {(r["mode"], r["setting"]): r for r in result["engine"]}
    assert len(engine) == 10
    default = [r for (mode, _), r in engine.items() if mode == "default"]
    assert all(r["ms_per_generation"] > 0 and r["graph_breaks"] == 0 for r in default), default
    assert engine[("default", "uncached")]["speedup_vs_uncached"] == 1.0
    split, one_cond = engine[("default", "FBC threshold 0.2, split step")], engine[("default", "FBC threshold 0.2")]
    assert split["fraction"] == one_cond["fraction"]  # the same decisions, taken on the host or in a torch.cond
    assert all(r["error"] == "n/a on cpu" for (mode, _), r in engine.items() if mode == "reduce-overhead")

    md = (tmp_path / "gpu_bench.md").read_text()
    for heading in ("# fastcache GPU benchmark", "## A. Drop-in", "## B. Engine", "## Units"):
        assert heading in md
    assert "| flux | small | fbc | fastcache-compiled |" in md
    assert "| default | FBC threshold 0.2, split step |" in md
