"""Small langchain-core fakes for unit tests: no model, no Milvus, no network."""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

# The HTTP library that the installed openai client is built on (httpx, or httpx2 in
# openai 3): its Request/Response/MockTransport are what openai's exceptions and clients take.
openai_http: Any = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.partition(".")[0])


def passage(text: str, source: str, headers: list[str], score: float) -> Document:
    return Document(page_content=text, metadata={"source": source, "headers": headers, "score": score})


FAQ_DOCS = [
    passage(
        "Product FAQ > Where does Milvus store data?\n\nInserted data are stored in MinIO or S3.",
        "faq/product_faq.md",
        ["Product FAQ", "Where does Milvus store data?"],
        0.91,
    ),
    passage(
        "Operational FAQ > CPU\n\nRun lscpu to check SIMD support.",
        "faq/operational_faq.md",
        ["Operational FAQ", "CPU"],
        0.42,
    ),
]


class FixedRetriever(BaseRetriever):
    """Returns the same documents for every query and records the queries."""

    documents: list[Document] = Field(default_factory=list)
    queries: list[str] = Field(default_factory=list)
    k: int = 3
    seen_k: Any = Field(default_factory=list)  # Any: not copied, so shared with configured copies

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun | None = None
    ) -> list[Document]:
        self.queries.append(query)
        self.seen_k.append(self.k)
        return list(self.documents)


class RecordingChat(BaseChatModel):
    """Answers with a fixed text (streamed word by word) and records what it was sent.

    Faults on demand: `failures` are raised by the next calls, one each; `break_after`
    raises `break_error` after that many streamed words; `stall_after` stops sending after
    that many words (async streams only); `rewrite` answers the condense prompt.
    """

    answer: str = "Milvus stores inserted data in MinIO or S3 [1]."
    reasoning: str | None = None
    usage: dict[str, Any] | None = None
    rewrite: str = "How do I change where Milvus stores data?"
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    call_kwargs: list[dict[str, Any]] = Field(default_factory=list)
    error: Any = None
    failures: list[Any] = Field(default_factory=list)
    break_after: int | None = None
    break_error: Any = None
    stall_after: int | None = None

    @property
    def _llm_type(self) -> str:
        return "recording-fake"

    def _record(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        self.calls.append(list(messages))
        self.call_kwargs.append(kwargs)
        if self.error is not None:
            raise self.error
        if self.failures:
            raise self.failures.pop(0)
        return self.rewrite if "standalone question" in str(messages[0].content) else self.answer

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = self._record(messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _chunks(self, text: str) -> Iterator[ChatGenerationChunk]:
        yield ChatGenerationChunk(message=AIMessageChunk(content=""))  # the role chunk
        if self.reasoning:
            for piece in re.findall(r"\S+\s*", self.reasoning):
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": piece})
                )
        for n, piece in enumerate(re.findall(r"\S+\s*", text)):
            if self.break_after is not None and n == self.break_after:
                raise self.break_error
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        if self.usage is not None:
            yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=self.usage))  # type: ignore[arg-type]

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(self._record(messages, kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for n, chunk in enumerate(self._chunks(self._record(messages, kwargs)), start=-1):
            if self.stall_after is not None and n >= self.stall_after:
                await asyncio.Event().wait()  # silent forever, like a stalled upstream
            yield chunk
