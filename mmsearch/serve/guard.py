"""The server's front door (plain ASGI, before any route): Host allow-list, token, upload size cap.

- Host: a browser tab on evil.example whose DNS is re-pointed at 127.0.0.1 (DNS rebinding) sends
  Host: evil.example; anything not on the allow-list gets 400 before a route runs.
- Token: when set, every /api call needs `Authorization: Bearer TOKEN`, or the cookie a browser gets by
  opening the printed `/?token=TOKEN` link once (SameSite=Strict, HttpOnly; the link then redirects to
  a URL without the token). The page's own static files carry no data and need none.
- Bodies: over the cap -> 413, from Content-Length when sent, else counted while reading.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
from typing import Iterable, Optional
from urllib.parse import parse_qsl, urlencode

COOKIE = "mmsearch_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/", "/favicon.ico")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def default_allowed_hosts(bind: str, extra: Iterable[str] = ()) -> set[str]:
    """Loopback names, plus for a LAN bind the address given and this machine's names and addresses."""
    hosts = {h.lower() for h in LOOPBACK_NAMES} | {h.lower() for h in extra}
    if not is_loopback(bind):
        if bind not in ("0.0.0.0", "::", ""):
            hosts.add(bind.lower())
        name = socket.gethostname()
        hosts |= {name.lower(), f"{name.lower()}.local", socket.getfqdn().lower()}
        try:
            hosts |= {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    return hosts


def host_of(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    def __init__(self, app, allowed_hosts: Optional[set[str]], token: Optional[str], max_upload: int):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        if self.allowed is not None:
            self.allowed |= {h.strip("[]") for h in self.allowed}
        self.token = token
        self.max_upload = max_upload
        self.max_body = max_upload + 64 * 1024  # room for the multipart framing around the file

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = host_of(headers.get("host", ""))
        if self.allowed is not None and host not in self.allowed and host.strip("[]") not in self.allowed:
            return await _reply(send, 400, f"host '{host}' is not allowed (DNS rebinding protection); "
                                            f"start the server with --allow-host {host or 'NAME'} to allow it")
        path = scope.get("path", "")
        if self.token:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            given = query.get("token")
            if given is not None and scope["method"] == "GET" and not path.startswith("/api/"):
                return await self._login(scope, send, given, query)
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self._authorised(headers):
                return await _reply(send, 401, "missing or wrong token: open the URL `mmsearch serve` printed, or "
                                               "send the header 'Authorization: Bearer TOKEN'")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await _reply(send, 413, self._too_big())
            body, ok = await _read_capped(receive, self.max_body)
            if not ok:
                return await _reply(send, 413, self._too_big())
            receive = _replay(body, receive)
        await self.app(scope, receive, _with_headers(send))

    def _too_big(self) -> str:
        return f"request body too large (limit {self.max_upload / 2**20:.0f} MB; start with --max-upload-mb to change it)"

    def _authorised(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip(), self.token):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value, self.token):
                return True
        return False

    async def _login(self, scope, send, given: str, query: dict):
        if not hmac.compare_digest(given, self.token):
            return await _reply(send, 401, "wrong token")
        query.pop("token")
        location = scope.get("path", "/") + ("?" + urlencode(query) if query else "")
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def _read_capped(receive, cap: int):
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks), True


def _replay(body: bytes, original):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()  # after the body: the real disconnect, when it comes
    return receive


def _with_headers(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            message["headers"] = list(message["headers"]) + [(b"x-content-type-options", b"nosniff"),
                                                             (b"referrer-policy", b"no-referrer")]
        await send(message)
    return wrapped


async def _reply(send, status: int, message: str):
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
