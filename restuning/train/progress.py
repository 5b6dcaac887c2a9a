"""Progress of long training steps: tqdm bars on a terminal, or one-line messages for a log.

``Progress`` is what callers pass: ``True`` for tqdm bars, ``False`` for silence, or a callable
that receives short messages (the server logs them). A stop callback lets a caller cancel
work between batches.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from tqdm import tqdm

Progress = bool | Callable[[str], None]
"""``True``: tqdm bars; ``False``: nothing; a callable: one-line messages."""

MESSAGE_STEPS = 4
"""A message-mode bar reports at every quarter of its total."""


class TrainingCancelledError(RuntimeError):
    """The caller asked to stop (server shutdown during a demo bootstrap)."""


class Reporter:
    """Where progress goes, and the cancellation check done between batches."""

    def __init__(self, progress: Progress = True, should_stop: Callable[[], bool] | None = None):
        self.progress = progress
        self.should_stop = should_stop

    def check(self) -> None:
        """Raise :class:`TrainingCancelledError` if the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelledError("training cancelled")

    def message(self, text: str) -> None:
        """A one-line status message."""
        if callable(self.progress):
            self.progress(text)
        elif self.progress:
            tqdm.write(text)

    def bar(self, total: int, desc: str, unit: str = "it") -> Bar:
        """A progress bar over ``total`` units (use as a context manager)."""
        return Bar(self, total, desc, unit)


class Bar:
    """A tqdm bar, or quarter-step messages, or nothing."""

    def __init__(self, reporter: Reporter, total: int, desc: str, unit: str) -> None:
        self._reporter = reporter
        self._total = total
        self._desc = desc
        self._unit = unit
        self._done = 0
        self._next_step = 1
        self._postfix: dict[str, Any] = {}
        self._tqdm: tqdm[Any] | None = None
        if reporter.progress is True:
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units done; checks for cancellation."""
        self._reporter.check()
        self._done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif callable(self._reporter.progress) and self._total > 0:
            while self._next_step <= MESSAGE_STEPS and (
                self._done * MESSAGE_STEPS >= self._next_step * self._total
            ):
                self._next_step += 1
                extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
                self._reporter.message(
                    f"{self._desc}: {self._done}/{self._total} {self._unit}{extra}"
                )

    def set_postfix(self, **values: Any) -> None:
        """Values shown beside the bar (loss, validation metric)."""
        self._postfix = values
        if self._tqdm is not None:
            self._tqdm.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
