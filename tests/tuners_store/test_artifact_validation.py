"""Artifact validation: every error code, from real packed artifacts and hand-corrupted bytes."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile
from typing import Any

import hypothesis
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from tests.tuners_store.artifact_factory import (
    ARCH,
    FINGERPRINT,
    bf16_artifact,
    bf16_bits,
    join,
    make_artifact,
    pack_raw,
    split,
    tiny_config,
)
from tuners_store.artifact import (
    MAX_HEADER_BYTES,
    ArtifactError,
    artifact_metadata,
    pack_artifact,
    random_arrays,
    read_header,
    validate_artifact,
)
from tuners_store.artifact import _sniff_format as sniff_format
from tuners_store.config import tensor_specs
from tuners_store.errors import StoreError


def expect(code: str, data: bytes, **kwargs: Any) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        validate_artifact(data, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


# -- valid artifacts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bypass": {"tuner": "res_prefix", "prefix_len": 3}},
        {"bypass": {"tuner": "res_prompt", "scale_mode": "channel"}},
        {"bypass": {"scale_mode": "scalar", "combine": "lerp", "lam": 0.3}},
        {"task": "embedding", "labels": [], "embedding_dim": 5, "pooling": "mean"},
        {"task": "regression", "labels": ["age"]},
    ],
    ids=["adapter", "prefix", "prompt-channel", "scalar-lerp", "embedding", "regression"],
)
def test_valid_artifact_round_trips_header(overrides: dict[str, Any]) -> None:
    config = tiny_config(**overrides)
    arrays = random_arrays(config, seed=3)
    data = pack_artifact(config, arrays)
    header = validate_artifact(data, expect_fingerprint=FINGERPRINT, expect_arch=ARCH)
    assert header.config == config
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert header.size == len(data)
    assert header.dtype == "F32"
    assert set(header.tensors) == set(tensor_specs(config))
    for name, array in arrays.items():
        assert header.tensors[name].shape == array.shape
        assert bytes(header.tensor_bytes(data, name)) == array.astype("<f4").tobytes()


def test_f16_and_bf16_artifacts_validate() -> None:
    assert validate_artifact(make_artifact(dtype=np.float16)).dtype == "F16"
    data, bits = bf16_artifact()
    header = validate_artifact(data)
    assert header.dtype == "BF16"
    assert bytes(header.tensor_bytes(data, "head.bias")) == bits["head.bias"].tobytes()


def test_packing_is_deterministic_and_safetensors_compatible() -> None:
    config = tiny_config()
    arrays = random_arrays(config, seed=5)
    data = pack_artifact(config, arrays)
    assert data == pack_artifact(config, dict(reversed(list(arrays.items()))))
    loaded = safetensors.numpy.load(data)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_artifacts_written_by_safetensors_validate() -> None:
    config = tiny_config()
    data = safetensors.numpy.save(random_arrays(config), metadata=artifact_metadata(config))
    assert validate_artifact(data).config == config


def test_artifact_error_is_a_store_error() -> None:
    err = expect("artifact_bad_format", b"nope")
    assert isinstance(err, StoreError)


def test_metadata_carries_format_and_config() -> None:
    config = tiny_config()
    meta = artifact_metadata(config)
    assert meta["restune.format"] == "1"
    assert json.loads(meta["restune.config"])["name"] == "cats"


# -- size and framing ----------------------------------------------------------------------


def test_too_large() -> None:
    data = make_artifact()
    err = expect("artifact_too_large", data, max_bytes=len(data) - 1)
    assert str(len(data)) in err.message
    validate_artifact(data, max_bytes=len(data))


def test_pickle_is_refused_with_a_hint() -> None:
    blob = pickle.dumps({"head.weight": [1.0, 2.0]}, protocol=4)
    assert "pickle" in expect("artifact_bad_format", blob).message


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408])
def test_a_header_length_that_reads_like_a_pickle_opcode_is_still_safetensors(
    header_len: int,
) -> None:
    """A header of 640 bytes starts the file with 0x80 0x02, a pickle's PROTO opcode; such a
    file is safetensors-shaped (JSON from offset 8) and must not be named a pickle."""
    header = b'{"__metadata__":{}}'.ljust(header_len)  # safetensors pads headers with spaces
    data = struct.pack("<Q", header_len) + header
    assert data[0] == 0x80
    assert data[1] in range(2, 6)
    sniff_format(data)  # no error: what the header holds is checked after this


def test_zip_is_refused_with_a_hint() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert "zip" in expect("artifact_bad_format", buf.getvalue()).message


@pytest.mark.parametrize(
    "blob",
    [b"", b"abc", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", struct.pack("<Q", 2) + b"[]"],
    ids=["empty", "tiny", "png", "json-array"],
)
def test_wrong_magic(blob: bytes) -> None:
    expect("artifact_bad_format", blob)


def test_huge_declared_header() -> None:
    blob = struct.pack("<Q", 2**62) + b'{"__metadata__": {}}'
    err = expect("artifact_header_too_large", blob)
    assert str(MAX_HEADER_BYTES) in err.message


def test_truncated_header() -> None:
    data = make_artifact()
    (n,) = struct.unpack("<Q", data[:8])
    expect("artifact_bad_format", data[: 8 + n // 2])


# -- header --------------------------------------------------------------------------------


def _with_header(mutate: Any, data: bytes | None = None) -> bytes:
    header, payload = split(data or make_artifact())
    mutate(header)
    return join(header, payload)


def test_header_not_json() -> None:
    data = make_artifact()
    (n,) = struct.unpack("<Q", data[:8])
    broken = data[:8] + b"{" + b"x" * (n - 1) + data[8 + n :]
    expect("artifact_bad_header", broken)


def test_duplicate_header_keys() -> None:
    header, payload = split(make_artifact())
    raw = json.dumps(header)
    # A second "head.bias" entry, identical: readers would still disagree on which one counts.
    entry = json.dumps(header["head.bias"])
    dup = raw[:-1] + f', "head.bias": {entry}}}'
    blob = dup.encode() + b" " * (-len(dup) % 8)
    assert (
        "twice"
        in expect("artifact_bad_header", struct.pack("<Q", len(blob)) + blob + payload).message
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda h: h.pop("__metadata__"), "not a restune artifact"),
        (lambda h: h["__metadata__"].pop("restune.format"), "restune.format"),
        (lambda h: h["__metadata__"].update({"restune.format": "2"}), "'2'"),
        (lambda h: h["__metadata__"].pop("restune.config"), "restune.config"),
        (lambda h: h["__metadata__"].update({"x": 1}), "strings"),
        (lambda h: h["head.bias"].pop("dtype"), "head.bias"),
        (lambda h: h["head.bias"].update({"shape": [-3]}), "head.bias"),
    ],
    ids=[
        "no-metadata",
        "no-format",
        "future-format",
        "no-config",
        "non-string",
        "no-dtype",
        "negative-shape",
    ],
)
def test_bad_header(mutate: Any, needle: str) -> None:
    assert needle in expect("artifact_bad_header", _with_header(mutate)).message


def _raw_edit(old: str, new: str, data: bytes | None = None) -> bytes:
    """The header's JSON text with ``old`` replaced by ``new`` once (what a JSON writer would
    not produce: 5000-digit integers, NaN, lone surrogate escapes)."""
    header, payload = split(data or make_artifact())
    text = json.dumps(header)
    assert old in text, old
    raw = text.replace(old, new, 1).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _extra_tensors(count: int) -> Any:
    def mutate(h: dict[str, Any]) -> None:
        for i in range(count):
            h[f"extra.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}

    return mutate


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        # Each would cost seconds or raise something else than ArtifactError without its bound.
        (
            lambda: _with_header(lambda h: h["head.bias"].update({"shape": [10**18] * 40_000})),
            "at most 4 dimensions",
        ),
        (
            lambda: _with_header(lambda h: h["head.bias"].update({"shape": [2**40]})),
            "every dimension",
        ),
        (
            lambda: _with_header(lambda h: h["head.weight"].update({"shape": [2**24, 2**24]})),
            "more values than the file",
        ),
        (
            lambda: _raw_edit('"data_offsets": [0,', '"data_offsets": [' + "9" * 5000 + ","),
            "5000-digit",
        ),
        (
            lambda: _raw_edit('"data_offsets": [0,', '"data_offsets": [-' + "9" * 30 + ","),
            "31-digit",
        ),
        (lambda: _raw_edit('"data_offsets": [0,', '"data_offsets": [NaN,'), "NaN"),
        (lambda: _raw_edit('"data_offsets": [0,', '"data_offsets": [-Infinity,'), "Infinity"),
        (lambda: _raw_edit('"head.bias"', '"head.bias\\ud800"'), "valid Unicode"),
        (
            lambda: _raw_edit('"restune.format"', '"\\udc00": "1", "restune.format"'),
            "valid Unicode",
        ),
        (
            lambda: _raw_edit('"restune.format": "1"', '"restune.format": "1\\ud83d"'),
            "valid Unicode",
        ),
        (
            lambda: _with_header(
                lambda h: h["__metadata__"].update({f"k{i}": "v" for i in range(63)})
            ),
            "65 entries; at most 64",
        ),
        (lambda: _with_header(_extra_tensors(4097)), "at most 4096"),
        (lambda: _with_header(lambda h: h.update({"x" * 257: h.pop("head.bias")})), "characters"),
        (
            lambda: _with_header(lambda h: h["head.bias"].update({"shape": [[[3]]]})),
            "every dimension",
        ),
        (
            lambda: _raw_edit(
                '"__metadata__": {',
                '"deep": ' + "[" * 50_000 + "]" * 50_000 + ', "__metadata__": {',
            ),
            "nested too deeply",
        ),
    ],
    ids=[
        "40000-dims",
        "huge-dim",
        "product-past-file",
        "5000-digit-offset",
        "31-digit-negative",
        "nan-constant",
        "infinity-constant",
        "lone-surrogate-tensor-name",
        "lone-surrogate-metadata-key",
        "lone-surrogate-metadata-value",
        "65-metadata-entries",
        "4097-tensors-past-the-contract",
        "257-char-tensor-name",
        "nested-shape",
        "50000-deep",
    ],
)
def test_header_bounds(data: Any, needle: str) -> None:
    err = expect("artifact_bad_header", data())
    assert needle in err.message, err.message
    err.message.encode("utf-8")  # every message can be written back (no lone surrogate)


def test_a_lone_surrogate_in_the_config_is_a_bad_config() -> None:
    # Escaped once more: the config is a JSON string inside the header's JSON.
    data = _raw_edit('\\"labels\\":[\\"cat', '\\"labels\\":[\\"\\\\udfff')
    expect("artifact_bad_config", data)


@pytest.mark.parametrize(
    ("path", "raw", "needle"),
    [
        (("bypass", "scale"), "NaN", "finite"),
        (("bypass", "scale"), "1e38", "less than or equal to 1000"),
        (("bypass", "scale"), "-1e4", "greater than or equal to -1000"),
        (("bypass", "lam"), "Infinity", "finite"),
        (("training", "val_score"), "NaN", "finite"),
        (("training", "extra"), '{"loss": 1e300}', "within"),
        (("training", "extra"), json.dumps({f"m{i}": 1.0 for i in range(65)}), "at most 64"),
        (("training", "epochs"), "-1", "greater than or equal to 0"),
        (("created_at",), json.dumps("x" * 65), "at most 64"),
    ],
)
def test_config_numbers_are_finite_and_bounded(
    path: tuple[str, ...], raw: str, needle: str
) -> None:
    def mutate(h: dict[str, Any]) -> None:
        doc = json.loads(h["__metadata__"]["restune.config"])
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = "__raw__"
        h["__metadata__"]["restune.config"] = json.dumps(doc).replace('"__raw__"', raw)

    err = expect("artifact_bad_config", _with_header(mutate))
    assert needle in err.message, err.message


def _refusal(data: bytes) -> ArtifactError | None:
    """The validator's refusal of ``data``, or None if it passed; anything else propagates
    (and fails the test)."""
    try:
        validate_artifact(data)
    except ArtifactError as exc:
        return exc
    return None


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    target=st.sampled_from(
        ["__metadata__", "head.bias", "head.weight", "bypass.lateral.1.w1", "new"]
    ),
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=_JSON,
)
def test_generated_headers_raise_only_artifact_errors(
    target: str, field: str | None, value: Any
) -> None:
    header, payload = split(make_artifact())
    if field is None or target not in header or target == "__metadata__":
        header[target] = value
    else:
        header[target][field] = value
    err = _refusal(join(header, payload))
    if err is not None:
        assert err.code.startswith("artifact_"), err.code
        err.message.encode("utf-8")  # writable back as UTF-8 (no lone surrogate)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=4000))
def test_generated_bytes_raise_only_artifact_errors(data: bytes, cut: int) -> None:
    valid = make_artifact()
    for blob in (data, valid[:cut] + data, struct.pack("<Q", len(data)) + data):
        err = _refusal(blob)
        if err is not None:
            err.message.encode("utf-8")


def test_bad_config_summarises_pydantic_errors() -> None:
    def mutate(h: dict[str, Any]) -> None:
        doc = json.loads(h["__metadata__"]["restune.config"])
        doc["labels"] = ["cat", "cat", "fox"]
        doc["bypass"]["bottleneck"] = -1
        h["__metadata__"]["restune.config"] = json.dumps(doc)

    err = expect("artifact_bad_config", _with_header(mutate))
    assert "bypass.bottleneck" in err.message
    assert "labels" in err.message


def test_config_not_json() -> None:
    data = _with_header(lambda h: h["__metadata__"].update({"restune.config": "{nope"}))
    expect("artifact_bad_config", data)


# -- tensors -------------------------------------------------------------------------------


def _arrays(**changes: Any) -> dict[str, np.ndarray[Any, Any]]:
    arrays = random_arrays(tiny_config())
    for name, value in changes.items():
        if value is None:
            arrays.pop(name.replace("__", "."))
        else:
            arrays[name.replace("__", ".")] = value
    return arrays


def test_missing_tensor() -> None:
    data = pack_artifact(tiny_config(), _arrays(head__bias=None))
    assert "head.bias" in expect("artifact_missing_tensor", data).message


def test_unexpected_tensor() -> None:
    data = pack_artifact(tiny_config(), _arrays(extra__w=np.zeros(3, np.float32)))
    assert "extra.w" in expect("artifact_unexpected_tensor", data).message


def test_wrong_shape_names_tensor_and_both_shapes() -> None:
    data = pack_artifact(tiny_config(), _arrays(head__weight=np.zeros((8, 3), np.float32)))
    err = expect("artifact_bad_shape", data)
    assert "'head.weight'" in err.message
    assert "[8, 3]" in err.message
    assert "[3, 8]" in err.message


@pytest.mark.parametrize(("dtype", "name"), [(np.float64, "F64"), (np.int32, "I32")])
def test_disallowed_dtype(dtype: Any, name: str) -> None:
    config = tiny_config()
    arrays = {k: v.astype(dtype) for k, v in random_arrays(config).items()}
    assert name in expect("artifact_bad_dtype", pack_raw(config, arrays, name)).message
    with pytest.raises(ValueError, match="float32 or float16"):
        pack_artifact(config, arrays)


def test_mixed_dtypes() -> None:
    data = pack_artifact(tiny_config(), _arrays(head__bias=np.zeros(3, np.float16)))
    assert "F16" in expect("artifact_bad_dtype", data).message


# -- offsets -------------------------------------------------------------------------------


def test_trailing_bytes() -> None:
    assert "trailing" in expect("artifact_bad_offsets", make_artifact() + b"\0" * 8).message


def test_overlapping_offsets() -> None:
    header, payload = split(make_artifact())
    names = sorted(
        (n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0]
    )
    b = names[1]
    # The second tensor claims to start 4 bytes inside the first one.
    b_begin, b_end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [b_begin - 4, b_end - 4]
    assert "overlaps" in expect("artifact_bad_offsets", join(header, payload)).message


def test_gap_between_tensors() -> None:
    header, payload = split(make_artifact())
    first = min(
        (n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0]
    )
    header[first]["data_offsets"] = [4, header[first]["data_offsets"][1] + 4]
    # A gap (and a tensor running past the end) are both offset errors.
    expect("artifact_bad_offsets", join(header, payload))


def test_offsets_out_of_range() -> None:
    header, payload = split(make_artifact())
    last = max(
        (n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1]
    )
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 8, end + 8]
    assert "ends at byte" in expect("artifact_bad_offsets", join(header, payload)).message


def test_offsets_span_wrong_size() -> None:
    header, payload = split(make_artifact())
    header["head.bias"]["data_offsets"][1] -= 4
    assert "head.bias" in expect("artifact_bad_offsets", join(header, payload)).message


# -- values --------------------------------------------------------------------------------


def test_nan_in_f32() -> None:
    bias = np.zeros(3, np.float32)
    bias[1] = np.nan
    err = expect("artifact_non_finite", pack_artifact(tiny_config(), _arrays(head__bias=bias)))
    assert "'head.bias'" in err.message
    assert "index 1" in err.message


def test_inf_in_f16() -> None:
    config = tiny_config()
    arrays = random_arrays(config, dtype=np.float16)
    arrays["head.weight"][2, 5] = np.float16("-inf")
    expect("artifact_non_finite", pack_artifact(config, arrays))


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_in_bf16(value: float) -> None:
    config = tiny_config()
    bits = {k: bf16_bits(v) for k, v in random_arrays(config).items()}
    w1 = "bypass.vertical.2.w1"
    bits[w1].reshape(-1)[7] = bf16_bits(np.array([value], np.float32))[0]
    err = expect("artifact_non_finite", pack_raw(config, bits, "BF16"))
    assert w1 in err.message
    assert "index 7" in err.message


def test_largest_finite_bf16_is_out_of_range_not_non_finite() -> None:
    config = tiny_config()
    bits = {k: bf16_bits(v) for k, v in random_arrays(config).items()}
    bits["head.bias"][0] = 0x7F7F  # bf16 max: every exponent bit but one
    err = expect("artifact_value_out_of_range", pack_raw(config, bits, "BF16"))
    assert "head.bias" in err.message


@pytest.mark.parametrize(
    ("dtype", "below", "at"),
    [
        # Largest value below 2**20 and 2**20 itself, as raw bits (biased exponent 127 + 20).
        ("F32", 0x497F_FFFF, 0x4980_0000),
        ("BF16", 0x497F, 0x4980),
    ],
)
def test_value_bound_is_exact(dtype: str, below: int, at: int) -> None:
    config = tiny_config()
    dt = np.uint32 if dtype == "F32" else np.uint16
    bits = {
        k: (v.view(np.uint32) if dtype == "F32" else bf16_bits(v)).astype(dt)
        for k, v in random_arrays(config).items()
    }
    bits["head.bias"][0] = below
    bits["head.bias"][1] = 0x8000_0000 | below if dtype == "F32" else 0x8000 | below
    validate_artifact(pack_raw(config, bits, dtype))
    bits["head.bias"][2] = at
    err = expect("artifact_value_out_of_range", pack_raw(config, bits, dtype))
    assert "first at flat index 2" in err.message


# -- backbone ------------------------------------------------------------------------------


def test_foreign_fingerprint_names_both_backbones() -> None:
    data = make_artifact()
    err = expect(
        "backbone_mismatch",
        data,
        expect_fingerprint="fp-other-9999",
        expect_arch="vit_small_patch14_dinov2",
    )
    for needle in (FINGERPRINT, "fp-other-9999", ARCH, "vit_small_patch14_dinov2"):
        assert needle in err.message
    validate_artifact(data, expect_fingerprint=FINGERPRINT)


def test_read_header_skips_tensor_checks() -> None:
    data = pack_artifact(tiny_config(), _arrays(head__bias=None))
    assert "head.bias" not in read_header(data).tensors
