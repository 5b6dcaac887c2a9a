"""Typed results parsed from the API's JSON, and images encoded from what callers hold."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.images import content_type, encode_image
from clients.types import Prediction, PushResult, TunerInfo

PREDICT_BODY = {
    "results": [
        {
            "image": 0,
            "tasks": {
                "a": {
                    "version": 3,
                    "sha256": "ab" * 32,
                    "kind": "classification",
                    "labels": [{"label": "cat", "score": 0.93}, {"label": "dog", "score": 0.05}],
                },
                "r": {
                    "version": 1,
                    "sha256": "cd" * 32,
                    "kind": "regression",
                    "values": {"age": 31.2},
                },
                "e": {
                    "version": 1,
                    "sha256": "ef" * 32,
                    "kind": "embedding",
                    "embedding": [0.6, 0.8],
                },
                "b": {"error": {"code": "tuner_load_failed", "detail": "corrupt"}},
            },
        }
    ],
    "backbone": {"arch": "vit_test_tiny", "fingerprint": "f" * 16, "runtime": "torch"},
    "timing": {"queue_ms": 1.5, "total_ms": 4, "cache_hits": 0},
}


def test_prediction_parses_every_answer_kind() -> None:
    p = Prediction.from_json(PREDICT_BODY)
    assert len(p) == 1
    a = p[0]["a"]
    assert a.top == ("cat", 0.93)
    assert a.version == 3
    assert a.kind == "classification"
    assert p[0]["r"].values == {"age": 31.2}
    assert p[0]["e"].embedding == [0.6, 0.8]
    b = p[0]["b"]
    assert not b.ok
    assert b.error is not None
    assert b.error.code == "tuner_load_failed"
    assert p.backbone["arch"] == "vit_test_tiny"
    assert p.timing["total_ms"] == 4.0
    assert p.raw == PREDICT_BODY


def test_tuner_info_and_push_result() -> None:
    info = TunerInfo.from_json(
        {
            "name": "a",
            "version": 2,
            "sha256": "x",
            "kind": "multilabel",
            "labels": ["p", "q"],
            "params": 123,
            "bytes": 456,
            "loaded": True,
            "future_field": 1,
        }
    )
    assert (info.name, info.version, info.labels, info.loaded) == ("a", 2, ["p", "q"], True)
    assert info.config is None
    assert info.raw["future_field"] == 1
    push = PushResult.from_json({"name": "a", "version": 2, "sha256": "x"}, created=False)
    assert not push.created


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_encode_image_inputs(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data, media = encode_image(rgb)
    assert media == "image/png"
    np.testing.assert_array_equal(_png_pixels(data), rgb)
    gray, _ = encode_image(rgb[:, :, 0])
    np.testing.assert_array_equal(_png_pixels(gray), rgb[:, :, 0])
    single, _ = encode_image(rgb[:, :, :1])
    np.testing.assert_array_equal(_png_pixels(single), rgb[:, :, 0])
    pil_data, _ = encode_image(Image.fromarray(rgb))
    np.testing.assert_array_equal(_png_pixels(pil_data), rgb)

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg)
    assert encode_image(path) == (jpeg, "image/jpeg")
    assert encode_image(str(path)) == (jpeg, "image/jpeg")
    assert encode_image(bytearray(jpeg)) == (jpeg, "image/jpeg")


def test_encode_image_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported"):
        encode_image(12)


def test_content_type_sniffing() -> None:
    assert content_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert content_type(b"GIF89a...") == "image/gif"
    assert content_type(b"nothing") == "application/octet-stream"
