"""The `rag` command with fake services: exit codes, one-line errors, printed output."""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import pytest
from langchain_core.runnables import ConfigurableField

import cli
from chains.rag import build_rag_chain
from settings import Settings
from tests.unit.fakes import FAQ_DOCS, FixedRetriever, RecordingChat, openai_http


def make_settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **{"DEEPSEEK_API_KEY": None, **values})


def run(argv: list[str], **settings_values: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(argv, settings_factory=lambda: make_settings(**settings_values), out=out)
    return code, out.getvalue()


class FakeService:
    def __init__(self, llm: Any = None, documents: list[Any] | None = None):
        self.retriever = FixedRetriever(documents=FAQ_DOCS if documents is None else documents)
        configurable = self.retriever.configurable_fields(k=ConfigurableField(id="k"))
        self.chain = build_rag_chain(configurable, llm)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the service (model, Milvus) was opened")

    monkeypatch.setattr(cli, "_service", refuse)


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Patch `cli._service`; tests set holder["llm"] / holder["documents"] first."""
    holder: dict[str, Any] = {"llm": RecordingChat(), "documents": None}

    def open_fake(settings: Settings, llm: Any = "auto") -> FakeService:
        holder["settings"] = settings
        holder["service"] = FakeService(holder["llm"], holder["documents"])
        return holder["service"]

    monkeypatch.setattr(cli, "_service", open_fake)
    return holder


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- usage errors -------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_a_usage_error(
    no_service: None, capsys: pytest.CaptureFixture[str], question: str
) -> None:
    code, out = run(["ask", question])
    assert code == 2
    assert out == ""
    assert one_line(capsys.readouterr().err) == "rag: error: the question is empty"


def test_too_long_question_is_a_usage_error(no_service: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["ask", "x" * 11], RAG_MAX_QUESTION_CHARS=10)
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "11 characters" in line and "RAG_MAX_QUESTION_CHARS" in line


def test_question_at_the_limit_is_accepted(
    service: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(["ask", "x" * 10, "--no-stream"], RAG_MAX_QUESTION_CHARS=10)
    assert code == 0
    assert capsys.readouterr().err == ""


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"], settings_factory=make_settings, out=io.StringIO())
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("ingest", "search", "ask", "serve", "stats"):
        assert command in help_text


def test_subcommand_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["ask", "--help"], settings_factory=make_settings, out=io.StringIO())
    assert info.value.code == 0
    assert "--no-stream" in capsys.readouterr().out


def test_missing_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([], settings_factory=make_settings, out=io.StringIO())
    assert info.value.code == 2


def test_invalid_configuration_is_one_line(no_service: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    code = cli.main(["ask", "q"], settings_factory=lambda: Settings(_env_file=None, RAG_TOP_K=0), out=out)
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("rag: error: invalid configuration") and "RAG_TOP_K" in line


# --- ask ----------------------------------------------------------------------------------


def test_ask_streams_the_answer_then_the_sources(
    service: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(["ask", "Where does Milvus store data?"])
    assert code == 0
    llm = service["llm"]
    answer_at = out.index(llm.answer)
    sources_at = out.index("Sources:")
    assert answer_at < sources_at
    assert "[1] faq/product_faq.md — Product FAQ > Where does Milvus store data?" in out
    assert "[2] faq/operational_faq.md — Operational FAQ > CPU" in out
    assert service["service"].closed == 1
    assert service["service"].retriever.queries == ["Where does Milvus store data?"]
    assert capsys.readouterr().err == ""


def test_ask_json_prints_the_chain_output(service: dict[str, Any]) -> None:
    code, out = run(["ask", "Where does Milvus store data?", "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["answer"] == service["llm"].answer
    assert [s["n"] for s in result["sources"]] == [1, 2]
    assert result["sources"][0]["source"] == "faq/product_faq.md"


def test_ask_no_stream_prints_answer_and_sources(service: dict[str, Any]) -> None:
    code, out = run(["ask", "q?", "--no-stream"])
    assert code == 0
    assert out.startswith(service["llm"].answer + "\n")
    assert "Sources:" in out


def test_ask_k_sets_the_retrievers_k(service: dict[str, Any]) -> None:
    code, _ = run(["ask", "q?", "-k", "5", "--json"])
    assert code == 0
    assert service["service"].retriever.seen_k == [5]


def test_ask_with_no_passages_prints_no_sources_block(service: dict[str, Any]) -> None:
    service["documents"] = []
    code, out = run(["ask", "q?"])
    assert code == 0
    assert "Sources:" not in out


def test_llm_failure_is_one_explained_line(
    service: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    request = openai_http.Request("POST", "https://api.deepseek.com/chat/completions")
    service["llm"] = RecordingChat(
        error=openai.AuthenticationError(
            "Authentication Fails", response=openai_http.Response(401, request=request), body=None
        )
    )
    code, _ = run(["ask", "q?"])
    assert code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("rag: error: DeepSeek rejected the API key") and "DEEPSEEK_API_KEY" in line
    assert service["service"].closed == 1


def test_unexpected_failure_is_one_line(service: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    service["llm"] = RecordingChat(error=RuntimeError("boom\nsecond line\nthird line"))
    code, _ = run(["ask", "q?", "--no-stream"])
    assert code == 1
    assert one_line(capsys.readouterr().err) == "rag: error: RuntimeError: boom"


# --- search -------------------------------------------------------------------------------


class RecordingRetriever:
    def __init__(self, documents: list[Any]):
        self.documents = documents
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def retrieve(self, query: str, **kwargs: Any) -> list[Any]:
        self.calls.append((query, kwargs))
        return self.documents


@pytest.fixture
def search_service(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = FakeService()
    fake.retriever = RecordingRetriever(FAQ_DOCS)  # type: ignore[assignment]
    monkeypatch.setattr(cli, "_service", lambda settings, llm="auto": fake)
    return fake


def test_search_prints_ranked_results(search_service: Any) -> None:
    code, out = run(["search", "where is data stored", "-k", "2", "--mode", "sparse", "--source", "faq/*"])
    assert code == 0
    assert search_service.retriever.calls == [
        ("where is data stored", {"k": 2, "search": "sparse", "source_glob": "faq/*", "expr": None})
    ]
    lines = out.splitlines()
    assert lines[0] == "? where is data stored"
    assert lines[1] == "[1] 0.910  faq/product_faq.md — Product FAQ > Where does Milvus store data?"
    assert "Inserted data are stored in MinIO or S3." in lines[2]
    assert any(line.startswith("[2] 0.420  faq/operational_faq.md") for line in lines)
    assert search_service.closed == 1


def test_search_json_reads_queries_from_stdin(search_service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first query\n\n  \nsecond query\n"))
    code, out = run(["search", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in rows] == ["first query", "second query"]
    assert rows[0]["results"][0] == {
        "text": FAQ_DOCS[0].page_content,
        "source": "faq/product_faq.md",
        "headers": ["Product FAQ", "Where does Milvus store data?"],
        "page": None,
        "last_page": None,
        "score": 0.91,
    }


def test_search_without_results_hints_at_ingest(search_service: Any) -> None:
    search_service.retriever.documents = []
    code, out = run(["search", "nothing"])
    assert code == 0
    assert "no results" in out and "rag ingest" in out


def test_search_empty_query_closes_the_service(
    search_service: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(["search", "  "])
    assert code == 2
    assert one_line(capsys.readouterr().err) == "rag: error: the question is empty"
    assert search_service.closed == 1


@pytest.mark.parametrize("extra", [[], ["--no-stream"]])
def test_ask_thinking_goes_to_stderr_and_usage_on_request(
    service: dict[str, Any], capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    service["llm"] = RecordingChat(
        reasoning="Passage one says so.",
        usage={"input_tokens": 50, "output_tokens": 5, "total_tokens": 55},
    )
    code, out = run(["ask", "Where is data stored?", "--thinking", "--usage", *extra])
    err = capsys.readouterr().err
    assert code == 0
    assert out.startswith(service["llm"].answer)  # the reasoning never reaches stdout
    assert "Passage one says so." in err and "Passage one" not in out
    assert '"prompt_tokens": 50' in err
    assert "[1] faq/product_faq.md" in out


def test_ask_unknown_model_is_a_usage_error(no_service: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["ask", "q?", "--model", "gpt-4o"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "unknown model 'gpt-4o'" in line and "deepseek-v4-flash" in line
