"""`fastcache calibrate`: measure a method's model-dependent constants on the embedded digit models.

MagCache needs each model's residual magnitude ratios (`mag_ratios`): one uncached run with
`MagCacheConfig(calibrate=True)` records them per step. TeaCache needs its rescaling polynomial
(`coefficients`): fitted from uncached runs, output change against modulated-input change
(`fastcache.methods.teacache.calibrate`, which takes any model with `modulated_input`). The embedded models ship
both (`fastcache/assets/digits_<model>_<method>.json`); this command measures them again.

    fastcache calibrate --model image --method mag            # rewrites the shipped file
    fastcache calibrate --model video --method mag --out ratios.json --steps 50
    fastcache calibrate --model image --method teacache
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastcache.models import digits
from fastcache.models.dit import cfg_inputs, sampling_timesteps

METHODS = ("mag", "teacache")
DEFAULT_STEPS = 30
DEFAULT_SEEDS = tuple(range(16))


def calibration_path(kind: str, method: str = "mag", directory: Path | None = None) -> Path:
    return (digits.assets_dir() if directory is None else Path(directory)) / f"digits_{kind}_{method}.json"


def mag_ratios_path(kind: str, directory: Path | None = None) -> Path:
    return calibration_path(kind, "mag", directory)


RESULT_KEYS = {"mag": "mag_ratios", "teacache": "coefficients"}  # what each method's calibration writes


def _load_shipped(kind: str, method: str, directory: Path | None) -> list[float]:
    path = calibration_path(kind, method, directory)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {RESULT_KEYS[method]}; run "
                                f"`fastcache calibrate --model {kind} --method {method}`")
    return json.loads(path.read_text())[RESULT_KEYS[method]]


def load_teacache_coefficients(kind: str, directory: Path | None = None) -> list[float]:
    """The shipped TeaCache coefficients of an embedded digit model (highest degree first)."""
    return _load_shipped(kind, "teacache", directory)


def load_mag_ratios(kind: str, directory: Path | None = None) -> list[float]:
    """The shipped MagCache ratios of an embedded digit model (measured at `steps` Euler steps; MagCacheConfig
    resamples them to any other step count)."""
    return _load_shipped(kind, "mag", directory)


@torch.no_grad()
def calibrate_mag(kind: str, steps: int = DEFAULT_STEPS, seeds: Sequence[int] = DEFAULT_SEEDS,
                  guidance: float = digits.DEFAULT_GUIDANCE, device: torch.device | str = "cpu") -> dict[str, Any]:
    """One uncached CFG Euler run of the embedded model with MagCache calibrating: the ratios per step."""
    import fastcache
    from fastcache.methods import mag_cache

    model = digits.load_pretrained(kind, device=device)
    labels = digits.sample_labels(len(seeds), device=device)
    noise = digits.initial_noise(model, list(seeds), device=device)
    method = fastcache.make(fastcache.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    timesteps = sampling_timesteps(steps, device=device)
    plan = method.plan(timesteps)
    state = method.init(model, cfg_inputs(noise, timesteps[0], labels, digits.NUM_CLASSES))

    def denoise(i: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal state
        out, state = method.step(model, state, inputs, plan[i])
        return out

    digits.euler_sample(denoise, noise, labels, steps, guidance)
    _, values = mag_cache.calibrated_ratios(state)
    return {"model": kind, "method": "mag", "steps": steps, "seeds": list(seeds), "guidance": guidance,
            "torch": torch.__version__, "mag_ratios": values}


@torch.no_grad()
def calibrate_teacache(kind: str, steps: int = DEFAULT_STEPS, seeds: Sequence[int] = DEFAULT_SEEDS,
                       guidance: float = digits.DEFAULT_GUIDANCE, device: torch.device | str = "cpu"
                       ) -> dict[str, Any]:
    """Uncached CFG Euler runs of the embedded model (the seeds in one batch): TeaCache's fitted coefficients."""
    from fastcache.methods import teacache

    model = digits.load_pretrained(kind, device=device)
    labels = digits.sample_labels(len(seeds), device=device)
    noise = digits.initial_noise(model, list(seeds), device=device)

    def generate(denoise: Any) -> None:
        digits.euler_sample(lambda i, inputs: denoise(inputs), noise, labels, steps, guidance)

    coefficients = teacache.calibrate(model, generate)
    return {"model": kind, "method": "teacache", "steps": steps, "seeds": list(seeds), "guidance": guidance,
            "torch": torch.__version__, "coefficients": list(coefficients)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcache calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=digits.KINDS, required=True, help="embedded digit model")
    parser.add_argument("--method", choices=METHODS, required=True,
                        help="mag: MagCache's mag_ratios; teacache: TeaCache's coefficients")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output json (default: the shipped file in fastcache/assets)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if not 2 <= args.steps <= 1000:
            parser.error(f"--steps: must be in [2, 1000], got {args.steps}")
    except SystemExit as exc:  # --help (0) or a bad argument (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    calibrate = calibrate_mag if args.method == "mag" else calibrate_teacache
    result = calibrate(args.model, args.steps)
    out = args.out or calibration_path(args.model, args.method)
    out.write_text(json.dumps(result, indent=1) + "\n")
    key = RESULT_KEYS[args.method]
    print(f"{key}={result[key]}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
