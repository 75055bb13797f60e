"""DeepSeek through its OpenAI-compatible API, with per-request model, temperature and thinking."""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any, Self

import httpx
import openai
from langchain_core.runnables import (
    ConfigurableField,
    ConfigurableFieldSingleOption,
    Runnable,
    RunnableConfig,
    ensure_config,
)
from langchain_core.runnables.configurable import RunnableConfigurableFields
from langchain_deepseek import ChatDeepSeek
from pydantic import model_validator

from errors import LLMError, LLMTimeoutError
from settings import Settings

log = logging.getLogger(__name__)


def thinking_body(thinking: bool) -> dict[str, Any]:
    """DeepSeek V4 thinks by default; RAG answers turn it off unless asked."""
    return {"thinking": {"type": "enabled" if thinking else "disabled"}}


# Why we bypass the SDK's typed layer for chat completions: `chat.completions.create` runs
# `async_maybe_transform` over every request's params (1.5-3 ms here) and builds a pydantic
# `ChatCompletionChunk` for every streamed chunk (~0.3 ms each), which langchain-openai turns
# straight back into a dict with `model_dump()`. Posting through the client's public `post` with
# `cast_to=object` keeps its auth, retries, errors and SSE parsing, and hands over the JSON as
# is: sources-to-last-token of a 16-chunk answer went from 20.2 ms to 13.7 ms in process.


def _chat_request(params: dict[str, Any]) -> tuple[dict[str, Any], openai.RequestOptions, bool]:
    """Split `create(**params)` into the JSON body, the request options and the stream flag,
    as the SDK's `create` does: request options are not body fields, and NotGiven/Omit
    values are left out (None stays, and is sent as null)."""
    params = dict(params)
    extra_headers = params.pop("extra_headers", None)
    extra_query = params.pop("extra_query", None)
    extra_body = params.pop("extra_body", None)
    timeout = params.pop("timeout", openai.NOT_GIVEN)
    body = {k: v for k, v in params.items() if not isinstance(v, openai.NotGiven | openai.Omit)}
    options: openai.RequestOptions = {"security": {"bearer_auth": True}}  # as chat.completions.create
    if extra_headers is not None:
        options["headers"] = extra_headers
    if extra_query is not None:
        options["params"] = extra_query
    if extra_body is not None:
        options["extra_json"] = extra_body  # merged into the body by the client, over the params
    if not isinstance(timeout, openai.NotGiven):
        options["timeout"] = timeout
    return body, options, bool(body.get("stream"))


def _sdk_attribute(raw: RawChatCompletions | AsyncRawChatCompletions, name: str) -> Any:
    # Private names aren't delegated: copy and pickle look some up before __init__ has run.
    if name.startswith("_"):
        raise AttributeError(name)
    return getattr(raw._root.chat.completions, name)


class RawChatCompletions:
    """`client.chat.completions` whose `create` returns plain JSON: a dict, or a `Stream` of
    dict chunks. Everything else (`with_raw_response`, `parse`, `stream`, ...) is the SDK's.

    langchain-openai streams through `create`; its non-streamed calls go through
    `with_raw_response.create` and stay typed, which they must: ChatDeepSeek reads
    `reasoning_content` only from a typed (non-dict) response.
    """

    def __init__(self, root: openai.OpenAI) -> None:
        self._root = root

    def __getattr__(self, name: str) -> Any:
        return _sdk_attribute(self, name)

    def create(self, **params: Any) -> Any:
        """POST /chat/completions without the typed request and response layer."""
        if "response_format" in params:  # the SDK checks it (and refers pydantic ones to parse)
            return self._root.chat.completions.create(**params)
        body, options, stream = _chat_request(params)
        return self._root.post(
            "/chat/completions",
            body=body,
            cast_to=object,
            options=options,
            stream=stream,
            stream_cls=openai.Stream[object],
        )


