"""Process logging on stderr: plain text at a terminal, JSON lines (one object per record)
anywhere else, unless the setting says which.

Access records carry structured fields (``request_id``, ``route``, ``status``...) passed through
``logging``'s ``extra``. Secrets are scrubbed from every record before it is written: the admin
token is registered with :func:`configure_logging` and replaced wherever it appears, so a
mistake elsewhere (an exception message echoing a header) cannot leak it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
# uvicorn adds ``color_message`` (the message with ANSI colours): noise in a log file.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "color_message"}
)


class SecretScrubber(logging.Filter):
    """Replaces registered secret strings in a record's message and extra fields."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Empty strings would match everywhere; very short ones are not secrets worth a scan.
        self._secrets = [s for s in secrets if s]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        record.msg = self._scrub(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = self._scrub(value)
        if record.exc_info and record.exc_text is None:
            # Format the traceback now so the scrubbed text is what gets written.
            record.exc_text = self._scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc (if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the structured fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def resolve_format(log_format: Literal["auto", "json", "text"]) -> Literal["json", "text"]:
    """``auto``: text for a person at a terminal, JSON for anything that ships logs."""
    if log_format != "auto":
        return log_format
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(
    log_format: Literal["auto", "json", "text"] = "auto",
    level: str = "info",
    secrets: list[str] | None = None,
) -> None:
    """Route the root, uvicorn and restune loggers to one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonLinesFormatter() if resolve_format(log_format) == "json" else TextFormatter()
    handler.setFormatter(formatter)
    handler.addFilter(SecretScrubber(secrets or []))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers propagate to the root; its access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
