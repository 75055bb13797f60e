"""A small OpenAI-compatible chat server on 127.0.0.1 for tests: plain and streamed answers,
every request recorded, faults on demand. The real `ChatOpenAI` client talks to it over HTTP.

In tests it runs in process (`LLMServer()`). Benchmarks run it as a process of their own:

    python tests/llm_server.py [--port 0] [--reply TEXT] [--token-delay S]

prints `{"url": ..., "api_key": ...}` as its first line, and answers until terminated. Its
`/control` routes set the behaviour and read what it observed (see `Handler.do_GET`); the
times are `time.perf_counter()`, which on Linux is one clock for every process.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

# Upper bound on holding a stream open, so a forgotten `release` cannot pin a thread forever.
HOLD_LIMIT_S = 60.0
# How often a stall notices that its client left (a stall writes nothing that could fail).
STALL_POLL_S = 0.05
KEEPALIVE = b": keep-alive\n\n"


class QuietHTTPServer(ThreadingHTTPServer):
    """Says nothing when a client resets a connection: clients drop idle keep-alive
    connections that way, and the tests that drop them on purpose assert it themselves."""

    # A burst of benchmark clients must not overflow the accept queue (socketserver's is 5):
    # the overflow would wait a SYN retransmit (1 s), which is no property of the service.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@dataclass
class Behaviour:
    """What the server does next. Tests change it between requests.

    Positions count content tokens already sent: `drop_after=0` and `keepalive_after=0` act
    right after the response headers, before the role chunk; a position past the end of the
    reply never triggers.
    """

    reply: str = "Milvus stores data in object storage [1]."
    # Fail this many requests (then behave): `fail_mode="status"` answers `fail_status` with an
    # OpenAI error body, "disconnect" closes the connection without any response.
    fail_times: int = 0
    fail_status: int = 500
    fail_mode: Literal["status", "disconnect"] = "status"
    # Sent as `Retry-After` on status failures when set.
    retry_after: float | None = None
    # Seconds between streamed tokens (the slow-upstream case).
    token_delay: float = 0.0
    # Seconds before the first content token (a slow start).
    first_token_delay: float = 0.0
    # Stop sending after this many tokens and hold the connection open (a stalled stream) until
    # `release`, then close it without finishing the body.
    stall_after: int | None = None
    # After this many tokens send SSE `: keep-alive` comments every `keepalive_interval` seconds
    # (DeepSeek under load) until `release` or the client leaves, then finish the reply.
    keepalive_after: int | None = None
    keepalive_interval: float = 0.05
    # After this many tokens close the socket mid-body: no final chunk, no [DONE].
    drop_after: int | None = None
    # After this many tokens send an OpenAI error event (`data: {"error": {...}}`) and end the
    # body there, as an API that fails in the middle of an answer.
    error_after: int | None = None
    # DeepSeek "thinking": streamed as `reasoning_content` before the content, only to requests
    # with {"thinking": {"type": "enabled"}}.
    reasoning: str | None = None
    # Agents (OpenAI's tool-call protocol): a request that offers `tools` and has no tool result
    # since its last user message is answered with a call of this tool, {"name", "arguments"},
    # streamed or not as asked (finish_reason "tool_calls"); once a tool result is in, with
    # `reply`. Requests without tools (the RAG chain's own) are answered with `reply` as usual.
    tool_call: dict[str, Any] | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "total_tokens": 110,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        }
    )


def tokens(text: str) -> list[str]:
    """`text` split on spaces the way the server streams it; "" gives no tokens at all."""
    if not text:
        return []
    parts = [t + " " for t in text.split(" ")]
    parts[-1] = parts[-1].rstrip(" ")
    return parts


def wants_tool_call(body: dict[str, Any], behaviour: Behaviour) -> bool:
    """Whether this request gets `behaviour.tool_call`: it offers tools and no tool answered yet."""
    if behaviour.tool_call is None or not body.get("tools"):
        return False
    roles = [m.get("role") for m in body.get("messages", [])]
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=-1)
    return "tool" not in roles[last_user + 1 :]


def argument_pieces(arguments: str, size: int = 8) -> list[str]:
    """A tool call's JSON arguments in pieces, as OpenAI streams them."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def thinking_enabled(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