class AsyncRawChatCompletions:
    """The async `RawChatCompletions`: `create` returns a dict, or a stream of dict chunks.

    Streams go straight through `http` (the model's own httpx client) when it is given: the
    SDK's request building and SSE layers cost ~2 ms an answer here (its `_build_request`
    alone ~1 ms). Errors are the SDK's own exception types, made by the SDK from the response.
    """

    def __init__(self, root: openai.AsyncOpenAI, http: httpx.AsyncClient | None = None) -> None:
        self._root = root
        self._http = http
        self._headers: dict[str, str] | None = None

    def __getattr__(self, name: str) -> Any:
        return _sdk_attribute(self, name)

    async def create(self, **params: Any) -> Any:
        """POST /chat/completions without the typed request and response layer."""
        if "response_format" in params:
            return await self._root.chat.completions.create(**params)
        body, options, stream = _chat_request(params)
        if stream and self._http is not None:
            return await self._stream(body, options)
        return await self._root.post(
            "/chat/completions",
            body=body,
            cast_to=object,
            options=options,
            stream=stream,
            stream_cls=openai.AsyncStream[object],
        )

    def _default_headers(self) -> dict[str, str]:
        if self._headers is None:
            sdk_headers = {k: v for k, v in self._root.default_headers.items() if isinstance(v, str)}
            self._headers = {**sdk_headers, "Authorization": f"Bearer {self._root.api_key}"}
        return self._headers

    async def _stream(self, body: dict[str, Any], options: openai.RequestOptions) -> ChunkStream:
        assert self._http is not None
        url = f"{str(self._root.base_url).rstrip('/')}/chat/completions"
        headers = {**self._default_headers(), "Accept": "text/event-stream", **(options.get("headers") or {})}
        request = self._http.build_request(
            "POST",
            url,
            json={**body, **(options.get("extra_json") or {})},
            headers={k: v for k, v in headers.items() if isinstance(v, str)},
            params=options.get("params"),  # type: ignore[arg-type]
            timeout=options.get("timeout", httpx.USE_CLIENT_DEFAULT),  # type: ignore[arg-type]
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise openai.APIConnectionError(request=request) from exc  # type: ignore[arg-type]
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise self._root._make_status_error_from_response(response)  # type: ignore[arg-type]
        return ChunkStream(response)


class ChunkStream:
    """The chunks of a streamed chat completion as dicts (`async for`, `async with`).

    A task of its own reads the response, so that pieces of text that arrived while the
    consumer was busy reach it as one chunk (see `join_text_deltas`): forwarding a chunk
    through LangChain, LangServe and the client's socket costs ~0.3 ms here, so a reply
    that arrives in a burst would otherwise pay that once per token. Nothing waits to be
    joined: the consumer gets whatever has arrived as soon as it asks.

    The reader task also keeps a client that leaves from interrupting the close of the
    connection upstream (see `close`).

    The SSE parsing is ours rather than httpx-sse's, which refuses any response without a
    `text/event-stream` content type; the SDK's parser does not check it either.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading, and close the HTTP response (and so the request upstream)."""
        reader = self._reader
        if reader is None:
            await self.response.aclose()
            return
        # Cancelled once only, and waited for with asyncio.wait rather than `await reader`:
        # a second cancellation (a second close, or anyio cancelling this task again and
        # again while a client that left is torn down) would interrupt the reader's own
        # close of the connection, which then stayed open while DeepSeek went on generating.
        if not self._stopping:
            self._stopping = True
            reader.cancel()
        await asyncio.wait({reader})

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        received: list[Any] = []  # chunks, then _END or the exception that ended the stream
        arrived = asyncio.Event()
        self._reader = reader = asyncio.get_running_loop().create_task(self._read(received, arrived))
        _readers.add(reader)
        reader.add_done_callback(_readers.discard)
        try:
            while True:
                while not received:  # (the reader ends every stream with _END or an exception)
                    arrived.clear()
                    await arrived.wait()
                batch = received[:]
                received.clear()
                last = batch[-1]
                ended = last is _END or isinstance(last, BaseException)
                for chunk in join_text_deltas(batch[:-1] if ended else batch):
                    yield chunk
                if isinstance(last, BaseException):
                    raise last
                if ended:
                    return
        finally:
            await self.close()

    async def _read(self, received: list[Any], arrived: asyncio.Event) -> None:
        try:
            async for chunk in self._events():
                received.append(chunk)
                if not arrived.is_set():
                    # The consumer is waiting: hand this chunk over now, before parsing the
                    # rest of a burst (what arrives while it is forwarded is joined). The
                    # first token of a burst left the chain 1.0-1.2 ms after the upstream sent
                    # it this way, against 2.0-2.1 ms, for +0.2 ms on the whole answer.
                    arrived.set()
                    await asyncio.sleep(0)
            received.append(_END)
        except Exception as exc:  # handed to the consumer, raised there
            received.append(exc)
        except asyncio.CancelledError:  # stopped by close(): a consumer still waiting fails
            received.append(openai.APIConnectionError(request=self.response.request))  # type: ignore[arg-type]
            raise
        finally:
            arrived.set()
            try:
                await self.response.aclose()
            except httpx.TransportError:  # the stream is over either way
                log.debug("closing the answer stream failed", exc_info=True)

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        request = self.response.request
        data: list[str] = []
        done = False
        try:
            async for line in self.response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith("data: ") else line[5:])
                    continue
                if line or not data or done:
                    continue  # comments (keep-alives), other fields, empty events, the tail
                event, data = "\n".join(data), []
                if event.startswith("[DONE]"):
                    # Read on to the end of the body, so the connection goes back to the pool.
                    done = True
                    continue
                chunk = json.loads(event)
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else None
                    if not isinstance(message, str) or not message:
                        message = "An error occurred during streaming"  # the SDK's words
                    raise openai.APIError(
                        message=message,
                        request=request,  # type: ignore[arg-type]
                        body=error,
                    )
                yield chunk
        except httpx.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise openai.APIConnectionError(request=request) from exc  # type: ignore[arg-type]


