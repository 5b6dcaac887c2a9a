"""restune's Python SDK and command line; HTTP only, imports nothing else of the project.

>>> from clients import Client
>>> result = Client("http://127.0.0.1:8000").predict("cat.jpg", tasks="species,age")
>>> result[0]["species"].top
"""

from clients.errors import (
    ArtifactRejected,
    BadImage,
    ConnectionFailed,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RestuneError,
    ServerError,
    StoreUnavailable,
    Unauthorized,
    UnknownTask,
    ValidationFailed,
    VersionInUse,
    error_from_response,
)
from clients.sdk import AsyncClient, Client
from clients.transport import RetryEvent, RetryPolicy
from clients.types import (
    Health,
    ImageResult,
    Prediction,
    PushResult,
    TaskAnswer,
    TaskError,
    Traffic,
    TunerInfo,
    VersionDeleted,
)

__all__ = [
    "ArtifactRejected",
    "AsyncClient",
    "BadImage",
    "Client",
    "ConnectionFailed",
    "Forbidden",
    "Health",
    "ImageResult",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Prediction",
    "PushResult",
    "RateLimited",
    "RestuneError",
    "RetryEvent",
    "RetryPolicy",
    "ServerError",
    "StoreUnavailable",
    "TaskAnswer",
    "TaskError",
    "Traffic",
    "TunerInfo",
    "Unauthorized",
    "UnknownTask",
    "ValidationFailed",
    "VersionDeleted",
    "VersionInUse",
    "error_from_response",
]
