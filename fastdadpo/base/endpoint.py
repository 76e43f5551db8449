"""A client of one OpenAI-compatible HTTP server (vLLM, SGLang, TGI, a hosted API): the HTTP judge
and served models (``fastdadpo generate --teacher-url``, ``model.teacher_url``) talk through it.

What it guarantees, whoever calls it:
- credentials (``user:password@`` in the URL, or an API key read from an environment variable) go
  only to the origin the user named: a redirect is never followed (the request carries the key, and a
  POST's body would not be re-sent anyway), plain http only to this machine unless allowed, and no
  credential ever appears in a message;
- each request is bounded as a whole, in time (a socket timeout bounds each read only, so a server
  trickling a byte at a time would never end) and in size (a reply past ``max_reply_bytes`` is no
  reply of this API, and would be held whole in memory before its JSON could be refused);
- HTTP 429, 5xx, timeouts and replies broken off are retried ``retries`` times with exponential
  backoff; anything else ends the run with one paragraph (a ``UserError``).

Written on the standard library on purpose: the whole-request deadline and the size cap need a
read loop of our own whatever the library, and the HTTP package the rest of the stack brings was
renamed between the releases this project supports (``httpx`` under huggingface_hub 1.x, ``httpx2``
under 2.x), so neither name can be relied on across the version matrix.
"""
from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import math
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from fastdadpo.base.errors import ConfigError, UserError

RETRYABLE_STATUS = (429, 500, 502, 503, 504)


