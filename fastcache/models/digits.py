"""The embedded digit models: data, sampling and the shipped weights.

Everything here runs offline. The data are scikit-learn's bundled `load_digits` (1,797 8x8 digits), scaled to
[-1, 1] and upsampled to 16x16; video clips are the same digits moving along a seeded affine path. The trained
weights live in `fastcache/assets/` (trained by `python -m fastcache.models.train {classifier,image,video}`).

Example:
    >>> from fastcache.models import digits
    >>> model = digits.load_pretrained("image")
    >>> noise = digits.initial_noise(model, seeds=[0, 1])
    >>> x0 = digits.euler_sample(digits.uncached_denoiser(model), noise, torch.tensor([3, 7]), steps=30)
    >>> digits.classify(digits.load_classifier(), x0)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcache.models.dit import DiT, DiTConfig, cfg_inputs, sampling_timesteps

Kind = Literal["image", "video"]
KINDS: tuple[Kind, ...] = ("image", "video")
SIZE = 16
NUM_CLASSES = 10
DEFAULT_GUIDANCE = 3.0

# Motion of the video clips (and the classifier's augmentation, so that it reads moved digits too):
# a shift of up to 2 px and a rotation of up to 12 degrees at each end of the clip, interpolated in between.
MAX_SHIFT_PX = 2.0
MAX_ROTATION_DEG = 12.0


# -- data ----------------------------------------------------------------------------------------------------
def load_digit_images(size: int = SIZE) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, size, size) float32 in [-1, 1] and their labels (N,) int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    images = torch.from_numpy(data.images).float()[:, None] / 8.0 - 1.0  # pixel values are 0..16
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), torch.from_numpy(data.target).long()


def _affine(images: Tensor, shift_px: Tensor, angle_rad: Tensor) -> Tensor:
    """Rotate and shift (N, C, H, W) images in [-1, 1]; the uncovered background is -1 (no ink)."""
    n, _, h, w = images.shape
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    theta = torch.stack([torch.stack([cos, -sin, -shift_px[:, 0] * 2 / w], -1),
                         torch.stack([sin, cos, -shift_px[:, 1] * 2 / h], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros: sample (x + 1) so that the padding lands on the background value -1
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def _random_ends(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    shift = (torch.rand(n, 2, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PX  # (N, end, xy)
    angle = (torch.rand(n, 2, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    return shift, angle


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """One random pose per image from the range the video clips move through."""
    shift, angle = _random_ends(images.shape[0], generator)
    return _affine(images, shift[:, 0], angle[:, 0])


def make_clips(images: Tensor, num_frames: int, generator: torch.Generator) -> Tensor:
    """Clips (N, C, F, H, W) of each digit moving from one random pose to another (linear path)."""
    n, c, h, w = images.shape
    shift, angle = _random_ends(n, generator)
    a = torch.linspace(0.0, 1.0, num_frames)[None, :]  # (1, F)
    shifts = shift[:, None, 0] + a[..., None] * (shift[:, None, 1] - shift[:, None, 0])  # (N, F, 2)
    angles = angle[:, :1] + a * (angle[:, 1:] - angle[:, :1])  # (N, F)
    frames = images[:, None].expand(n, num_frames, c, h, w).reshape(n * num_frames, c, h, w)
    moved = _affine(frames, shifts.reshape(-1, 2), angles.reshape(-1))
    return moved.view(n, num_frames, c, h, w).transpose(1, 2).contiguous()


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed train/test split of the digits (the classifier reports accuracy on the held-out part)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


# -- classifier ----------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """A tiny MLP on 16x16 images in [-1, 1]; it judges the class of generated digits."""

    def __init__(self, size: int = SIZE, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(),
                                 nn.Linear(hidden, NUM_CLASSES))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


@torch.no_grad()
def classify(classifier: nn.Module, samples: Tensor) -> Tensor:
    """Predicted class per sample: images (B, 1, H, W), or videos (B, 1, F, H, W) by mean frame logits."""
    samples = samples.float().cpu().clamp(-1.0, 1.0)
    if samples.dim() == 5:
        b, c, f, h, w = samples.shape
        logits = classifier(samples.transpose(1, 2).reshape(b * f, c, h, w)).view(b, f, -1).mean(1)
    else:
        logits = classifier(samples)
    return logits.argmax(-1)


# -- sampling ------------------------------------------------------------------------------------------------
Denoiser = Callable[[int, dict[str, Tensor]], Tensor]


def sample_labels(num_samples: int, device: torch.device | str = "cpu") -> Tensor:
    """The class of sample i is i mod 10, so that a few samples cover every digit."""
    return torch.arange(num_samples, device=device) % NUM_CLASSES


def initial_noise(model: DiT, seeds: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Starting noise with one generator per seed: sample i depends only on seeds[i], whatever the batch."""
    cfg = model.cfg
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if cfg.num_frames > 1:
        shape = (1, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(noise).to(device)


def uncached_denoiser(model: DiT) -> Denoiser:
    def denoise(i: int, inputs: dict[str, Tensor]) -> Tensor:
        del i
        return model(inputs["x"], inputs["timestep"], inputs["label"])

    return denoise


@torch.no_grad()
def euler_sample(denoise: Denoiser, noise: Tensor, labels: Tensor, steps: int,
                 guidance: float = DEFAULT_GUIDANCE, null_label: int = NUM_CLASSES,
                 callback: Callable[[int], None] | None = None) -> Tensor:
    """Rectified-flow Euler sampling with batched classifier-free guidance.

    Args:
        denoise: `denoise(step_index, inputs)` -> the model output for the batched [uncond; cond] inputs.
        noise: the starting noise x_1000, (B, C, H, W) or (B, C, F, H, W).
        labels: (B,) class labels.
        steps: number of Euler steps from t=1000 to t=0.
        guidance: the CFG scale g in `v = v_uncond + g (v_cond - v_uncond)`.
        callback: called with the step index after each step (progress bars).

    Returns:
        The final samples x_0, same shape as `noise`.
    """
    timesteps = sampling_timesteps(steps, device=noise.device)
    x = noise
    for i in range(steps):
        t = timesteps[i]
        t_next = timesteps[i + 1] if i + 1 < steps else torch.zeros_like(t)
        out = denoise(i, cfg_inputs(x, t, labels, null_label))
        uncond, cond = out.chunk(2)
        velocity = uncond + guidance * (cond - uncond)
        x = x + (t_next - t) / 1000.0 * velocity
        if callback is not None:
            callback(i)
    return x


# -- shipped weights -----------------------------------------------------------------------------------------
def assets_dir() -> Path:
    return Path(str(resources.files("fastcache.assets")))


def asset_paths(name: str, directory: Path | None = None) -> tuple[Path, Path]:
    directory = assets_dir() if directory is None else Path(directory)
    return directory / f"digits_{name}.safetensors", directory / f"digits_{name}.json"


def read_meta(name: str, directory: Path | None = None) -> dict[str, Any]:
    """The json beside a weights file: the DiTConfig (models) and the training facts."""
    return json.loads(asset_paths(name, directory)[1].read_text())


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path}: missing embedded weights; train them with "
                                f"`python -m fastcache.models.train {path.stem.removeprefix('digits_')}`")
    # stored in float16 to keep the package small; computed in float32
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_pretrained(kind: Kind = "image", device: torch.device | str = "cpu",
                    directory: Path | None = None) -> DiT:
    """The trained digit DiT (eval mode, float32): "image" (B,1,16,16) or "video" (B,1,F,16,16) BCFHW."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    weights, _ = asset_paths(kind, directory)
    meta = read_meta(kind, directory)
    model = DiT(DiTConfig(**meta["config"]))
    model.load_state_dict(_load_tensors(weights))
    return model.to(device).eval().requires_grad_(False)


def load_classifier(directory: Path | None = None) -> DigitClassifier:
    """The digit classifier (eval mode, CPU) used for class accuracy of generated samples."""
    weights, _ = asset_paths("classifier", directory)
    meta = read_meta("classifier", directory)
    model = DigitClassifier(**meta["config"])
    model.load_state_dict(_load_tensors(weights))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def sample_accuracy(model: DiT, classifier: nn.Module, num_samples: int = 100, steps: int = 30,
                    guidance: float = DEFAULT_GUIDANCE, seed: int = 0, batch_size: int = 50) -> float:
    """Class accuracy of uncached CFG samples (labels i mod 10, seeds seed + i) under the classifier."""
    correct = 0
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        labels = sample_labels(num_samples)[idx]
        noise = initial_noise(model, [seed + i for i in idx])
        x0 = euler_sample(uncached_denoiser(model), noise, labels, steps, guidance)
        correct += int((classify(classifier, x0) == labels).sum())
    return correct / num_samples