class LLMServer:
    """Serve until `close()`; `url` is the OpenAI base URL ("http://127.0.0.1:PORT/v1").

    Observations for tests (all cleared by `reset()`): `requests` (path, headers, body and
    `received`, the `time.perf_counter()` when its headers had been read); `sent`, a
    `(time.perf_counter(), token)` per content token, timed just before its write so it never
    postdates the client's receipt; `disconnected`/`disconnects`, a streaming client that went
    away; `streams_open` and its high-water mark `max_streams_open`.
    """

    api_key = "test-key"

    def __init__(self, port: int = 0) -> None:
        self.behaviour = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.sent: list[tuple[float, str]] = []
        self.release = threading.Event()  # set to end stalled and keep-alive streams
        self.disconnected = threading.Event()
        self.disconnects = 0
        self.streams_open = 0
        self.max_streams_open = 0
        self._lock = threading.Lock()
        self._streams_changed = threading.Condition(self._lock)
        self._httpd = QuietHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        # `close()` waits up to one poll interval; the default 0.5 s adds up over per-test servers.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def api_key_secret(self) -> Any:
        from pydantic import SecretStr

        return SecretStr(self.api_key)

    def reset(self) -> None:
        with self._lock:
            self.behaviour = Behaviour()
            self.requests.clear()
            self.sent.clear()
            self.release.clear()
            self.disconnected.clear()
            self.disconnects = 0
            # Streams still running stay counted, or their ends would drive the count negative.
            self.max_streams_open = self.streams_open

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def counts(self) -> dict[str, int]:
        """How much it has observed since the last reset, and the streams open now."""
        with self._lock:
            return {
                "requests": len(self.requests),
                "sent": len(self.sent),
                "streams_open": self.streams_open,
                "max_streams_open": self.max_streams_open,
                "disconnects": self.disconnects,
            }

    def observations(self, requests_from: int = 0, sent_from: int = 0) -> dict[str, Any]:
        """The requests' arrival times and the content tokens sent, from these positions on."""
        with self._lock:
            return {
                "requests": [{"received": r["received"]} for r in self.requests[requests_from:]],
                "sent": self.sent[sent_from:],
            }

    def wait_streams_closed(self, timeout: float) -> bool:
        """Wait until no streaming response is in progress; False on timeout."""
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: self.streams_open == 0, timeout)

    def _should_fail(self) -> bool:
        with self._lock:
            if self.behaviour.fail_times > 0:
                self.behaviour.fail_times -= 1
                return True
            return False

    def _record_request(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(record)

    def _record_sent(self, at: float, token: str) -> None:
        with self._lock:
            self.sent.append((at, token))

    def _record_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1
        self.disconnected.set()

    @contextmanager
    def _streaming(self) -> Iterator[None]:
        with self._streams_changed:
            self.streams_open += 1
            self.max_streams_open = max(self.max_streams_open, self.streams_open)
        try:
            yield
        finally:
            with self._streams_changed:
                self.streams_open -= 1
                self._streams_changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Each SSE event is a small write: with Nagle's algorithm on, the second one waits
            # for the client's delayed ACK (~40 ms), which no real API server makes clients pay.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                """`/v1/models`; `/control/counts`; `/control/observations?requests_from=N&sent_from=M`."""
                path, _, query = self.path.partition("?")
                if path == "/control/counts":
                    self._json(200, server.counts())
                elif path == "/control/observations":
                    positions = {k: int(v) for k, v in (p.split("=", 1) for p in query.split("&") if p)}
                    self._json(200, server.observations(**positions))
                elif self.path.rstrip("/").endswith("/models"):
                    self._json(
                        200, {"object": "list", "data": [{"id": "deepseek-v4-flash", "object": "model"}]}
                    )
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                received = time.perf_counter()  # the request line and headers are in
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/control/behaviour":
                    # A fresh start with this behaviour (Behaviour's fields as JSON).
                    server.reset()
                    server.behaviour = Behaviour(**body)
                    self._json(200, server.counts())
                    return
                server._record_request(
                    {"path": self.path, "headers": dict(self.headers), "body": body, "received": received}
                )
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._json(
                        401, {"error": {"message": "Authentication Fails", "type": "authentication_error"}}
                    )
                    return
                if server._should_fail():
                    self._fail(server.behaviour)
                    return
                if wants_tool_call(body, server.behaviour):
                    self._tool_call(body, call_id=f"call_{len(server.requests)}")
                elif body.get("stream"):
                    self._stream(body)
                else:
                    self._plain(body)

            def _fail(self, b: Behaviour) -> None:
                if b.fail_mode == "disconnect":
                    self._drop()
                    return
                headers = {} if b.retry_after is None else {"Retry-After": f"{b.retry_after:g}"}
                error = {"message": f"injected {b.fail_status}", "type": "server_error"}
                self._json(b.fail_status, {"error": error}, headers)

            def _drop(self) -> None:
                """Close the connection now, mid-response or before one, as a crashed upstream would."""
                self.close_connection = True
                with suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _plain(self, body: dict[str, Any]) -> None:
                b = server.behaviour
                message: dict[str, Any] = {"role": "assistant", "content": b.reply}
                if b.reasoning and thinking_enabled(body):
                    message["reasoning_content"] = b.reasoning
                self._json(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": b.usage,
                    },
                )

            def _tool_call(self, body: dict[str, Any], call_id: str) -> None:
                b = server.behaviour
                assert b.tool_call is not None
                name, arguments = b.tool_call["name"], json.dumps(b.tool_call.get("arguments", {}))
                function = {"name": name, "arguments": arguments}
                if not body.get("stream"):
                    call = {"id": call_id, "type": "function", "function": function}
                    message = {"role": "assistant", "content": None, "tool_calls": [call]}
                    self._json(
                        200,
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model"),
                            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                            "usage": b.usage,
                        },
                    )
                    return
                base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": body.get("model")}

                def delta(call: dict[str, Any], **fields: Any) -> dict[str, Any]:
                    return {**base, "choices": [{"index": 0, "delta": {**fields, "tool_calls": [call]}}]}

                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                # The first chunk names the call, the next ones carry its arguments in pieces.
                opening = {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {**function, "arguments": ""},
                }
                self._event(delta(opening, role="assistant", content=None))
                for piece in argument_pieces(arguments):
                    self._event(delta({"index": 0, "function": {"arguments": piece}}))
                self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({**base, "choices": [], "usage": b.usage})
                self._event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _chunk(self, data: bytes) -> None:
                # The first write after the client closed usually still succeeds, so look first.
                if self._client_gone():
                    raise ConnectionResetError("client closed the stream")
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _event(self, payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                self._chunk(f"data: {data}\n\n".encode())

            def _client_gone(self) -> bool:
                """True once the client closed its end; a peek at EOF is the only sign while idle."""
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except ConnectionError:
                    return True

            def _hold(self, b: Behaviour, keepalive: bool) -> None:
                """Hold the stream open until `release`; raise ConnectionResetError if the client leaves."""
                interval = b.keepalive_interval if keepalive else STALL_POLL_S
                deadline = time.monotonic() + HOLD_LIMIT_S
                while not server.release.is_set() and time.monotonic() < deadline:
                    if self._client_gone():
                        raise ConnectionResetError("client closed the stream")
                    if keepalive:
                        self._chunk(KEEPALIVE)
                    server.release.wait(interval)

            def _fault_at(self, b: Behaviour, position: int) -> bool:
                """Apply the fault due after `position` content tokens; True when the stream ends here."""
                if b.drop_after == position:
                    self._drop()
                    return True
                if b.error_after == position:
                    self._event({"error": {"message": "injected stream error", "type": "server_error"}})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return True
                if b.keepalive_after == position:
                    self._hold(b, keepalive=True)
                return False

            def _stream(self, body: dict[str, Any]) -> None:
                with server._streaming():
                    try:
                        self._send_stream(body)
                        return
                    except ConnectionError:
                        self.close_connection = True
                # Reported after `streams_open` dropped, so a waiter on `disconnected` sees it closed.
                server._record_disconnect()

            def _send_stream(self, body: dict[str, Any]) -> None:
                b = server.behaviour
                content = tokens(b.reply)
                reasoning = tokens(b.reasoning or "") if thinking_enabled(body) else []
                base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": body.get("model")}

                def delta(**fields: Any) -> dict[str, Any]:
                    return {**base, "choices": [{"index": 0, "delta": fields}]}

                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self._fault_at(b, 0):
                    return
                self._event(delta(role="assistant", content=""))
                for token in reasoning:
                    if b.token_delay:
                        time.sleep(b.token_delay)  # the upstream's pace, not synchronisation
                    self._event(delta(reasoning_content=token))
                for i, token in enumerate(content):
                    if b.stall_after == i:
                        self._hold(b, keepalive=False)
                        self.close_connection = True  # end the body unfinished, as a dead upstream
                        return
                    if i == 0 and b.first_token_delay:
                        time.sleep(b.first_token_delay)
                    if b.token_delay:
                        time.sleep(b.token_delay)
                    at = time.perf_counter()
                    self._event(delta(content=token))
                    server._record_sent(at, token)
                    if self._fault_at(b, i + 1):
                        return
                self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({**base, "choices": [], "usage": b.usage})
                self._event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve on loopback until terminated (SIGTERM or Ctrl-C)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--reply", default=Behaviour.reply, help="the answer every request gets")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = LLMServer(port=args.port)
    server.behaviour = Behaviour(reply=args.reply, token_delay=args.token_delay)
    try:
        print(json.dumps({"url": server.url, "api_key": server.api_key}), flush=True)
        threading.Event().wait()  # until a signal ends the process
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