_END = object()
# Running readers, so none is garbage-collected while it still closes its connection.
_readers: set[asyncio.Task[None]] = set()
TEXT_FIELDS = ("content", "reasoning_content")


def _text_field(chunk: Any) -> str | None:
    """The delta field a chunk carries when it is nothing but a piece of answer or reasoning."""
    if not isinstance(chunk, dict) or chunk.get("usage") or len(chunk.get("choices") or ()) != 1:
        return None
    choice = chunk["choices"][0]
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("logprobs"):
        return None
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return None
    present = [key for key, value in delta.items() if value is not None]
    if len(present) == 1 and present[0] in TEXT_FIELDS and isinstance(delta[present[0]], str):
        return present[0]
    return None


def join_text_deltas(chunks: list[Any]) -> list[Any]:
    """The chunks with each run of consecutive pieces of the same text (answer or reasoning)
    joined into its first chunk. Anything else (the role, a finish reason, usage, tool calls,
    logprobs) stays a chunk of its own, in its place."""
    joined: list[Any] = []
    joined_field: str | None = None
    for chunk in chunks:
        field = _text_field(chunk)
        if field is not None and field == joined_field:
            previous = joined[-1]["choices"][0]
            if previous.get("index") == chunk["choices"][0].get("index"):
                # Ours to change: parsed from the response for this stream alone.
                previous["delta"][field] += chunk["choices"][0]["delta"][field]
                continue
        joined.append(chunk)
        joined_field = field
    return joined


class DeepSeekChat(ChatDeepSeek):
    """ChatDeepSeek with thinking as a plain switch, so it can be set per request.

    ChatDeepSeek (not ChatOpenAI) because it keeps the `reasoning_content` that DeepSeek
    streams while thinking, and reads its prompt-cache usage fields.
    """

    thinking: bool = False

    def __repr_args__(self) -> Any:
        # LangChain's tracing serializes a model it can't load back as its repr, once per
        # instance, and every request's configured copy is a new instance: pydantic's repr
        # of all fields (clients included) cost ~0.6 ms an answer. These say what matters.
        return [
            ("model_name", self.model_name),
            ("api_base", self.api_base),
            ("temperature", self.temperature),
            ("thinking", self.thinking),
        ]

    @model_validator(mode="after")
    def _raw_chat_completions(self) -> Self:
        """Swap the SDK's chat.completions for the raw ones (see RawChatCompletions).

        Runs after ChatDeepSeek built the root clients. Configured copies get the wrapped
        clients passed in and keep them; a client that isn't the root's own is left alone.
        """
        root, async_root = self.root_client, self.root_async_client
        if root is not None and self.client is root.chat.completions:
            self.client = RawChatCompletions(root)
        if async_root is not None and self.async_client is async_root.chat.completions:
            self.async_client = AsyncRawChatCompletions(async_root, self.http_async_client)
        return self

    @property
    def _default_params(self) -> dict[str, Any]:
        params = super()._default_params
        params["extra_body"] = {**(params.get("extra_body") or {}), **thinking_body(self.thinking)}
        if self.thinking:
            # Sampling settings are ignored in thinking mode; don't send them.
            params.pop("temperature", None)
        return params


