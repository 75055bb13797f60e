"""build_rag_chain with a fake retriever and fake chat models."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage

from chains.prompts import SYSTEM_PROMPT
from chains.rag import build_rag_chain, to_sources
from errors import InputError
from tests.unit.fakes import FAQ_DOCS, FixedRetriever, RecordingChat

QUESTION = "Where does Milvus store data?"


def expected_sources() -> list[dict[str, Any]]:
    return [
        {
            "n": 1,
            "source": "faq/product_faq.md",
            "headers": ["Product FAQ", "Where does Milvus store data?"],
            "page": None,
            "last_page": None,
            "text": FAQ_DOCS[0].page_content,
            "score": 0.91,
        },
        {
            "n": 2,
            "source": "faq/operational_faq.md",
            "headers": ["Operational FAQ", "CPU"],
            "page": None,
            "last_page": None,
            "text": FAQ_DOCS[1].page_content,
            "score": 0.42,
        },
    ]


def test_invoke_returns_answer_and_numbered_sources() -> None:
    llm = FakeListChatModel(responses=["Data lives in MinIO [1]."])
    chain = build_rag_chain(FixedRetriever(documents=FAQ_DOCS), llm)
    result = chain.invoke({"question": QUESTION})
    assert set(result) == {"answer", "sources"}
    assert result["answer"] == "Data lives in MinIO [1]."
    assert result["sources"] == expected_sources()


def test_prompt_sent_to_the_model_holds_passages_then_question() -> None:
    retriever = FixedRetriever(documents=FAQ_DOCS)
    llm = RecordingChat()
    build_rag_chain(retriever, llm).invoke({"question": f"  {QUESTION}\n"})

    assert retriever.queries == [QUESTION]  # stripped before retrieval
    assert len(llm.calls) == 1
    system, human = llm.calls[0]
    assert isinstance(system, SystemMessage) and system.content == SYSTEM_PROMPT
    assert isinstance(human, HumanMessage)
    text = human.text
    assert '<passage n="1" source="faq/product_faq.md"' in text
    assert '<passage n="2" source="faq/operational_faq.md"' in text
    assert "Inserted data are stored in MinIO or S3." in text
    assert "Run lscpu to check SIMD support." in text
    assert text.index("Inserted data") < text.index("Run lscpu") < text.index(f"Question: {QUESTION}")
    assert text.endswith(f"Question: {QUESTION}")


def test_stream_yields_sources_and_answer_pieces_matching_invoke() -> None:
    llm = RecordingChat(answer="Milvus keeps inserted data in object storage such as MinIO [1].")
    chain = build_rag_chain(FixedRetriever(documents=FAQ_DOCS), llm)

    chunks = list(chain.stream({"question": QUESTION}))
    invoked = chain.invoke({"question": QUESTION})

    source_chunks = [c["sources"] for c in chunks if "sources" in c]
    answer_chunks = [c["answer"] for c in chunks if "answer" in c]
    assert source_chunks == [expected_sources()]
    assert len(answer_chunks) > 1  # token by token, not one final blob
    assert "".join(answer_chunks) == invoked["answer"] == llm.answer
    assert all(set(c) <= {"answer", "sources"} for c in chunks)


def test_without_llm_the_answer_explains_and_lists_sources() -> None:
    chain = build_rag_chain(FixedRetriever(documents=FAQ_DOCS), None)
    result = chain.invoke({"question": QUESTION})
    answer = result["answer"]
    assert "DEEPSEEK_API_KEY" in answer
    assert "[1] faq/product_faq.md — Product FAQ > Where does Milvus store data?" in answer
    assert "[2] faq/operational_faq.md — Operational FAQ > CPU" in answer
    assert result["sources"] == expected_sources()

    streamed = list(chain.stream({"question": QUESTION}))
    assert "".join(c.get("answer", "") for c in streamed) == answer


def test_empty_retrieval_still_answers() -> None:
    llm = RecordingChat(answer="The documents provided do not answer the question.")
    result = build_rag_chain(FixedRetriever(documents=[]), llm).invoke(
        {"question": "What is the moon made of?"}
    )
    assert result == {"answer": "The documents provided do not answer the question.", "sources": []}
    human = llm.calls[0][1].text
    assert "no passages were found" in human
    assert human.endswith("Question: What is the moon made of?")

    offline = build_rag_chain(FixedRetriever(documents=[]), None).invoke({"question": "anything?"})
    assert offline["sources"] == []
    assert "No passages were retrieved" in offline["answer"]


def test_plain_string_input_is_accepted() -> None:
    retriever = FixedRetriever(documents=FAQ_DOCS[:1])
    result = build_rag_chain(retriever, FakeListChatModel(responses=["ok"])).invoke(QUESTION)
    assert result["answer"] == "ok"
    assert retriever.queries == [QUESTION]


def test_retriever_errors_propagate() -> None:
    class Refusing(FixedRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Any]:
            raise InputError("the query is empty")

    with pytest.raises(InputError):
        build_rag_chain(Refusing(), None).invoke({"question": " "})


def test_chain_declares_its_input_and_output() -> None:
    chain = build_rag_chain(FixedRetriever(), None)
    assert "question" in chain.get_input_jsonschema()["properties"]
    assert {"answer", "sources"} <= set(chain.get_output_jsonschema()["properties"])


def test_to_sources_defaults() -> None:
    from langchain_core.documents import Document

    assert to_sources([Document(page_content="t", metadata={})]) == [
        {"n": 1, "source": "", "headers": [], "page": None, "last_page": None, "text": "t", "score": 0.0}
    ]


def test_pdf_passages_are_cited_with_their_pages_in_the_sources_and_the_chat_text() -> None:
    from langchain_core.documents import Document

    from chains.rag import build_chat_chain, format_sources

    pdf = Document(
        page_content="Guide > Backups\n\nBack up nightly.",
        metadata={"source": "guide.pdf", "headers": ["Guide", "Backups"], "page": 3, "last_page": 4},
    )
    chain = build_rag_chain(
        FixedRetriever(documents=[pdf, FAQ_DOCS[0]]), FakeListChatModel(responses=["Nightly [1]."])
    )
    sources = chain.invoke({"question": "How often are backups made?"})["sources"]
    assert (sources[0]["page"], sources[0]["last_page"]) == (3, 4)
    assert format_sources(sources) == (
        "[1] guide.pdf pp. 3-4 — Guide > Backups\n"
        "[2] faq/product_faq.md — Product FAQ > Where does Milvus store data?"
    )
    chat = build_chat_chain(
        build_rag_chain(FixedRetriever(documents=[pdf]), FakeListChatModel(responses=["Nightly [1]."]))
    )
    assert chat.invoke({"question": "How often?"}) == (
        "Nightly [1].\n\nSources:\n[1] guide.pdf pp. 3-4 — Guide > Backups"
    )
