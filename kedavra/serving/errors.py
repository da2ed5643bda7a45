"""How the app answers what goes wrong: a bad field (422 naming it), a full queue (503 with Retry-After), a
client that left (499, nobody reads it), in the bodies A1111's clients and FastAPI's own errors use.

Routes and their helpers return their one result or raise: `field_error` / `body_error` (a 422 in FastAPI's
format), `unavailable` (a 503, with Retry-After when a wait is known), `ClientGone`; the worker's `QueueFull`
is answered here too. `EXCEPTION_HANDLERS` maps each exception to its answer for `FastAPI(exception_handlers=)`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kedavra.serving.worker import QueueFull

MAX_ECHOED_INPUT = 200  # characters of a bad field's value repeated in a 422 (a base64 image can be megabytes)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client hung up before the answer


class ClientGone(Exception):
    """The client disconnected while its request waited; its job has been cancelled."""


def field_error(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 naming the body's `field`, in FastAPI's error format."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def body_error(message: str) -> RequestValidationError:
    """A 422 about the request as a whole (loc ["body"]): fields that are fine alone but not together."""
    return RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": message}])


def unavailable(detail: str, retry_after_s: int | None = None) -> HTTPException:
    """A 503 {"detail": detail}, with a Retry-After header (seconds) when a wait is known."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return HTTPException(status_code=503, detail=detail, headers=headers)


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without repeating huge inputs (base64 images) back to the client."""
    details = []
    for detail in error.errors():
        detail = {key: value for key, value in detail.items() if key != "url"}
        if "ctx" in detail:  # pydantic puts the validator's exception there; its text is already in "msg"
            detail["ctx"] = {k: str(v) if isinstance(v, Exception) else v for k, v in detail["ctx"].items()}
        if "input" in detail:
            detail["input"] = _echoable(detail["input"])
        details.append(detail)
    return JSONResponse({"detail": jsonable_encoder(details)}, status_code=422)


async def queue_full_handler(request: Request, full: QueueFull) -> JSONResponse:
    """503 with Retry-After: the worker's estimate of when a slot frees."""
    return JSONResponse({"detail": str(full)}, status_code=503, headers={"Retry-After": str(full.retry_after)})


async def client_gone_handler(request: Request, gone: ClientGone) -> Response:
    """An empty 499: nobody is there to read it."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


EXCEPTION_HANDLERS = {
    RequestValidationError: validation_error_handler,
    QueueFull: queue_full_handler,
    ClientGone: client_gone_handler,
}


def _echoable(value: Any) -> Any:
    """A bad value as a 422 repeats it: as it came if short and valid JSON (NaN is not), else described."""
    text = repr(value)
    if len(text) > MAX_ECHOED_INPUT:
        return f"<{type(value).__name__} of {len(text)} characters>"
    try:
        json.dumps(jsonable_encoder(value), allow_nan=False)
    except (TypeError, ValueError):
        return text
    return value
