import pytest
import torch

from fastcache.models import digits
from fastcache.models.dit import DiT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return digits.load_classifier()


def test_data_range_and_shapes() -> None:
    images, labels = digits.load_digit_images()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1 and set(labels.tolist()) == set(range(10))
    clips = digits.make_clips(images[:3], 4, torch.Generator().manual_seed(0))
    again = digits.make_clips(images[:3], 4, torch.Generator().manual_seed(0))
    assert clips.shape == (3, 1, 4, 16, 16) and torch.equal(clips, again)  # seeded
    assert clips.min() >= -1 and clips.max() <= 1
    assert (clips[:, :, 0] - clips[:, :, -1]).abs().amax() > 0.1  # the digits move


@pytest.mark.parametrize("kind", digits.KINDS)
def test_pretrained_load(kind: str) -> None:
    model = digits.load_pretrained(kind)
    meta = digits.read_meta(kind)
    assert isinstance(model, DiT) and not model.training
    assert model.cfg.to_dict() == meta["config"] and model.cfg.depth >= 4
    assert 0.5e6 <= sum(p.numel() for p in model.parameters()) <= 2e6
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.cfg.temporal_attention == (kind == "video")
    with pytest.raises(ValueError):
        digits.load_pretrained("audio")  # type: ignore[arg-type]


def test_classifier_reads_real_digits(classifier: torch.nn.Module) -> None:
    images, labels = digits.load_digit_images()
    _, test_idx = digits.split_indices(len(images))
    assert (digits.classify(classifier, images[test_idx]) == labels[test_idx]).float().mean() > 0.95


def test_noise_depends_only_on_its_seed() -> None:
    model = digits.load_pretrained("image")
    both = digits.initial_noise(model, [2, 3])
    assert torch.equal(both[1:], digits.initial_noise(model, [3]))


def test_image_model_draws_recognisable_digits(classifier: torch.nn.Module) -> None:
    model = digits.load_pretrained("image")
    labels = digits.sample_labels(10)
    noise = digits.initial_noise(model, range(10))
    x0 = digits.euler_sample(digits.uncached_denoiser(model), noise, labels, steps=8)
    assert x0.shape == (10, 1, 16, 16)
    assert (digits.classify(classifier, x0) == labels).float().mean() >= 0.8


def test_video_model_draws_moving_digits(classifier: torch.nn.Module) -> None:
    model = digits.load_pretrained("video")
    labels = digits.sample_labels(5)
    noise = digits.initial_noise(model, range(5))
    x0 = digits.euler_sample(digits.uncached_denoiser(model), noise, labels, steps=6)
    assert x0.shape == (5, 1, model.cfg.num_frames, 16, 16)
    assert (digits.classify(classifier, x0) == labels).float().mean() >= 0.6
