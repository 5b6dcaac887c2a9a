"""A request's images decoded and preprocessed on the GPU: JPEGs in one nvJPEG batch.

At 10,000 images/s of backbone the host's decoders decide the end-to-end rate (GPU.md: PIL
885 JPEGs/s per core, torchvision's batched nvJPEG decode on the GPU 15,500/s). With
torchvision installed and a CUDA device, :class:`GpuImageDecoder` decodes every JPEG of a
request in one ``torchvision.io.decode_jpeg(..., device="cuda")`` call and resizes, crops and
normalises on the device; other formats (and any JPEG nvJPEG refuses) take the PIL path of
:mod:`server.engine.decode`. The server's limits apply first either way: every image's bytes,
format, declared pixels and aspect ratio are checked from its header (:func:`open_checked`)
before anything is decoded; the aspect-ratio limit is what bounds the whole-image resize here
(at most ``max_aspect_ratio`` x the resized short side squared).

The resize is torch's antialiased bicubic/bilinear, which follows PIL's filters but not to the
last bit: features differ from the PIL path by rounding (within the bf16 tolerance anyway).
The feature cache key of a GPU-decoded JPEG is the digest of its bytes (identical bytes,
identical pixels), in a namespace of its own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

from restuning.preprocess import PreprocessMode, resized_size
from restuning.presets import DataConfig
from server.engine.decode import input_digest, open_checked, prepare_image
from server.errors import ApiError
from server.settings import DEFAULT_MAX_ASPECT_RATIO, Settings

log = logging.getLogger(__name__)

GPU_FORMATS = frozenset({"JPEG", "MPO"})
"""Formats nvJPEG decodes (MPO: phone JPEGs with extra pictures; the first is decoded)."""
GPU_MODES = frozenset({"RGB", "L"})
"""JPEG colour modes sent to the GPU; CMYK and others take the PIL path."""

Prepared = tuple[torch.Tensor, str]
"""(pixels (3, H, W) float32 normalised, feature-cache digest) of one image."""


def gpu_decode_available(device: str | torch.device) -> bool:
    """Whether JPEGs can be decoded on ``device``: a CUDA device and torchvision present."""
    return (
        torch.device(device).type == "cuda" and importlib.util.find_spec("torchvision") is not None
    )


def jpeg_digest(data: bytes) -> str:
    """Feature-cache key of a JPEG decoded on the GPU (never equal to an input digest)."""
    return hashlib.sha256(b"jpeg-bytes:" + data).hexdigest()


def preprocess_on_device(image: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """Decoded RGB (3, h, w) uint8 on any device -> normalised (3, H, W) float32 there.

    The steps of :func:`restuning.preprocess.preprocess`: resize (shorter side, same size
    rule), center crop padded with black where the crop leaves the image, ``/255``, mean/std.
    """
    _, height, width = image.shape
    new_w, new_h = resized_size(int(width), int(height), data_config)
    x = image.unsqueeze(0).to(torch.float32)  # (1, 3, h, w)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(
            x,
            size=(new_h, new_w),
            mode=data_config.interpolation,
            antialias=True,
            align_corners=False,
        )
        x = x.round().clamp(0.0, 255.0)  # PIL hands back uint8 pixels
    _, out_h, out_w = data_config.input_size
    top = round((new_h - out_h) / 2.0)
    left = round((new_w - out_w) / 2.0)
    # Pad (black) where the crop window leaves the image, then cut it out.
    pad = (max(0, -left), max(0, left + out_w - new_w), max(0, -top), max(0, top + out_h - new_h))
    if any(pad):
        x = F.pad(x, pad)
        top, left = top + pad[2], left + pad[0]
    x = x[0, :, top : top + out_h, left : left + out_w]  # (3, H, W)
    mean = torch.tensor(data_config.mean, device=x.device).view(3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(data_config.std, device=x.device).view(3, 1, 1) * 255.0)
    return ((x - mean) * inv_std).contiguous()


class GpuImageDecoder:
    """Decodes a request's images: JPEGs batched on the GPU, the rest with PIL."""

    def __init__(
        self,
        data_config: DataConfig,
        device: str | torch.device,
        *,
        max_bytes: int,
        max_pixels: int,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        host_mode: PreprocessMode = "exact",
    ) -> None:
        """``host_mode``: the preprocessing of the images PIL decodes (not nvJPEG's)."""
        self.data_config = data_config
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.host_mode = host_mode

    def prepare(self, images: list[bytes]) -> list[Prepared]:
        """(pixels on the device, digest) per image, in order; the first bad image raises its
        ``ApiError`` (``bad_image`` / ``image_too_large`` with its index) before any decoding."""
        on_gpu: list[int] = []
        for index, data in enumerate(images):
            with open_checked(
                data,
                index,
                max_bytes=self.max_bytes,
                max_pixels=self.max_pixels,
                max_aspect_ratio=self.max_aspect_ratio,
            ) as img:
                if img.format in GPU_FORMATS and img.mode in GPU_MODES:
                    on_gpu.append(index)
        out: list[Prepared | None] = [None] * len(images)
        for index, prepared in zip(
            on_gpu, self._decode_jpegs([images[i] for i in on_gpu]), strict=True
        ):
            out[index] = prepared
        for index, data in enumerate(images):
            if out[index] is None:
                out[index] = self._decode_on_host(data, index)
        return [p for p in out if p is not None]

    def _decode_jpegs(self, jpegs: list[bytes]) -> list[Prepared | None]:
        """One batched nvJPEG decode; ``None`` for images it refused (PIL tries them next)."""
        if not jpegs:
            return []
        io = _torchvision_io()
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        try:
            decoded: list[torch.Tensor | None] = list(
                io.decode_jpeg(encoded, mode=io.ImageReadMode.RGB, device=self.device)
            )
        except RuntimeError:
            # One bad file fails the whole batch call: decode one by one to find it.
            decoded = [self._decode_one(io, e) for e in encoded]
        out: list[Prepared | None] = []
        for data, image in zip(jpegs, decoded, strict=True):
            if image is None:
                out.append(None)
                continue
            out.append((preprocess_on_device(image, self.data_config), jpeg_digest(data)))
        return out

    def _decode_one(self, io: Any, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            image: torch.Tensor = io.decode_jpeg(
                encoded, mode=io.ImageReadMode.RGB, device=self.device
            )
            return image
        except RuntimeError as exc:
            log.info("nvJPEG refused an image (%s); decoding it with PIL", exc)
            return None

    def _decode_on_host(self, data: bytes, index: int) -> Prepared:
        pixels = prepare_image(
            data,
            index,
            self.data_config,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            mode=self.host_mode,
        )  # (3, H, W)
        return pixels.to(self.device, non_blocking=True), input_digest(pixels)


def _torchvision_io() -> Any:
    """``torchvision.io``, imported on first use (torchvision is optional)."""
    try:
        import torchvision.io as io  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # gpu_decode_available() said otherwise: a broken install
        raise ApiError("internal", f"torchvision is not importable: {exc}") from exc
    return io


def build_gpu_decoder(settings: Settings, data_config: DataConfig) -> GpuImageDecoder | None:
    """A GPU decoder for a torch runtime on CUDA with torchvision present, else ``None``."""
    if settings.runtime != "torch" or not gpu_decode_available(settings.device):
        return None
    return GpuImageDecoder(
        data_config,
        settings.device,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_aspect_ratio=settings.max_image_aspect_ratio,
        host_mode=settings.preprocess,
    )
