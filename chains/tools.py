"""The service as LangChain tools for agents: `search_docs` returns passages, `ask_docs` an
answer with its sources. Built over the retriever and the chain in process, or over a
running server's through RemoteRunnable; the MCP server (mcp_server.py) serves the same tools.

    tools = rag_tools(service.configurable_retriever, service.chain)   # in process
    tools = remote_tools("http://127.0.0.1:8000", api_key="...")       # a running `rag serve`

Errors an agent can act on (an empty question, `k` out of range, a bad filter, a refused
API key, DeepSeek down) come back as the tool's result with the reason, marked as an error
(`ToolMessage.status == "error"`), instead of ending the agent's run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from langchain_core.callbacks import Callbacks
from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field

from chains.prompts import format_context
from chains.rag import format_sources
from errors import RagError

SEARCH_DOCS = "search_docs"
ASK_DOCS = "ask_docs"

SEARCH_DESCRIPTION = (
    "Search the documentation and return the most relevant passages, best first. Each passage "
    "comes with its source file and its section (heading path), as "
    '<passage n="1" source="..." section="Title > Section">text</passage>. Use it to look up '
    "facts, commands or configuration in the documents and to quote them with their source; "
    "no passages means the documents don't cover the query."
)
ASK_DESCRIPTION = (
    "Ask a question about the documentation and get a written answer that cites its sources as "
    "[1], [2], listed under the answer with their file and section. The answer comes from a "
    "language model that reads only the passages found for the question. Use it for a direct "
    "answer; use search_docs to read the passages yourself."
)


class SearchDocsInput(BaseModel):
    """What search_docs takes."""

    query: str = Field(description="What to look for: a question or a few keywords.")
    k: int | None = Field(
        default=None,
        description="How many passages to return, from 1 up to the service's limit (RAG_MAX_K, "
        "20 unless configured). Default: the service's RAG_TOP_K (3 unless configured).",
    )
    source: str | None = Field(
        default=None,
        description="Only passages from source files whose path matches this glob, "
        "e.g. 'faq/*' or '*_faq.md'.",
    )
    filter: str | None = Field(
        default=None,
        description="Advanced: a Milvus boolean expression on the stored fields `source`, "
        "`root` and `chunk_index`, e.g. 'chunk_index == 0'.",
    )


class AskDocsInput(BaseModel):
    """What ask_docs takes."""

    question: str = Field(
        description="The question, in full: it is answered on its own, without this conversation."
    )


def tool_error(exc: BaseException, where: str = "") -> ToolException | None:
    """A ToolException carrying the reason an agent can act on, or None for anything else
    (a bug stays a bug). `where`: the server's URL, for errors of a remote call."""
    if isinstance(exc, ToolException):
        return exc
    if isinstance(exc, RagError):
        return ToolException(str(exc))
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        detail = server_reason(exc.response)
        if status in (401, 403):
            return ToolException(f"the RAG server at {where} refused the API key ({status}): {detail}")
        return ToolException(f"the RAG server at {where} answered {status}: {detail}")
    if isinstance(exc, httpx.TransportError):
        return ToolException(f"cannot reach the RAG server at {where}: {exc or type(exc).__name__}")
    return None


