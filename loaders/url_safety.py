"""Fetching URLs that a client named without letting it reach the server's own network (SSRF).

A URL ingested for an HTTP client must not make the server call its loopback interface,
its private network or a cloud metadata address (169.254.169.254). Checking the host name
is not enough: a public name can resolve to 127.0.0.1, a redirect can point anywhere, and a
name can resolve differently between the check and the connection (DNS rebinding). So the
check runs in an httpx transport, on every request the client makes, redirects included: it
resolves the host once, refuses it if any address is not public, and connects to the
address it checked (the name still goes in the Host header and in TLS's SNI and certificate
check, through httpx's `sni_hostname` request extension).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import httpx

from errors import SourceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A download (a page or a zip archive of many pages) is read up to this size.
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


class UnsafeURLError(SourceError):
    """The URL points at an address the server must not fetch for a client."""


def address_problem(address: IPAddress) -> str | None:
    """Why the server must not connect to `address` for a client; None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return address_problem(mapped)
    for kind, flag in (
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a private", address.is_private),
        ("a multicast", address.is_multicast),
        ("an unspecified", address.is_unspecified),
        ("a reserved", address.is_reserved),
    ):
        if flag:
            return f"{kind} address"
    # Shared address space (100.64/10, carrier-grade NAT) is neither private nor global.
    if not address.is_global:
        return "a non-public address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceError(f"cannot resolve {host!r}: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return list(dict.fromkeys(addresses))


def check_url(url: str, problem: Callable[[IPAddress], str | None] = address_problem) -> list[IPAddress]:
    """The public addresses of `url`'s host; UnsafeURLError (or SourceError) if it may not be fetched.

    Every address the name resolves to must be public: an attacker who controls a name can
    give it one public and one private address and let the client pick.
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise UnsafeURLError(f"{url}: only http and https URLs can be ingested")
    if not parsed.host:
        raise UnsafeURLError(f"{url}: the URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve(parsed.host, port)
    for address in addresses:
        if (reason := problem(address)) is not None:
            raise UnsafeURLError(
                f"{url}: {parsed.host} resolves to {address}, {reason}; the server does not fetch "
                "URLs on its own network for clients (RAG_ALLOW_PRIVATE_URLS=true allows it)"
            )
    if not addresses:
        raise SourceError(f"cannot resolve {parsed.host!r}")
    return addresses


class PublicOnlyTransport(httpx.BaseTransport):
    """An httpx transport that checks each request's host (see check_url) and connects to
    an address it checked, so that a second lookup cannot return another one. `problem`
    decides which addresses are refused."""

    def __init__(
        self, problem: Callable[[IPAddress], str | None] = address_problem, **transport_options: Any
    ) -> None:
        self.problem = problem
        self._transport = httpx.HTTPTransport(**transport_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            addresses = check_url(str(request.url), self.problem)
        except SourceError as exc:
            # Raised through httpx as a request error, so callers handle it like any failed fetch.
            raise httpx.RequestError(str(exc), request=request) from exc
        host = request.url.host
        # The Host header keeps the name (httpx set it from the URL), and TLS checks the
        # certificate against it; the connection goes to each checked address in turn.
        extensions = {**request.extensions, "sni_hostname": host}
        failure: httpx.ConnectError | None = None
        for address in addresses:
            pinned = httpx.Request(
                request.method,
                request.url.copy_with(host=str(address)),
                headers=request.headers,
                stream=request.stream,
                extensions=extensions,
            )
            try:
                return self._transport.handle_request(pinned)
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def close(self) -> None:
        self._transport.close()


def fetch(
    url: str, *, allow_private: bool, timeout: float = 30.0, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> tuple[bytes, str | None]:
    """The body of `url` and its Content-Type (redirects followed; each hop checked unless
    `allow_private`).

    Raises httpx.HTTPError when the fetch fails or is refused, SourceError over `max_bytes`
    (read as it streams: a huge body is never held whole).
    """
    transport = None if allow_private else PublicOnlyTransport()
    with (
        httpx.Client(transport=transport, follow_redirects=True, timeout=timeout) as client,
        client.stream("GET", url) as response,
    ):
        response.raise_for_status()
        body = bytearray()
        for piece in response.iter_bytes():
            body += piece
            if len(body) > max_bytes:
                limit = f"{max_bytes / 2**20:g} MB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
                raise SourceError(f"download larger than {limit}")
        return bytes(body), response.headers.get("content-type")
