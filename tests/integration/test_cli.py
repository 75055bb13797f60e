"""The `rag` command as a user runs it: real processes, real Milvus Lite, the test LLM server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration

RAG = [sys.executable, "-m", "cli"]
REPO = Path(__file__).resolve().parents[2]
QUESTION = "How is data stored in milvus?"
SECTION = "Where does Milvus store data?"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        RAG + args, cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, str]:
    """An environment with a Lite file holding the FAQ, ingested by `rag ingest`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env["MILVUS_URI"] = str(tmp_path_factory.mktemp("cli") / "cli.db")
    result = run(["ingest", str(corpus / "milvus-faq"), "--json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == 4 and report["added"] == report["total_chunks"] > 60
    env["FAQ_CHUNKS"] = str(report["total_chunks"])
    return env


def test_ingest_again_adds_nothing_and_shows_a_summary(cli_env: dict[str, str], corpus: Path) -> None:
    result = run(["ingest", str(corpus / "milvus-faq")], cli_env)
    assert result.returncode == 0, result.stderr
    assert f"0 chunks added, 0 updated, {cli_env['FAQ_CHUNKS']} unchanged" in result.stdout
    assert "ingest" in result.stderr  # the progress bar
    report = json.loads(run(["ingest", str(corpus / "milvus-faq"), "--json"], cli_env).stdout)
    assert report["model_loaded"] is False, "nothing changed: the embedding model stays unloaded"
    assert set(report) >= {"files", "added", "updated", "unchanged", "deleted", "total_chunks", "seconds"}


def test_a_reader_that_stops_early_ends_the_command_quietly(cli_env: dict[str, str]) -> None:
    """`rag search < questions | head -1`: no error line, no traceback, SIGPIPE's status."""
    questions = "\n".join(f"{QUESTION} {n}" for n in range(200)) + "\n"  # ~1 MB of JSON lines
    process = subprocess.Popen(
        [*RAG, "search", "--json", "-k", "10"],
        cwd=REPO,
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin and process.stdout and process.stderr
    process.stdin.write(questions)
    process.stdin.close()
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does after its line
    assert process.wait(timeout=120) == 141
    assert json.loads(first)["query"] == f"{QUESTION} 0"
    assert process.stderr.read() == ""


def test_search_reads_queries_from_stdin_as_json_lines(cli_env: dict[str, str]) -> None:
    result = run(["search", "--json", "-k", "2"], cli_env, stdin=f"{QUESTION}\netcd pod pending\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [QUESTION, "etcd pod pending"]
    assert all(len(line["results"]) == 2 for line in lines)
    assert SECTION in lines[0]["results"][0]["headers"]
    assert set(lines[0]["results"][0]) == {"text", "source", "headers", "page", "last_page", "score"}
    assert lines[0]["results"][0]["page"] is None  # markdown has no pages


def test_ask_streams_the_answer_then_sources(cli_env: dict[str, str], llm_server: LLMServer) -> None:
    env = {**cli_env, "DEEPSEEK_API_KEY": llm_server.api_key, "DEEPSEEK_BASE_URL": llm_server.url}
    result = run(["ask", QUESTION], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(llm_server.behaviour.reply)
    assert f"[1] product_faq.md — Product FAQ > {SECTION}" in result.stdout
    assert llm_server.requests[-1]["body"]["stream"] is True

    result = run(["ask", QUESTION, "--json", "-k", "2"], env)
    output = json.loads(result.stdout)
    assert output["answer"] == llm_server.behaviour.reply and len(output["sources"]) == 2


@pytest.mark.parametrize(
    ("args", "env_update", "expected"),
    [
        (["ingest", "/no/such/folder"], {}, "no such file or folder"),
        (["ask", "   "], {}, "the question is empty"),
        (["ask", QUESTION], {"DEEPSEEK_API_KEY": "wrong"}, "rejected the API key"),
        (
            ["ask", QUESTION],
            {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_BASE_URL": "closed"},
            "cannot reach DeepSeek",
        ),
        (["search", QUESTION], {"MILVUS_URI": "closed"}, "cannot reach Milvus"),
        (["search", QUESTION, "--filter", "chunk_index =="], {}, "invalid filter '(chunk_index ==)'"),
    ],
)
def test_errors_are_one_readable_line(
    cli_env: dict[str, str], llm_server: LLMServer, args: list[str], env_update: dict[str, str], expected: str
) -> None:
    env = {**cli_env, "DEEPSEEK_BASE_URL": llm_server.url, "DEEPSEEK_MAX_RETRIES": "0", **env_update}
    if env.get("DEEPSEEK_BASE_URL") == "closed":
        env["DEEPSEEK_BASE_URL"] = f"http://127.0.0.1:{closed_port()}/v1"
    if env.get("MILVUS_URI") == "closed":
        env["MILVUS_URI"] = f"http://127.0.0.1:{closed_port()}"
    result = run(args, env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rag: error:"), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_each_verb_takes_a_knowledge_base(cli_env: dict[str, str], tmp_path: Path) -> None:
    """`--kb hr` reads and writes the collection of hr only; the default one is untouched."""
    env = {**cli_env, "RAG_KNOWLEDGE_BASES": "hr,eng"}
    (tmp_path / "leave.md").write_text("# Leave\n\n## Paid leave\n\nEach employee gets 30 days off.\n")
    ingested = run(["ingest", str(tmp_path), "--kb", "hr", "--json"], env)
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["total_chunks"] == 1

    hr = json.loads(run(["stats", "--kb", "hr", "--json"], env).stdout)
    default = json.loads(run(["stats", "--json"], env).stdout)
    assert (hr["knowledge_base"], hr["sources"], hr["total_chunks"]) == ("hr", ["leave.md"], 1)
    assert hr["collection"] == "rag_docs_hr" and hr["knowledge_bases"] == ["default", "hr", "eng"]
    assert default["knowledge_base"] == "default" and default["total_chunks"] == int(cli_env["FAQ_CHUNKS"])
    assert "leave.md" not in default["sources"]
    listed = [line.split(maxsplit=1) for line in run(["stats", "--kb", "eng"], env).stdout.splitlines()]
    assert ["knowledge_base", "eng"] in listed and ["knowledge_bases", "default, hr, eng"] in listed

    found = run(["search", "paid leave", "--kb", "hr", "--json"], env)
    assert [r["source"] for r in json.loads(found.stdout)["results"]] == ["leave.md"]
    nothing = run(["search", "paid leave", "--kb", "eng", "--json"], env)
    assert json.loads(nothing.stdout)["results"] == []

    unknown = run(["search", "paid leave", "--kb", "payroll"], env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "rag: error: no knowledge base 'payroll'; there are default, hr, eng (RAG_KNOWLEDGE_BASES)"
    )
    bad = run(["stats"], {**env, "RAG_KNOWLEDGE_BASES": "hr,Eng"})
    assert bad.returncode == 2 and bad.stderr.startswith(
        "rag: error: invalid configuration (RAG_KNOWLEDGE_BASES): "
        "Value error, 'Eng' is not a knowledge base name"
    )
