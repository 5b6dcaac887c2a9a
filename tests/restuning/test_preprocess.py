"""preprocess: resize, center crop and normalisation on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from restuning.preprocess import preprocess, preprocess_batch
from restuning.presets import PRESETS, DataConfig
from tests.fixtures.models import tiny_images

DINO = PRESETS["vit_small_patch14_dinov2"].data  # 224, crop 0.875, ImageNet mean/std
AUGREG = PRESETS["vit_small_patch16_224"].data  # 224, crop 0.9, mean/std 0.5


@pytest.mark.parametrize(
    ("config", "resized_wh", "top_left"),
    [
        # Shorter side 400 -> floor(224 / 0.875) = 256, longer 600 -> 384; crop at (16, 80).
        (DINO, (384, 256), (16, 80)),
        # timm floors: 224 / 0.9 = 248.9 -> 248 (not 249), longer side 372; crop at (12, 74).
        (AUGREG, (372, 248), (12, 74)),
    ],
)
def test_real_photo_matches_hand_computed_crop(
    config: DataConfig, resized_wh: tuple[int, int], top_left: tuple[int, int]
) -> None:
    photo = data.coffee()  # (400, 600, 3): shorter side is the height
    out = preprocess(Image.fromarray(photo), config)
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32
    resized = np.asarray(
        Image.fromarray(photo).resize(resized_wh, Image.Resampling.BICUBIC), dtype=np.float64
    )
    top, left = top_left
    crop = resized[top : top + 224, left : left + 224] / 255.0
    expected = (crop - np.array(config.mean)) / np.array(config.std)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_normalisation_statistics_of_a_real_photo() -> None:
    photo = data.astronaut()
    out = preprocess(Image.fromarray(photo), AUGREG)
    # mean/std 0.5 maps [0, 255] onto [-1, 1].
    assert out.min() >= -1.0
    assert out.max() <= 1.0
    assert out.min() < -0.9
    assert out.max() > 0.9
    # Channel order is RGB: the astronaut's suit and flag make red the brightest channel.
    means = out.mean(dim=(1, 2))
    assert means[0] > means[2]


def test_constant_colour_normalises_exactly() -> None:
    img = Image.new("RGB", (50, 40), (255, 128, 0))
    out = preprocess(img, DINO)
    for channel, value in enumerate((255, 128, 0)):
        want = (value / 255.0 - DINO.mean[channel]) / DINO.std[channel]
        torch.testing.assert_close(out[channel], torch.full((224, 224), want), atol=1e-5, rtol=0)


def test_crop_is_centred() -> None:
    # 96 x 48 (wide): left half black, right half white. vit_test_tiny: shorter side ->
    # floor(32 / 0.875) = 36, so 72 x 36, and the 32 x 32 crop is centred on the edge.
    pixels = np.zeros((48, 96, 3), dtype=np.uint8)
    pixels[:, 48:] = 255
    out = preprocess(Image.fromarray(pixels), PRESETS["vit_test_tiny"].data)
    row = out[0, 16]
    assert row.shape == (32,)
    assert torch.all(row[:14] == -1.0)
    assert torch.all(row[18:] == 1.0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_mode_becomes_three_channels(mode: str) -> None:
    img = Image.fromarray(data.chelsea()).convert(mode)
    out = preprocess(img, DINO)
    assert out.shape == (3, 224, 224)
    assert torch.isfinite(out).all()


def test_interpolation_is_honoured() -> None:
    img = Image.fromarray(data.rocket())
    bilinear = DataConfig(DINO.input_size, DINO.mean, DINO.std, "bilinear", DINO.crop_pct)
    assert not torch.allclose(preprocess(img, DINO), preprocess(img, bilinear))


def test_non_square_target() -> None:
    config = DataConfig((3, 32, 48), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    out = preprocess(Image.fromarray(data.coffee()), config)
    assert out.shape == (3, 32, 48)


def test_batch_equals_single_images() -> None:
    images = [Image.open(io.BytesIO(png)) for png in tiny_images(5, seed=2)]
    batch = preprocess_batch(images, AUGREG)
    assert batch.shape == (5, 3, 224, 224)
    for index, img in enumerate(images):
        torch.testing.assert_close(batch[index], preprocess(img, AUGREG), atol=0, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        preprocess_batch([], AUGREG)


def test_tiny_images_are_real_deterministic_pngs() -> None:
    first = tiny_images(4, seed=1)
    assert first == tiny_images(4, seed=1)
    assert first != tiny_images(4, seed=2)
    assert len(set(first)) == 4
    for png in first:
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG"
        assert 48 <= min(img.size) <= max(img.size) <= 64
        assert np.asarray(img).std() > 10  # a photo, not a flat fill


def test_data_config_validation() -> None:
    with pytest.raises(ValueError, match="crop_pct"):
        DataConfig((3, 224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=1.5)
    with pytest.raises(ValueError, match="std"):
        DataConfig((3, 224, 224), (0.5,) * 3, (0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="input_size"):
        DataConfig((1, 224, 224), (0.5,) * 3, (0.5,) * 3)