def server_reason(response: httpx.Response) -> str:
    """The reason in an error response: our `{"detail": str}`, FastAPI's validation list, or the text."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": "..."}, ...]
        return "; ".join(_validation_error(error) for error in detail)
    return str(detail) if detail is not None else response.text.strip()[:500]


def _validation_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    where = ".".join(str(part) for part in error.get("loc", [])[1:])  # after "body"
    return f"{where}: {error.get('msg', '')}" if where else str(error.get("msg", ""))


@contextmanager
def tool_errors(where: str = "") -> Iterator[None]:
    """Raise what `tool_error` makes of an exception (the tool reports it), or the exception."""
    try:
        yield
    except Exception as exc:
        error = tool_error(exc, where)
        if error is None or error is exc:
            raise
        raise error from exc


def search_docs_tool(retriever: Runnable, *, where: str = "") -> BaseTool:
    """`search_docs(query, k?, source?, filter?)`: the passages as text for the model, the
    Documents (text, source, headers, score) as the ToolMessage's artifact.

    `retriever`: a Runnable from a query to Documents that takes `k`, `source` and `filter`
    as configurable fields: `service.configurable_retriever`, or RemoteRunnable of /retriever.

    LangChain's `create_retriever_tool` makes this kind of tool, but its input schema is the
    query alone (RetrieverInput), with no room for k, source or filter; so this is the tool it
    would build, from the same public parts: a StructuredTool with
    response_format="content_and_artifact", whose content is the passages as the RAG prompt
    numbers and delimits them (chains.prompts.format_context).
    """

    def settings(
        k: int | None, source: str | None, filter: str | None, callbacks: Callbacks
    ) -> RunnableConfig:
        chosen = {"k": k, "source": source, "filter": filter}
        # An explicit `configurable` replaces the caller's (an agent's thread id, ...): only
        # these three reach the retriever, or a remote server.
        return {"callbacks": callbacks, "configurable": {n: v for n, v in chosen.items() if v is not None}}

    def search(
        query: str,
        k: int | None = None,
        source: str | None = None,
        filter: str | None = None,
        callbacks: Callbacks = None,
    ) -> tuple[str, list[Document]]:
        with tool_errors(where):
            documents = retriever.invoke(query, settings(k, source, filter, callbacks))
        return format_context(documents), documents

    async def asearch(
        query: str,
        k: int | None = None,
        source: str | None = None,
        filter: str | None = None,
        callbacks: Callbacks = None,
    ) -> tuple[str, list[Document]]:
        with tool_errors(where):
            documents = await retriever.ainvoke(query, settings(k, source, filter, callbacks))
        return format_context(documents), documents

    return StructuredTool.from_function(
        func=search,
        coroutine=asearch,
        name=SEARCH_DOCS,
        description=SEARCH_DESCRIPTION,
        args_schema=SearchDocsInput,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


def answer_with_sources(output: dict[str, Any]) -> str:
    """The chain's output as the text an agent reads: the answer, then its numbered sources."""
    text = str(output.get("answer") or "").strip()
    if output.get("sources"):
        text += "\n\nSources:\n" + format_sources(output["sources"])
    return text


def ask_docs_tool(chain: Runnable, *, where: str = "") -> BaseTool:
    """`ask_docs(question)`: the answer with its sources as text; the chain's whole output
    (answer, sources, usage) as the ToolMessage's artifact.

    `chain`: the RAG chain, `service.chain`, or RemoteRunnable of /rag.
    """

    def request(inputs: dict[str, Any]) -> dict[str, Any]:
        question = str(inputs.get("question") or "").strip()
        if not question:  # said here too: a server would answer with a schema error instead
            raise ToolException("the question is empty: ask ask_docs a question in words")
        return {"question": question}

    def ask(inputs: dict[str, Any], config: RunnableConfig) -> tuple[str, dict[str, Any]]:
        with tool_errors(where):
            output = chain.invoke(request(inputs), {"callbacks": config.get("callbacks"), "configurable": {}})
        return answer_with_sources(output), output

    async def aask(inputs: dict[str, Any], config: RunnableConfig) -> tuple[str, dict[str, Any]]:
        with tool_errors(where):
            output = await chain.ainvoke(
                request(inputs), {"callbacks": config.get("callbacks"), "configurable": {}}
            )
        return answer_with_sources(output), output

    with warnings.catch_warnings():
        # as_tool is marked beta, and LangChain warns about it once per process, in every
        # server's and `rag mcp`'s output; the warning's class is not public, its text is.
        warnings.filterwarnings("ignore", message="This API is in beta")
        tool = RunnableLambda(ask, afunc=aask, name=ASK_DOCS).as_tool(
            args_schema=AskDocsInput, name=ASK_DOCS, description=ASK_DESCRIPTION
        )
    # as_tool takes no such arguments; both are public fields of the BaseTool it returns.
    tool.response_format = "content_and_artifact"
    tool.handle_tool_error = True
    return tool


def rag_tools(retriever: Runnable, chain: Runnable, *, where: str = "") -> list[BaseTool]:
    """search_docs and ask_docs over a retriever and a chain (in process: the service's
    `configurable_retriever` and `chain`)."""
    return [search_docs_tool(retriever, where=where), ask_docs_tool(chain, where=where)]


def remote_tools(url: str, api_key: str | None = None, *, timeout: float | None = 120.0) -> list[BaseTool]:
    """search_docs and ask_docs over a running server (`rag serve`) at `url`, reached with
    LangServe's RemoteRunnable; `api_key`: one of its RAG_API_KEYS, sent as a bearer token.
    `timeout`: seconds per request (an answer takes a few)."""
    from langserve import RemoteRunnable

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    retriever: RemoteRunnable = RemoteRunnable(f"{base}/retriever/", headers=headers, timeout=timeout)
    chain: RemoteRunnable = RemoteRunnable(f"{base}/rag/", headers=headers, timeout=timeout)
    return rag_tools(retriever, chain, where=base)
