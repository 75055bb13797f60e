"""An OpenAI-compatible API over the RAG chain: `POST /v1/chat/completions` and `GET /v1/models`.

Any OpenAI client or chat UI can ask the service questions. The answer comes from the RAG
chain, and the passages it cites come in an extra top-level `sources` field.
See docs/openai-api.md.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Send

from errors import RagError

log = logging.getLogger(__name__)

OWNER = "milvus-deepseek-rag"


def _is_none(value: object) -> bool:
    return value is None


def _optional(description: str) -> Any:
    """A field left out of the JSON when it is None, as OpenAI does with fields that don't apply."""
    return Field(default=None, exclude_if=_is_none, description=description)


# Requests


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message of the conversation, as OpenAI clients send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text: the string, or its text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if part.type == "text" and part.text)


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ThinkingOption(BaseModel):
    """DeepSeek's own spelling of the switch: `{"type": "enabled"}`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled"]


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, plus this service's retrieval fields.

    Fields that would change what the answer is (`n` above 1, `tools`, a JSON
    `response_format`, `logprobs`, audio) are refused with a 400 that says so (see
    `unsupported`): answering once, in prose, would look like success. Hints that don't
    (`max_tokens`, `stop`, `top_p`, `seed`, `user`, ...) are accepted and ignored, so that
    any client works unchanged.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        default=None, description="A model from GET /v1/models; default: DEEPSEEK_MODEL."
    )
    messages: list[ChatMessage] = Field(
        description="The last user message is the question; earlier user and assistant messages are "
        "the conversation. System messages are ignored: the service's own prompt applies."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    k: int | None = Field(default=None, ge=1, description="Passages to retrieve (at most RAG_MAX_K).")
    search: Literal["hybrid", "dense", "sparse"] | None = Field(default=None, description="Search mode.")
    source: str | None = Field(
        default=None, min_length=1, description="Glob on the source path, e.g. 'faq/*'."
    )
    thinking: bool | ThinkingOption | None = Field(
        default=None, description='DeepSeek thinking: true/false or {"type": "enabled"|"disabled"}.'
    )

    # OpenAI fields that are read only to refuse them (see `unsupported`).
    n: int | None = Field(default=None, ge=1, description="Only 1: one answer per request.")
    tools: list[Any] | None = Field(default=None, description="Not supported: answers come from documents.")
    functions: list[Any] | None = Field(default=None, description="Not supported (tools' old form).")
    tool_choice: Any = Field(default=None, description='Only "none" or "auto".')
    response_format: dict[str, Any] | None = Field(default=None, description='Only {"type": "text"}.')
    logprobs: bool | None = Field(default=None, description="Not supported.")
    top_logprobs: int | None = Field(default=None, description="Not supported.")
    modalities: list[str] | None = Field(default=None, description='Only ["text"].')
    audio: dict[str, Any] | None = Field(default=None, description="Not supported.")

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) for the first field set to something this service can't honour."""
        reason = None
        if self.n is not None and self.n > 1:
            field, reason = (
                "n",
                f"n={self.n} is not supported: one answer per request; send n=1 or leave n out",
            )
        elif self.tools or self.functions:
            field = "tools" if self.tools else "functions"
            reason = f"{field} are not supported: the answer comes from the documents, with no tool calls"
        elif self.tool_choice not in (None, "none", "auto"):
            field, reason = "tool_choice", "tool_choice is not supported: send 'none' or leave it out"
        elif (kind := (self.response_format or {}).get("type", "text")) != "text":
            field, reason = "response_format", f"response_format {kind!r} is not supported: answers are text"
        elif self.logprobs or self.top_logprobs:
            field = "logprobs" if self.logprobs else "top_logprobs"
            reason = f"{field} is not supported"
        elif self.audio is not None or any(m != "text" for m in self.modalities or []):
            field, reason = "modalities", "modalities other than text are not supported: answers are text"
        return None if reason is None else (field, reason)

    def thinking_enabled(self) -> bool | None:
        """The thinking switch as a bool, or None when the request did not say."""
        if isinstance(self.thinking, ThinkingOption):
            return self.thinking.type == "enabled"
        return self.thinking


# Responses


