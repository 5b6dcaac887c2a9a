"""preprocess: resize, center crop and normalisation on real photos; the crop-only resample
against timm's resize-then-crop; the fast mode against the exact one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from restuning.preprocess import (
    crop_box,
    crop_pixels,
    preprocess,
    preprocess_batch,
    resized_size,
)
from restuning.presets import PRESETS, DataConfig, Interpolation
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
    # Only the crop is resampled: the same filter windows, so at most one grey level of float
    # rounding on a rare pixel.
    diff = np.abs(out.permute(1, 2, 0).numpy() - expected)
    grey_level = 1.0 / (255.0 * min(config.std))
    assert diff.max() <= grey_level + 1e-5
    assert (diff > 1e-5).mean() < 1e-3


def reference_crop(img: Image.Image, config: DataConfig) -> np.ndarray:  # (H, W, 3) uint8
    """timm's eval transform on a PIL image: resize the whole image, then center-crop."""
    rgb = img.convert("RGB")
    new_w, new_h = resized_size(rgb.width, rgb.height, config)
    filt = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    resized = rgb.resize((new_w, new_h), filt[config.interpolation])
    _, out_h, out_w = config.input_size
    left, top = round((new_w - out_w) / 2.0), round((new_h - out_h) / 2.0)
    return np.asarray(resized.crop((left, top, left + out_w, top + out_h)), dtype=np.int16)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crop_only_resize_equals_resize_then_crop(interpolation: Interpolation) -> None:
    rng = np.random.default_rng(7)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for trial in range(12):
        # Shrinks and enlargements, square and non-square targets, odd sizes and aspects.
        width, height = (int(v) for v in rng.integers(20, 700, size=2))
        out_h, out_w = (224, 224) if trial % 3 else (int(rng.integers(16, 64)),) * 2
        if trial % 4 == 3:
            out_w = out_h + 8
        crop_pct = float(rng.choice([0.875, 0.9, 0.95, 1.0]))
        config = DataConfig((3, out_h, out_w), DINO.mean, DINO.std, interpolation, crop_pct)
        img = Image.fromarray(photos[trial % 4]).resize((width, height))
        want = reference_crop(img, config)
        got = crop_pixels(img, config).astype(np.int16)
        diff = np.abs(got - want)
        # Float rounding of the window's start flips a rare fixed-point weight: a grey level,
        # two where an enlargement's overshoot amplifies it, on well under 1% of the values.
        assert diff.max() <= 2, (trial, img.size, config)
        assert (diff > 0).mean() < 1e-2, (trial, img.size, config)


def test_crop_box_maps_the_resized_crop_to_source_coordinates() -> None:
    # coffee 600 x 400 -> 384 x 256 for DINO; the crop starts at (80, 16) resized pixels,
    # one resized pixel being 600 / 384 = 400 / 256 = 1.5625 source pixels.
    assert crop_box(600, 400, DINO) == (125.0, 25.0, 475.0, 375.0)
    # A 100000 x 1 strip: the crop is under one source pixel wide, in the middle.
    left, top, right, bottom = crop_box(100_000, 1, DINO)
    assert 49_999 < left < right < 50_001
    assert right - left == pytest.approx(224 / 256)
    assert (top, bottom) == (16 / 256, 240 / 256)


def _jpeg(photo: np.ndarray, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_fast_mode_decodes_a_jpeg_at_a_reduced_scale_close_to_exact() -> None:
    data_ = _jpeg(data.astronaut(), (2000, 1500))
    exact = crop_pixels(Image.open(io.BytesIO(data_)), DINO, "exact").astype(np.int16)
    opened = Image.open(io.BytesIO(data_))
    fast = crop_pixels(opened, DINO, "fast").astype(np.int16)
    # The largest 1/2^k scale that still covers the 341 x 256 resize: 1/4.
    assert opened.size == (500, 375)
    diff = np.abs(exact - fast)
    assert 0 < diff.mean() < 1.5  # grey levels
    assert diff.max() <= 32


def test_fast_mode_of_a_decoded_image_only_averages_large_shrinks() -> None:
    photo = Image.fromarray(data.astronaut())  # 512 x 512: a 2x shrink, under the gap of 3
    assert np.array_equal(crop_pixels(photo, DINO, "fast"), crop_pixels(photo, DINO, "exact"))
    big = photo.resize((2048, 2048))  # an 8x shrink: blocks of 2 are averaged first
    diff = np.abs(
        crop_pixels(big, DINO, "fast").astype(np.int16)
        - crop_pixels(big, DINO, "exact").astype(np.int16)
    )
    assert 0 < diff.mean() < 1.0
    assert diff.max() <= 8
    with pytest.raises(ValueError, match="preprocess mode"):
        crop_pixels(photo, DINO, "quick")  # type: ignore[arg-type]


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
