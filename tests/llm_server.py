"""A small OpenAI-compatible chat server on 127.0.0.1 for tests: plain and streamed answers,
every request recorded, faults on demand. The real `ChatOpenAI` client talks to it over HTTP."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    """What the server does next. Tests change it between requests."""

    reply: str = "Milvus stores data in object storage [1]."
    # Fail this many requests (then behave) with `fail_status` and an OpenAI error body.
    fail_times: int = 0
    fail_status: int = 500
    # Seconds between streamed tokens (the slow-upstream case).
    token_delay: float = 0.0
    # Stop sending after this many tokens and hold the connection open (a stalled stream).
    stall_after: int | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "total_tokens": 110,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        }
    )


class LLMServer:
    """Serve until `close()`; `url` is the OpenAI base URL ("http://127.0.0.1:PORT/v1")."""

    api_key = "test-key"

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()  # set to end stalled streams
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def api_key_secret(self) -> Any:
        from pydantic import SecretStr

        return SecretStr(self.api_key)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()
        self.release.clear()

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _should_fail(self) -> bool:
        with self._lock:
            if self.behaviour.fail_times > 0:
                self.behaviour.fail_times -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(
                        200, {"object": "list", "data": [{"id": "deepseek-v4-flash", "object": "model"}]}
                    )
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                record = {"path": self.path, "headers": dict(self.headers), "body": body}
                server.requests.append(record)
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._json(
                        401, {"error": {"message": "Authentication Fails", "type": "authentication_error"}}
                    )
                    return
                if server._should_fail():
                    status = server.behaviour.fail_status
                    self._json(status, {"error": {"message": f"injected {status}", "type": "server_error"}})
                    return
                if body.get("stream"):
                    self._stream(body)
                else:
                    self._plain(body)

            def _plain(self, body: dict[str, Any]) -> None:
                b = server.behaviour
                self._json(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": b.reply},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": b.usage,
                    },
                )

            def _event(self, payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                chunk = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()

            def _stream(self, body: dict[str, Any]) -> None:
                b = server.behaviour
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": body.get("model")}
                tokens = [t + " " for t in b.reply.split(" ")]
                tokens[-1] = tokens[-1].rstrip(" ")
                try:
                    self._event(
                        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                    )
                    for i, token in enumerate(tokens):
                        if b.stall_after is not None and i >= b.stall_after:
                            server.release.wait(60)
                            return
                        if b.token_delay:
                            time.sleep(b.token_delay)  # the upstream's pace, not synchronisation
                        self._event({**base, "choices": [{"index": 0, "delta": {"content": token}}]})
                    self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    if (body.get("stream_options") or {}).get("include_usage"):
                        self._event({**base, "choices": [], "usage": b.usage})
                    self._event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return

        return Handler
