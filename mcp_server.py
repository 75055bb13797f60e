"""The service over MCP (Model Context Protocol): the tools search_docs, ask_docs and
list_sources, for any MCP host. Served as streamable HTTP at /mcp in the app (server.py,
behind the same API keys), one server per knowledge base (/kb/{name}/mcp for the others),
and over stdio by `rag mcp [--kb NAME]` for desktop hosts.

The tools are chains/tools.py's LangChain tools (one behaviour, in process, remote and
here); the MCP server adds the input schemas, structured results and `isError` results.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api_keys import KeyRing
from chains.rag import to_sources
from chains.tools import (
    ASK_DESCRIPTION,
    ASK_DOCS,
    SEARCH_DESCRIPTION,
    SEARCH_DOCS,
    AskDocsInput,
    SearchDocsInput,
    rag_tools,
)
from errors import RagError
from settings import DEFAULT_KB, Settings

if TYPE_CHECKING:
    from service import RagService

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
LIST_SOURCES = "list_sources"
LIST_DESCRIPTION = (
    "List the documents that search_docs and ask_docs can draw on: the source paths in the "
    "collection and how many chunks (passages) it holds. Use it to see what is covered, or to "
    "pick a `source` glob for search_docs."
)
INSTRUCTIONS = (
    "Answers from a team's own documents, with citations. search_docs returns passages with "
    "their source and section; ask_docs returns a written answer that cites them; list_sources "
    "lists the documents. Quote sources as the tools give them."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)


class Passage(BaseModel):
    """One passage: its text, source file and heading path, numbered best first."""

    n: int
    text: str
    source: str
    headers: list[str]
    score: float


class SearchResult(BaseModel):
    """What search_docs returns (structured)."""

    passages: list[Passage]


class AnswerResult(BaseModel):
    """What ask_docs returns (structured): the answer and the passages it cites as [n]."""

    answer: str
    sources: list[Passage]


class SourcesResult(BaseModel):
    """What list_sources returns (structured)."""

    collection: str
    total_chunks: int
    sources: list[str]


def _described(model: type[BaseModel], field: str) -> Any:
    """The field's description from chains.tools, so both kinds of tool say the same."""
    return Field(description=model.model_fields[field].description)


def bearer_token(headers: Any) -> str:
    """The token of an `Authorization: Bearer ...` header, or ""."""
    scheme, _, token = str(headers.get("authorization", "")).partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authorize(ctx: Context, keys: KeyRing, kb: str) -> None:
    """Whether this caller may use the tools of knowledge base `kb`: the one check every MCP
    tool makes first.

    Over HTTP the bearer key must be a known key (when any are set) whose scope holds `kb`.
    The app's AccessMiddleware has already refused other keys before /mcp or /kb/{kb}/mcp,
    with a 401 or 404; checking again here keeps the tools guarded wherever this server is
    mounted. Over stdio there are no headers: `rag mcp` runs as the local user who started it.
    """
    headers = ctx.headers
    if headers is None or not keys.required:
        return
    grant = keys.grant_for(bearer_token(headers))
    if grant is None:
        raise ToolError("missing or invalid API key: send Authorization: Bearer <key>")
    if not grant.may_read(kb):
        raise ToolError(f"no knowledge base {kb!r}")


async def _call(tool: BaseTool, arguments: dict[str, Any]) -> ToolMessage:
    """Run a LangChain tool as an agent would (a tool call), so its artifact comes back;
    its error result (the reason, for the model to act on) becomes the MCP error result."""
    call = {"type": "tool_call", "id": "mcp", "name": tool.name, "args": arguments}
    message = await tool.ainvoke(call)
    if not isinstance(message, ToolMessage):
        raise TypeError(f"{tool.name} returned {type(message).__name__}, not a ToolMessage")
    if message.status == "error":
        raise ToolError(str(message.content))
    return message


