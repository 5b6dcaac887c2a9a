"""Host-to-device staging of input batches through one reusable pinned buffer.

Copies from pageable host memory are synchronous and go through a driver bounce buffer; from
page-locked (pinned) memory they are DMA transfers that can run ``non_blocking`` while the host
prepares the next batch. Pinning is slow (a syscall, page faults), so one buffer is kept and
grown, never allocated per batch. On the CPU there is nothing to stage: ``to_device`` returns
its input unchanged.
"""

from __future__ import annotations

import threading

import torch


class HostStaging:
    """Moves batches to ``device`` via a reusable pinned host buffer (a no-op on the CPU)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None  # flat, pinned
        self._copied: torch.cuda.Event | None = None  # last copy out of the buffer
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether batches are staged (CUDA devices only)."""
        return self.device.type == "cuda"

    @property
    def capacity(self) -> int:
        """Elements the pinned buffer holds now (0 before the first staged batch)."""
        return 0 if self._buffer is None else self._buffer.numel()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` on the staging device; the copy is asynchronous on the current stream.

        Inputs already on the device, and everything when the device is the CPU, are returned
        as they are. The returned tensor is safe to use on the current stream at once.
        """
        if not self.enabled or batch.device.type != "cpu":
            return batch
        with self._lock:
            # The previous batch's copy may still be reading the buffer: wait for it before
            # overwriting (this only blocks when batches come faster than PCIe moves them).
            if self._copied is not None:
                self._copied.synchronize()
            staged = self._host_view(batch)
            staged.copy_(batch)
            on_device = staged.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._copied.record(torch.cuda.current_stream(self.device))
            return on_device

    def _host_view(self, batch: torch.Tensor) -> torch.Tensor:
        """A pinned tensor shaped like ``batch``, backed by the reusable buffer."""
        needed = batch.numel()
        buffer = self._buffer
        if buffer is None or buffer.dtype != batch.dtype or buffer.numel() < needed:
            # Grown in powers of two so a slowly rising batch size does not re-pin every time.
            size = 1 << max(needed - 1, 1).bit_length()
            buffer = torch.empty(size, dtype=batch.dtype, pin_memory=True)
            self._buffer = buffer
        return buffer[:needed].view(batch.shape)
