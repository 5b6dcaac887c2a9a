"""Dynamic int8 quantization of an exported backbone (ONNX Runtime, CPU).

MatMul weights become per-channel int8 constants; activations are quantized on the fly per
batch (``DynamicQuantizeLinear`` + ``MatMulInteger``). No calibration data is needed. The speed
comes from the CPU's int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI); without them
ONNX Runtime's u8 x s8 kernels can saturate, so weights are then quantized to 7 bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from restuning.onnx_export import META_INT8, read_metadata, set_metadata, write_atomically

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul",)
"""Linear layers export as MatMul (+ Add); attention's activation x activation MatMuls have
no constant weight and are left in float (``MatMulConstBOnly``)."""
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")


class _QuantizerChatter(logging.Filter):
    """Drops the quantizer's per-tensor notes, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_quantizer = f"onnxruntime{os.sep}quantization" in record.pathname
        return not (from_quantizer and record.levelno <= logging.WARNING)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # A filter on the root logger sees only records logged on root itself, which is exactly
    # how the quantizer logs; records of other loggers propagate past it untouched.
    root = logging.getLogger()
    chatter = _QuantizerChatter()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


@cache
def cpu_has_vnni(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU advertises int8 dot-product instructions (Linux ``/proc/cpuinfo``)."""
    try:
        flags = cpuinfo.read_text(errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in VNNI_FLAGS)


def quantize_backbone_onnx(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, reduce_range: bool | None = None
) -> Path:
    """Write a dynamically int8-quantized copy of the ONNX backbone ``src`` at ``dst``.

    ``reduce_range`` (7-bit weights) defaults to on only for CPUs without VNNI. The
    ``restune.*`` metadata of ``src`` is kept, with ``restune.int8`` set to ``1``. ``dst``
    appears atomically.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    vnni = cpu_has_vnni()
    if reduce_range is None:
        reduce_range = not vnni
    if not vnni:
        log.warning(
            "this CPU has no AVX-512 VNNI / AVX-VNNI: int8 matmuls may be no faster than "
            "float32 here; quantizing with 7-bit weights (reduce_range) to avoid saturation"
        )
    source = Path(src)
    metadata = {k: v for k, v in read_metadata(source).items() if k.startswith("restune.")}
    metadata[META_INT8] = "1"

    def produce(tmp: Path) -> None:
        quantize_dynamic(
            source,
            tmp,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        set_metadata(tmp, metadata)

    with _quiet_quantizer():
        target = write_atomically(Path(dst), produce)
    log.info(
        "quantized %s to int8 (per-channel MatMul weights%s) at %s in %.1f s",
        source.name,
        ", 7-bit" if reduce_range else "",
        target,
        time.perf_counter() - started,
    )
    return target
