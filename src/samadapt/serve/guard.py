"""Every refusal the app makes before a route runs, in one ASGI middleware (docs/app.md, "Safety").

In order, a request is refused when:

1. its ``Host`` is not one of the allowed names (403): a web page that re-points its own domain name at 127.0.0.1
   (DNS rebinding) reaches the app with ``Host: its.domain``, so only the names the app is reached by pass;
2. it changes state (POST, PUT, PATCH, DELETE) and carries an ``Origin`` other than the app's own (403): a browser
   names the page that sent a request, so another page's form or ``fetch`` is refused;
3. it is an ``/api`` request without the token (403): ``X-Token`` header, ``token`` query parameter, or the cookie
   set when the page was opened with ``?token=``;
4. its body is larger than ``max_body`` (413), whether it says so in ``Content-Length`` or streams it in chunks: the
   bytes are counted as they arrive and reading stops at the limit.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
TOKEN_HINT = "missing or wrong token: open the address that samadapt serve printed (it ends with ?token=...)"


def host_name(value: str) -> str:
    """``Host`` / ``Origin`` authority -> the bare, lower-case name: ``[::1]:8000`` -> ``::1``, ``A.b.:80`` -> ``a.b``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def token_cookie(connection: HTTPConnection) -> str:
    """The cookie holding the token for this origin (cookies ignore ports: one name per port keeps two apps apart)."""
    return f"samadapt-token-{connection.url.port or 80}"


def token_given(connection: HTTPConnection, token: str) -> bool:
    """Whether the request carries ``token`` (header, query parameter or cookie); compared in constant time."""
    for given in (
        connection.headers.get("x-token"),
        connection.query_params.get("token"),
        connection.cookies.get(token_cookie(connection)),
    ):
        if given and secrets.compare_digest(given.encode(), token.encode()):
            return True
    return False


class _BodyTooLargeError(Exception):
    """Raised into the app by ``receive`` once a streamed body passed the limit."""


class Guard:
    """The app's gate: ``Guard(app, token=..., hosts=[...], max_body=...)`` (see the module docstring).

    ``hosts``: names the app is reached by besides ``LOOPBACK_NAMES`` (the ``--host`` given, a machine name); any
    port is accepted with them (an ssh tunnel may forward another local port). ``token``: None opens ``/api`` to
    every request that passes the other checks."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: Iterable[str], max_body: int) -> None:
        self.app = app
        self.token = token
        self.hosts = {host_name(h) for h in (*LOOPBACK_NAMES, *hosts)}
        self.max_body = max_body

    def refusal(self, connection: HTTPConnection, method: str) -> tuple[int, str] | None:
        """(status, message) of a request refused before its body is read, else None."""
        host = connection.headers.get("host")
        if host is None or host_name(host) not in self.hosts:
            return 403, f"host {host!r} is not served here (DNS rebinding?): use http://127.0.0.1 or the --host given"
        origin = connection.headers.get("origin")
        if method in STATE_CHANGING and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, f"a request from another page ({origin}) may not change anything here"
        if connection.url.path.startswith("/api") and self.token and not token_given(connection, self.token):
            return 403, TOKEN_HINT
        length = connection.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request larger than {self.max_body} bytes"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(HTTPConnection(scope), scope["method"])
        if refused is not None:
            await JSONResponse({"detail": refused[1]}, status_code=refused[0])(scope, receive, send)
            return
        seen, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    over = True
                    raise _BodyTooLargeError
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if over:  # whatever the app makes of a body it could not finish reading, the answer is 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except Exception:
            if not over:
                raise
        if over and not started:
            detail = {"detail": f"request larger than {self.max_body} bytes"}
            await JSONResponse(detail, status_code=413)(scope, receive, send)
