"""`rag serve` as a process, operated: /metrics scraped over HTTP after real answers (through
RemoteRunnable and the openai client), request ids on responses and on JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langserve import RemoteRunnable

from settings import Settings
from tests.integration.conftest import QUESTION
from tests.integration.test_workers import (
    RAG,
    REPO,
    STARTUP_TIMEOUT,
    Output,
    log_records,
    port_open,
    scrape,
)
from tests.llm_server import LLMServer
from workers import free_port

pytestmark = pytest.mark.integration

KEY = "metrics-key"


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def test_metrics_request_ids_and_json_logs_of_one_worker(
    faq_db: Settings, llm_server: LLMServer, tmp_path: Path
) -> None:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env = {
        **keep,
        "HF_HUB_OFFLINE": "1",
        "MILVUS_URI": faq_db.milvus_uri,
        "RAG_COLLECTION": faq_db.collection,
        "DEEPSEEK_API_KEY": LLMServer.api_key,
        "DEEPSEEK_BASE_URL": llm_server.url,
        "DEEPSEEK_MAX_RETRIES": "1",
        "DEEPSEEK_RETRY_BACKOFF": "0",
        "RAG_API_KEYS": KEY,
        "RAG_LOG_FORMAT": "json",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen(
        [*RAG, "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(serve)
    try:
        log_records(output, 1, lambda r: r["logger"] == "server" and r["message"] == "ready", STARTUP_TIMEOUT)
        # "ready" is logged at the end of the app's start-up; uvicorn binds its port right after.
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert time.monotonic() < deadline and serve.poll() is None, "\n".join(output.lines)
        refused = httpx.get(f"{base}/metrics", timeout=30)
        assert refused.status_code == 401, "/metrics takes the API keys like the other routes"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200

        headers = {"Authorization": f"Bearer {KEY}"}
        before = scrape(base, headers)
        assert before[("rag_store_chunks", labels(kb="default"))] >= 60  # the FAQ's chunks
        refused_metrics = labels(method="GET", route="/metrics", status="401", kb="")
        assert before[("rag_http_requests_total", refused_metrics)] == 1

        # An answer streamed through LangServe's client, with a request id of the caller's.
        chain: RemoteRunnable = RemoteRunnable(
            f"{base}/rag/", headers={**headers, "X-Request-ID": "answer-1"}
        )
        chunks: list[dict[str, Any]] = list(chain.stream({"question": QUESTION}))
        assert "".join(c.get("answer", "") for c in chunks) == llm_server.behaviour.reply

        # DeepSeek fails once (503), the retry answers: through the openai client.
        llm_server.behaviour.fail_times, llm_server.behaviour.fail_status = 1, 503
        client = openai.OpenAI(
            base_url=f"{base}/v1", api_key=KEY, default_headers={"X-Request-ID": "openai-1"}, max_retries=0
        )
        stream = client.chat.completions.create(
            model=faq_db.deepseek_model, messages=[{"role": "user", "content": QUESTION}], stream=True
        )
        answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert answer == llm_server.behaviour.reply
        assert len(llm_server.requests) == 3  # one answer, then a failure and its retry

        # Our id comes back; a client without one is given one.
        response = httpx.post(
            f"{base}/retriever/invoke",
            json={"input": QUESTION},
            headers={**headers, "X-Request-ID": "retr-1"},
        )
        assert response.status_code == 200 and response.headers["X-Request-ID"] == "retr-1"
        given = httpx.get(f"{base}/rag/input_schema", headers=headers).headers["X-Request-ID"]
        assert len(given) == 32

        after = scrape(base, headers)

        def moved(name: str, sample_labels: frozenset[tuple[str, str]] = frozenset()) -> float:
            return after.get((name, sample_labels), 0.0) - before.get((name, sample_labels), 0.0)

        requests = "rag_http_requests_total"
        ok = {"status": "200", "kb": "default"}
        assert moved(requests, labels(method="POST", route="/rag/stream", **ok)) == 1
        assert moved(requests, labels(method="POST", route="/v1/chat/completions", **ok)) == 1
        assert moved(requests, labels(method="POST", route="/retriever/invoke", **ok)) == 1
        duration = "rag_http_request_duration_seconds_count"
        assert moved(duration, labels(method="POST", route="/rag/stream", kb="default")) == 1
        assert moved("rag_retrieval_duration_seconds_count") == 3
        assert moved("rag_time_to_first_token_seconds_count") == 2
        assert 0 < moved("rag_time_to_first_token_seconds_sum") < 10
        assert moved("rag_deepseek_errors_total", labels(error="503")) == 1
        assert moved("rag_deepseek_retries_total") == 1
        usage = llm_server.behaviour.usage  # reported by the test server for each answer
        assert moved("rag_deepseek_tokens_total", labels(type="prompt")) == 2 * usage["prompt_tokens"]
        assert moved("rag_deepseek_tokens_total", labels(type="completion")) == 2 * usage["completion_tokens"]
        hits, misses = usage["prompt_cache_hit_tokens"], usage["prompt_cache_miss_tokens"]
        assert moved("rag_deepseek_prompt_cache_tokens_total", labels(cache="hit")) == 2 * hits
        assert moved("rag_deepseek_prompt_cache_tokens_total", labels(cache="miss")) == 2 * misses

        # Each request's access log line carries its id, and every log line is one JSON object.
        for request_id in ("answer-1", "openai-1", "retr-1", given):
            (access,) = log_records(
                output, 1, lambda r, i=request_id: r["request_id"] == i and r["logger"] == "uvicorn.access"
            )
            assert {"time", "level", "process", "message"} <= set(access)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0, "\n".join(output.lines)
        printed = output.until_end()
        logged = printed[1:]  # after "serving on ..."
        assert printed[0].startswith("serving on ") and logged
        assert all(isinstance(json.loads(line), dict) for line in logged), logged
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
