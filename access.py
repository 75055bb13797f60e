"""Who may use which knowledge base: the key check in front of every route, and the API docs
each key sees. See docs/deployment.md, "Knowledge bases and keys".

A request names its knowledge base by its path: `/kb/{name}/rag/...`, `/kb/{name}/v1/...`,
`/kb/{name}/documents`, `/kb/{name}/mcp`; the same routes without the prefix are the default
knowledge base's (RAG_COLLECTION). The check runs on the path, before any route reads the
body: a key gets 404 for a knowledge base it may not read, with the same body as for one that
does not exist (existence is not revealed), and 403 for an upload or delete with a read key.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from api_keys import OPEN, Grant, KeyRing
from limits import reject, route_path
from pages import OPEN_PATHS, presented_key
from settings import DEFAULT_KB

KB_PREFIX = "/kb/"
# Routes of the whole server rather than of one knowledge base: any valid key may call
# them, and each answers for the caller's knowledge bases only (the root /v1 lists and
# takes `{kb}:{model}` ids; /metrics shows the samples of the caller's knowledge bases).
SERVER_PATHS = frozenset(
    {
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
    }
)
# The operator's: the store's address and collection names.
ADMIN_PATHS = frozenset({"/health/details"})


@dataclass(frozen=True)
class Target:
    """What a path names: its knowledge base (None: the server's own routes), the path's
    prefix (`/kb/hr`, or "" for the default knowledge base) and the rest of the path."""

    kb: str | None
    prefix: str
    rest: str


def target_of(path: str) -> Target:
    if path.startswith(KB_PREFIX):
        name, _, rest = path[len(KB_PREFIX) :].partition("/")
        return Target(name, f"{KB_PREFIX}{name}", "/" + rest)
    if path in SERVER_PATHS or path in ADMIN_PATHS:
        return Target(None, "", path)
    return Target(DEFAULT_KB, "", path)


def is_write(method: str, rest: str) -> bool:
    """Whether a request changes a knowledge base: an upload or a delete of documents."""
    return (method == "POST" and rest.rstrip("/") == "/documents") or (
        method == "DELETE" and rest.startswith("/documents/")
    )


def no_such_knowledge_base(name: str) -> str:
    shown = name if len(name) <= 64 else name[:64] + "…"
    return f"no knowledge base {shown!r}"


class AccessMiddleware:
    """The API key and its scope, on every route but the open ones, before any route runs.

    A bad key never reaches Milvus or DeepSeek, and keys are never logged. The key comes as
    `Authorization: Bearer <key>`, or from a browser that signed in on `/`. The caller's
    grant and knowledge base go into the request's state (`grant`, `kb`, `kb_prefix`) for
    the routes that answer per caller, and for the metrics' `kb` label.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, knowledge_bases: Collection[str]) -> None:
        self.app = app
        self.keys = keys
        self.knowledge_bases = frozenset(knowledge_bases)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        grant = self.keys.grant_for(presented_key(connection))
        if grant is None:
            await self._unauthorized(scope, receive, send, connection)
            return
        requested = route_path(scope)
        path = target_of(requested)
        state = scope.setdefault("state", {})
        state["grant"] = grant
        if path.kb is None:
            if requested in ADMIN_PATHS and not grant.is_admin:
                await reject(scope, send, 403, f"{requested} needs an admin key", code="forbidden")
                return
        elif path.kb not in self.knowledge_bases or not grant.may_read(path.kb):
            await reject(scope, send, 404, no_such_knowledge_base(path.kb), code="knowledge_base_not_found")
            return
        elif is_write(scope["method"], path.rest) and not grant.may_write(path.kb):
            message = f"this key may read the knowledge base {path.kb!r} but not change it (its role is read)"
            await reject(scope, send, 403, message, code="forbidden")
            return
        else:
            state["kb"], state["kb_prefix"] = path.kb, path.prefix
        await self.app(scope, receive, send)

    async def _unauthorized(
        self, scope: Scope, receive: Receive, send: Send, connection: HTTPConnection
    ) -> None:
        if scope["method"] == "GET" and "text/html" in connection.headers.get("accept", ""):
            # A person in a browser (a playground, /docs): to the page that asks for the key.
            await RedirectResponse("/", status_code=303)(scope, receive, send)
            return
        await reject(
            scope,
            send,
            401,
            "missing or invalid API key: send Authorization: Bearer <key> "
            "(in a browser, sign in on the first page, /)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def grant_of(request: Request) -> Grant:
    """The caller's grant (everything on an app without the access middleware)."""
    return getattr(request.state, "grant", OPEN)


# ---------------------------------------------------------------------------- the API docs


def visible_schema(schema: dict[str, Any], grant: Grant, knowledge_bases: Collection[str]) -> dict[str, Any]:
    """The OpenAPI document with only the paths `grant` may call, and only the schemas and
    tags those paths use: another knowledge base's name appears nowhere."""

    def offered(path: str) -> bool:
        kb = target_of(path).kb
        if kb is None:
            return grant.is_admin or path not in ADMIN_PATHS
        return kb in knowledge_bases and grant.may_read(kb)

    paths = {path: item for path, item in schema.get("paths", {}).items() if offered(path)}
    schemas = schema.get("components", {}).get("schemas", {})
    used: set[str] = set()
    pending: list[Any] = [paths]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in used and name in schemas:
                    used.add(name)
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    tags = {
        tag for item in paths.values() for operation in item.values() for tag in operation.get("tags", [])
    }
    visible = {**schema, "paths": paths}
    if "components" in schema:
        visible["components"] = {
            **schema["components"],
            "schemas": {n: s for n, s in schemas.items() if n in used},
        }
    if "tags" in schema:
        visible["tags"] = [tag for tag in schema["tags"] if tag.get("name") in tags]
    return visible


def add_api_docs(app: FastAPI, knowledge_bases: Collection[str]) -> None:
    """/openapi.json, /docs and /redoc, each key seeing the routes of its knowledge bases.

    The app is made with openapi_url=None (FastAPI's own /openapi.json would list every
    knowledge base's routes to every key); the pages are FastAPI's.
    """
    kbs = frozenset(knowledge_bases)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(visible_schema(app.openapi(), grant_of(request), kbs))

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{root(request)}/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root(request)}/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=f"{root(request)}/openapi.json", title=f"{app.title} - ReDoc")
