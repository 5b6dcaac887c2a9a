"""Decoding untrusted image bytes: limits before allocation, memory bounded by the declared
size and the model's input, every failure names the image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from restuning.preprocess import PreprocessMode, preprocess
from restuning.presets import PRESETS
from server.engine.decode import MAX_JPEG_SCANS, decode_image, input_digest, prepare_image
from server.errors import ApiError
from tests.fixtures.memory import peak_rss_growth
from tests.fixtures.models import tiny_image
from tests.reliability.bad_images import jpeg_scan_bomb, tiled_tiff

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def failure(data: bytes, index: int = 3, **limits: int) -> ApiError:
    with pytest.raises(ApiError) as err:
        decode_image(data, index, **{**LIMITS, **limits})
    return err.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    img = tiny_image(0, size=(40, 30))
    out = decode_image(encode(img, fmt), 0, **LIMITS)
    assert out.mode == "RGB"
    assert out.size == (40, 30)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    # 20000 x 20000 declared in ~100 bytes: decoding it would allocate 1.2 GB.
    err = failure(png_declaring(20_000, 20_000))
    assert err.code == "image_too_large"
    assert err.status == 413
    assert err.extra == {"image": 3}


def test_pixel_limit_is_checked_before_decoding() -> None:
    # Under PIL's own bomb threshold: only our limit stands in the way, and it must act
    # before load() (the IDAT holds far fewer bytes than 3000 x 3000 would need).
    err = failure(png_declaring(3000, 3000), max_pixels=1_000_000)
    assert err.code == "image_too_large"
    assert "3000x3000" in err.detail


def test_byte_limit_is_checked_before_parsing() -> None:
    data = encode(tiny_image(1), "PNG")
    err = failure(data, max_bytes=len(data) - 1)
    assert err.code == "image_too_large"
    assert str(len(data)) in err.detail


def test_zero_bytes() -> None:
    err = failure(b"")
    assert (err.code, err.status, err.extra) == ("bad_image", 422, {"image": 3})
    assert "empty" in err.detail


def test_truncated_file() -> None:
    data = encode(tiny_image(2, size=(64, 64)), "PNG")
    err = failure(data[: len(data) // 2], index=1)
    assert err.code == "bad_image"
    assert err.extra == {"image": 1}
    assert "image 1" in err.detail


@pytest.mark.parametrize(
    "data",
    [
        b"definitely not an image",
        encode(tiny_image(0, size=(16, 16)), "ICO"),  # a real image, but not an allowed format
        b"%PDF-1.4\n",
    ],
)
def test_wrong_format(data: bytes) -> None:
    err = failure(data)
    assert err.code == "bad_image"
    assert "supported" in err.detail


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue(), 0, **LIMITS)
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG"), 0, **LIMITS))
    assert out.shape == (64, 64, 3)
    # Clipping would saturate everything above 255 (most of the ramp) to white.
    assert (out == 255).mean() < 0.01
    assert out[-1, -1, 0] > 240


DINO = PRESETS["vit_small_patch14_dinov2"].data  # 224 x 224 input
INPUT_BYTES = 3 * 224 * 224  # the crop in RGB uint8
MiB = 1 << 20
UNBOUNDED = {"max_bytes": 1 << 26, "max_pixels": 1 << 26, "max_aspect_ratio": 1e7}


def test_input_digest_depends_on_the_backbone_input_not_the_encoding() -> None:
    img = tiny_image(4)
    png = prepare_image(encode(img, "PNG"), 0, DINO, **LIMITS)
    webp = prepare_image(encode(img, "WEBP", lossless=True), 0, DINO, **LIMITS)
    other = prepare_image(encode(tiny_image(5), "PNG"), 0, DINO, **LIMITS)
    assert input_digest(png) == input_digest(webp)
    assert input_digest(png) != input_digest(other)
    # The key is the tensor the backbone sees: the same pixels sent preprocessed share it.
    assert input_digest(png) == input_digest(preprocess(img, DINO).clone())
    assert input_digest(png) != input_digest(png[:, :, :223].contiguous())


def test_prepare_image_equals_decode_then_preprocess() -> None:
    for fmt in ("PNG", "JPEG", "GIF"):
        data = encode(tiny_image(6, size=(90, 70)), fmt)
        want = preprocess(decode_image(data, 0, **LIMITS), DINO)
        torch.testing.assert_close(prepare_image(data, 0, DINO, **LIMITS), want, rtol=0, atol=0)


def strip_png(width: int, height: int) -> bytes:
    """A real PNG of a black ``width`` x ``height`` strip (a few hundred bytes)."""
    return encode(Image.new("RGB", (width, height)), "PNG")


@pytest.mark.parametrize(("width", "height"), [(100_000, 1), (3000, 1), (1, 3000), (2001, 100)])
def test_extreme_aspect_ratios_are_refused_from_the_header(width: int, height: int) -> None:
    data = strip_png(width, height)
    assert len(data) < 1000
    with peak_rss_growth() as peak, pytest.raises(ApiError) as err:
        prepare_image(data, 2, DINO, max_bytes=1 << 20, max_pixels=40_000_000)
    assert (err.value.code, err.value.status, err.value.extra) == (
        "image_aspect_ratio",
        422,
        {"image": 2},
    )
    assert f"{width}x{height}" in err.value.detail
    assert "the limit is 20" in err.value.detail
    assert peak.bytes < 8 * MiB


def test_the_aspect_limit_is_a_setting() -> None:
    data = strip_png(300, 10)  # 30:1
    with pytest.raises(ApiError):
        decode_image(data, 0, **LIMITS)
    assert decode_image(data, 0, **LIMITS, max_aspect_ratio=30).size == (300, 10)
    assert prepare_image(data, 0, DINO, **LIMITS, max_aspect_ratio=30).shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_strip_past_the_limit_resamples_only_the_crop(mode: PreprocessMode) -> None:
    # Resizing the whole 100000 x 1 strip to a 256-pixel short side first would allocate
    # 25.6M x 256 RGB pixels (~26 GB in PIL); the crop alone is 224 x 224.
    data = strip_png(100_000, 1)
    with peak_rss_growth() as peak:
        pixels = prepare_image(data, 0, DINO, **UNBOUNDED, mode=mode)
    assert pixels.shape == (3, 224, 224)
    assert torch.isfinite(pixels).all()
    assert peak.bytes < 16 * MiB


def test_tiff_tiles_larger_than_the_image_needs_are_refused() -> None:
    # 16 x 16 pixels declared, one 8192 x 8192 tile: libtiff would allocate and inflate 64 MB.
    data = tiled_tiff(16, 16, 8192)
    assert len(data) < 100_000
    with peak_rss_growth() as peak, pytest.raises(ApiError) as err:
        prepare_image(data, 1, DINO, **LIMITS)
    assert (err.value.code, err.value.extra) == ("image_too_large", {"image": 1})
    assert "8192x8192 TIFF tiles" in err.value.detail
    assert peak.bytes < 8 * MiB
    # A thumbnail in one ordinary 256 x 256 tile decodes.
    pixels = prepare_image(tiled_tiff(200, 120, 256), 0, DINO, **LIMITS)
    assert pixels.shape == (3, 224, 224)


def test_jpegs_with_more_scans_than_encoders_write_are_refused() -> None:
    ordinary = encode(tiny_image(2, size=(64, 64)), "JPEG", quality=90, progressive=True)
    assert 1 < ordinary.count(b"\xff\xda") <= 16
    assert prepare_image(ordinary, 0, DINO, **LIMITS).shape == (3, 224, 224)
    assert prepare_image(jpeg_scan_bomb(MAX_JPEG_SCANS), 0, DINO, **LIMITS).shape == (3, 224, 224)
    with pytest.raises(ApiError) as err:
        prepare_image(jpeg_scan_bomb(MAX_JPEG_SCANS + 1), 4, DINO, **LIMITS)
    assert (err.value.code, err.value.extra) == ("image_too_large", {"image": 4})
    assert f"{MAX_JPEG_SCANS + 1} JPEG scans" in err.value.detail


def _photo(width: int, height: int, seed: int) -> Image.Image:
    return tiny_image(seed, seed=seed, size=(width, height))


def _encode_case(kind: str, width: int, height: int, seed: int) -> bytes:
    """A real file of one format/mode combination the server accepts."""
    img = _photo(width, height, seed)
    if kind == "png-rgba":
        return encode(img.convert("RGBA"), "PNG")
    if kind == "png-palette":
        return encode(img.convert("P"), "PNG")
    if kind == "png-la":
        return encode(img.convert("LA"), "PNG")
    if kind == "png-16bit":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        return encode(Image.fromarray(grey), "PNG")
    if kind == "gif-animated":
        frames = [img.convert("P"), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
        return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    if kind == "tiff-pages":
        return encode(img, "TIFF", compression="tiff_deflate", save_all=True, append_images=[img])
    if kind == "tiff-float":
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 7.0
        return encode(Image.fromarray(grey, mode="F"), "TIFF")
    if kind == "jpeg-progressive":
        return encode(img, "JPEG", quality=90, progressive=True)
    if kind == "jpeg-cmyk":
        return encode(img.convert("CMYK"), "JPEG", quality=90)
    if kind == "jpeg-grey":
        return encode(img.convert("L"), "JPEG", quality=90)
    if kind == "mpo":
        return encode(img, "MPO", save_all=True, append_images=[img])
    fmt = {"png": "PNG", "webp": "WEBP", "bmp": "BMP", "jpeg": "JPEG"}[kind]
    return encode(img, fmt)


CASES = (
    "png",
    "png-rgba",
    "png-palette",
    "png-la",
    "png-16bit",
    "gif-animated",
    "tiff-pages",
    "tiff-float",
    "webp",
    "bmp",
    "jpeg",
    "jpeg-progressive",
    "jpeg-cmyk",
    "jpeg-grey",
    "mpo",
)


@st.composite
def _sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Sizes from 1 x 1 to 0.6 MP, aspect ratios up to 3000:1 either way."""
    long = draw(st.integers(1, 3000))
    short = draw(st.integers(1, max(1, min(long, 600_000 // long))))
    return (long, short) if draw(st.booleans()) else (short, long)


def _check_peak(kind: str, width: int, height: int, mode: PreprocessMode, seed: int) -> None:
    data = _encode_case(kind, width, height, seed)
    with peak_rss_growth() as peak:
        pixels = prepare_image(data, 0, DINO, **UNBOUNDED, mode=mode)
    assert pixels.shape == (3, 224, 224)
    assert torch.isfinite(pixels).all()
    bound = 24 * width * height + 64 * INPUT_BYTES + 16 * MiB
    assert peak.bytes <= bound, (kind, (width, height), mode, peak.bytes, bound)


@pytest.mark.parametrize("kind", CASES)
def test_every_format_prepares_a_strip_in_bounded_memory(kind: str) -> None:
    """Each format and mode once, as a 1200 x 3 strip (resized whole: 200 MB) and 1 x 1."""
    _check_peak(kind, 1200, 3, "exact", seed=1)
    _check_peak(kind, 1, 1, "fast", seed=2)


@pytest.mark.slow
@settings(
    max_examples=24,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, unshrunk
)
@given(
    kind=st.sampled_from(CASES),
    size=_sizes(),
    mode=st.sampled_from(("exact", "fast")),
    seed=st.integers(0, 5),
)
def test_peak_memory_is_bounded_by_the_declared_size_and_the_input(
    kind: str, size: tuple[int, int], mode: PreprocessMode, seed: int
) -> None:
    """Peak RSS of decode + preprocess <= 24 bytes per declared pixel (the decoded image in
    PIL, the decoder's buffers, one RGB copy of the crop window) + a multiple of the model
    input + a constant, whatever the format, mode or aspect ratio. Resizing the whole image
    first would break it for strips: a 3000 x 1 image resized to a 256-pixel short side is
    0.8 GB."""
    _check_peak(kind, *size, mode, seed)