class PerLoopTransport(httpx.AsyncBaseTransport):
    """One connection pool per event loop.

    Pooled connections belong to the loop that opened them. The server answers on its own
    loop and synchronous callers on a background one (chains/rag.py), so a single pool
    would hand one loop's connections to the other.
    """

    def __init__(self) -> None:
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncHTTPTransport] = (
            weakref.WeakKeyDictionary()
        )

    def _pool(self) -> httpx.AsyncHTTPTransport:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = httpx.AsyncHTTPTransport()
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pool().handle_async_request(request)

    async def aclose(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()


class ConfiguredOnDemand(RunnableConfigurableFields):  # type: ignore[type-arg]
    """Configurable fields that build a configured copy of the model only when a call
    changes one of them.

    LangChain's own rebuilds the model (a pydantic validation of every field, ~0.5 ms an
    answer) whenever a field has an option list, as `model` does, and LangServe fills in
    every field's default as soon as a request brings any config at all.
    """

    def _prepare(self, config: RunnableConfig | None = None) -> tuple[Runnable, RunnableConfig]:
        config = ensure_config(config)
        asked = config.get("configurable", {})
        for key, spec in self.fields.items():
            if spec.id not in asked:
                continue
            value = asked[spec.id]
            if isinstance(spec, ConfigurableFieldSingleOption):
                if value not in spec.options:
                    return super()._prepare(config)  # which names the unknown option
                value = spec.options[value]
            if value != getattr(self.default, key):
                return super()._prepare(config)
        return self.default, config


def make_llm(settings: Settings) -> Runnable | None:
    """The chat model (None without DEEPSEEK_API_KEY), with configurable fields
    `model`, `temperature` and `thinking` for LangServe's per-request config."""
    if not settings.llm_configured:
        return None
    # Own HTTP clients per model: langchain-openai's shared default async client is bound
    # to the first event loop that uses it, which breaks apps that run more than one loop.
    timeout = httpx.Timeout(settings.deepseek_timeout, connect=min(10.0, settings.deepseek_timeout))
    model = DeepSeekChat(
        http_client=httpx.Client(timeout=timeout),
        http_async_client=httpx.AsyncClient(timeout=timeout, transport=PerLoopTransport()),
        model_name=settings.deepseek_model,
        api_base=settings.deepseek_base_url,
        api_key=settings.deepseek_api_key,
        temperature=0.0,
        timeout=timeout,
        # The answer stream retries on its own, and only before the first token (chains/rag.py).
        max_retries=0,
        # Off: the answer stream has its own stall and deadline limits (chains/rag.py), and
        # langchain-openai's per-chunk timeout ran every chunk in a task of its own.
        stream_chunk_timeout=None,
        stream_usage=True,
        # Explicit: configured copies are rebuilt from every field, and an explicit
        # streaming=False (the default, copied) would turn their streams into one chunk.
        streaming=True,
    )
    models = settings.model_list
    return ConfiguredOnDemand(
        default=model,
        fields=dict(
            model_name=ConfigurableFieldSingleOption(
                id="model",
                name="Model",
                description="DeepSeek model id.",
                options={m: m for m in models},
                default=settings.deepseek_model,
            ),
            temperature=ConfigurableField(id="temperature", name="Temperature", description="0 to 2."),
            thinking=ConfigurableField(
                id="thinking",
                name="Thinking",
                description="Let the model reason before answering; its reasoning streams separately.",
            ),
        ),
    )


def _is_transport_error(exc: BaseException) -> bool:
    # openai 3 runs on httpx2 and may surface the HTTP library's own errors mid-stream.
    return any(
        cls.__name__ in ("TransportError", "RemoteProtocolError", "NetworkError")
        and cls.__module__.startswith(("httpx", "httpcore"))
        for cls in type(exc).__mro__
    )


def is_retryable(exc: BaseException) -> bool:
    """Worth another try: rate limits, server errors and broken connections."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (429, 500, 502, 503, 504)
    return isinstance(exc, openai.APIConnectionError) or _is_transport_error(exc)


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After in seconds, if it sent one."""
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def describe_llm_error(exc: BaseException, where: str = "the DeepSeek API") -> LLMError | None:
    """Our error for an exception from the OpenAI client (`where`: the base URL), or None."""
    import openai

    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, openai.AuthenticationError):
        return LLMError(f"DeepSeek rejected the API key (401) at {where}: check DEEPSEEK_API_KEY")
    if isinstance(exc, openai.APITimeoutError):
        return LLMTimeoutError(f"DeepSeek did not answer in time at {where}")
    if isinstance(exc, openai.APIConnectionError):
        return LLMError(f"cannot reach DeepSeek at {where}: check DEEPSEEK_BASE_URL and the network")
    if isinstance(exc, openai.RateLimitError):
        return LLMError(f"DeepSeek is rate limiting requests (429) at {where}: try again later")
    if isinstance(exc, openai.APIStatusError):
        message = exc.message if hasattr(exc, "message") else str(exc)
        return LLMError(f"DeepSeek answered {exc.status_code} at {where}: {message}")
    if _is_transport_error(exc):
        return LLMError(f"the connection to DeepSeek at {where} broke mid-answer: {exc}")
    return None
