"""The server's front door (plain ASGI, before any route): Host allow-list, other sites, token, body cap,
and the security headers of every response.

- Host: a browser tab on evil.example whose DNS is re-pointed at 127.0.0.1 (DNS rebinding) sends
  Host: evil.example; anything not on the allow-list (or a loopback address: all of 127.0.0.0/8 and
  ::1) gets 400 before a route runs.
- Other sites: a page on another origin may not use the API, even without a token on loopback (a
  form can POST an upload cross-site without a preflight; an <img> can show a private thumbnail). An
  /api call a browser marks cross-site or same-site (Sec-Fetch-Site), and any POST whose Origin is not
  this server, gets 403, unless that origin was named with --cors. Scripts send neither header.
- Token: when set, every /api call needs `Authorization: Bearer TOKEN`, or the cookie a browser gets by
  opening the printed `/?token=TOKEN` link once (SameSite=Strict, HttpOnly; the link then redirects to
  a URL without the token). Compared as bytes, in constant time. The page's own static files carry no
  data and need none.
- Bodies: over the cap -> 413, from Content-Length when sent, else counted while reading. The rest of
  an oversized body (up to DRAIN_BYTES more) is read and dropped first: a client that sends its body
  before reading (urllib, browsers) would otherwise get a connection reset instead of the 413.
- Headers: every response says nosniff, no-referrer, no framing, and carries the page's CSP (the page
  is also reachable as /static/index.html).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
import secrets
import socket
from typing import Iterable, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

COOKIE = "mmsearch_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/", "/favicon.ico")
DRAIN_BYTES = 64 << 20  # at least this much of an oversized body is read and dropped, so the client sees the 413
# the page loads nothing from elsewhere and runs no inline script: say so to the browser
CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"content-security-policy", CSP.encode()))
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")  # fits a header, a cookie and a URL unescaped


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_problem(token: str) -> Optional[str]:
    """Why a chosen token cannot be used as given, or None."""
    if not TOKEN_CHARS.fullmatch(token):
        return "use up to 256 characters from A-Z a-z 0-9 . _ ~ + / = -"
    return None


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
    def __init__(self, app, allowed_hosts: Optional[set[str]], token: Optional[str], max_upload: int,
                 cors_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        if self.allowed is not None:
            self.allowed |= {h.strip("[]") for h in self.allowed}
        self.token = token.encode("utf-8") if token else None
        self.cors = {o.rstrip("/").lower() for o in cors_origins}
        self.max_upload = max_upload
        self.max_body = max_upload + 64 * 1024  # room for the multipart framing around the file
        self.drain = max(DRAIN_BYTES, self.max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"], scope.get("path", "")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await _reply(send, 400, "bad Content-Length", close=True)
        declared = int(length) if length is not None else None

        async def refuse(status: int, message: str):
            """Reply early; a body the client may still be sending is read and dropped first (bounded)."""
            if method in ("POST", "PUT", "PATCH") and "100-continue" not in headers.get("expect", "") and \
                    (declared is None or declared <= self.max_body + self.drain):
                await _read_capped(receive, 0, self.max_body + self.drain)
            return await _reply(send, status, message, close=True)

        raw_host = headers.get("host", "")
        host = host_of(raw_host)
        if not self._host_ok(host):
            return await refuse(400, f"host '{host}' is not allowed (DNS rebinding protection); "
                                     f"start the server with --allow-host {host or 'NAME'} to allow it")
        if self._other_site(method, path, headers, raw_host):
            return await refuse(403, "requests from other sites are refused; start the server with "
                                     "--cors ORIGIN to let a page on ORIGIN call the API")
        if self.token:
            # latin-1 both ways: each value is the exact bytes the client sent
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                              encoding="latin-1")
            given = next((v for k, v in query if k == "token"), None)
            if given is not None and method == "GET" and not path.startswith("/api/"):
                return await self._login(scope, send, given, query)
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self._authorised(headers):
                return await refuse(401, "missing or wrong token: open the URL `mmsearch serve` printed, or "
                                         "send the header 'Authorization: Bearer TOKEN'")
        if method in ("POST", "PUT", "PATCH"):
            if declared is not None and declared > self.max_body:
                return await refuse(413, self._too_big())
            body, ok = await _read_capped(receive, self.max_body, self.drain)
            if not ok:
                return await _reply(send, 413, self._too_big(), close=True)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _host_ok(self, host: str) -> bool:
        if self.allowed is None or host in self.allowed or host.strip("[]") in self.allowed:
            return True
        return is_loopback(host)  # 127.0.0.0/8 and ::1 literals: no DNS name to rebind

    def _other_site(self, method: str, path: str, headers: dict, raw_host: str) -> bool:
        """A browser request from a page of another origin (not one named with --cors)."""
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() in self.cors:
            return False
        if path.startswith("/api/") and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return True
        if origin is not None and method not in ("GET", "HEAD", "OPTIONS"):
            return urlsplit(origin).netloc.lower() != raw_host.strip().lower()  # "null" too
        return False

    def _too_big(self) -> str:
        return f"request body too large (limit {self.max_upload / 2**20:.0f} MB; start with --max-upload-mb to change it)"

    def _authorised(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self._same(auth[7:].strip()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and self._same(value):
                return True
        return False

    def _same(self, given: str) -> bool:
        """`given` (a latin-1 decoded header or query value) equals the token, compared on bytes."""
        return hmac.compare_digest(given.encode("latin-1", "replace"), self.token)

    async def _login(self, scope, send, given: str, query: list):
        if not self._same(given):
            return await _reply(send, 401, "wrong token")
        rest = [(k, v) for k, v in query if k != "token"]
        location = scope.get("path", "/") + ("?" + urlencode(rest, encoding="latin-1") if rest else "")
        cookie = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def _read_capped(receive, cap: int, drain: int = 0):
    """(body, True), or (b"", False) once it passes `cap`: then up to `drain` more bytes are read and dropped."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total <= cap:
            chunks.append(chunk)
        elif chunks:
            chunks = []
        if not message.get("more_body") or total > cap + drain:
            break
    return (b"".join(chunks), True) if total <= cap else (b"", False)


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
            names = {k.lower() for k, _ in message.get("headers", [])}
            message["headers"] = list(message.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
        await send(message)
    return wrapped


async def _reply(send, status: int, message: str, close: bool = False):
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})