def create_mcp_server(
    service: RagService,
    settings: Settings | None = None,
    lifespan: Callable[[MCPServer], AbstractAsyncContextManager[None]] | None = None,
    kb: str = DEFAULT_KB,
) -> MCPServer:
    """The MCP server over the service of knowledge base `kb`; `settings` (default: the
    service's) give the API keys. `lifespan`: what runs around it (stdio opens the store in
    it; in the app, the app's does)."""
    keys = (settings or service.settings).key_ring()
    search_tool, ask_tool = rag_tools(service.configurable_retriever, service.chain)
    server: MCPServer = MCPServer(
        "milvus-deepseek-rag",
        instructions=INSTRUCTIONS,
        version="0.1.0",
        lifespan=lifespan,
        # The SDK configures the root logger if nothing has; at its default (INFO) every
        # HTTP request of every library would be logged. WARNING is Python's own default.
        log_level="WARNING",
    )

    @server.tool(name=SEARCH_DOCS, description=SEARCH_DESCRIPTION, annotations=READ_ONLY)
    async def search_docs(
        query: Annotated[str, _described(SearchDocsInput, "query")],
        ctx: Context,
        k: Annotated[int | None, _described(SearchDocsInput, "k")] = None,
        source: Annotated[str | None, _described(SearchDocsInput, "source")] = None,
        filter: Annotated[str | None, _described(SearchDocsInput, "filter")] = None,
    ) -> Annotated[CallToolResult, SearchResult]:
        authorize(ctx, keys, kb)
        arguments = {"query": query, "k": k, "source": source, "filter": filter}
        message = await _call(search_tool, {n: v for n, v in arguments.items() if v is not None})
        passages = to_sources(message.artifact or [])
        return CallToolResult(
            content=[TextContent(type="text", text=str(message.content))],
            structured_content=SearchResult.model_validate({"passages": passages}).model_dump(),
        )

    @server.tool(name=ASK_DOCS, description=ASK_DESCRIPTION, annotations=READ_ONLY)
    async def ask_docs(
        question: Annotated[str, _described(AskDocsInput, "question")], ctx: Context
    ) -> Annotated[CallToolResult, AnswerResult]:
        authorize(ctx, keys, kb)
        message = await _call(ask_tool, {"question": question})
        output = message.artifact or {}
        result = AnswerResult.model_validate(
            {"answer": output.get("answer", ""), "sources": output.get("sources", [])}
        )
        return CallToolResult(
            content=[TextContent(type="text", text=str(message.content))],
            structured_content=result.model_dump(),
        )

    @server.tool(name=LIST_SOURCES, description=LIST_DESCRIPTION, annotations=READ_ONLY)
    async def list_sources(ctx: Context) -> Annotated[CallToolResult, SourcesResult]:
        authorize(ctx, keys, kb)
        from store.milvus import collection_stats

        try:
            # Milvus calls block: off the event loop.
            stats = await anyio.to_thread.run_sync(lambda: collection_stats(service.get_store()))
        except RagError as exc:
            raise ToolError(str(exc)) from exc
        result = SourcesResult.model_validate(stats)
        lines = [f"{result.total_chunks} chunks from {len(result.sources)} sources in {result.collection}:"]
        lines += [f"- {source}" for source in result.sources]
        if not result.sources:
            lines = [f"The collection {result.collection} is empty: nothing has been ingested yet."]
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines))],
            structured_content=result.model_dump(),
        )

    return server


class McpEndpoint:
    """/mcp: the MCP SDK's streamable HTTP app, a new one for each run of the app's lifespan.

    The SDK's session manager runs once only, but an app's lifespan may run again (a server
    restarted in the same process, tests), so each run builds its own; between runs /mcp
    answers 503.
    """

    def __init__(self, server: MCPServer, settings: Settings, path: str = MCP_PATH) -> None:
        self.server = server
        self.settings = settings
        self.path = path
        self.current: Starlette | None = None

    def build(self) -> Starlette:
        # Without API keys, on a loopback RAG_HOST, the SDK checks Host and Origin (421, 403),
        # so that a web page can't reach a local server through DNS rebinding. With keys, the
        # key guards /mcp as every other route, and a reverse proxy may pass its own Host.
        keyed = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        return self.server.streamable_http_app(
            streamable_http_path=self.path,
            stateless_http=True,
            json_response=True,
            transport_security=keyed if self.settings.keys_required else None,
            host=self.settings.host,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The SDK's app and its session manager (a task group) for one run of the app."""
        http_app = self.build()
        async with http_app.router.lifespan_context(http_app):
            self.current = http_app
            try:
                yield
            finally:
                self.current = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.current is None:
            response = JSONResponse(status_code=503, content={"detail": "the MCP server is not running"})
            await response(scope, receive, send)
            return
        await self.current(scope, receive, send)


def mount_mcp(
    app: Starlette, service: RagService, settings: Settings, prefix: str = "", kb: str = DEFAULT_KB
) -> Callable[[], AbstractAsyncContextManager[None]]:
    """Serve the MCP tools of knowledge base `kb` at `{prefix}/mcp` in `app`; returns what
    the app's lifespan must run around its life (the SDK's session manager).

    Stateless, with JSON responses: each POST stands alone, so `rag serve --workers N` may
    send one client's requests to different workers (clients of the 2026 protocol carry no
    session either). The route is added to the app's own router, not mounted under /mcp,
    where Starlette would redirect POST /mcp to /mcp/.
    """
    path = prefix + MCP_PATH
    endpoint = McpEndpoint(create_mcp_server(service, settings, kb=kb), settings, path)
    app.router.routes.append(Route(path, endpoint=endpoint))
    return endpoint.running


def warm_up(service: RagService) -> None:
    """Open the store and load the model now, not on the first call, as the app does."""
    try:
        service.get_store()
        service.embeddings.embed_query("warm up")
    except RagError as exc:  # the tools report it on each call until Milvus is back
        log.error("starting without Milvus: %s", exc)


def serve_stdio(service: RagService) -> None:
    """`rag mcp`: serve the tools over standard input and output until the host closes them."""

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        # Inside the server's run, after the SDK pointed file descriptor 1 at stderr:
        # nothing printed while the store opens can reach the protocol's stream.
        await anyio.to_thread.run_sync(warm_up, service)
        try:
            yield
        finally:
            service.close()

    anyio.run(create_mcp_server(service, lifespan=lifespan).run_stdio_async)
