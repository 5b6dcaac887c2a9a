"""What a CUDA graph capture would refuse, found by running a plan body on any device.

A capture records kernels; it cannot record the host. Inside a capture these fail or, worse,
bake one batch's values into every replay:

- an op whose tensor operands have different floating dtypes (CPU kernels promote; CUDA's
  LayerNorm, matmuls and baddbmm raise). Stricter than CUDA, which promotes in elementwise
  ops: a plan body computes in one dtype, and a silent promotion is a slow float32 path;
- a tensor made from host data (a Python list as an index, ``torch.tensor(...)``), which is a
  host-to-device copy;
- a read of device data on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``) and
  ops whose output size depends on the data (``nonzero``, ``unique``, boolean masks): host
  syncs;
- a tensor on another device than the plan's as an op's operand, or a factory asked for
  another device (``torch.zeros(n)`` without ``device=`` inside a CUDA plan, host pixels).

:class:`CaptureRecorder` is a dispatch mode (and a function mode for the host reads that never
reach the dispatcher on the CPU) that sees every op of a run and records each of these as a
:class:`Violation`. The CPU tests run every plan shape under it; on a GPU the plan runs its
last warm-up under it and refuses to capture a body that breaks a rule, so an illegal body is
a counted fallback instead of a failed capture. The recorder also keeps every tensor the run
read but did not make (weights, cached position embeddings): a captured graph reads them by
address at every replay, so the plan holding the recorder keeps them alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

T = TypeVar("T")

aten = torch.ops.aten

CAST_OPS = frozenset({"_to_copy", "copy_", "copy", "to", "_copy_from", "_copy_from_and_resize"})
"""Ops whose purpose is a dtype change: mixed dtypes are what they are for."""

HOST_DATA_OPS = {
    "lift_fresh": "a tensor made from host data (a Python list or number): a host copy",
    "lift_fresh_copy": "a tensor made from host data (a Python list or number): a host copy",
    "_local_scalar_dense": "a device value read on the host (.item(), bool(), int()): a sync",
}

SYNC_OPS = {
    name: "output size depends on the data: a host sync"
    for name in (
        "nonzero",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "masked_select",
        "repeat_interleave",
        "equal",
        "is_nonzero",
        "_assert_async",
    )
}

HOST_READ_METHODS = frozenset(
    {"tolist", "numpy", "item", "cpu", "__bool__", "__int__", "__float__", "__index__"}
)
"""Tensor methods that hand device data to the host (seen before the dispatcher, since on
the CPU some never dispatch an op)."""

BOOL_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


@dataclass(frozen=True)
class Violation:
    """One op a capture would refuse, and why."""

    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason}"


class CaptureIllegalError(RuntimeError):
    """A plan body does something a CUDA graph capture refuses (see the module doc)."""

    def __init__(self, violations: list[Violation]) -> None:
        shown = "; ".join(str(v) for v in dict.fromkeys(violations))
        super().__init__(f"not capturable: {shown}")
        self.violations = violations


def _tensors(tree: object) -> list[Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, Tensor)]


class _Dispatch(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, recorder: CaptureRecorder) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.recorder = recorder

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.recorder._check(func, args, kwargs)  # before the op: the CPU may refuse it too
        out = func(*args, **kwargs)
        self.recorder._record_outputs(out)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, recorder: CaptureRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS and args and isinstance(args[0], Tensor):
            self.recorder._flag(f"Tensor.{name}", "device data read on the host: a sync")
        return func(*args, **(kwargs or {}))


class CaptureRecorder:
    """Records what a run does that a capture on ``device`` would refuse (see module doc).

    Use :meth:`recording` around the run, then :attr:`violations`; :attr:`external` holds the
    tensors the run read but did not make.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.violations: list[Violation] = []
        self.ops = 0
        self.external: list[Tensor] = []
        self._made: set[int] = set()
        self._seen: set[int] = set()

    @contextmanager
    def recording(self) -> Iterator[CaptureRecorder]:
        """Every op run inside the block is checked and recorded."""
        with _Function(self), _Dispatch(self):
            yield self

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` under :meth:`recording`; :class:`CaptureIllegalError` on any violation."""
        with self.recording():
            out = fn()
        self.raise_if_any()
        return out

    def raise_if_any(self) -> None:
        """Raise :class:`CaptureIllegalError` when anything was recorded."""
        if self.violations:
            raise CaptureIllegalError(self.violations)

    def _flag(self, op: str, reason: str) -> None:
        self.violations.append(Violation(op, reason))

    def _check(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ops += 1
        name = func.overloadpacket.__name__
        op = str(func)
        inputs = _tensors((args, kwargs))
        if name in HOST_DATA_OPS:
            self._flag(op, HOST_DATA_OPS[name])
        if name in SYNC_OPS:
            self._flag(op, SYNC_OPS[name])
        if name in BOOL_INDEX_OPS and any(t.dtype == torch.bool for t in _tensors(args[1:2])):
            self._flag(op, "a boolean mask index: its size depends on the data, a host sync")
        devices = {t.device for t in inputs}
        wanted = kwargs.get("device")
        if isinstance(wanted, torch.device):
            devices.add(wanted)
        strays = sorted(str(d) for d in devices if not _same_device(d, self.device))
        if strays:
            self._flag(op, f"tensor on {', '.join(strays)}, the plan runs on {self.device}")
        floats = {t.dtype for t in inputs if t.is_floating_point()}
        if len(floats) > 1 and name not in CAST_OPS:
            kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in floats))
            self._flag(op, f"mixed dtypes in one op ({kinds}): CUDA kernels refuse them")
        for t in inputs:
            sid = _storage_id(t)
            if sid not in self._made and sid not in self._seen:
                self._seen.add(sid)
                self.external.append(t)

    def _record_outputs(self, out: Any) -> None:
        # Outputs' devices are not checked: some CUDA kernels return host bookkeeping tensors
        # (attention's RNG seed and offset) nobody reads; one that is read is an input then.
        for t in _tensors(out):
            self._made.add(_storage_id(t))


def _same_device(device: torch.device, plan: torch.device) -> bool:
    if device.type != plan.type:
        return False
    return device.index is None or plan.index is None or device.index == plan.index


def _storage_id(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr()) or id(t)
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
        return id(t)


def check_capturable(fn: Callable[[], T], device: torch.device | str) -> T:
    """``fn()``, raising :class:`CaptureIllegalError` if a capture on ``device`` would refuse it."""
    return CaptureRecorder(device).run(fn)
