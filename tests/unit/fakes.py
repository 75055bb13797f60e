"""Small langchain-core fakes for unit tests: no model, no Milvus, no network."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
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
    """Answers with a fixed text (streamed word by word) and records what it was sent."""

    answer: str = "Milvus stores inserted data in MinIO or S3 [1]."
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    error: Any = None

    @property
    def _llm_type(self) -> str:
        return "recording-fake"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls.append(list(messages))
        if self.error is not None:
            raise self.error
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=self.answer))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        self.calls.append(list(messages))
        if self.error is not None:
            raise self.error
        for piece in re.findall(r"\S+\s*", self.answer):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
