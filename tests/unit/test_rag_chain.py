"""build_rag_chain with a fake retriever and fake chat models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage

from chains.llm import make_llm
from chains.prompts import SYSTEM_PROMPT
from chains.rag import PASSAGE_PREVIEW_CHARS, build_chat_chain, build_rag_chain, to_sources
from chains.retrieval import MilvusRetriever, per_request_settings
from errors import InputError
from settings import Settings
from tests.unit.fakes import FAQ_DOCS, FixedRetriever, RecordingChat, passage

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


def test_without_llm_the_answer_shows_what_each_passage_says() -> None:
    long_text = "Product FAQ > Sizing\n\n" + " ".join(f"word{i}" for i in range(200))
    documents = [*FAQ_DOCS, passage(long_text, "faq/product_faq.md", ["Product FAQ", "Sizing"], 0.3)]
    chain = build_rag_chain(FixedRetriever(documents=documents), None)
    result = chain.invoke({"question": QUESTION})
    answer = result["answer"]
    assert "DEEPSEEK_API_KEY" in answer
    # Each passage's text, numbered like the sources; the sources list alone names them.
    assert "[1] Inserted data are stored in MinIO or S3." in answer
    assert "[2] Run lscpu to check SIMD support." in answer
    assert "Where does Milvus store data?" not in answer and "faq/operational_faq.md" not in answer
    third = answer.split("[3] ")[1]
    assert third.startswith("word0 word1 ") and third.endswith(" …") and "word199" not in third
    assert 250 <= len(third) <= PASSAGE_PREVIEW_CHARS + 2
    assert result["sources"] == to_sources(documents)

    streamed = list(chain.stream({"question": QUESTION}))
    assert "".join(c.get("answer", "") for c in streamed) == answer


def test_without_llm_the_chat_answer_lists_the_sources_once() -> None:
    chat = build_chat_chain(build_rag_chain(FixedRetriever(documents=FAQ_DOCS), None))
    text = chat.invoke({"question": QUESTION})
    assert text.count("Where does Milvus store data?") == 1
    assert text.count("faq/operational_faq.md") == 1
    assert "[1] Inserted data are stored in MinIO or S3." in text
    assert text.endswith(
        "Sources:\n[1] faq/product_faq.md — Product FAQ > Where does Milvus store data?\n"
        "[2] faq/operational_faq.md — Operational FAQ > CPU"
    )


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


def test_every_per_request_setting_is_one_the_playground_can_draw() -> None:
    """LangServe's playground cannot draw `anyOf: [X, null]` (an Optional field), and shows
    no default for an enum behind a `$ref`: its page stayed blank. See tests/browser."""
    settings = Settings(_env_file=None, DEEPSEEK_API_KEY="sk-test", MILVUS_URI="unused.db")
    retriever = per_request_settings(MilvusRetriever(store=None))  # no search runs
    chain = build_rag_chain(retriever, make_llm(settings))
    for runnable in (chain, build_chat_chain(chain), retriever):
        schema = runnable.config_schema(include=["configurable"]).model_json_schema()
        fields = schema["$defs"]["Configurable"]["properties"]
        assert "null" not in json.dumps(fields) and "$ref" not in json.dumps(fields)
        assert {"k", "search", "source", "filter"} <= set(fields)
        assert all("type" in field and "default" in field for field in fields.values())
    assert set(fields) == {"k", "search", "source", "filter"}  # the retriever's own
    model_fields = chain.config_schema(include=["configurable"]).model_json_schema()["$defs"]
    model_fields = model_fields["Configurable"]["properties"]
    assert model_fields["model"]["enum"] == settings.model_list
    assert model_fields["model"]["default"] == settings.deepseek_model
    assert model_fields["temperature"]["type"] == "number" and model_fields["temperature"]["default"] == 0
    assert model_fields["thinking"]["type"] == "boolean"


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
