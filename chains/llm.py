"""DeepSeek through `ChatDeepSeek` (langchain-deepseek): model and temperature settable per
request, DeepSeek V4's thinking switch, and DeepSeek's errors in words users can act on."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx
import openai
from langchain_core.runnables import (
    ConfigurableField,
    ConfigurableFieldSingleOption,
    ConfigurableFieldSpec,
    Runnable,
)
from langchain_deepseek import ChatDeepSeek

from errors import LLMError, LLMTimeoutError
from settings import Settings

# The per-request switch for DeepSeek's reasoning. The RAG chain declares it and binds the
# matching `extra_body` (with_thinking): it is a request field of DeepSeek's, not a setting of
# the model that LangChain could configure.
THINKING = ConfigurableFieldSpec(
    id="thinking",
    annotation=bool,
    name="Thinking",
    description="Let the model reason before answering; its reasoning streams separately.",
    default=False,
)


def thinking_body(thinking: bool) -> dict[str, Any]:
    """DeepSeek V4's switch, sent as `extra_body`. V4 thinks unless told not to."""
    return {"thinking": {"type": "enabled" if thinking else "disabled"}}


def with_thinking(llm: Runnable, thinking: bool) -> Runnable:
    """The model with DeepSeek's thinking switched on or off for the calls made through it.

    A bound `extra_body` replaces the model's own (langchain-openai merges call arguments
    over the model's parameters key by key), so this decides whatever the model says.
    DeepSeek ignores `temperature` while thinking; it is sent anyway.
    """
    return llm.bind(extra_body=thinking_body(thinking))


class PerLoopTransport(httpx.AsyncBaseTransport):
    """One connection pool per event loop.

    Pooled connections (and the pool's own locks) belong to the loop that made them. The
    server answers on its loop and synchronous callers run the same chain on a background
    loop (chains/rag.py), so one pool shared by both fails with "bound to a different event
    loop"; the openai SDK's default client keeps one pool per client, as httpx does.
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


def make_llm(settings: Settings) -> Runnable | None:
    """The chat model (None without DEEPSEEK_API_KEY), with `model` (one of DEEPSEEK_MODELS)
    and `temperature` configurable per request; thinking is off unless bound on
    (with_thinking)."""
    if not settings.llm_configured:
        return None
    timeout = httpx.Timeout(settings.deepseek_timeout, connect=min(10.0, settings.deepseek_timeout))
    model = ChatDeepSeek(
        model_name=settings.deepseek_model,
        api_base=settings.deepseek_base_url,
        api_key=settings.deepseek_api_key,
        temperature=0.0,
        timeout=timeout,
        extra_body=thinking_body(False),
        # Configured copies of the model are given these clients, so every request shares
        # their connections (see PerLoopTransport for why the async one is ours).
        http_client=httpx.Client(timeout=timeout),
        http_async_client=httpx.AsyncClient(timeout=timeout, transport=PerLoopTransport()),
        # The answer stream retries on its own, and only before the first token (chains/rag.py).
        max_retries=0,
        # Off: the answer stream has its own stall and deadline limits with messages that name
        # their settings (chains/rag.py); this one would fire as a bare TimeoutError.
        stream_chunk_timeout=None,
        # DeepSeek's usage (with its prompt cache counts) comes in the stream's last chunk.
        stream_usage=True,
        # invoke() streams too, so that it has the same usage and limits.
        streaming=True,
    )
    return model.configurable_fields(
        model_name=ConfigurableFieldSingleOption(
            id="model",
            name="Model",
            description="DeepSeek model id.",
            options={m: m for m in settings.model_list},
            default=settings.deepseek_model,
        ),
        temperature=ConfigurableField(id="temperature", name="Temperature", description="0 to 2."),
    )


def is_retryable(exc: BaseException) -> bool:
    """Worth another try: rate limits, server errors and broken connections (timeouts too)."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (429, 500, 502, 503, 504)
    return isinstance(exc, openai.APIConnectionError)


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After in seconds, if it sent one."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    value = exc.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def describe_llm_error(exc: BaseException, where: str = "the DeepSeek API") -> LLMError | None:
    """Our error for an exception from the OpenAI client (`where`: the base URL), or None."""
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
        return LLMError(f"DeepSeek answered {exc.status_code} at {where}: {exc.message}")
    if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
        return LLMError(f"DeepSeek reported an error at {where}: {exc.message}")
    return None