class SourcePassage(BaseModel):
    """A retrieved passage, numbered as the answer cites it ([1], [2], ...)."""

    model_config = ConfigDict(extra="allow")

    n: int
    source: str
    headers: list[str]
    page: int | None = _optional("The first page of a PDF passage.")
    last_page: int | None = _optional("The last page of a PDF passage, when it spans pages.")
    text: str
    score: float


class CompletionUsage(BaseModel):
    """Token counts of the LLM call, with DeepSeek's prompt cache split when it gives one."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_cache_hit_tokens: int | None = _optional("Prompt tokens served from DeepSeek's cache.")
    prompt_cache_miss_tokens: int | None = _optional("Prompt tokens not in DeepSeek's cache.")


class AssistantMessage(BaseModel):
    """The answer."""

    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = _optional("DeepSeek's reasoning, only when thinking was on.")


class Choice(BaseModel):
    """The one choice of a completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion`, plus `sources`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = _optional("Left out when the chain reported no token counts (no LLM).")
    sources: list[SourcePassage] = Field(description="The passages the answer cites, by n.")


class Delta(BaseModel):
    """What a streamed chunk adds to the answer."""

    role: Literal["assistant"] | None = _optional("Only in the first chunk.")
    content: str | None = _optional("Answer text.")
    reasoning_content: str | None = _optional("Reasoning text (thinking on), never mixed into content.")


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk."""

    index: int = 0
    delta: Delta
    finish_reason: Literal["stop"] | None = None


class ChatCompletionChunk(BaseModel):
    """OpenAI's `chat.completion.chunk`; the first one also carries `sources`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = _optional("Only in the last chunk, with stream_options.include_usage.")
    sources: list[SourcePassage] | None = _optional("Only in the first chunk.")


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object. `code` is a string for request errors, the HTTP status otherwise."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which OpenAI clients turn into an exception with the message."""

    error: ErrorDetail


# Errors


def _error_type(status_code: int) -> str:
    return "invalid_request_error" if status_code < 500 else "server_error"


def error_response(
    status_code: int, message: str, *, param: str | None = None, code: str | int | None = None
) -> JSONResponse:
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`."""
    detail = ErrorDetail(message=message, type=_error_type(status_code), param=param, code=code)
    return JSONResponse(status_code=status_code, content=ErrorResponse(error=detail).model_dump(mode="json"))


def _rag_error_response(exc: RagError) -> JSONResponse:
    return error_response(exc.status_code, str(exc), code=exc.status_code)


def _validation_error_response(exc: RequestValidationError) -> JSONResponse:
    reasons = []
    param = None
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        param = param or where or None
        reasons.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return error_response(422, "; ".join(reasons) or "invalid request", param=param, code="invalid_value")


class _OpenAIErrorRoute(APIRoute):
    """Request validation errors as OpenAI error bodies: exception handlers are the app's, and
    the app's answer `{"detail": [...]}` would reach OpenAI clients as an unexplained 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error_response(exc)

        return handle


# The chain


def to_chain_input(messages: list[ChatMessage]) -> dict[str, Any] | None:
    """`{"question", "chat_history"}` from OpenAI messages, or None when no user message has text.

    The last user message is the question. The user and assistant messages before it become
    the chat history; system messages are dropped (the service's own system prompt applies),
    and so is anything after the question.
    """
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None or not messages[last_user].text().strip():
        return None
    history: list[BaseMessage] = []
    for message in messages[:last_user]:
        if message.role == "user":
            history.append(HumanMessage(content=message.text()))
        elif message.role == "assistant":
            history.append(AIMessage(content=message.text()))
    return {"question": messages[last_user].text(), "chat_history": history}


def to_chain_config(request: ChatCompletionRequest, model: str) -> RunnableConfig:
    """The chain's configurable: `model` always, the other fields only when the request set them."""
    configurable: dict[str, Any] = {"model": model}
    thinking = request.thinking_enabled()
    for key, value in (
        ("k", request.k),
        ("search", request.search),
        ("source", request.source),
        ("temperature", request.temperature),
        ("thinking", thinking),
    ):
        if value is not None:
            configurable[key] = value
    return {"configurable": configurable}


