import json
from pathlib import Path

import pytest
import torch

from fastcache import __main__ as cli
from fastcache import demo
from fastcache.models import digits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args", [
    ["--methods", "uncached,sea"],
    ["--fbc-thresholds", "0.1,1.5"],
    ["--fbc-thresholds", "-0.1"],
    ["--fbc-thresholds", "nan"],
    ["--fbc-thresholds", "abc"],
    ["--steps", "0"],
    ["--num-samples", "0"],
    ["--repeats", "0"],
    ["--model", "audio"],
    ["--device", "tpu"],
    ["--num-samples", "3", "--seeds", "1,2"],
])
def test_bad_input_fails_in_one_line_before_any_work(args: list[str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["demo", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastcache demo: error:"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_output_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("keep")
    for out in (a_file, a_file / "sub", full):
        assert demo.main(["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert (full / "old.txt").read_text() == "keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_help_and_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--steps", "--seeds", "--num-samples", "--device", "--model", "--out",
                 "--quick", "--no-compile", "--fbc-thresholds"):
        assert flag in text
    assert cli.main(["frobnicate"]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_end_to_end_quick_eager(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = cli.main(["demo", "--quick", "--no-compile", "--model", "both", "--steps", "3", "--num-samples", "2",
                   "--fbc-thresholds", "0.05,1.0", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for method in demo.METHODS:
        assert method in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples_image.png", "samples_video.png",
                                                     "speed_quality.png", "table.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no temporary folder left behind
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (kind, m) for kind in ("image", "video")
        for m in ("uncached", "pab", "fastercache", "fbc", "fbc", "mag", "taylorseer", "teacache", "dbcache")]
    assert all(r["error"] is None for r in rows)
    for r in rows:
        assert 0 < r["computed_fraction"] <= 1 and r["time_s"] > 0 and 0 <= r["class_accuracy"] <= 1
        assert r["nonfinite"] == 0  # the count the table reports as "NaN hits"
        if r["method"] == "uncached":
            assert r["psnr"] is None and r["max_abs_error"] == 0 and r["ssim"] == pytest.approx(1.0)
    for kind in ("image", "video"):  # every method really cached something, and it changed the samples
        # (dbcache's default threshold, sized for 30 steps, never caches at 3: tests/test_dbcache.py covers it)
        for method in ("pab", "fastercache", "fbc", "mag", "taylorseer", "teacache"):
            assert any(r["computed_fraction"] < 1 and r["max_abs_error"] > 0
                       for r in rows if (r["model"], r["method"]) == (kind, method)), (kind, method)
    assert rows[0]["graph_breaks"] is None  # eager: nothing compiled
    assert len(rows[9]["per_frame_psnr"]) == digits.read_meta("video")["config"]["num_frames"]
    assert report["machine"]["torch"] == torch.__version__


def test_one_compiled_run_has_no_graph_breaks() -> None:
    # the one compiled run of the suite: the plain forward (1 graph, kept by inductor's FX graph cache)
    model = digits.load_pretrained("image")
    labels = digits.sample_labels(1)
    noise = digits.initial_noise(model, [0])
    spec = demo.RunSpec("uncached", "-")
    compiled = demo.run_method(model, spec, noise, labels, steps=2, guidance=3.0, repeats=1, compile=True)
    eager = demo.run_method(model, spec, noise, labels, steps=2, guidance=3.0, repeats=1, compile=False)
    assert compiled.error is None, compiled.error
    assert compiled.graph_breaks == 0 and compiled.graphs == 1 and compiled.warmup_s > 0
    assert torch.allclose(compiled.samples, eager.samples, atol=1e-4)


def test_calibrate_writes_mag_ratios_and_the_shipped_ones_load(tmp_path: Path, capsys) -> None:
    from fastcache import calibrate

    out = tmp_path / "ratios.json"
    assert cli.main(["calibrate", "--model", "image", "--method", "mag", "--steps", "4", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["steps"] == 4 and len(written["mag_ratios"]) == 4 and written["mag_ratios"][0] == 1.0
    assert all(0.5 < r < 2.0 for r in written["mag_ratios"])
    assert "mag_ratios=" in capsys.readouterr().out
    for kind in ("image", "video"):  # shipped with the package, for the demo's MagCache rows
        shipped = calibrate.load_mag_ratios(kind)
        assert len(shipped) == json.loads(calibrate.mag_ratios_path(kind).read_text())["steps"] and shipped[0] == 1.0
    assert cli.main(["calibrate", "--model", "image", "--method", "tea"]) == 2
