"""Train the embedded digit models and write them to `fastcache/assets/`.

    python -m fastcache.models.train classifier   # seconds; the judge of generated digits
    python -m fastcache.models.train image        # class-conditional DiT on 16x16 digits (~6-7 min, 2 cores)
    python -m fastcache.models.train video        # starts from the image weights, adds temporal attention

Training is seeded and runs a fixed number of steps (not a time budget), so a rerun on the same machine and
thread count gives the same weights. The objective is rectified flow: x_t = (1 - t/1000) x0 + (t/1000) noise,
the model predicts `noise - x0`, t drawn logit-normal on (0, 1000); 10% of labels are replaced by the null
label so that one model serves both halves of classifier-free guidance. Weights are an EMA of the training
weights, stored in float16 (half the bytes; the samples do not change visibly).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcache.models import digits
from fastcache.models.dit import DiT, DiTConfig


@dataclass(frozen=True)
class DiTRecipe:
    config: DiTConfig
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    init_from: str | None = None  # the video model starts from the trained image model
    eval_samples: int = 100


# Measured on 2 idle AMD EPYC cores: 0.33 s/step for the image recipe, 0.45 s/step for the video one (about
# 4 and 3 minutes); 3-5x that while other jobs share the cores.
RECIPES: dict[str, DiTRecipe] = {
    "image": DiTRecipe(DiTConfig(), steps=700, batch_size=96, lr=1e-3),
    "video": DiTRecipe(DiTConfig(num_frames=4, temporal_attention=True), steps=400, batch_size=24, lr=5e-4,
                       init_from="image", eval_samples=50),
}


def _facts(seed: int, threads: int, wall_s: float) -> dict[str, Any]:
    return {"seed": seed, "threads": threads, "wall_s": round(wall_s, 1), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine()}


def _save(name: str, out_dir: Path, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write weights then json, each under a temporary name first, so a crash never leaves a half file."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights, meta_path = digits.asset_paths(name, out_dir)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates owner-only files; package data should be readable by all
    os.replace(tmp, weights)
    _write_json(meta_path, meta)


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def _lr_at(step: int, recipe: DiTRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10%


# -- classifier ----------------------------------------------------------------------------------------------
def train_classifier(out_dir: Path, seed: int = 0, threads: int = 2, epochs: int = 60) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits.load_digit_images()
    train_idx, test_idx = digits.split_indices(len(images))
    model = digits.DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    x_train, y_train = images[train_idx], labels[train_idx]
    batch = 128
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(0, len(perm), batch):
            idx = perm[s:s + batch]
            x = x_train[idx]
            # half the batch in a random pose: generated video frames are moved digits
            moved = digits.augment(x, gen)
            keep = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(keep[:, None, None, None], x, moved)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    x_test, y_test = images[test_idx], labels[test_idx]
    with torch.no_grad():
        acc = float((model(x_test).argmax(-1) == y_test).float().mean())
        acc_moved = float((model(digits.augment(x_test, gen)).argmax(-1) == y_test).float().mean())
    meta = {"config": {"size": digits.SIZE, "hidden": 128},
            "training": {"epochs": epochs, "batch_size": batch, "train_size": len(train_idx),
                         **_facts(seed, threads, time.perf_counter() - start)},
            "eval": {"test_size": len(test_idx), "test_accuracy": round(acc, 4),
                     "test_accuracy_moved": round(acc_moved, 4)}}
    _save("classifier", out_dir, model.state_dict(), meta)
    return meta


# -- diffusion transformers ----------------------------------------------------------------------------------
def _batch(kind: str, images: Tensor, labels: Tensor, cfg: DiTConfig, size: int,
           gen: torch.Generator) -> tuple[Tensor, Tensor]:
    idx = torch.randint(len(images), (size,), generator=gen)
    x0 = images[idx]
    if kind == "video":
        x0 = digits.make_clips(x0, cfg.num_frames, gen)
    return x0, labels[idx]


def train_dit(kind: str, out_dir: Path, seed: int = 0, threads: int = 2, steps: int | None = None,
              log_every: int = 50) -> dict[str, Any]:
    recipe = RECIPES[kind]
    if steps is not None:
        recipe = DiTRecipe(**{**recipe.__dict__, "steps": steps})
    cfg = recipe.config
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = DiT(cfg)
    if recipe.init_from is not None:
        # Same blocks plus zero-gated temporal attention: the video model starts as the image model run per
        # frame and only has to learn the motion, which fits the time budget (from scratch it does not).
        base = digits.load_pretrained(recipe.init_from, directory=out_dir)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all("temporal" in k or k == "frame_embed" for k in missing), missing
    model.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    images, labels = digits.load_digit_images()
    null = cfg.num_classes
    print(f"[{kind}] {sum(p.numel() for p in model.parameters()):,} params, {recipe.steps} steps "
          f"x batch {recipe.batch_size}", flush=True)
    running = 0.0
    for step in range(recipe.steps):
        x0, y = _batch(kind, images, labels, cfg, recipe.batch_size, gen)
        b = x0.shape[0]
        y = torch.where(torch.rand(b, generator=gen) < recipe.label_dropout, torch.full_like(y, null), y)
        s = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal: most weight on mid-noise levels
        noise = torch.randn(x0.shape, generator=gen)
        sv = s.view(b, *([1] * (x0.dim() - 1)))
        xt = (1 - sv) * x0 + sv * noise
        loss = F.mse_loss(model(xt, s * 1000.0, y), noise - x0)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA tracks the weights
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            print(f"[{kind}] step {step + 1}/{recipe.steps} loss {running / log_every:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            running = 0.0
    train_s = time.perf_counter() - start
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            p.copy_(e)
    meta: dict[str, Any] = {
        "kind": kind, "config": cfg.to_dict(), "params": sum(p.numel() for p in model.parameters()),
        "training": {"data": "sklearn load_digits (1797), [-1,1], bilinear 8->16",
                     "motion": (f"affine path, shift <= {digits.MAX_SHIFT_PX} px, rotation <= "
                                f"{digits.MAX_ROTATION_DEG} deg at each end") if kind == "video" else None,
                     "objective": "rectified flow, v = noise - x0, t = 1000*sigmoid(N(0,1))",
                     "steps": recipe.steps, "batch_size": recipe.batch_size, "lr": recipe.lr,
                     "schedule": f"linear warm-up {recipe.warmup}, cosine to 10%", "optimizer": "AdamW",
                     "label_dropout": recipe.label_dropout, "ema_decay": recipe.ema_decay,
                     "init_from": recipe.init_from, "dtype_stored": "float16",
                     **_facts(seed, threads, train_s)},
    }
    _save(kind, out_dir, model.state_dict(), meta)
    if digits.asset_paths("classifier", out_dir)[0].exists():
        # judge the stored (float16-rounded) weights, exactly what load_pretrained gives
        t0 = time.perf_counter()
        trained = digits.load_pretrained(kind, directory=out_dir)
        acc = digits.sample_accuracy(trained, digits.load_classifier(out_dir), recipe.eval_samples, steps=30)
        meta["eval"] = {"num_samples": recipe.eval_samples, "sampler": "Euler", "steps": 30,
                        "guidance": digits.DEFAULT_GUIDANCE, "class_accuracy": round(acc, 4),
                        "eval_s": round(time.perf_counter() - t0, 1)}
        _write_json(digits.asset_paths(kind, out_dir)[1], meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcache.models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["classifier", "image", "video"])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: fastcache/assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (DiTs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = args.out if args.out is not None else digits.assets_dir()
    if args.kind == "classifier":
        meta = train_classifier(out_dir, args.seed, args.threads)
    else:
        meta = train_dit(args.kind, out_dir, args.seed, args.threads, args.steps)
    print(json.dumps({k: meta[k] for k in ("training", "eval") if k in meta}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