def _usage(value: Any) -> CompletionUsage | None:
    return CompletionUsage.model_validate(value) if isinstance(value, dict) else None


def _sources(value: Any) -> list[SourcePassage]:
    return [SourcePassage.model_validate(s) for s in value or []]


async def _close(stream: AsyncIterator[Any]) -> None:
    """Close an async generator even inside a cancelled scope, so its cleanup runs to the end
    (closing the chain's stream is what cancels the upstream LLM request)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


# Streaming

_OUTPUT_KEYS = ("sources", "reasoning", "answer")


async def _read_until_output(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chain's chunks up to the first one that goes to the client (normally `sources`).

    Read before the response starts, so that an error before any output (bad input,
    Milvus down) gets a real HTTP status rather than a 200 and an error event.
    """
    head: list[dict[str, Any]] = []
    try:
        async for chunk in stream:
            head.append(chunk)
            if any(key in chunk for key in _OUTPUT_KEYS):
                break
    except BaseException:
        await _close(stream)
        raise
    return head


class _ChunkWriter:
    """Turns the chain's chunks into OpenAI `chat.completion.chunk` SSE events."""

    def __init__(self, model: str) -> None:
        self.completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.started = False
        self.usage: CompletionUsage | None = None
        self.error: tuple[int, str] | None = None

    def event(self, choices: list[ChunkChoice], **extra: Any) -> str:
        chunk = ChatCompletionChunk(
            id=self.completion_id, created=self.created, model=self.model, choices=choices, **extra
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    def start(self, sources: list[SourcePassage]) -> str:
        self.started = True
        delta = Delta(role="assistant", content="")
        return self.event([ChunkChoice(delta=delta)], sources=sources)

    def events_for(self, chunk: dict[str, Any]) -> list[str]:
        """The events for one chain chunk; the first output also opens the message."""
        events = []
        if "sources" in chunk and not self.started:
            events.append(self.start(_sources(chunk["sources"])))
        if (chunk.get("reasoning") or chunk.get("answer")) and not self.started:
            events.append(self.start([]))
        if chunk.get("reasoning"):
            events.append(self.event([ChunkChoice(delta=Delta(reasoning_content=str(chunk["reasoning"])))]))
        if chunk.get("answer"):
            events.append(self.event([ChunkChoice(delta=Delta(content=str(chunk["answer"])))]))
        if "usage" in chunk:
            self.usage = _usage(chunk["usage"])
        if isinstance(chunk.get("error"), dict):
            error = chunk["error"]
            self.error = (int(error.get("status_code", 500)), str(error.get("message", "error")))
        return events

    def finish(self, include_usage: bool) -> list[str]:
        events = [] if self.started else [self.start([])]
        events.append(self.event([ChunkChoice(delta=Delta(), finish_reason="stop")]))
        if include_usage:
            events.append(self.event([], usage=self.usage))
        events.append("data: [DONE]\n\n")
        return events

    @staticmethod
    def error_event(status_code: int, message: str) -> str:
        # The openai client raises APIError on a data payload with an `error` key.
        detail = ErrorDetail(message=message, type=_error_type(status_code), code=status_code)
        return f"data: {json.dumps({'error': detail.model_dump(mode='json')})}\n\n"


async def _sse_events(
    head: list[dict[str, Any]],
    stream: AsyncIterator[dict[str, Any]],
    writer: _ChunkWriter,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE events of one completion. CancelledError and GeneratorExit pass through."""
    failure: tuple[int, str] | None = None
    try:
        for chunk in head:
            for event in writer.events_for(chunk):
                yield event
        async for chunk in stream:
            for event in writer.events_for(chunk):
                yield event
    except RagError as exc:
        failure = (exc.status_code, str(exc))
    except Exception as exc:  # the headers are gone: an error event is all the client can get
        log.exception("chat completion stream failed")
        failure = (500, f"internal error: {type(exc).__name__}")
    # The chain's error chunk says it best; the exception that follows it repeats it.
    failure = writer.error or failure
    if failure is not None:
        yield writer.error_event(*failure)
        return
    for event in writer.finish(include_usage):
        yield event


class _EventStream(StreamingResponse):
    """A text/event-stream response that closes its generators however the stream ends.

    Starlette leaves the body generator suspended when the client disconnects; closing it,
    and then the chain's stream, is what stops the upstream LLM request.
    """

    def __init__(self, events: AsyncIterator[str], upstream: AsyncIterator[Any]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            # No caching, and no buffering in nginx-like proxies: tokens should arrive as they come.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._upstream = upstream

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await _close(self._events)
            await _close(self._upstream)


# The router

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "No user message with text, or a field this service can't honour (n > 1, tools, ...)"),
        (404, "Unknown model"),
        (422, "Invalid field, question too long or k above RAG_MAX_K"),
        (502, "The LLM failed"),
        (503, "Milvus is unreachable"),
        (504, "The LLM timed out"),
    )
}


@dataclass(frozen=True)
class ModelChoice:
    """What a `model` id names: the chain that answers, the LLM model it asks, and the
    knowledge base it reads (for the metrics)."""

    chain: Runnable
    model: str
    kb: str | None = None


# The model ids a request may name, and what each names (per request: per API key).
ModelsFor = Callable[[Request], dict[str, ModelChoice]]


def make_openai_router(chain: Runnable, models: list[str], default_model: str) -> APIRouter:
    """Routes `/v1/chat/completions` and `/v1/models` that answer with `chain`.

    `chain` follows the RAG chain's contract: input `{"question", "chat_history"}`, a
    configurable with `model`, `k`, `search`, `source`, `temperature` and `thinking`, and a
    stream of `sources`, `reasoning`, `answer`, `usage` and `error` chunks. `models` are the
    ids a request may name; `default_model` answers requests that name none.
    """
    choices = {m: ModelChoice(chain, m) for m in dict.fromkeys([*models, default_model])}
    return openai_router(lambda _: choices, default_model)


def openai_router(models_for: ModelsFor, default_model: str) -> APIRouter:
    """The OpenAI-compatible routes over the models that `models_for` gives each request
    (a server with several knowledge bases lists `{kb}:{model}` ids, each key its own)."""
    listed_at = int(time.time())
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=_OpenAIErrorRoute)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """The models that `model` may name."""
        return ModelList(data=[ModelCard(id=m, created=listed_at) for m in models_for(request)])

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        responses={
            **_ERROR_RESPONSES,
            200: {
                "description": "A chat.completion, or with `stream: true` an event stream of "
                "chat.completion.chunk objects ending with `data: [DONE]`.",
                "content": {"text/event-stream": {}},
            },
        },
    )
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        """Answer the last user message from the documents, OpenAI-style, with `sources`."""
        model = request.model or default_model
        choices = models_for(http)
        choice = choices.get(model)
        if choice is None:
            return error_response(
                404,
                f"The model `{model[:200]}` does not exist; available: {', '.join(choices) or 'none'}",
                param="model",
                code="model_not_found",
            )
        if choice.kb is not None:
            http.state.kb = choice.kb  # the metrics' label: the knowledge base that answers
        chain = choice.chain
        if refused := request.unsupported():
            field, reason = refused
            return error_response(400, reason, param=field, code="unsupported_parameter")
        chain_input = to_chain_input(request.messages)
        if chain_input is None:
            return error_response(
                400,
                "messages must include a user message with text",
                param="messages",
                code="missing_user_message",
            )
        config = to_chain_config(request, choice.model)

        if not request.stream:
            try:
                result = await chain.ainvoke(chain_input, config)
            except RagError as exc:
                return _rag_error_response(exc)
            reasoning = result.get("reasoning")
            completion = ChatCompletion(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=model,
                choices=[
                    Choice(
                        message=AssistantMessage(
                            content=str(result.get("answer") or ""),
                            reasoning_content=str(reasoning) if reasoning else None,
                        )
                    )
                ],
                usage=_usage(result.get("usage")),
                sources=_sources(result.get("sources")),
            )
            return JSONResponse(completion.model_dump(mode="json"))

        upstream: AsyncIterator[dict[str, Any]] = chain.astream(chain_input, config)
        try:
            head = await _read_until_output(upstream)
        except RagError as exc:
            return _rag_error_response(exc)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = _sse_events(head, upstream, _ChunkWriter(model), include_usage)
        return _EventStream(events, upstream)

    return router
