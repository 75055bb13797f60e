"""Request limits on every route: body size, batch size, a rate per client, and 422s that
don't echo the request back.

Both middlewares are pure ASGI, like the others in server.py: they must not buffer a
streamed answer or hide a client's disconnect. A body over the limit is refused with 413
before the route reads it: at once when Content-Length says so, or as soon as a chunked
body passes the limit; the route then sees a disconnect and its own answer is dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings

MB = 1024 * 1024
# Rate-limit state is kept for at most this many clients; the least recently seen go first
# (a client forgotten that way starts again with a full bucket).
MAX_TRACKED_CLIENTS = 10_000


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Add the body, batch and rate limits and the 422 handler to `app`.

    Call it before the API-key middleware is added: that one then runs first, and only
    requests with a valid key reach the limits (a stranger can't fill the rate table).
    """
    app.add_middleware(
        RateLimitMiddleware,
        per_minute=settings.rate_limit,
        burst=settings.rate_burst,
        max_batch=settings.max_batch,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=int(settings.max_body_mb * MB),
        upload_bytes=int(settings.max_upload_mb * MB),
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, batch_input_error)


def _without_input(errors: Sequence[Any]) -> list[Any]:
    return [
        {key: error[key] for key in ("type", "loc", "msg") if key in error}
        if isinstance(error, dict)
        else error
        for error in errors
    ]


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's and LangServe's 422, without pydantic's `input` (the request, echoed back:
    megabytes for a large body, and whatever secret it held) or `ctx`."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": _without_input(exc.errors())})


async def batch_input_error(request: Request, exc: Exception) -> JSONResponse:
    """A 422 for an input of a LangServe batch that fails its schema.

    LangServe's batch route validates each input with pydantic but, unlike its other routes,
    lets the ValidationError out, which would be a 500. Anywhere else a ValidationError is a
    bug of ours, and goes on to the app's 500 handler.
    """
    assert isinstance(exc, ValidationError)
    if not request.url.path.rstrip("/").endswith("/batch"):
        raise exc
    return JSONResponse(status_code=422, content={"detail": _without_input(exc.errors())})


def _size(limit: int) -> str:
    return f"{limit / MB:g} MB" if limit >= MB else f"{limit} bytes"


def route_path(scope: Scope) -> str:
    """The path the router matches: the request's path without the app's root path (behind a
    proxy that serves the app under a prefix, `uvicorn --root-path /rag`, scope["path"]
    includes it). Starlette's own function for this is private (starlette._utils); this is
    its rule, which the tests check against the routes the router picks."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def is_openai_path(path: str) -> bool:
    """Whether a path is the OpenAI-compatible API's: /v1/... or /kb/{name}/v1/..."""
    if path.startswith("/kb/"):
        path = "/" + path[len("/kb/") :].partition("/")[2]
    return path.startswith("/v1/")


async def reject(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    code: str,
    headers: dict[str, str] | None = None,
) -> None:
    """A JSON error; OpenAI's error shape under /v1, so OpenAI clients show the message."""
    if is_openai_path(route_path(scope)):
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        content: dict[str, Any] = {"error": error}
    else:
        content = {"detail": message}
    response = JSONResponse(status_code=status, content=content, headers=headers)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class BodyLimitMiddleware:
    """413 for a body over `max_bytes` (`upload_bytes` for uploads to .../documents)."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/documents"):
            return self.upload_bytes, "RAG_MAX_UPLOAD_MB"
        return self.max_bytes, "RAG_MAX_BODY_MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        message = f"the request body is larger than {_size(limit)} ({setting})"
        # The connection can't serve another request with a body left unread in it.
        close = {"Connection": "close"}
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await reject(scope, send, 413, message, code="body_too_large", headers=close)
            return
        received = 0
        refused = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await reject(scope, send, 413, message, code="body_too_large", headers=close)
                    return {"type": "http.disconnect"}
            return incoming

        async def guarded_send(outgoing: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 is the answer; whatever the route says after the disconnect is dropped
            if outgoing["type"] == "http.response.start":
                response_started = True
            await send(outgoing)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise  # the route's failure on the cut-off body is expected; any other is not


class TokenBuckets:
    """A token bucket per client: `burst` requests at once, refilled at `per_second`."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, cost: int = 1) -> float:
        """Take `cost` tokens: 0.0 when taken, else the seconds until there will be enough."""
        now = self.clock()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.per_second
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


def client_id(scope: Scope) -> str:
    """Who a request counts against: its API key (hashed, never kept), else its address."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]
    client = scope.get("client")
    return f"address:{client[0] if client else 'unknown'}"


def batch_size(body: bytes) -> int | None:
    """How many inputs a LangServe batch request holds; None when it isn't one (the route
    then answers the malformed body itself)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    inputs = data.get("inputs") if isinstance(data, dict) else None
    return len(inputs) if isinstance(inputs, list) else None


async def _read_body(receive: Receive) -> tuple[list[Message], bytes] | None:
    """Every message of the request body and the body; None when the client left."""
    messages: list[Message] = []
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        messages.append(message)
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return messages, bytes(body)


def _replay(messages: list[Message], receive: Receive) -> Callable[[], Awaitable[Message]]:
    queue = list(messages)

    async def replayed() -> Message:
        return queue.pop(0) if queue else await receive()

    return replayed


class RateLimitMiddleware:
    """Batch size cap (422) and, when `per_minute` > 0, a rate per client (429, Retry-After).

    A batch counts one request per input: `/rag/batch` with 10 questions is 10 DeepSeek calls.
    /health is never limited (load balancers call it).
    """

    def __init__(self, app: ASGIApp, per_minute: float, burst: int, max_batch: int) -> None:
        self.app = app
        self.max_batch = max_batch
        self.buckets = TokenBuckets(per_minute / 60.0, burst) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        cost = 1
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/batch"):
            # The body is already capped at RAG_MAX_BODY_MB by BodyLimitMiddleware.
            read = await _read_body(receive)
            if read is None:
                return
            messages, body = read
            count = batch_size(body)
            if count is not None and count > self.max_batch:
                await reject(
                    scope,
                    send,
                    422,
                    f"a batch holds at most {self.max_batch} inputs (RAG_MAX_BATCH); this one has {count}",
                    code="batch_too_large",
                )
                return
            cost = max(1, count or 1)
            receive = _replay(messages, receive)
        if self.buckets is not None:
            wait = self.buckets.take(client_id(scope), cost)
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                await reject(
                    scope,
                    send,
                    429,
                    f"too many requests: try again in {retry_after} s (RAG_RATE_LIMIT)",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)},
                )
                return
        await self.app(scope, receive, send)
