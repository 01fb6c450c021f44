"""Checks the labelling app runs on every request before any route: a same-origin check and a body-size limit.

Both are plain ASGI middleware so that they decide from the headers alone: a
refused request is answered before its body is read, and an accepted one is
read only up to the limit.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Largest request body accepted, in bytes.  The largest legitimate body is a demonstration (or the comments of a
#: rating): at most labeling.max_text_chars characters, 8,000 by default, so under 100 KiB even if every character
#: were JSON-escaped as a 12-byte surrogate pair; a ranking is well under 10 KiB.  1 MiB leaves an order of magnitude
#: of room while bounding what one request can make the server hold (the body is buffered, then parsed into Python
#: objects several times its size).
MAX_BODY_BYTES = 1 << 20

#: Methods that only read; every other method changes state (or might, for a method this app does not know).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the app reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to any interface


class SameOriginOnly:
    """Refuse (403) a state-changing request whose ``Origin`` (or, without one, ``Referer``) is another site's.

    SameSite=Strict already keeps the session cookie off requests from other
    *sites*, but every port of 127.0.0.1 is the same site: a page served by any
    other local program could post to the app with the annotator's cookie.  The
    check covers sign-in too, so that another page cannot sign a browser in
    under the attacker's token (the refusal happens before the route, so no
    cookie is set).

    The app's own origin is the one the request was addressed to: its scheme
    (``X-Forwarded-Proto`` from a trusted proxy counts, as uvicorn applies it)
    and its ``Host``.  A browser always sets ``Host`` to the server it is
    talking to, so a page elsewhere cannot make the two agree; this also holds
    behind a reverse proxy that passes ``Host`` on, and for a wildcard bind
    where the served addresses are not known in advance.  127.0.0.1,
    localhost and [::1] on the same port count as one origin.

    A request with neither header is let through: browsers send ``Origin`` on
    every cross-origin request that is not a GET or HEAD (Fetch standard; all
    current engines), so such a request did not come from another site's page.
    It comes from a script (curl, a client with a bearer token), which can send
    any header it likes anyway; refusing it would break scripts and stop no
    attack.  ``Origin: null`` (sandboxed or opaque documents) is refused.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        claimed = headers.get("origin", headers.get("referer"))
        if claimed is not None and not _same_origin(urlsplit(claimed.strip()), _addressed(scope, headers)):
            detail = f"cross-origin request refused (from {claimed[:200]!r})"
            return await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def _addressed(scope: Scope, headers: Headers) -> SplitResult:
    host = headers.get("host")
    if host is None:
        server_host, server_port = scope.get("server") or ("", None)
        host = f"[{server_host}]:{server_port}" if ":" in server_host else f"{server_host}:{server_port}"
    return urlsplit(f"{scope['scheme']}://{host}")


def _same_origin(claimed: SplitResult, own: SplitResult) -> bool:
    try:
        claimed_port = claimed.port or DEFAULT_PORTS.get(claimed.scheme)
        own_port = own.port or DEFAULT_PORTS.get(own.scheme)
    except ValueError:  # a port that is not a number or out of range
        return False
    if claimed.scheme != own.scheme or claimed_port != own_port or not claimed.hostname:
        return False
    return claimed.hostname == own.hostname or {claimed.hostname, own.hostname} <= LOOPBACK_NAMES


class BodyLimit:
    """Refuse (413) a request whose body is over ``max_bytes``, reading at most ``max_bytes`` + one chunk of it.

    A declared ``Content-Length`` over the limit is refused before anything is
    read.  A chunked body (no length) is counted as it arrives and refused as
    soon as the count passes the limit.  An accepted body is handed to the
    route from the buffer, so the route never reads past the limit either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        # The server (h11/httptools) already refused a length that is not a number.
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the route see that
                return await self.app(scope, _replay([], message, receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        await refusal(scope, receive, send)


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body (or the message that ended it) first, then the real one."""
    body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    pending = [last or body]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
