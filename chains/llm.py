"""DeepSeek through its OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

import httpx
from langchain_openai import ChatOpenAI

from errors import LLMError
from settings import Settings


def thinking_body(thinking: bool) -> dict[str, Any]:
    """DeepSeek V4 thinks by default; RAG answers turn it off unless asked."""
    return {"thinking": {"type": "enabled" if thinking else "disabled"}}


def make_llm(settings: Settings, thinking: bool = False) -> ChatOpenAI | None:
    """The chat model, or None when no DEEPSEEK_API_KEY is set."""
    if not settings.llm_configured:
        return None
    # Own HTTP clients per model: langchain-openai's shared default async client is bound
    # to the first event loop that uses it, which breaks apps that run more than one loop.
    timeout = httpx.Timeout(settings.deepseek_timeout, connect=min(10.0, settings.deepseek_timeout))
    return ChatOpenAI(
        http_client=httpx.Client(timeout=timeout),
        http_async_client=httpx.AsyncClient(timeout=timeout),
        model=settings.deepseek_model,
        base_url=settings.deepseek_base_url,
        api_key=settings.deepseek_api_key,
        temperature=0.0 if not thinking else None,
        timeout=settings.deepseek_timeout,
        max_retries=settings.deepseek_max_retries,
        stream_usage=True,
        extra_body=thinking_body(thinking),
    )


def describe_llm_error(exc: BaseException, settings: Settings) -> LLMError | None:
    """Our error for an exception from the OpenAI client, or None if it is not one."""
    import openai

    where = settings.deepseek_base_url
    if isinstance(exc, openai.AuthenticationError):
        return LLMError(f"DeepSeek rejected the API key (401) at {where}: check DEEPSEEK_API_KEY")
    if isinstance(exc, openai.APITimeoutError):
        return LLMError(f"DeepSeek did not answer in time at {where}")
    if isinstance(exc, openai.APIConnectionError):
        return LLMError(f"cannot reach DeepSeek at {where}: check DEEPSEEK_BASE_URL and the network")
    if isinstance(exc, openai.RateLimitError):
        return LLMError(f"DeepSeek is rate limiting requests (429) at {where}: try again later")
    if isinstance(exc, openai.APIStatusError):
        message = exc.message if hasattr(exc, "message") else str(exc)
        return LLMError(f"DeepSeek answered {exc.status_code} at {where}: {message}")
    return None
