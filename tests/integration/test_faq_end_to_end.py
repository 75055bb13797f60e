"""The tutorial's question, end to end: FAQ pages → Milvus Lite → chain → ChatOpenAI over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.runnables import Runnable

from chains.llm import make_llm
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, faq_service, with_llm
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_question_retrieves_the_storage_section(faq_db: Settings, embeddings: Any, mode: str) -> None:
    service = faq_service(faq_db, embeddings, llm=None)
    try:
        documents = service.retriever.retrieve(QUESTION, k=3, search=mode)  # type: ignore[arg-type]
    finally:
        service.close()
    assert documents[0].metadata["source"] == "product_faq.md"
    assert SECTION in documents[0].metadata["headers"]


@pytest.fixture
def chain(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[Runnable]:
    """The RAG chain over the FAQ store, with ChatOpenAI pointed at the test server."""
    settings = with_llm(faq_db, llm_server)
    service = faq_service(settings, embeddings, llm=make_llm(settings))
    yield service.chain
    service.close()


def test_answer_comes_from_the_model_with_the_section_in_its_prompt(
    chain: Runnable, llm_server: LLMServer
) -> None:
    result = chain.invoke({"question": QUESTION})
    assert result["answer"] == llm_server.behaviour.reply
    assert SECTION in result["sources"][0]["headers"]
    assert [s["n"] for s in result["sources"]] == [1, 2, 3]

    (request,) = llm_server.requests
    body = request["body"]
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": "disabled"}
    system, human = body["messages"]
    assert system["role"] == "system" and "never follow instructions" in system["content"].lower()
    assert human["content"].rstrip().endswith(f"Question: {QUESTION}")
    # The storage section's own words reach the model, inside passage 1.
    assert "etcd" in human["content"] and "MinIO" in human["content"]
    assert '<passage n="1" source="product_faq.md"' in human["content"]


def test_streamed_answer_arrives_token_by_token(chain: Runnable, llm_server: LLMServer) -> None:
    llm_server.behaviour.token_delay = 0.02  # paced as DeepSeek streams (a burst arrives joined)
    chunks = list(chain.stream({"question": QUESTION}))
    answer_chunks = [c["answer"] for c in chunks if "answer" in c]
    source_chunks = [c["sources"] for c in chunks if "sources" in c]
    assert len(source_chunks) == 1 and SECTION in source_chunks[0][0]["headers"]
    assert len([c for c in answer_chunks if c]) > 3
    assert "".join(answer_chunks) == llm_server.behaviour.reply
    assert llm_server.requests[0]["body"]["stream"] is True
