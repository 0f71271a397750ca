"""Every exception convo raises, in one tree, so callers catch exactly as broadly as they mean to.

    ConvoError
    ├── InvalidInput                 bad input; nothing was written (CLI exit 2)
    │   ├── NotFound                 unknown conversation, turn or branch id
    │   ├── AmbiguousId              an id prefix that matches several rows
    │   ├── ContentError             a content block or image the API would reject
    │   ├── HistoryError             a turn list the API would reject (pairing, roles, ...)
    │   │   └── PrefillNotSupported  the model refuses a final assistant turn
    │   └── ConfigError              a setting that is missing or malformed
    │       └── MissingApiKey
    ├── BudgetExceeded               a send refused before any request (CLI exit 1)
    ├── OutputInvalid                structured output that does not match its schema
    ├── StoreError                   the database, not the input, is at fault
    │   ├── DatabaseUnavailable
    │   ├── SchemaTooNew             created by a newer convo: refuse, never corrupt
    │   └── Conflict                 another writer moved the branch first
    └── APIError                     talking to the Messages API failed
        ├── APIConnectionError       no HTTP response (refused, dropped, cut stream)
        │   └── APITimeoutError
        └── APIStatusError           the API answered with an error (HTTP or SSE event)
            ├── BadRequestError          400 invalid_request_error
            ├── AuthenticationError      401 authentication_error
            ├── BillingError             402 billing_error
            ├── PermissionDeniedError    403 permission_error
            ├── APINotFoundError         404 not_found_error
            ├── APIConflictError         409 conflict_error
            ├── RequestTooLargeError     413 request_too_large
            ├── RateLimitError           429 rate_limit_error
            ├── InternalServerError      500 and other 5xx, api_error, timeout_error (504)
            └── OverloadedError          529 overloaded_error

Messages are one line and never contain the API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import EllipsisType
from typing import Any


class ConvoError(Exception):
    """Base of everything convo raises on purpose."""

    exit_code = 1


class InvalidInput(ConvoError, ValueError):
    exit_code = 2


class NotFound(InvalidInput, LookupError):
    pass


class AmbiguousId(InvalidInput, LookupError):
    def __init__(self, prefix: str, candidates: list[str], what: str = "id") -> None:
        self.prefix = prefix
        self.candidates = candidates
        shown = ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else "")
        super().__init__(f"{what} prefix {prefix!r} is ambiguous: matches {shown}")


class ContentError(InvalidInput):
    pass


class HistoryError(InvalidInput):
    def __init__(self, message: str, turn_id: int | str | None = None) -> None:
        self.turn_id = turn_id
        super().__init__(message)


class PrefillNotSupported(HistoryError):
    pass


class ConfigError(InvalidInput):
    pass


class MissingApiKey(ConfigError):
    def __init__(self) -> None:
        super().__init__(
            "no API key: set ANTHROPIC_API_KEY (or run `convo demo` for the local stand-in)"
        )


class BudgetExceeded(ConvoError):
    pass


class OutputInvalid(ConvoError):
    """Claude's structured output failed validation; `errors` lists why, `output` what it sent."""

    def __init__(self, message: str, *, errors: list[str], output: Any) -> None:
        self.errors = errors
        self.output = output
        super().__init__(message)


class StoreError(ConvoError):
    pass


class DatabaseUnavailable(StoreError):
    pass


class SchemaTooNew(StoreError):
    pass


class Conflict(StoreError):
    pass


class APIError(ConvoError):
    pass


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class APIStatusError(APIError):
    """An error answer from the API, over HTTP or as an SSE `error` event after a 200."""

    status_code: int | None = None
    error_type: str = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None | EllipsisType = ...,
        error_type: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        self.message = message
        # Not given (...): keep the class's status. None: no HTTP status at all (an SSE error
        # event after a 200), which must not pass for e.g. an HTTP 529.
        if not isinstance(status_code, EllipsisType):
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type
        self.request_id = request_id
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body
        where = f"HTTP {self.status_code}" if self.status_code else "stream"
        rid = f" (request-id {request_id})" if request_id else ""
        super().__init__(f"{where} {self.error_type}: {message}{rid}")


class BadRequestError(APIStatusError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIStatusError):
    status_code = 401
    error_type = "authentication_error"


class BillingError(APIStatusError):
    status_code = 402
    error_type = "billing_error"


class PermissionDeniedError(APIStatusError):
    status_code = 403
    error_type = "permission_error"


class APINotFoundError(APIStatusError):
    status_code = 404
    error_type = "not_found_error"


class APIConflictError(APIStatusError):
    status_code = 409
    error_type = "conflict_error"


class RequestTooLargeError(APIStatusError):
    status_code = 413
    error_type = "request_too_large"


class RateLimitError(APIStatusError):
    status_code = 429
    error_type = "rate_limit_error"


class InternalServerError(APIStatusError):
    status_code = 500
    error_type = "api_error"


class OverloadedError(APIStatusError):
    status_code = 529
    error_type = "overloaded_error"


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls  # type: ignore[misc]
    for cls in (
        BadRequestError,
        AuthenticationError,
        BillingError,
        PermissionDeniedError,
        APINotFoundError,
        APIConflictError,
        RequestTooLargeError,
        RateLimitError,
        InternalServerError,
        OverloadedError,
    )
}
_BY_TYPE: dict[str, type[APIStatusError]] = {cls.error_type: cls for cls in _BY_STATUS.values()}
_BY_TYPE["timeout_error"] = InternalServerError


def api_error_for(
    status_code: int | None,
    error_type: str | None,
    message: str,
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
) -> APIStatusError:
    """The one place that maps an HTTP status or an error type to an exception class."""
    cls: type[APIStatusError]
    if status_code is not None and status_code in _BY_STATUS:
        cls = _BY_STATUS[status_code]
    elif status_code is not None and status_code >= 500:
        cls = InternalServerError
    elif error_type in _BY_TYPE:
        cls = _BY_TYPE[error_type]  # type: ignore[index]
    else:
        cls = APIStatusError
    return cls(
        message,
        status_code=status_code,
        error_type=error_type,
        request_id=request_id,
        headers=headers,
        body=body,
    )
