"""The service: an OpenAI-compatible Ray Serve app (serve.app), its SDK (serve.client) and CLI.

Importing the package only loads the SDK (httpx + pydantic), so `from serve import Client`
works in a process without torch or Ray.
"""

from lvlm_hallu.serve.client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InvalidImageError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
    Retry,
)

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AuthenticationError", "BadRequestError",
    "Client", "InvalidImageError", "NotFoundError", "OverloadedError", "PayloadTooLargeError", "RateLimitError",
    "Retry",
]
