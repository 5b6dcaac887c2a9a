"""One error taxonomy for the service: a stable ``code`` per failure, mapped to HTTP once.

Raised anywhere in the server (routes, engine, registry); rendered by the app as RFC 9457
``application/problem+json``. Clients map the same codes back to exceptions.
"""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE: dict[str, int] = {
    "validation_error": 422,
    "bad_request": 400,
    "headers_too_large": 431,
    "bad_image": 422,
    "image_too_large": 413,
    "image_aspect_ratio": 422,
    "too_many_images": 413,
    "too_many_tasks": 422,
    "no_tasks": 422,
    "duplicate_task": 422,
    "unknown_task": 404,
    "unknown_version": 404,
    "tuner_not_found": 404,
    "version_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "forbidden": 403,
    "overloaded": 503,
    "store_unavailable": 503,
    "not_ready": 503,
    "deadline_exceeded": 504,
    "request_timeout": 408,
    "client_disconnected": 499,
    "invalid_name": 422,
    "invalid_traffic": 422,
    "quota_exceeded": 429,
    "rate_limited": 429,
    "backbone_mismatch": 409,
    "artifact_too_large": 413,
    "artifact_header_too_large": 413,
    "tuner_load_failed": 500,
    "tuner_unloadable": 409,
    "version_in_use": 409,
    "non_finite_features": 422,
    "task_failed": 500,
    "non_finite_output": 500,
    "bad_output_shape": 500,
    "internal": 500,
}
"""HTTP status of every code. Artifact codes not listed (``artifact_*``) map to 422."""

TITLES: dict[str, str] = {
    "validation_error": "Invalid request",
    "bad_request": "Malformed HTTP request",
    "headers_too_large": "Request headers too large",
    "bad_image": "Image could not be decoded",
    "image_too_large": "Image too large",
    "image_aspect_ratio": "Image aspect ratio too extreme",
    "too_many_images": "Too many images",
    "too_many_tasks": "Too many tasks",
    "unknown_task": "Unknown task",
    "tuner_not_found": "Tuner not found",
    "version_in_use": "Version in use",
    "tuner_unloadable": "Stored tuner cannot be loaded",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "payload_too_large": "Request body too large",
    "unsupported_media_type": "Unsupported media type",
    "overloaded": "Server overloaded",
    "store_unavailable": "Tuner store unavailable",
    "not_ready": "Not ready",
    "deadline_exceeded": "Deadline exceeded",
    "request_timeout": "Request not received in time",
    "client_disconnected": "Client closed the request",
    "unauthorized": "Authentication required",
    "forbidden": "Not allowed",
    "internal": "Internal server error",
}


def status_for(code: str) -> int:
    """HTTP status for a code; unknown ``artifact_*`` codes are client errors (422)."""
    if code in STATUS_BY_CODE:
        return STATUS_BY_CODE[code]
    return 422 if code.startswith("artifact_") else 500


class ApiError(Exception):
    """A failure with a stable code, a human message and optional extra problem fields."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else status_for(code)
        self.retry_after = retry_after
        self.extra = extra

    @property
    def title(self) -> str:
        """Short human summary of the code (RFC 9457 ``title``)."""
        return TITLES.get(self.code, self.code.replace("_", " ").capitalize())

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 body."""
        body: dict[str, Any] = {
            "type": f"urn:restune:error:{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body

    def headers(self) -> dict[str, str]:
        """Response headers the error implies: ``Retry-After`` for retryable refusals, the
        Bearer challenge on 401 (RFC 9110 requires ``WWW-Authenticate`` there)."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="restune"'
        return headers
