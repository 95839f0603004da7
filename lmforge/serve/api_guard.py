"""What stands between the network and `lmforge api`: the listening socket, Bearer auth and the body limit."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import socket
from typing import Any, Awaitable, Callable

from lmforge.errors import LmforgeError
from lmforge.serve.api_schema import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), not yet listening; a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise LmforgeError(f"port {port} on {host} is in use: stop what listens there or set --api_port") from None
        raise LmforgeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


async def send_error(send: Send, status: int, body: dict[str, Any]) -> None:
    """Answer with a JSON error body, before the app has seen the request."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """ASGI middleware: `Authorization: Bearer api_key` on /v1 routes (when a key is set), and request bodies
    of at most max_bytes, read in full before the app runs so a slow or chunked upload cannot exceed it."""

    def __init__(self, app: Any, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.expected and scope["path"].startswith("/v1") and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            return await send_error(send, 401, error_body(
                "missing or incorrect API key: send the header `Authorization: Bearer API_KEY`", code="invalid_api_key"))
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        body = await self._read_body(receive)
        if body is None:
            return await self._too_large(send)
        return await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes max_bytes."""
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            more = message.get("more_body", False)
        return b"".join(parts)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, error_body(
            f"request body larger than max_request_bytes ({self.max_bytes} bytes)", code="request_too_large"))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the app the body already read, then passes on (e.g. the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
