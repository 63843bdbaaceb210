"""Errors the service answers with, as OpenAI error objects `{"error": {message, type, param, code}}`.

Every failure a request can cause is turned into a `ServiceError` before it reaches the HTTP
layer, so that no exception escapes a route (an escaping exception would be logged by Ray as a
replica error and answered without our error shape). `error_for` maps the model layer's typed
errors (lvlm.errors, interventions.InterventionError) to 400s; anything unexpected becomes a 500
whose message does not leak internals.
"""

from __future__ import annotations

import logging

from lvlm_hallu.serve.schema import ErrorBody, ErrorResponse

log = logging.getLogger("serve")


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s else {}


class BadRequest(ServiceError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ServiceError):
    status, type, default_code = 401, "authentication_error", "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="lvlm-hallu"'}  # RFC 6750


class NotFound(ServiceError):
    status, type, default_code = 404, "not_found_error", "not_found"


class MethodNotAllowed(ServiceError):
    status, type, default_code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status, type, default_code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type, default_code = 415, "invalid_request_error", "unsupported_media_type"


class Overloaded(ServiceError):
    status, type, default_code = 429, "rate_limit_error", "overloaded"


class Unavailable(ServiceError):
    status, type, default_code = 503, "service_unavailable", "unavailable"


def error_for(exc: BaseException, request_id: str | None = None) -> ServiceError:
    """The HTTP error for an exception raised while handling a request; an unexpected one is
    logged with the request id the client got in `x-request-id`."""
    if isinstance(exc, ServiceError):
        return exc
    from lvlm_hallu.interventions import InterventionError
    from lvlm_hallu.lvlm.errors import ContextLengthError, ImageError, PromptError

    if isinstance(exc, InterventionError):
        return BadRequest(str(exc), param=exc.param or "interventions", code="invalid_intervention")
    if isinstance(exc, ImageError):
        return BadRequest(str(exc), param="messages", code="invalid_image")
    if isinstance(exc, ContextLengthError):  # image tokens count: the text-only check before it can pass
        return BadRequest(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, PromptError):
        return BadRequest(str(exc), param="messages", code="invalid_prompt")
    log.error("request %s failed", request_id or "-", exc_info=exc)
    return ServiceError(f"internal error ({type(exc).__name__}); the request was not completed",
                        code="internal_error")