def display_url(url: str) -> str:
    """``url`` fit for messages: without user:password, each query value replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        query = "&".join(f"{name}=***" for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))
    except ValueError:
        return "<an unparsable URL>"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); names are not resolved."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_http_url(url: Optional[str], flag: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag}: {display_url(url or '')!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return parts


class _Redirected(Exception):
    def __init__(self, code: int, target: str):
        super().__init__(code, target)
        self.code, self.target = code, target


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(code, urllib.parse.urljoin(req.full_url, newurl))


class _Retry(Exception):
    """A failure worth another attempt; ``message`` is said if none is left."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Endpoint:
    """One server. ``url`` is its base (``http://host:8000``, ``.../v1``) or one route on it;
    ``flag`` names where the user gave it (for messages), ``what`` names it in messages ("the judge
    endpoint"). ``request(route, payload)`` POSTs JSON (GET without a payload) and returns the reply's
    JSON; a route is relative to the API root (``/v1``) unless it starts with ``/``."""

    def __init__(self, url: Optional[str], *, flag: str, what: str, api_key_env: Optional[str] = None,
                 api_key_flag: str = "--api-key-env", allow_http: bool = False,
                 allow_http_flag: str = "--allow-http", timeout: float = 60.0, timeout_flag: str = "--timeout",
                 retries: int = 2, backoff: float = 1.0, max_reply_bytes: int = 1 << 20):
        parts = split_http_url(url, flag)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ConfigError(f"{timeout_flag}: must be a positive number of seconds, got {timeout!r}")
        self.flag, self.what, self.timeout, self.timeout_flag = flag, what, float(timeout), timeout_flag
        self.retries, self.backoff, self.max_reply_bytes = retries, backoff, max_reply_bytes
        self.display = display_url(url)
        # The requests carry the prompts and the credentials: in clear text only to this machine.
        if parts.scheme.lower() == "http" and not is_loopback(parts.hostname) and not allow_http:
            raise ConfigError(f"{flag}: {self.display} is plain http to another machine, which would send the "
                              f"prompts and the API key unencrypted; use https, or pass {allow_http_flag} if the "
                              f"network is trusted")
        self.headers = {"Content-Type": "application/json"}
        self.secrets = []
        if parts.username is not None:  # user:password@ in the URL: HTTP basic auth, never part of the request line
            if api_key_env:
                raise ConfigError(f"{flag} / {api_key_flag}: give the credentials one way, not both "
                                  f"(user:password in the URL, or an API key)")
            user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            self.secrets += [s for s in (user, password, parts.username, parts.password, token) if s]
        if api_key_env:
            if not os.environ.get(api_key_env):
                raise ConfigError(f"{api_key_flag}: the environment variable {api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
            self.secrets.append(os.environ[api_key_env])
        self.secrets += [value for _, value in urllib.parse.parse_qsl(parts.query) if len(value) >= 4]
        self._scheme, self._netloc = parts.scheme.lower(), parts.netloc.rpartition("@")[2]
        self._path, self._query = parts.path.rstrip("/"), parts.query
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def url(self, route: str) -> str:
        """The full URL of ``route`` (credentials left out: they travel in a header)."""
        if route.startswith("/"):  # from the server's root, beside the API (vLLM's /tokenize)
            path = self._path.removesuffix("/v1") + route
        elif self._path.endswith("/" + route):
            path = self._path
        else:
            path = self._path + ("/" if self._path.endswith("/v1") else "/v1/") + route
        return urllib.parse.urlunsplit((self._scheme, self._netloc, path, self._query, ""))

    def redacted(self, text: str) -> str:
        """``text`` (a server's reply, an error) with every credential replaced by ``***`` and every
        control character escaped: a reply's bytes reach the user's terminal only as visible text
        (an escape sequence could otherwise recolour, hide or rewrite the message)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)

    def request(self, route: str, payload: Optional[dict] = None, *, retries: Optional[int] = None,
                missing_ok: bool = False) -> Optional[dict]:
        """The JSON reply (a dict) of ``route``; None for HTTP 404/405 with ``missing_ok`` (a route the
        server does not have). Retries as the class says; every other failure is a UserError."""
        target = self.url(route)
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            request = urllib.request.Request(target, data=body, headers=self.headers,
                                             method="GET" if body is None else "POST")
            try:
                raw = self._attempt(request, missing_ok)
                return None if raw is None else self._json(raw, route)
            except _Retry as retry:
                if attempt == retries:
                    raise UserError(f"{self.what} {self.display}: {retry.message}, {retries + 1} times; check the "
                                    f"server, or raise {self.timeout_flag} if it is only slow") from None
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _attempt(self, request, missing_ok: bool) -> Optional[bytes]:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return self._read_bounded(response)
        except _Redirected as exc:
            raise UserError(f"{self.what} {self.display} answered with a redirect (HTTP {exc.code}) to "
                            f"{display_url(exc.target)}, which is not followed: the request carries the "
                            f"credentials, sent only to {self.flag}. Give the final address as {self.flag}") from None
        except urllib.error.HTTPError as exc:
            detail = self.redacted(exc.read(4096).decode("utf-8", "replace")[:300])
            if exc.code in RETRYABLE_STATUS:
                raise _Retry(f"answered HTTP {exc.code} ({detail or 'no details'})") from None
            if missing_ok and exc.code in (404, 405):
                return None
            raise UserError(f"{self.what} {self.display} answered HTTP {exc.code} {self.redacted(str(exc.reason))} "
                            f"to {display_url(request.full_url)}: {detail or 'no details'}; check {self.flag}, the "
                            f"model name and the API key") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                raise UserError(f"cannot reach {self.what} {display_url(request.full_url)}: connection refused. "
                                f"Start the OpenAI-compatible server there, or pass the right {self.flag}") from None
            if isinstance(exc.reason, TimeoutError):
                raise _Retry(f"sent no reply within {self.timeout:g} s") from None
            if isinstance(exc.reason, (ConnectionError, ssl.SSLError)):  # reset while the request was sent
                raise _Retry(f"dropped the connection ({type(exc.reason).__name__}: "
                             f"{self.redacted(str(exc.reason))[:160]})") from None
            raise UserError(f"cannot reach {self.what} {self.display}: {self.redacted(str(exc.reason))}") from None
        except TimeoutError:
            raise _Retry(f"sent no reply within {self.timeout:g} s") from None
        except (http.client.HTTPException, OSError) as exc:
            # Closed early, a bad status line, a short body, a TLS connection torn mid-reply, a route lost:
            # the network's, so worth another try (a refused connection was answered above).
            raise _Retry(f"broke off its reply ({type(exc).__name__}: {self.redacted(str(exc))[:160]})") from None

    def _read_bounded(self, response) -> bytes:
        """The body, within ``timeout`` seconds for the whole of it and ``max_reply_bytes``."""
        deadline, chunks, size = time.monotonic() + self.timeout, [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = response.read1(1 << 16)
            if not chunk:
                if getattr(response, "length", None):  # the connection ended before its Content-Length
                    raise http.client.IncompleteRead(b"".join(chunks), response.length)
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise UserError(f"{self.what} {self.display} sent a reply of more than {self.max_reply_bytes:,} "
                                f"bytes, which is no reply of the API asked")
            chunks.append(chunk)

    def _json(self, raw: bytes, route: str) -> dict:
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise UserError(f"{self.what} {self.display} sent a reply to {route} that is not a JSON object: "
                            f"{self.redacted(repr(raw[:200]))}")
        return reply
