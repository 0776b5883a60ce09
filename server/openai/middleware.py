"""ASGI middleware of our own: the request body's size limit."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException

from server.openai.errors import APIError


class BodyLimit:
    """413 for a request body over `max_bytes`, whether its Content-Length says so or it arrives in chunks.

    Plain ASGI on purpose: Starlette's `@app.middleware("http")` hides a client's disconnect from
    `Request.is_disconnected()`, so an abandoned non-streaming request would run to its end.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await APIError(413, message).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, message)  # FastAPI passes it on from reading the body
            return event

        await self.app(scope, limited_receive, send)
