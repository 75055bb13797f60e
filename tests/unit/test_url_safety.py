"""URLs fetched for a client can't reach the server's own network: every address of the name,
every redirect hop, and the connection goes to the address that was checked."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from errors import SourceError
from loaders.sources import DocumentSourceLoader
from loaders.url_safety import (
    IPAddress,
    PublicOnlyTransport,
    UnsafeURLError,
    address_problem,
    check_url,
    fetch,
)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ],
)
def test_addresses_on_the_servers_network_are_refused(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_a_name_with_one_private_address_among_public_ones_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "docs.example.com"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(UnsafeURLError, match="resolves to 10.0.0.7, a private address"):
        check_url("https://docs.example.com/guide.md")


def test_only_http_and_https() -> None:
    for url in ("file:///etc/passwd", "ftp://example.com/x.md", "gopher://example.com/"):
        with pytest.raises(UnsafeURLError, match="only http and https"):
            check_url(url)
    with pytest.raises(SourceError, match="cannot resolve"):
        check_url("http://no-such-host.invalid/x.md")


class Site(BaseHTTPRequestHandler):
    """/page.md, and /hop redirecting to the URL in `Site.target`; records each request."""

    target = ""
    seen: list[tuple[str, str]] = []

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        Site.seen.append((self.path, self.headers.get("Host", "")))
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", Site.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"# Page\n\nHello.\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def site() -> Iterator[int]:
    Site.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def only_127_0_0_1_is_public(address: IPAddress) -> str | None:
    """A policy under which this test's site (on 127.0.0.1) stands for a public server."""
    return None if str(address) == "127.0.0.1" else address_problem(address)


def test_a_redirect_to_a_private_address_is_refused(site: int) -> None:
    Site.target = f"http://127.0.0.2:{site}/page.md"
    with (
        httpx.Client(
            transport=PublicOnlyTransport(only_127_0_0_1_is_public), follow_redirects=True
        ) as client,
        pytest.raises(httpx.RequestError, match="127.0.0.2, a loopback address"),
    ):
        client.get(f"http://127.0.0.1:{site}/hop")
    assert [path for path, _ in Site.seen] == ["/hop"]  # the second hop was never sent


def test_the_connection_goes_to_the_checked_address_with_the_name_in_host(
    site: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with httpx.Client(transport=PublicOnlyTransport(only_127_0_0_1_is_public)) as client:
        response = client.get(f"http://docs.internal.example:{site}/page.md")
    assert response.status_code == 200 and response.text.startswith("# Page")
    # The name is looked up once, by the check; the connection asks only for the address
    # checked (socket.create_connection "resolves" the literal), never for the name again.
    assert resolved[0] == "docs.internal.example" and set(resolved[1:]) == {"127.0.0.1"}
    assert Site.seen == [("/page.md", f"docs.internal.example:{site}")]


def test_the_server_path_refuses_loopback_and_the_operator_path_allows_it(site: int) -> None:
    url = f"http://127.0.0.1:{site}/page.md"
    with pytest.raises(httpx.RequestError, match="loopback"):
        fetch(url, allow_private=False)
    body, _ = fetch(url, allow_private=True)
    assert body.startswith(b"# Page")

    refused = DocumentSourceLoader([url], allow_private_urls=False)
    assert list(refused.lazy_load()) == []
    assert "loopback address" in refused.skipped[0].reason
    assert len(DocumentSourceLoader([url]).load()) == 1  # the CLI's default: the operator's own call


def test_a_download_over_the_limit_is_cut_off(site: int) -> None:
    with pytest.raises(SourceError, match="download larger than"):
        fetch(f"http://127.0.0.1:{site}/page.md", allow_private=True, max_bytes=4)
