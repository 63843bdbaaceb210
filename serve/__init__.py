"""The service: an OpenAI-compatible Ray Serve app (serve.app), its SDK (serve.client) and CLI.

Importing the package only loads the SDK (httpx + pydantic), so `from serve import Client`
works in a process without torch or Ray.
"""

from serve.client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
)

__all__ = [
    "APIConnectionError", "APIError", "AsyncClient", "AuthenticationError", "BadRequestError", "Client",
    "NotFoundError", "OverloadedError", "PayloadTooLargeError", "RateLimitError",
]
