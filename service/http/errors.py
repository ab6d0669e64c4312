"""HTTP status and headers of a domain error, from the one table (service.errors.ErrorKind).

Each dialect renders its own body shape; all of them take the status and the retry hint from here.
"""

from __future__ import annotations

import math

from service.errors import RwkvdError


def status_of(error: RwkvdError) -> int:
    return error.kind.http_status


def headers_of(error: RwkvdError) -> dict[str, str]:
    """Retry-After for retryable errors (queue full, draining)."""
    if error.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
