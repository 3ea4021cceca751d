"""Who may call the service and what a browser may do with its answers: plain ASGI middleware.

- :class:`BearerToken`: with a token set, every request but the web page and its static files
  must send ``Authorization: Bearer TOKEN`` (compared in constant time); 401 otherwise.
- :class:`SecurityHeaders`: every response says ``nosniff`` and carries a strict Content
  Security Policy (no inline or third-party script, no framing), so nothing the collection
  holds can run as a page of this origin.
- :class:`AllowedHosts`: a request whose ``Host`` is not one of the server's names gets 400,
  so a web page whose DNS name was rebound to a local address cannot read the server.
- CORS uses Starlette's own middleware, only for the origins named.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.middleware.cors import CORSMiddleware

from xmodal.serve.settings import ServeSettings, is_loopback

Scope = dict[str, Any]
log = logging.getLogger("xmodal.serve")

# The web page and its own script and style: no data of the index, so no token needed.
PUBLIC_PATHS = ("/", "/static/app.js", "/static/app.css")
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every HTTP response (replacing any the app set)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in SECURITY_HEADERS}

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + list(SECURITY_HEADERS)}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(header: str) -> str:
    """The name part of a Host header (``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(name: str, allowed: list[str]) -> bool:
    """``name`` is one of ``allowed``, or under one of its ``*.domain`` patterns."""
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class AllowedHosts:
    """400 for a request whose Host header names none of ``allowed``."""

    def __init__(self, app: Any, allowed: list[str]):
        self.app = app
        self.allowed = [("[::1]" if h == "::1" else h) for h in allowed]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers") or [] if k.lower() == b"host"), b"")
        name = host_name(header.decode("latin-1"))
        if host_allowed(name, self.allowed):
            await self.app(scope, receive, send)
            return
        detail = f"host {name[:80]!r} is not served here (xmodal serve --allowed-hosts)"
        await _answer(send, 400, detail)


async def _answer(send: Any, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerToken:
    """401 for a request without ``Authorization: Bearer <token>`` (but :data:`PUBLIC_PATHS`)."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                given = value
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        reason = "wrong bearer token" if given else "this server needs a bearer token"
        challenge = [(b"www-authenticate", b'Bearer realm="xmodal"')]
        await _answer(send, 401, f"{reason} (Authorization: Bearer TOKEN)", challenge)


def add_security(app: Any, settings: ServeSettings) -> None:
    """Wrap ``app`` (outermost last): security headers on every answer, then the Host check,
    CORS (only for the origins named) and the token."""
    if settings.token:
        app.add_middleware(BearerToken, token=settings.token)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if settings.hosts != ["*"]:
        app.add_middleware(AllowedHosts, allowed=settings.hosts)
    app.add_middleware(SecurityHeaders)


def exposure_warnings(settings: ServeSettings) -> list[str]:
    """What an operator should hear about before the server starts listening."""
    warnings = []
    if not is_loopback(settings.host) and not settings.token:
        warnings.append(
            f"serving on {settings.host}, reachable from other machines, without a token: "
            "anyone who can connect can search and read the collection "
            "(set --token or XMODAL_TOKEN)"
        )
    if settings.hosts == ["*"] and not is_loopback(settings.host):
        warnings.append(
            "any Host header is answered: name this server's host names with --allowed-hosts"
        )
    return warnings
