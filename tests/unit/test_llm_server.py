"""The fault modes of the OpenAI-compatible test server, seen through the real `openai` and `httpx`
clients over loopback HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.llm_server import LLMServer, tokens

MESSAGES: Any = [{"role": "user", "content": "How is data stored in Milvus?"}]
REPLY = "Milvus stores data in object storage [1]."
THINKING = {"thinking": {"type": "enabled"}}


@pytest.fixture
def server() -> Iterator[LLMServer]:
    """A fresh server per test, so a stream left over from one test cannot touch the next."""
    llm_server = LLMServer()
    yield llm_server
    llm_server.close()


@pytest.fixture
def client(server: LLMServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=10) as c:
        yield c


def stream_chunks(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True, **kwargs)
    return list(stream)


def contents(chunks: list[Any]) -> list[str]:
    """The non-empty content deltas, i.e. the content tokens."""
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def reasonings(chunks: list[Any]) -> list[str]:
    return [
        text
        for c in chunks
        if c.choices and (text := (c.choices[0].delta.model_extra or {}).get("reasoning_content"))
    ]


def raw_stream(server: LLMServer, body: dict[str, Any] | None = None) -> Any:
    """A streamed completion read line by line with httpx, SSE comments included."""
    return httpx.stream(
        "POST",
        f"{server.url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True, **(body or {})},
        timeout=10,
    )


def test_default_stream_is_unchanged(server: LLMServer, client: openai.OpenAI) -> None:
    chunks = stream_chunks(client)
    assert "".join(contents(chunks)) == REPLY
    assert contents(chunks) == tokens(REPLY)
    assert reasonings(chunks) == []
    assert server.requests[0]["body"]["stream"] is True


def test_reasoning_streams_before_content_when_thinking_is_enabled(
    server: LLMServer, client: openai.OpenAI
) -> None:
    server.behaviour.reasoning = "The FAQ says object storage."
    chunks = stream_chunks(client, extra_body=THINKING)

    assert "".join(reasonings(chunks)) == "The FAQ says object storage."
    assert reasonings(chunks) == ["The ", "FAQ ", "says ", "object ", "storage."]
    assert "".join(contents(chunks)) == REPLY
    kinds = ["r" if reasonings([c]) else "c" for c in chunks if reasonings([c]) or contents([c])]
    assert kinds == sorted(kinds, reverse=True), "all reasoning must precede the content"
    assert server.requests[0]["body"]["thinking"] == {"type": "enabled"}
    # Only content tokens count as sent: the benchmark measures the answer, not the thinking.
    assert [t for _, t in server.sent] == tokens(REPLY)


@pytest.mark.parametrize("extra_body", [None, {"thinking": {"type": "disabled"}}])
def test_no_reasoning_without_thinking(
    server: LLMServer, client: openai.OpenAI, extra_body: dict[str, Any] | None
) -> None:
    server.behaviour.reasoning = "hidden thoughts"
    chunks = stream_chunks(client, extra_body=extra_body)
    assert reasonings(chunks) == []
    assert "".join(contents(chunks)) == REPLY

    plain = client.chat.completions.create(model="m", messages=MESSAGES, extra_body=extra_body)
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_plain_response_carries_reasoning_when_thinking_is_enabled(
    server: LLMServer, client: openai.OpenAI
) -> None:
    server.behaviour.reasoning = "Think first."
    plain = client.chat.completions.create(model="m", messages=MESSAGES, extra_body=THINKING)
    assert plain.choices[0].message.content == REPLY
    assert (plain.choices[0].message.model_extra or {})["reasoning_content"] == "Think first."


def test_empty_reply_streams_no_content_tokens(server: LLMServer) -> None:
    server.behaviour.reply = ""
    with raw_stream(server, {"stream_options": {"include_usage": True}}) as response:
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]

    events = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]"
    assert len(events) == 3  # role chunk, finish chunk, usage
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert events[2]["choices"] == [] and events[2]["usage"]["total_tokens"] == 110
    assert server.sent == []


def test_keepalive_comments_until_release_then_the_reply_finishes(server: LLMServer) -> None:
    server.behaviour.reply = "one two three"
    server.behaviour.keepalive_after = 1
    server.behaviour.keepalive_interval = 0.01
    lines: list[str] = []
    with raw_stream(server) as response:
        chunks = response.iter_lines()
        for line in chunks:
            lines.append(line)
            if lines.count(": keep-alive") == 3:
                break
        assert not server.release.is_set()
        assert server.streams_open == 1
        server.release.set()
        lines.extend(chunks)

    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    streamed = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert streamed == ["", "one ", "two ", "three", None]
    assert events[-1] == "[DONE]"
    first_keepalive = lines.index(": keep-alive")
    before = [line for line in lines[:first_keepalive] if line.startswith("data: ")]
    assert len(before) == 2, "keep-alives begin after the role chunk and the first token"
    assert not server.disconnected.is_set()


def test_closing_a_keepalive_stream_is_seen_as_a_disconnect(server: LLMServer, client: openai.OpenAI) -> None:
    server.behaviour.reply = "a b c"
    server.behaviour.keepalive_after = 1
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received = [chunk.choices[0].delta.content for chunk in islice(stream, 2)]
    assert received == ["", "a "]
    assert not server.disconnected.is_set()

    stream.close()

    assert server.disconnected.wait(5)
    assert server.disconnects == 1
    assert server.streams_open == 0  # the stream is already over when the disconnect is reported
    assert [t for _, t in server.sent] == ["a "]
    assert not server.release.is_set()


def test_closing_a_paced_stream_stops_the_tokens(server: LLMServer, client: openai.OpenAI) -> None:
    server.behaviour.reply = " ".join(f"t{i}" for i in range(40))
    server.behaviour.token_delay = 0.02
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert contents(list(islice(stream, 2))) == ["t0 "]
    stream.close()
    assert server.disconnected.wait(5)
    assert server.disconnects == 1
    assert 1 <= len(server.sent) < 40


def test_closing_a_stalled_stream_is_seen_as_a_disconnect(server: LLMServer, client: openai.OpenAI) -> None:
    server.behaviour.stall_after = 0
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    stream.close()
    assert server.disconnected.wait(5)
    assert server.disconnects == 1


def test_stalled_stream_ends_unfinished_on_release(server: LLMServer) -> None:
    server.behaviour.reply = "a b c"
    server.behaviour.stall_after = 1
    lines: list[str] = []
    with raw_stream(server) as response, pytest.raises(httpx.RemoteProtocolError):
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: ") and '"a "' in line:
                server.release.set()
    assert "data: [DONE]" not in lines
    assert [t for _, t in server.sent] == ["a "]


@pytest.mark.parametrize("drop_after", [0, 1, 3])
def test_drop_after_n_tokens_is_a_connection_error(
    server: LLMServer, client: openai.OpenAI, drop_after: int
) -> None:
    server.behaviour.reply = "a b c d"
    server.behaviour.drop_after = drop_after
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.extend(contents([chunk]))
    assert received == ["a ", "b ", "c ", "d"][:drop_after]
    assert [t for _, t in server.sent] == received
    assert not server.disconnected.is_set()  # the upstream hung up, not the client


def test_fail_mode_disconnect_is_a_connection_error_then_it_answers(
    server: LLMServer, client: openai.OpenAI
) -> None:
    server.behaviour.fail_times = 1
    server.behaviour.fail_mode = "disconnect"
    with pytest.raises(openai.APIConnectionError) as raised:
        client.chat.completions.create(model="m", messages=MESSAGES)
    # openai 3 wraps httpx2, not httpx, so match the cause by name and message.
    cause = raised.value.__cause__
    assert type(cause).__name__ == "RemoteProtocolError"
    assert "without sending a response" in str(cause)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == REPLY
    assert len(server.requests) == 2


@pytest.mark.parametrize(("retry_after", "header"), [(2, "2"), (0.5, "0.5"), (None, None)])
def test_status_failure_sends_retry_after(
    server: LLMServer, client: openai.OpenAI, retry_after: float | None, header: str | None
) -> None:
    server.behaviour.fail_times = 1
    server.behaviour.fail_status = 429
    server.behaviour.retry_after = retry_after
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert raised.value.response.headers.get("retry-after") == header
    assert raised.value.body == {"message": "injected 429", "type": "server_error"}


def test_first_token_delay_holds_back_only_the_first_token(server: LLMServer, client: openai.OpenAI) -> None:
    server.behaviour.first_token_delay = 0.3
    start = time.perf_counter()
    chunks = stream_chunks(client)
    assert "".join(contents(chunks)) == REPLY
    first, last = server.sent[0][0], server.sent[-1][0]
    assert first - start >= 0.3
    assert last - first < 0.3, "only the first token waits"


def test_sent_records_each_token_no_later_than_the_client_gets_it(
    server: LLMServer, client: openai.OpenAI
) -> None:
    received: list[tuple[float, str]] = []
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
        received.extend((time.perf_counter(), t) for t in contents([chunk]))

    assert [t for _, t in server.sent] == [t for _, t in received] == tokens(REPLY)
    times = [at for at, _ in server.sent]
    assert times == sorted(times)
    assert all(sent_at <= got_at for (sent_at, _), (got_at, _) in zip(server.sent, received, strict=True))


def test_streams_open_counts_concurrent_streams(server: LLMServer) -> None:
    server.behaviour.keepalive_after = 0
    server.behaviour.keepalive_interval = 0.01
    with raw_stream(server) as first, raw_stream(server) as second:
        lines = [first.iter_lines(), second.iter_lines()]
        assert [next(each) for each in lines] == [": keep-alive", ": keep-alive"]
        assert server.streams_open == 2
        assert server.max_streams_open == 2
        server.release.set()
        assert all("data: [DONE]" in list(each) for each in lines)
    assert server.wait_streams_closed(5)
    assert server.streams_open == 0
    assert server.max_streams_open == 2
    assert len(server.requests) == 2


def test_reset_clears_the_observations(server: LLMServer, client: openai.OpenAI) -> None:
    server.behaviour.keepalive_after = 0
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    stream.close()
    assert server.disconnected.wait(5)
    server.behaviour.keepalive_after = None
    stream_chunks(client)
    assert server.sent and server.requests and server.disconnects == 1 and server.max_streams_open == 1
    # The client has [DONE] before the server's handler has closed its side.
    assert server.wait_streams_closed(5)

    server.reset()

    assert server.sent == [] and server.requests == [] and server.disconnects == 0
    assert not server.disconnected.is_set() and server.max_streams_open == 0
    assert server.behaviour.keepalive_after is None


@pytest.mark.parametrize("error_after", [0, 2])
def test_error_after_n_tokens_is_an_error_event(
    server: LLMServer, client: openai.OpenAI, error_after: int
) -> None:
    server.behaviour.reply = "a b c d"
    server.behaviour.error_after = error_after
    received: list[str] = []
    with pytest.raises(openai.APIError, match="injected stream error") as raised:
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.extend(contents([chunk]))
    assert not isinstance(raised.value, openai.APIConnectionError)  # a whole body, with the error in it
    assert received == ["a ", "b ", "c ", "d"][:error_after]
    assert (
        client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "a b c d"
    )


def test_runs_as_a_process_controlled_over_http() -> None:
    """The way benchmarks use it: `python tests/llm_server.py`, then its /control routes."""
    script = Path(__file__).resolve().parents[1] / "llm_server.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--reply", "one two", "--token-delay", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        url, api_key = started["url"], started["api_key"]
        root = url.removesuffix("/v1")
        with openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=10) as client:
            first = stream_chunks(client)
            assert "".join(contents(first)) == "one two"

            counts = httpx.post(f"{root}/control/behaviour", json={"reply": "three four five"}).json()
            assert counts == {
                "requests": 0,
                "sent": 0,
                "streams_open": 0,
                "max_streams_open": 0,
                "disconnects": 0,
            }
            before = time.perf_counter()
            assert "".join(contents(stream_chunks(client))) == "three four five"
            assert client.chat.completions.create(model="m", messages=MESSAGES).choices[
                0
            ].message.content == ("three four five")

        counts = httpx.get(f"{root}/control/counts").json()
        assert (counts["requests"], counts["sent"], counts["max_streams_open"]) == (2, 3, 1)
        seen = httpx.get(f"{root}/control/observations", params={"requests_from": 1, "sent_from": 1}).json()
        assert [token for _, token in seen["sent"]] == ["four ", "five"]
        assert len(seen["requests"]) == 1
        # One clock for both processes (perf_counter is CLOCK_MONOTONIC on Linux).
        assert before < seen["sent"][0][0] < seen["requests"][0]["received"] < time.perf_counter()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
