"""Request guards that run before routing, for every request, with or without a token.

* :class:`BodyLimitMiddleware` refuses a body larger than ``max_body_bytes`` with 413 *before*
  reading it: a declared ``Content-Length`` is checked from the header alone; a chunked body is
  buffered up to the limit and no further. Without it FastAPI reads and parses a body of any size
  before the bearer token is even looked at (a 95 MB body took the server's memory with it).
* The Host allow-list (DNS rebinding: a web page on an attacker's name that resolves to the
  catalog's address) is Starlette's ``TrustedHostMiddleware``, added by the app factory when
  ``allowed_hosts`` is set.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _refuse(send: Send, status: int, detail: str, error: str) -> None:
    body = json.dumps({"detail": detail, "error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the unread body makes the connection unusable
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        too_large = f"request body larger than {self.max_bytes} bytes"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, "malformed Content-Length", "BadRequest")
                return
            if size > self.max_bytes:
                await _refuse(send, 413, too_large, "PayloadTooLarge")
                return
            await self.app(scope, receive, send)  # the server never delivers more than declared
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, 413, too_large, "PayloadTooLarge")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)
