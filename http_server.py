# SPDX-License-Identifier: Apache-2.0
"""The wasmstore REST API: an HTTP/1.1 server over a `wasmstore.Store`.

Standard library only (plus `wasmstore.py`): `http.server.ThreadingHTTPServer` with keep-alive,
Content-Length on every response, zero-copy downloads (`os.sendfile` of the object file; plain
reads through TLS), uploads streamed into the store, key/method auth, TLS, CORS, a WebSocket
watch (RFC 6455), Prometheus metrics, bounded request heads and bodies, connection timeouts and
a connection cap, and graceful shutdown on SIGTERM / Ctrl-C.

As a command::

    python http_server.py [--root DIR] [--host H] [--port P] [--auth SPEC] [--tls KEY,CERT]
                          [--cors] [--max-body N] [--timeout S] [--quiet]

As a library::

    import wasmstore, http_server
    server = http_server.make_server(wasmstore.Store("/srv/store"), "127.0.0.1", 0, auth="k:GET")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ...
    server.graceful_shutdown()

Map of this file (top-down):
    constants, exceptions (ServerError root)
    URL parsing        parse_target(), decode_segment()
    replies            Reply, FileBody, error_reply() and the one ERROR_STATUS table
    route handlers     pure functions (store, call, body) -> Reply, the ROUTES table, LocateCache
    auth               AuthTable (constant-time key comparison)
    body readers       LimitedReader, ChunkedReader (bounded, never read past the request)
    metrics            Metrics (Prometheus text format)
    watch              WatchHub (one Store.watch thread per branch -> bounded per-client queues)
    WebSocket framing  encode_frame(), FrameParser
    connection         request head parsing (Headers, read_headers), WasmstoreHandler
                       (one thread per connection)
    server             WasmstoreServer, make_server()
    command line       main()
"""

__version__ = "0.1.0"
__all__ = [
    "ServerError",
    "HttpError",
    "Reply",
    "FileBody",
    "Call",
    "ROUTES",
    "ERROR_STATUS",
    "AuthTable",
    "Metrics",
    "WatchHub",
    "LocateCache",
    "Headers",
    "WasmstoreHandler",
    "WasmstoreServer",
    "make_server",
    "parse_target",
    "error_reply",
    "main",
]

import argparse
import base64
import bisect
import collections
import hashlib
import hmac
import http
import http.server
import io
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse

import wasmstore

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6384
DEFAULT_MAX_BODY = 128 * 1024 * 1024       # largest accepted module upload (413 above)
DEFAULT_TIMEOUT = 30.0                     # seconds an idle or stalled connection may hold a thread
DEFAULT_MAX_CONNECTIONS = 512              # beyond this, new connections get 503 (bounds threads)
MAX_REQUEST_LINE = 8 * 1024                # longer request line: 414
MAX_HEADER_BYTES = 32 * 1024               # larger header block: 431
MAX_HEADER_COUNT = 100                     # more header lines: 431
MAX_DISCARDED_BODY = 64 * 1024             # routes without a body accept (and drop) at most this
MIN_BODY_RATE = 1024                       # bytes/s: each KiB of a request body adds 1 s to its time limit
MAX_ERROR_MESSAGE = 500                    # error bodies are one short line
API_PREFIX = ("api", "v1")
KNOWN_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
WS_MAX_CLIENT_PAYLOAD = 64 * 1024          # the watch protocol needs nothing large from clients
WS_QUEUE_SIZE = 256                        # events buffered per client before it is dropped as slow
WS_POLL_SECONDS = 0.05                     # how often a session checks its queue and its socket
WS_PING_SECONDS = 20.0                     # keep-alive ping period on an otherwise silent watch
WATCH_POLL_SECONDS = 0.05                  # how often a branch watcher checks the branch head
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
WASM_TYPE = "application/wasm"             # exactly this: WebAssembly.instantiateStreaming checks it
CORS_ALLOW_HEADERS = "Wasmstore-Auth, Wasmstore-Branch, Wasmstore-Author, Authorization, Content-Type, If-None-Match"
CORS_EXPOSE_HEADERS = "Wasmstore-Hash, ETag"

_SEGMENT_RE = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*\Z", re.S)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_METHOD_RE = re.compile(r"[A-Z]{1,16}\Z")


# ---------------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------------

class ServerError(Exception):
    """Root of every error raised by this module (bad configuration, bad request)."""


class HttpError(ServerError):
    """A request-level error answered with `status` and a one-line message."""

    def __init__(self, status, message, *, close=False, headers=()):
        super().__init__(message)
        self.status = int(status)
        self.close = close            # the connection cannot be reused (unread or bad body)
        self.headers = list(headers)


# ---------------------------------------------------------------------------------------------
# URL parsing
# ---------------------------------------------------------------------------------------------

def decode_segment(raw):
    """Strictly percent-decode one URL path segment to a str (UTF-8), or raise HttpError(400).

    `raw` is the segment as http.server gives it (the request line decoded as latin-1, so each
    char is one byte). Malformed escapes, invalid UTF-8, "/" (it would change the path's
    structure), control characters and the dot segments are refused here, at the boundary.
    """
    if "%" not in raw and raw.isascii():
        text = raw                                   # the common case, kept cheap
    else:
        if not _SEGMENT_RE.match(raw):
            raise HttpError(400, "bad percent-encoding in URL path")
        try:
            text = urllib.parse.unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise HttpError(400, "URL path is not valid UTF-8") from None
    if "/" in text:
        raise HttpError(400, "URL path segment contains an encoded '/'")
    if _CONTROL_RE.search(text):
        raise HttpError(400, "URL path contains a control character")
    if text in (".", ".."):
        raise HttpError(400, "URL path contains a '.' or '..' segment")
    return text


def parse_target(target):
    """Split a request target into (decoded path segments, query dict); empty segments dropped."""
    if target.startswith(("http://", "https://")):       # absolute-form (RFC 9112 3.2.2)
        target = urllib.parse.urlsplit(target).path or "/"
        target = target.split("?", 1)[0]
    if not target.startswith("/"):
        raise HttpError(400, "request target must start with '/'")
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    if _CONTROL_RE.search(path) or " " in path:
        raise HttpError(400, "URL path contains a control character")
    segments = tuple([decode_segment(s) for s in path.split("/") if s])
    if not query:
        return segments, {}
    try:
        params = urllib.parse.parse_qs(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "bad query string") from None
    return segments, {k: v[-1] for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# Replies and the single exception -> status table
# ---------------------------------------------------------------------------------------------

class FileBody:
    """A response body served from an open file descriptor (sent with os.sendfile).

    close() hands the descriptor back: to the shared open-file lease it came from
    (see LocateCache), or to os.close when it was opened for this reply alone."""

    __slots__ = ("fd", "size", "_release")

    def __init__(self, fd, size, release=None):
        self.fd = fd                  # a raw fd: io.open's buffered object costs ~40 us here
        self.size = size
        self._release = release

    def read(self):
        """The whole body (for tests and non-socket callers)."""
        return os.pread(self.fd, self.size, 0)

    def close(self):
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self._release is None:
                os.close(fd)
            else:
                self._release()


def open_body(filename):
    """A FileBody of its own for an object file; NotFound if gc removed it."""
    try:
        fd = os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise wasmstore.NotFound("the module was removed meanwhile") from None
    try:
        return FileBody(fd, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise


class Reply:
    """What a handler returns: status, extra headers (list of pairs), body (bytes or FileBody)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status=200, headers=(), body=b""):
        self.status = status
        self.headers = list(headers)
        self.body = body

    def __repr__(self):
        return f"Reply({self.status}, {self.headers!r}, {self.body!r:.80})"

    @property
    def body_size(self):
        return self.body.size if isinstance(self.body, FileBody) else len(self.body)

    def close(self):
        if isinstance(self.body, FileBody):
            self.body.close()


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


def _reason(status):
    return _REASONS.get(status, "Unknown")


def text_reply(text, status=200):
    return Reply(status, [("Content-Type", TEXT_TYPE)], text.encode("utf-8"))


def json_reply(value, status=200):
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Reply(status, [("Content-Type", JSON_TYPE)], data)


# The store's errors take their status from the one table in wasmstore.py (shared with its
# CLI); error_status() walks the exception's MRO, so a subclass (InvalidModule, MergeConflict)
# finds its own entry or its parent's.
ERROR_STATUS = {
    HttpError: None,                  # carries its own status
    **{cls: http_status for cls, (http_status, _) in wasmstore.ERROR_STATUS.items()},
}


def error_status(exc):
    """The HTTP status for an exception (None: not an expected error, i.e. a bug)."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            status = ERROR_STATUS[cls]
            return exc.status if status is None else status
    return None


def one_line(message):
    """Error bodies are one short line: no newlines, no unbounded echo of input."""
    line = " ".join(str(message).split())
    if len(line) > MAX_ERROR_MESSAGE:
        line = line[:MAX_ERROR_MESSAGE - 3] + "..."
    return line or "error"


def error_reply(exc):
    """Map an exception to a plain-text one-line Reply; unexpected exceptions become 500."""
    status = error_status(exc)
    if status is None:
        return text_reply("internal server error\n", 500)
    reply = text_reply(one_line(exc) + "\n", status)
    if isinstance(exc, HttpError):
        reply.headers.extend(exc.headers)
    return reply


# ---------------------------------------------------------------------------------------------
# Route handlers: pure functions (store, call, body) -> Reply, testable without a socket
# ---------------------------------------------------------------------------------------------

class Call:
    """The parts of a request a handler needs."""

    __slots__ = ("params", "path", "branch", "author", "headers", "max_body", "locator")

    def __init__(self, params=(), path="", branch=None, author=None, headers=None,
                 max_body=DEFAULT_MAX_BODY, locator=None):
        self.params = tuple(params)   # the route's named segments (hash, index, branch...)
        self.path = path              # the "*" rest joined with "/" ("" when absent)
        self.branch = branch          # Wasmstore-Branch or None (default branch)
        self.author = author          # Wasmstore-Author or None
        self.headers = headers or {}
        self.max_body = max_body
        self.locator = locator        # a LocateCache, or None: store.locate


def _path_or_none(call):
    return call.path or None


def _etag_matches(header, digest):
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{digest}"':
            return True
    return False


class _OpenFile:
    """An object file kept open for downloads, shared by the requests that lease it."""

    __slots__ = ("fd", "size", "key", "leases", "evicted")

    def __init__(self, fd, info):
        self.fd = fd
        self.size = info.st_size
        self.key = (info.st_ino, info.st_mtime_ns, info.st_size)
        self.leases = 1
        self.evicted = False


class LocateCache:
    """Serves module downloads without re-resolving the path or reopening the file.

    Paths: Store.locate is memoized per (branch, path) while the branch head is unchanged
    (one pread of the open ref file tells; any commit, also by another process, or gc makes the
    branch's entries stale). Files: a hash-checked object file stays open and is shared by
    requests (objects are immutable; sendfile reads at an explicit offset), leased so its
    descriptor is closed only when no reply uses it. Each request fstats the descriptor: a
    file changed in place since it was checked goes back through Store.locate's hash check.
    Every syscall releases the GIL, and with many connections each release costs a thread
    switch: this is what keeps a download to five syscalls.
    """

    def __init__(self, store, size=4096, open_files=64):
        self.store = store
        self.size = size
        self.entries = {}
        self.lock = threading.Lock()
        self.open_files = open_files
        self.files = collections.OrderedDict()      # digest -> _OpenFile, oldest first

    def locate(self, path, branch=None):
        head = self.store.head(branch=branch)
        key = (branch, path)
        hit = self.entries.get(key)
        if hit is not None and hit[0] == head and head is not None:
            return hit[1], hit[2]
        digest, filename = self.store.locate(path, branch=branch)
        if self.store.head(branch=branch) == head:   # no commit raced the lookup
            with self.lock:
                if len(self.entries) >= self.size:
                    self.entries.clear()             # simple bound; refilled on demand
                self.entries[key] = (head, digest, filename)
        return digest, filename

    def forget(self, path, branch=None):
        self.entries.pop((branch, path), None)

    def open(self, path, branch=None):
        """(digest, FileBody) of the module at path on branch; the caller closes the body."""
        digest, filename = self.locate(path, branch)
        try:
            body = self._lease(digest, filename)
        except FileNotFoundError:                    # gc removed it after the lookup
            body = None
        if body is None:
            self.forget(path, branch)
            digest, filename = self.store.locate(path, branch=branch)   # checks the hash again
            body = open_body(filename)
        return digest, body

    def _lease(self, digest, filename):
        with self.lock:
            entry = self.files.get(digest)
            if entry is not None:
                entry.leases += 1
                self.files.move_to_end(digest)
        if entry is None:
            entry = self._open(digest, filename)
        else:
            info = os.fstat(entry.fd)
            if (info.st_ino, info.st_mtime_ns, info.st_size) != entry.key:
                self._evict(digest, entry)           # changed in place: never trusted again
                self._release(entry)
                return None
        return FileBody(entry.fd, entry.size, lambda: self._release(entry))

    def _open(self, digest, filename):
        fd = os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            entry = _OpenFile(fd, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        with self.lock:
            existing = self.files.get(digest)
            if existing is not None:                  # another request opened it meanwhile
                existing.leases += 1
                os.close(fd)
                return existing
            self.files[digest] = entry
            while len(self.files) > self.open_files:
                oldest_digest, oldest = next(iter(self.files.items()))
                self._evict_locked(oldest_digest, oldest)
        return entry

    def _evict(self, digest, entry):
        with self.lock:
            self._evict_locked(digest, entry)

    def _evict_locked(self, digest, entry):
        if self.files.get(digest) is entry:
            del self.files[digest]
        if not entry.evicted:
            entry.evicted = True
            if entry.leases == 0:
                os.close(entry.fd)

    def _release(self, entry):
        with self.lock:
            entry.leases -= 1
            if entry.evicted and entry.leases == 0:
                os.close(entry.fd)

    def close(self):
        """Close every open file no reply is using (the rest close when released)."""
        with self.lock:
            for digest, entry in list(self.files.items()):
                self._evict_locked(digest, entry)


def _open_object(store, call):
    """(digest, FileBody) of the module a request names."""
    if call.locator is not None:
        return call.locator.open(call.path, call.branch)
    digest, filename = store.locate(call.path, branch=call.branch)
    return digest, open_body(filename)


def module_reply(digest, body, headers):
    """200 with the object file (or 304 when the client's ETag is current); owns body."""
    etag = f'"{digest}"'
    common = [("Content-Type", WASM_TYPE), ("Wasmstore-Hash", digest), ("ETag", etag),
              ("Cache-Control", "no-cache")]
    if _etag_matches(headers.get("If-None-Match"), digest):
        body.close()
        reply = Reply(304, common)
        reply.headers.append(("Content-Length", str(body.size)))   # what a 200 would have sent
        return reply
    return Reply(200, common, body)


def get_module(store, call, body):
    digest, file_body = _open_object(store, call)
    return module_reply(digest, file_body, call.headers)


def add_module(store, call, body):
    """`body` is a binary reader yielding exactly the request body (streamed, never buffered)."""
    digest = store.add_file(call.path, body, branch=call.branch, author=call.author,
                            size_limit=call.max_body)
    return text_reply(digest)


def delete_module(store, call, body):
    store.remove(call.path, branch=call.branch, author=call.author)
    return Reply(200)


def list_modules(store, call, body):
    return json_reply(store.list(call.path, branch=call.branch))


def get_hash(store, call, body):
    return text_reply(store.hash(call.path, branch=call.branch))


def set_hash(store, call, body):
    store.set(call.path, call.params[0], branch=call.branch, author=call.author)
    return Reply(200)


def get_versions(store, call, body):
    versions = store.versions(call.path, branch=call.branch)
    return json_reply([[digest, commit] for digest, commit in versions])


def get_version(store, call, body):
    raw_index = call.params[0]
    if not raw_index.isdigit() or len(raw_index) > 9:
        raise HttpError(400, f"version index must be a non-negative integer, got {raw_index!r}")
    digest, _commit = store.version(int(raw_index), call.path, branch=call.branch)
    return module_reply(digest, open_body(store.module_filename(digest)), call.headers)


def rollback(store, call, body):
    store.rollback(_path_or_none(call), branch=call.branch, author=call.author)
    return Reply(200)


def restore(store, call, body):
    store.restore(call.params[0], _path_or_none(call), branch=call.branch, author=call.author)
    return Reply(200)


def snapshot(store, call, body):
    return text_reply(store.snapshot(branch=call.branch))


def commit_info(store, call, body):
    return json_reply(store.commit_info(call.params[0]))


def list_branches(store, call, body):
    return json_reply(store.branches())


def default_branch(store, call, body):
    return text_reply(store.default_branch)


def switch_branch(store, call, body):
    store.set_default_branch(call.params[0])
    return Reply(200)


def create_branch(store, call, body):
    store.create_branch(call.params[0], branch=call.branch)
    return Reply(200)


def delete_branch(store, call, body):
    store.delete_branch(call.params[0])
    return Reply(200)


def merge(store, call, body):
    store.merge(call.params[0], branch=call.branch, author=call.author)
    return Reply(200)


def gc(store, call, body):
    return text_reply(str(store.gc(branch=call.branch)))


def auth_ok(store, call, body):
    return Reply(200)            # reaching a handler means the key passed for this method


class Route:
    """One row of the routing table: /api/v1/<name>/<params...>/<rest...>."""

    __slots__ = ("method", "name", "nparams", "rest", "handler", "label", "upload", "websocket")

    def __init__(self, method, name, nparams, rest, handler, *, upload=False, websocket=False):
        self.method = method          # "*" = any method
        self.name = name
        self.nparams = nparams
        self.rest = rest              # "none" | "optional"
        self.handler = handler
        self.upload = upload          # body streamed into the store
        self.websocket = websocket
        parts = ["/api/v1", name] + [":p"] * nparams + (["*"] if rest == "optional" else [])
        self.label = "/".join(parts)  # bounded metric label


# (method, name, number of named params, rest of path, handler)
ROUTES = [
    Route("GET", "modules", 0, "optional", list_modules),
    Route("GET", "module", 0, "optional", get_module),
    Route("POST", "module", 0, "optional", add_module, upload=True),
    Route("DELETE", "module", 0, "optional", delete_module),
    Route("GET", "hash", 0, "optional", get_hash),
    Route("POST", "hash", 1, "optional", set_hash),
    Route("GET", "versions", 0, "optional", get_versions),
    Route("GET", "version", 1, "optional", get_version),
    Route("POST", "rollback", 0, "optional", rollback),
    Route("POST", "restore", 1, "optional", restore),
    Route("GET", "snapshot", 0, "none", snapshot),
    Route("GET", "commit", 1, "none", commit_info),
    Route("GET", "branches", 0, "none", list_branches),
    Route("GET", "branch", 0, "none", default_branch),
    Route("PUT", "branch", 1, "none", switch_branch),
    Route("POST", "branch", 1, "none", create_branch),
    Route("DELETE", "branch", 1, "none", delete_branch),
    Route("POST", "merge", 1, "none", merge),
    Route("POST", "gc", 0, "none", gc),
    Route("GET", "watch", 0, "none", None, websocket=True),
    Route("*", "auth", 0, "none", auth_ok),
]


def match_route(method, segments, routes=ROUTES):
    """Find the route for (method, decoded segments): (Route, params, rest) or HttpError 404/405.

    HEAD is served by the GET route (same headers, no body).
    """
    if tuple(segments[:2]) != API_PREFIX or len(segments) < 3:
        raise HttpError(404, "no such route")
    name, tail = segments[2], segments[3:]
    lookup = "GET" if method == "HEAD" else method
    allowed = []
    for route in routes:
        if route.name != name:
            continue
        if route.nparams > len(tail) or (route.rest == "none" and len(tail) != route.nparams):
            continue
        if route.method in ("*", lookup):
            if route.websocket and method == "HEAD":
                continue
            return route, tail[:route.nparams], "/".join(tail[route.nparams:])
        allowed.append(route.method)
    if allowed:
        if "GET" in allowed:
            allowed.append("HEAD")
        raise HttpError(405, f"method {method} not allowed here",
                        headers=[("Allow", ", ".join(sorted(set(allowed))))])
    raise HttpError(404, "no such route")


# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------

class AuthTable:
    """Keys and the methods each may use, from a spec like "KEY1:GET,POST;KEY2:GET" ("*" = all).

    Every presented key is compared with every configured key in constant time, so neither
    timing nor early exit tells how much of a key matched or which entry it was.
    """

    ALL = None

    def __init__(self, spec=None):
        self.entries = []
        if spec:
            self.entries = self._parse(spec)

    @staticmethod
    def _parse(spec):
        entries, seen = [], set()
        for number, part in enumerate(spec.split(";"), 1):
            part = part.strip()
            if not part:
                continue
            key, sep, methods = part.rpartition(":")
            key = key.strip()
            if not sep or not key:
                raise ServerError(f"auth entry {number}: expected KEY:METHODS")
            if _CONTROL_RE.search(key) or key != key.strip() or "," in key:
                raise ServerError(f"auth entry {number}: the key has a control character or ','")
            if key in seen:
                raise ServerError(f"auth entry {number}: duplicate key")
            seen.add(key)
            names = [m.strip().upper() for m in methods.split(",") if m.strip()]
            if names == ["*"]:
                allowed = AuthTable.ALL
            else:
                if not names or not all(_METHOD_RE.match(m) for m in names):
                    raise ServerError(f"auth entry {number}: methods must be '*' or names like GET,POST")
                allowed = frozenset(names)
            entries.append((key.encode("utf-8"), allowed))
        if not entries:
            raise ServerError("auth spec has no KEY:METHODS entry")
        return entries

    @property
    def enabled(self):
        return bool(self.entries)

    def check(self, presented, method):
        """Raise HttpError 401 (no or unknown key) or 403 (method not allowed for the key)."""
        if not self.entries:
            return
        if not presented:
            raise HttpError(401, "missing key (send it in Wasmstore-Auth)")
        candidate = presented.encode("latin-1", "replace")
        found, allowed = False, None
        for key, methods in self.entries:
            if hmac.compare_digest(candidate, key) and not found:
                found, allowed = True, methods
        if not found:
            raise HttpError(401, "unknown key")
        wanted = "GET" if method == "HEAD" else method
        if allowed is not AuthTable.ALL and wanted not in allowed:
            raise HttpError(403, f"key not allowed to use {method}")


def presented_key(headers):
    key = headers.get("Wasmstore-Auth")
    if key is None:
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            key = value.strip()
    return key


# ---------------------------------------------------------------------------------------------
# Body readers: bounded views of the connection's input
# ---------------------------------------------------------------------------------------------

class LimitedReader(io.RawIOBase):
    """Yields exactly `length` bytes of `source`; a short body is an error, not a silent EOF."""

    def __init__(self, source, length):
        self.source = source
        self.remaining = length
        self.consumed = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.remaining <= 0:
            return 0
        view = memoryview(buffer)[:min(len(buffer), self.remaining)]
        count = self.source.readinto(view)
        if not count:
            raise HttpError(400, "request body shorter than Content-Length", close=True)
        self.remaining -= count
        self.consumed += count
        return count

    @property
    def exhausted(self):
        return self.remaining <= 0


class ChunkedReader(io.RawIOBase):
    """Decodes Transfer-Encoding: chunked, refusing more than `limit` bytes (413)."""

    def __init__(self, source, limit):
        self.source = source
        self.limit = limit
        self.consumed = 0
        self.chunk_left = 0
        self.done = False

    def readable(self):
        return True

    def _line(self):
        line = self.source.readline(1026)
        if not line.endswith(b"\n"):
            raise HttpError(400, "bad chunked encoding", close=True)
        return line

    def _next_chunk(self):
        size_text = self._line().split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            raise HttpError(400, "bad chunk size", close=True)
        size = int(size_text, 16)
        if self.consumed + size > self.limit:
            raise HttpError(413, f"request body over the limit of {self.limit} bytes", close=True)
        if size == 0:
            for _ in range(MAX_HEADER_COUNT):     # trailer section, up to the empty line
                if self._line() in (b"\r\n", b"\n"):
                    self.done = True
                    return
            raise HttpError(400, "bad chunked trailer", close=True)
        self.chunk_left = size

    def readinto(self, buffer):
        if self.done:
            return 0
        if self.chunk_left == 0:
            self._next_chunk()
            if self.done:
                return 0
        view = memoryview(buffer)[:min(len(buffer), self.chunk_left)]
        count = self.source.readinto(view)
        if not count:
            raise HttpError(400, "request body ended inside a chunk", close=True)
        self.chunk_left -= count
        self.consumed += count
        if self.chunk_left == 0 and self._line() not in (b"\r\n", b"\n"):
            raise HttpError(400, "bad chunked encoding", close=True)
        return count

    @property
    def exhausted(self):
        return self.done


def drain(reader, limit):
    """Read and drop a body a route does not use (bounded)."""
    total = 0
    buffer = bytearray(16384)
    while True:
        count = reader.readinto(buffer)
        if not count:
            return total
        total += count
        if total > limit:
            raise HttpError(413, "this route takes no request body", close=True)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Request counters, a latency histogram per route and byte counters (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()          # (route, method, status) -> count
        self.latency = {}                              # route -> [bucket counts..., sum, count]
        self.bytes_in = 0
        self.bytes_out = 0
        self.websocket_clients = 0
        self.connections = 0

    def observe(self, route, method, status, seconds, bytes_in, bytes_out):
        if method not in KNOWN_METHODS:
            method = "OTHER"                           # bounded label set, even under fuzzing
        with self.lock:
            self.requests[(route, method, status)] += 1
            row = self.latency.get(route)
            if row is None:
                row = self.latency[route] = [0] * (len(LATENCY_BUCKETS) + 2)
            index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
            if index < len(LATENCY_BUCKETS):
                row[index] += 1                        # per bucket; cumulated by render()
            row[-2] += seconds
            row[-1] += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def add_gauge(self, name, delta):
        with self.lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self, store=None, in_flight=None):
        """The Prometheus text exposition format (version 0.0.4)."""
        out = []
        with self.lock:
            out.append("# HELP wasmstore_http_requests_total HTTP requests by route, method and status.")
            out.append("# TYPE wasmstore_http_requests_total counter")
            for (route, method, status), count in sorted(self.requests.items()):
                out.append(f'wasmstore_http_requests_total{{route="{_label(route)}",method="{method}",'
                           f'status="{status}"}} {count}')
            out.append("# HELP wasmstore_http_request_duration_seconds Time from request line to last byte sent.")
            out.append("# TYPE wasmstore_http_request_duration_seconds histogram")
            for route, row in sorted(self.latency.items()):
                lbl = _label(route)
                for bound, count in zip(LATENCY_BUCKETS, itertools.accumulate(row[:len(LATENCY_BUCKETS)])):
                    out.append(f'wasmstore_http_request_duration_seconds_bucket{{route="{lbl}",le="{bound}"}} {count}')
                out.append(f'wasmstore_http_request_duration_seconds_bucket{{route="{lbl}",le="+Inf"}} {row[-1]}')
                out.append(f'wasmstore_http_request_duration_seconds_sum{{route="{lbl}"}} {row[-2]:.6f}')
                out.append(f'wasmstore_http_request_duration_seconds_count{{route="{lbl}"}} {row[-1]}')
            out.append("# HELP wasmstore_http_request_body_bytes_total Request body bytes received.")
            out.append("# TYPE wasmstore_http_request_body_bytes_total counter")
            out.append(f"wasmstore_http_request_body_bytes_total {self.bytes_in}")
            out.append("# HELP wasmstore_http_response_body_bytes_total Response body bytes sent.")
            out.append("# TYPE wasmstore_http_response_body_bytes_total counter")
            out.append(f"wasmstore_http_response_body_bytes_total {self.bytes_out}")
            out.append("# HELP wasmstore_http_connections Open client connections.")
            out.append("# TYPE wasmstore_http_connections gauge")
            out.append(f"wasmstore_http_connections {self.connections}")
            out.append("# HELP wasmstore_websocket_clients Connected watch clients.")
            out.append("# TYPE wasmstore_websocket_clients gauge")
            out.append(f"wasmstore_websocket_clients {self.websocket_clients}")
        if in_flight is not None:
            out.append("# HELP wasmstore_http_requests_in_flight Requests being served (this one included).")
            out.append("# TYPE wasmstore_http_requests_in_flight gauge")
            out.append(f"wasmstore_http_requests_in_flight {in_flight}")
        if store is not None:
            try:
                out.extend(self._store_gauges(store))
            except wasmstore.StoreError:
                pass                                   # e.g. default branch deleted meanwhile
        return ("\n".join(out) + "\n").encode("utf-8")

    @staticmethod
    def _store_gauges(store):
        branch = store.default_branch
        lbl = _label(branch)
        return [
            "# HELP wasmstore_modules Modules (paths) in the default branch's current tree.",
            "# TYPE wasmstore_modules gauge",
            f'wasmstore_modules{{branch="{lbl}"}} {store.module_count(branch=branch)}',
            "# HELP wasmstore_commits Commits in the default branch's history.",
            "# TYPE wasmstore_commits gauge",
            f'wasmstore_commits{{branch="{lbl}"}} {store.commit_count(branch=branch)}',
        ]


# ---------------------------------------------------------------------------------------------
# Watch: one poller thread per watched branch, broadcasting into bounded per-client queues
# ---------------------------------------------------------------------------------------------

class Subscription:
    """A watch client's mailbox. The hub never blocks on it: a full queue drops the client."""

    def __init__(self, branch, size=WS_QUEUE_SIZE):
        self.branch = branch
        self.queue = queue.Queue(size)
        self.closed = None            # (code, reason) once the hub wants the client gone

    def offer(self, message):
        if self.closed:
            return
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            self.closed = (1008, "too slow: event queue overflowed")


class _BranchWatcher(threading.Thread):
    """Runs Store.watch for one branch and broadcasts each event as one JSON text.

    The watch iterator is created by WatchHub.subscribe, before the WebSocket handshake is
    answered, and Store.watch reads its start head at that call: a commit made right after
    the handshake is never missed. Store.watch re-reads the branch head from disk on each
    poll, so commits by other processes are seen.
    """

    def __init__(self, hub, branch, events, stop_event):
        super().__init__(name=f"wasmstore-watch-{branch}", daemon=True)
        self.hub = hub
        self.branch = branch
        self.events = events
        self.stop_event = stop_event
        self.subscribers = set()

    def run(self):
        try:
            for _commit, changes in self.events:
                self.hub.broadcast(self, json.dumps(changes, separators=(",", ":"), ensure_ascii=False))
        except wasmstore.NotFound:
            self.hub.end_branch(self, (1001, "branch deleted"))
        except Exception:                                  # a bug: say why, end the watches
            self.hub.log(f"watch {self.branch}: " + traceback.format_exc())
            self.hub.end_branch(self, (1011, "internal error"))


class WatchHub:
    """Fans out store changes to WebSocket sessions (one watcher thread per branch)."""

    def __init__(self, store, poll_interval=WATCH_POLL_SECONDS, log=None):
        self.store = store
        self.poll_interval = poll_interval
        self.lock = threading.Lock()
        self.watchers = {}
        self.log = log or (lambda text: None)

    def subscribe(self, branch=None):
        """Register a client on `branch` (None = default); NotFound if the branch does not exist."""
        branch = branch or self.store.default_branch
        with self.lock:
            watcher = self.watchers.get(branch)
            if watcher is None:
                stop_event = threading.Event()
                events = self.store.watch(branch=branch, poll_interval=self.poll_interval,
                                          stop_event=stop_event)    # NotFound: no such branch
                watcher = _BranchWatcher(self, branch, events, stop_event)
                self.watchers[branch] = watcher
                watcher.start()
            subscription = Subscription(branch)
            watcher.subscribers.add(subscription)
            return subscription

    def unsubscribe(self, subscription):
        with self.lock:
            watcher = self.watchers.get(subscription.branch)
            if watcher is None:
                return
            watcher.subscribers.discard(subscription)
            if not watcher.subscribers:
                watcher.stop_event.set()
                del self.watchers[subscription.branch]

    def broadcast(self, watcher, message):
        with self.lock:
            subscribers = list(watcher.subscribers)
        for subscription in subscribers:
            subscription.offer(message)

    def end_branch(self, watcher, reason):
        with self.lock:
            if self.watchers.get(watcher.branch) is watcher:
                del self.watchers[watcher.branch]
            subscribers = list(watcher.subscribers)
        for subscription in subscribers:
            subscription.closed = reason

    def close(self, reason=(1001, "server shutting down")):
        with self.lock:
            watchers = list(self.watchers.values())
            self.watchers.clear()
        for watcher in watchers:
            watcher.stop_event.set()
            for subscription in list(watcher.subscribers):
                subscription.closed = reason


# ---------------------------------------------------------------------------------------------
# WebSocket framing (RFC 6455): unmasked server frames, masked client frames
# ---------------------------------------------------------------------------------------------

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def websocket_accept(key):
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")


def encode_frame(opcode, payload=b"", mask=None):
    """One final frame; `mask` (4 bytes) only for client frames (tests)."""
    length = len(payload)
    head = bytearray([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 65536:
        head.append(mask_bit | 126)
        head += length.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += length.to_bytes(8, "big")
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


class WebSocketProtocolError(ServerError):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class FrameParser:
    """Incremental parser of client frames: feed bytes, take complete (opcode, payload) frames."""

    def __init__(self, max_payload=WS_MAX_CLIENT_PAYLOAD):
        self.buffer = bytearray()
        self.max_payload = max_payload

    def feed(self, data):
        self.buffer += data

    def frames(self):
        while True:
            frame = self._take()
            if frame is None:
                return
            yield frame

    def _take(self):
        buf = self.buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            raise WebSocketProtocolError(1002, "reserved bits set")
        if not second & 0x80:
            raise WebSocketProtocolError(1002, "client frames must be masked")
        length, offset = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, offset = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, offset = int.from_bytes(buf[2:10], "big"), 10
        if opcode >= 0x8 and (length > 125 or not fin):
            raise WebSocketProtocolError(1002, "bad control frame")
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise WebSocketProtocolError(1002, "unknown opcode")
        if length > self.max_payload:
            raise WebSocketProtocolError(1009, "frame too large")
        if len(buf) < offset + 4 + length:
            return None
        mask = bytes(buf[offset:offset + 4])
        data = bytes(buf[offset + 4:offset + 4 + length])
        del buf[:offset + 4 + length]
        if length:
            key = (mask * (length // 4 + 1))[:length]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
        return opcode, data


# ---------------------------------------------------------------------------------------------
# Connection handling
# ---------------------------------------------------------------------------------------------

class _DeadlineSocketReader(io.RawIOBase):
    """Raw socket input with a per-phase deadline.

    socket.makefile() cannot be used after a timeout, and its per-recv timeout lets a client
    trickle one byte at a time forever. This reader re-arms the timeout before each recv:
    min(per-read timeout, time left until the deadline of the current phase).

    On plain TCP the timeouts are the kernel's (SO_RCVTIMEO / SO_SNDTIMEO on a blocking
    socket): a Python-level socket timeout adds a poll() before every recv and send, and
    each extra syscall releases the GIL, which costs a thread switch per request under load.
    TLS sockets keep Python's timeouts (OpenSSL must see the socket as it expects).
    """

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.deadline = None
        self.min_rate = None
        self.kernel_timeouts = not isinstance(sock, ssl.SSLSocket)
        if self.kernel_timeouts:
            sock.settimeout(None)
            self.armed = None
        else:
            self.armed = sock.gettimeout()

    def readable(self):
        return True

    def set_deadline(self, seconds, min_rate=None):
        """A deadline `seconds` from now for the phase that starts (None: no deadline). With
        min_rate, every min_rate bytes received push it 1 s further (as Apache's mod_reqtimeout
        MinRate): a steady upload of any size finishes, a client trickling bytes does not."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.min_rate = min_rate

    def arm(self, wait):
        """Arming costs a syscall: skip it unless the timeout changes by > 0.1 s (so a
        deadline may fire up to 0.1 s early or late, which is fine for timeouts)."""
        armed = self.armed
        if armed is None or abs(wait - armed) > 0.1:
            if self.kernel_timeouts:
                wait = max(wait, 0.001)             # a zero timeval would mean "forever"
                timeval = struct.pack("ll", int(wait), int((wait % 1) * 1_000_000))
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            else:
                self.sock.settimeout(wait)
            self.armed = wait

    def readinto(self, buffer):
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("request deadline passed")
        self.arm(wait)
        try:
            count = self.sock.recv_into(buffer)
        except BlockingIOError:                     # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None
        if self.min_rate is not None and self.deadline is not None:
            self.deadline += count / self.min_rate
        return count


class Headers:
    """Request headers: case-insensitive get/get_all over the (name, value) pairs received.

    http.client.parse_headers runs the email package's parser, which costs more than the
    rest of a request; HTTP/1.1 header fields need far less (RFC 9112 section 5).
    """

    __slots__ = ("items_", "index")

    def __init__(self, pairs=()):
        self.items_ = []
        self.index = {}
        for name, value in pairs:
            self.add(name, value)

    def add(self, name, value):
        self.items_.append((name, value))
        self.index.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self.index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        values = self.index.get(name.lower())
        return list(values) if values else default

    def items(self):
        return list(self.items_)

    def __contains__(self, name):
        return name.lower() in self.index

    def __len__(self):
        return len(self.items_)


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def read_headers(rfile, max_bytes=MAX_HEADER_BYTES, max_count=MAX_HEADER_COUNT):
    """Read header lines up to the empty line: Headers, or HttpError 400 / 431."""
    headers = Headers()
    budget = max_bytes
    while True:
        line = rfile.readline(budget + 1)
        budget -= len(line)
        if budget < 0:
            raise HttpError(431, "request header fields too large", close=True)
        if not line.endswith(b"\n"):
            raise HttpError(400, "request headers ended early", close=True)
        if line in (b"\r\n", b"\n"):
            return headers
        if len(headers) >= max_count:
            raise HttpError(431, "too many request header fields", close=True)
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_RE.match(name):     # also refuses obs-fold and spaces
            raise HttpError(400, "malformed request header field", close=True)
        value = value.strip(b" \t\r\n")
        if b"\0" in value or b"\r" in value:
            raise HttpError(400, "malformed request header field", close=True)
        headers.add(name.decode("ascii"), value.decode("latin-1"))


class WasmstoreHandler(http.server.BaseHTTPRequestHandler):
    """One connection: parses requests, authorizes, routes, and writes replies."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"   # so that early errors still get a status line
    server_version = "wasmstore/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True        # else keep-alive responses stall ~40 ms (Nagle + delayed ACK)

    # -- connection lifecycle --------------------------------------------------------------

    def setup(self):
        server = self.server
        self.timeout = server.request_timeout
        self.request.settimeout(self.timeout)
        self._tls_socket = None
        if server.ssl_context is not None:
            # The TLS handshake runs here, in the connection's thread, never in the accept loop.
            tls = server.ssl_context.wrap_socket(self.request, server_side=True,
                                                 do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except BaseException:
                tls.close()
                raise
            self.request = self._tls_socket = tls
        super().setup()
        self.rfile.close()                # replaced: see _DeadlineSocketReader
        self._reader = _DeadlineSocketReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader, 65536)
        server.metrics.add_gauge("connections", 1)

    def finish(self):
        self.server.metrics.add_gauge("connections", -1)
        try:
            super().finish()
        except OSError:
            pass
        if self._tls_socket is not None:
            # socketserver closes the raw socket it accepted, which wrap_socket detached.
            self._tls_socket.close()

    def handle_one_request(self):
        self._reset_request_state()
        self._reader.set_deadline(self.timeout)    # idle wait + request head share one budget
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not line:
            self.close_connection = True
            return
        self._started = time.monotonic()
        self.server.request_started()
        try:
            self._handle_request_line(line)
        except TimeoutError:
            self._reply_if_possible(HttpError(408, "request timed out", close=True))
        except (OSError, ssl.SSLError):
            self.close_connection = True           # the client went away mid-request
        finally:
            self.server.request_finished()
            self._account()

    def _reset_request_state(self):
        self.command = None
        self.request_version = self.default_request_version
        self.requestline = ""
        self.path = ""
        self.headers = Headers()
        self._status = None
        self._bytes_out = 0
        self._bytes_in = 0
        self._route_label = "invalid"
        self._body_done = False
        self._reply_started = False
        self._expect_continue = False

    def _handle_request_line(self, line):
        if len(line) > MAX_REQUEST_LINE:
            self._reply_if_possible(HttpError(414, "request line too long"))
            return
        self.raw_requestline = line
        try:
            self.parse_request()
        except HttpError as exc:
            self._reply_if_possible(exc)
            return
        self._reader.set_deadline(self.timeout, MIN_BODY_RATE)     # the body, if any
        self._serve()
        self.wfile.flush()

    def parse_request(self):
        """Request line and headers (RFC 9112); raises HttpError. Replaces http.server's,
        whose email-based header parsing dominated the cost of a small request."""
        self.close_connection = True
        line = self.raw_requestline
        if not line.endswith(b"\n"):
            raise HttpError(400, "request line ended early")
        self.requestline = text = line.rstrip(b"\r\n").decode("latin-1")
        words = text.split(" ")
        if len(words) != 3 or not all(words):
            raise HttpError(400, "bad request line")
        method, target, version = words
        self.command, self.path = method, target
        if version == "HTTP/1.1":
            keep_alive = True
        elif version == "HTTP/1.0":
            keep_alive = False
        elif re.fullmatch(r"HTTP/[2-9](\.\d)?", version):
            raise HttpError(505, "HTTP version not supported")
        else:
            raise HttpError(400, "bad HTTP version")
        self.request_version = version
        self.headers = read_headers(self.rfile)
        tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",")}
        if "close" in tokens:
            keep_alive = False
        elif "keep-alive" in tokens:
            keep_alive = True
        self.close_connection = not keep_alive
        expect = self.headers.get("Expect")
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                raise HttpError(417, "unsupported Expect", close=True)
            if version == "HTTP/1.1":
                self.handle_expect_100()
        return True

    def handle_expect_100(self):
        self._expect_continue = True               # answered only once auth and size are checked
        return True

    # -- request processing ----------------------------------------------------------------

    def _serve(self):
        method = self.command
        reply = None
        try:
            reply = self._dispatch(method)
        except Exception as exc:                    # every error becomes one plain-text line
            reply = self._reply_for(exc)
        if reply is not None:
            self._send_reply(reply, head_only=(method == "HEAD"))

    def _reply_for(self, exc):
        if isinstance(exc, HttpError) and exc.close:
            self.close_connection = True
        if isinstance(exc, (TimeoutError, ConnectionError)):
            raise exc
        status = error_status(exc)
        if status is None:                          # a bug: the traceback goes to the log only
            self.server.log_text(f"error in {self.command} {self._safe_path()}:\n" + traceback.format_exc())
        elif status >= 500:                         # known failure (corrupt object): one line
            self.server.log_text(f"error in {self.command} {self._safe_path()}: {one_line(exc)}")
        return error_reply(exc)

    def _dispatch(self, method):
        server = self.server
        if not _METHOD_RE.match(method or "") or method not in KNOWN_METHODS:
            raise HttpError(501, "unsupported method", close=True)
        segments, query = parse_target(self.path)
        if method == "OPTIONS" and server.cors:
            self._route_label = "preflight"
            return self._preflight()
        if segments == ("metrics",):
            self._route_label = "/metrics"
            server.auth.check(presented_key(self.headers), method)
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "method not allowed", headers=[("Allow", "GET, HEAD")])
            self._consume_body(upload=False)
            reply = Reply(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                          server.metrics.render(server.store, server.in_flight))
            return reply
        try:
            route, params, rest = match_route(method, segments)
        except HttpError:
            self._route_label = "unmatched"
            server.auth.check(presented_key(self.headers), method)   # no route probing without a key
            raise
        self._route_label = route.label
        if server.auth.enabled:
            key = presented_key(self.headers)
            if key is None and route.websocket:
                key = query.get("auth")             # browsers cannot set headers on a WebSocket
            server.auth.check(key, method)
        call = Call(params, rest, branch=self._header("Wasmstore-Branch"),
                    author=self._header("Wasmstore-Author"), headers=self.headers,
                    max_body=server.max_body, locator=server.locate_cache)
        if route.websocket:
            call.branch = call.branch or query.get("branch") or None
            return self._serve_watch(call)
        body = self._consume_body(upload=route.upload)
        try:
            return route.handler(server.store, call, body)
        finally:
            if route.upload:
                self._bytes_in += body.consumed
                self._body_done = body.exhausted

    def _header(self, name):
        """A Wasmstore-* header as text: clients send UTF-8 bytes, which arrive latin-1-decoded."""
        value = self.headers.get(name)
        if value is None or value == "":
            return None
        try:
            return value.encode("latin-1").decode("utf-8").strip()
        except UnicodeError:
            return value.strip()

    def _consume_body(self, upload):
        """Return a bounded body reader for uploads; read and drop any body elsewhere."""
        transfer = self.headers.get("Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        reader = None
        if transfer is not None:
            if transfer.strip().lower() != "chunked":
                raise HttpError(501, "unsupported Transfer-Encoding", close=True)
            if lengths:
                raise HttpError(400, "both Content-Length and Transfer-Encoding", close=True)
            limit = self.server.max_body if upload else MAX_DISCARDED_BODY
            reader = ChunkedReader(self.rfile, limit)
        elif lengths:
            values = {v.strip() for v in lengths}
            value = values.pop()
            if values or not value.isdigit() or len(value) > 19:
                raise HttpError(400, "bad Content-Length", close=True)
            length = int(value)
            limit = self.server.max_body if upload else MAX_DISCARDED_BODY
            if length > limit:
                message = (f"request body of {length} bytes is over the limit of {limit} bytes"
                           if upload else "this route takes no request body")
                raise HttpError(413, message, close=True)
            reader = LimitedReader(self.rfile, length)
        elif upload:
            raise HttpError(411, "Content-Length required", close=True)
        if reader is not None and self._expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        if upload:
            return reader
        if reader is not None:
            self._bytes_in += drain(reader, MAX_DISCARDED_BODY)
        self._body_done = True
        return b""

    def _unread_body(self):
        """True if the request announced a body that was not read to its end."""
        if self._body_done:
            return False
        if self.headers.get("Transfer-Encoding") is not None:
            return True
        length = (self.headers.get("Content-Length") or "0").strip()
        return length != "0"

    def _preflight(self):
        self._consume_body(upload=False)
        requested = self.headers.get("Access-Control-Request-Headers") or ""
        headers = [
            ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
            ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
            ("Access-Control-Max-Age", "600"),
        ]
        if requested and not _CONTROL_RE.search(requested):
            # Allow what the browser asks for only if every name is a Wasmstore-* or standard one.
            allowed = {h.strip().lower() for h in CORS_ALLOW_HEADERS.split(",")}
            names = [n.strip() for n in requested.split(",") if n.strip()]
            if all(n.lower() in allowed or n.lower().startswith("wasmstore-") for n in names):
                headers[1] = ("Access-Control-Allow-Headers", ", ".join(names))
        return Reply(204, headers)

    # -- replies ---------------------------------------------------------------------------

    def _send_reply(self, reply, head_only=False):
        """Write status, headers (always Content-Length) and the body in as few sends as possible."""
        try:
            self._reader.arm(self.timeout)
            if self.server.draining or self._unread_body():
                self.close_connection = True      # unread body bytes would be parsed as a request
            self._status = reply.status
            self._reply_started = True
            lines = [f"HTTP/1.1 {reply.status} {_reason(reply.status)}",
                     f"Server: {self.server_version}", f"Date: {self.date_time_string()}"]
            has_length = False
            for name, value in reply.headers:
                has_length = has_length or name.lower() == "content-length"
                lines.append(f"{name}: {value}")
            if not has_length:
                lines.append(f"Content-Length: {reply.body_size}")
            if self.server.cors:
                lines.append("Access-Control-Allow-Origin: *")
                lines.append(f"Access-Control-Expose-Headers: {CORS_EXPOSE_HEADERS}")
            if self.close_connection:
                lines.append("Connection: close")
            elif self.request_version == "HTTP/1.0":
                lines.append("Connection: keep-alive")
            lines.append("\r\n")
            self._headers_buffer = ["\r\n".join(lines).encode("latin-1")]
            body = reply.body
            if head_only or reply.status in (204, 304):
                self.flush_headers()
                return
            if isinstance(body, FileBody):
                self._flush_headers_before_file()
                sent = self._send_file(body)
                self._bytes_out += sent
                if sent != body.size:
                    self.close_connection = True
            else:
                self._headers_buffer.append(body)
                self.flush_headers()
                self._bytes_out += len(body)
        finally:
            reply.close()

    def _flush_headers_before_file(self):
        """Send the head with MSG_MORE: the kernel holds it and sends it with the first bytes
        of the file (one wakeup of the client instead of two), like TCP_CORK."""
        data = b"".join(self._headers_buffer)
        self._headers_buffer = []
        if self._tls_socket is None and hasattr(socket, "MSG_MORE"):
            self.connection.sendall(data, socket.MSG_MORE)
        else:
            self.wfile.write(data)

    def _send_file(self, body):
        """Zero-copy os.sendfile on plain TCP; reads + sendall through TLS. Returns bytes sent."""
        sock = self.connection
        if isinstance(sock, ssl.SSLSocket):
            sent = 0
            while sent < body.size:
                chunk = os.pread(body.fd, min(256 * 1024, body.size - sent), sent)
                if not chunk:
                    break
                sock.sendall(chunk)
                sent += len(chunk)
            return sent
        # socket.sendfile() builds a selector per call; the socket is non-blocking (it has a
        # timeout), so loop on os.sendfile and wait for room only when the kernel says so.
        out, offset, size = sock.fileno(), 0, body.size
        while offset < size:
            try:
                count = os.sendfile(out, body.fd, offset, size - offset)
            except BlockingIOError:
                poller = select.poll()                 # not select(): fds may exceed 1023
                poller.register(out, select.POLLOUT)
                if not poller.poll(self.timeout * 1000):
                    raise TimeoutError("client stopped reading") from None
                continue
            if count == 0:
                break                              # file shrank: cannot happen for objects
            offset += count
        return offset

    def _reply_if_possible(self, error):
        self.close_connection = True
        if self._reply_started:
            return
        try:
            self._send_reply(error_reply(error), head_only=(self.command == "HEAD"))
        except OSError:
            pass

    _date_cache = (0, "")

    def date_time_string(self, timestamp=None):
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        cached = WasmstoreHandler._date_cache
        if cached[0] != now:                       # formatting costs more than the lookup
            cached = WasmstoreHandler._date_cache = (now, super().date_time_string(now))
        return cached[1]

    def log_request(self, code="-", size="-"):
        pass                                       # one access-log line per request: _account()

    def log_message(self, format, *args):
        self.server.log_text(format % args)

    def _safe_path(self):
        """The request path for logs: no query (it may hold a key), control chars escaped."""
        path = (self.path or "").split("?", 1)[0][:2048]
        return path.encode("unicode_escape").decode("ascii").replace('"', '\\"')

    def _account(self):
        elapsed = time.monotonic() - self._started
        status = self._status or 0
        method = self.command or "-"
        self.server.metrics.observe(self._route_label, method, status, elapsed,
                                    self._bytes_in, self._bytes_out)
        if not self.server.quiet:
            method_text = method if _METHOD_RE.match(method) else "-"
            self.server.log_text(f'{self.client_address[0]} "{method_text} {self._safe_path()}" '
                                 f"{status} {self._bytes_out} {elapsed * 1000:.1f}ms")

    # -- WebSocket watch -------------------------------------------------------------------

    def _serve_watch(self, call):
        headers = self.headers
        if "websocket" not in (headers.get("Upgrade") or "").lower() or \
                "upgrade" not in (headers.get("Connection") or "").lower():
            raise HttpError(426, "this route needs a WebSocket upgrade",
                            headers=[("Upgrade", "websocket")])
        if (headers.get("Sec-WebSocket-Version") or "").strip() != "13":
            raise HttpError(426, "unsupported WebSocket version",
                            headers=[("Sec-WebSocket-Version", "13")])
        key = (headers.get("Sec-WebSocket-Key") or "").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError(key)
        except ValueError:
            raise HttpError(400, "bad Sec-WebSocket-Key") from None
        self._consume_body(upload=False)
        subscription = self.server.hub.subscribe(call.branch)      # 404 before the upgrade
        try:
            self._status = 101
            self._reply_started = True
            self._reader.arm(self.timeout)
            self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n").encode("ascii"))
            self.close_connection = True
            self.server.metrics.add_gauge("websocket_clients", 1)
            try:
                self._websocket_session(subscription)
            finally:
                self.server.metrics.add_gauge("websocket_clients", -1)
        finally:
            self.server.hub.unsubscribe(subscription)
        return None

    def _ws_send(self, opcode, payload=b""):
        self._reader.arm(self.timeout)             # a stalled reader is dropped after the timeout
        data = encode_frame(opcode, payload)
        self.connection.sendall(data)
        self._bytes_out += len(data)

    def _ws_close(self, code, reason=""):
        try:
            self._ws_send(OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:120])
        except OSError:
            pass

    def _websocket_session(self, subscription):
        """Single-threaded (TLS objects must not be used from two threads): alternately
        flush queued events and poll the socket briefly for client frames."""
        parser = FrameParser()
        reader = self._reader
        reader.set_deadline(None)                   # a session lasts as long as the client answers pings
        last_heard = last_ping = time.monotonic()
        buffer = bytearray(16384)
        try:
            while True:
                if subscription.closed:
                    self._ws_close(*subscription.closed)
                    return
                if self.server.draining:
                    self._ws_close(1001, "server shutting down")
                    return
                while True:
                    try:
                        message = subscription.queue.get_nowait()
                    except queue.Empty:
                        break
                    self._ws_send(OP_TEXT, message.encode("utf-8"))
                now = time.monotonic()
                if now - last_heard > 2 * WS_PING_SECONDS + self.timeout:
                    return                              # no pong, no frame: the client is gone
                if now - last_ping > WS_PING_SECONDS:
                    self._ws_send(OP_PING, b"wasmstore")
                    last_ping = now
                reader.timeout = WS_POLL_SECONDS
                try:
                    count = self.rfile.readinto1(buffer)
                except TimeoutError:
                    continue
                finally:
                    reader.timeout = self.timeout
                if not count:
                    return                              # EOF: the client is gone
                last_heard = time.monotonic()
                self._bytes_in += count
                parser.feed(memoryview(buffer)[:count])
                for opcode, payload in parser.frames():
                    if opcode == OP_PING:
                        self._ws_send(OP_PONG, payload)
                    elif opcode == OP_CLOSE:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                        if code < 1000 or code >= 5000 or code in (1004, 1005, 1006, 1015):
                            code = 1002
                        self._ws_close(code)
                        return
                    # text/binary/pong frames from clients carry nothing this protocol uses
        except WebSocketProtocolError as exc:
            self._ws_close(exc.code, str(exc))
        except (OSError, ssl.SSLError):
            pass                                        # dead or too slow: drop it


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

class WasmstoreServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer serving one Store, with graceful shutdown and a connection cap."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, store, host=DEFAULT_HOST, port=DEFAULT_PORT, *, auth=None, tls=None,
                 cors=False, max_body=DEFAULT_MAX_BODY, quiet=False, timeout=DEFAULT_TIMEOUT,
                 max_connections=DEFAULT_MAX_CONNECTIONS, log=None):
        if isinstance(store, (str, os.PathLike)):
            store = wasmstore.Store(store)
        if int(max_body) < 0:
            raise ServerError(f"max_body must be >= 0, got {max_body!r}")
        if not float(timeout) > 0:
            raise ServerError(f"timeout must be > 0, got {timeout!r}")
        self.store = store
        self.auth = auth if isinstance(auth, AuthTable) else AuthTable(auth)
        self.ssl_context = self._ssl_context(tls)
        self.cors = bool(cors)
        self.max_body = int(max_body)
        self.quiet = bool(quiet)
        self.request_timeout = float(timeout)
        self.metrics = Metrics()
        self._log = log or sys.stderr
        self._log_lock = threading.Lock()
        self.hub = WatchHub(store, log=self.log_text)
        self.locate_cache = LocateCache(store)
        self.draining = False
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(int(max_connections))
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), WasmstoreHandler)

    @staticmethod
    def _ssl_context(tls):
        if not tls:
            return None
        if isinstance(tls, ssl.SSLContext):
            return tls
        keyfile, certfile = tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        return context

    @property
    def port(self):
        return self.server_address[1]

    @property
    def url(self):
        host = self.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup): not needed here.
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def log_text(self, text):
        with self._log_lock:
            try:
                self._log.write(text.rstrip("\n") + "\n")
                self._log.flush()
            except (OSError, ValueError):
                pass

    # -- connection cap ---------------------------------------------------------------------

    def process_request(self, request, client_address):
        if self.draining or not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request):
        try:
            if self.ssl_context is None:
                request.settimeout(0.5)
                body = b"server busy, retry later\n"
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            return                     # failed TLS handshakes, resets: the client's problem
        self.log_text("unexpected error on a connection:\n" + traceback.format_exc())

    # -- graceful shutdown ------------------------------------------------------------------

    @property
    def in_flight(self):
        return self._inflight

    def request_started(self):
        with self._inflight_cond:
            self._inflight += 1

    def request_finished(self):
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

    def serve_forever(self, poll_interval=0.5):
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def graceful_shutdown(self, grace=30.0):
        """Stop accepting, let in-flight requests finish (up to `grace` s), close watchers.

        Must not be called from the thread running serve_forever().
        """
        self.draining = True
        if getattr(self, "_serving", False):
            self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace
        self.hub.close()
        with self._inflight_cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_cond.wait(left)
        self.locate_cache.close()
        return True


def make_server(store, host=DEFAULT_HOST, port=DEFAULT_PORT, **options):
    """A WasmstoreServer bound to (host, port); run it with serve_forever().

    options: auth (spec string or AuthTable), tls ((keyfile, certfile) or SSLContext), cors,
    max_body (bytes), quiet, timeout (seconds), max_connections, log (a text stream).
    """
    return WasmstoreServer(store, host, port, **options)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _byte_size(text):
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]i?b?|b)?\s*", text, re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 134217728 or 128M, got {text!r}")
    scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(match.group(2) or "")[:1].lower()]
    return int(match.group(1)) * scale


def _port(text):
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def _tls_pair(text):
    keyfile, sep, certfile = text.partition(",")
    if not sep or not keyfile.strip() or not certfile.strip():
        raise argparse.ArgumentTypeError("expected KEY_FILE,CERT_FILE")
    return keyfile.strip(), certfile.strip()


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def build_parser():
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="http_server.py",
        description="Serve a wasmstore over HTTP (REST API, WebSocket watch, /metrics).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""environment: WASMSTORE_ROOT, WASMSTORE_HOST, WASMSTORE_PORT, WASMSTORE_AUTH, WASMSTORE_TLS
  (used when the matching option is absent)

examples:
  python http_server.py                                   # ~/.wasmstore on http://127.0.0.1:6384
  python http_server.py --auth 'SECRET:*;READER:GET'      # keys in the Wasmstore-Auth header
  python http_server.py --tls key.pem,cert.pem --cors     # HTTPS, browser access
  curl --data-binary @a.wasm http://127.0.0.1:6384/api/v1/module/a.wasm""")
    parser.add_argument("--root", default=env.get("WASMSTORE_ROOT") or os.path.join("~", ".wasmstore"),
                        help="store directory (default: $WASMSTORE_ROOT or ~/.wasmstore)")
    parser.add_argument("--host", default=env.get("WASMSTORE_HOST") or DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"TCP port, 0 = any free port (default: {DEFAULT_PORT})")
    parser.add_argument("--auth", default=env.get("WASMSTORE_AUTH") or None, metavar="SPEC",
                        help="require keys: 'KEY1:GET,POST;KEY2:GET' ('*' = every method)")
    parser.add_argument("--tls", type=_tls_pair, default=None, metavar="KEY,CERT",
                        help="serve HTTPS with this PEM key file and certificate file")
    parser.add_argument("--cors", action="store_true",
                        help="send Access-Control-Allow-Origin: * and answer preflight requests")
    parser.add_argument("--max-body", type=_byte_size, default=DEFAULT_MAX_BODY, metavar="N",
                        help="largest accepted upload in bytes, suffix K/M/G allowed (default: 128M)")
    parser.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"close idle or stalled connections after S seconds (default: {DEFAULT_TIMEOUT:g}); "
                             f"a request body gets S seconds plus 1 per {MIN_BODY_RATE // 1024} KiB received")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _options_from(parser, args):
    """Fill options not given on the command line from the environment (validated alike)."""
    env = os.environ
    if args.port is None:
        try:
            args.port = _port(env["WASMSTORE_PORT"]) if env.get("WASMSTORE_PORT") else DEFAULT_PORT
        except argparse.ArgumentTypeError as exc:
            parser.error(f"WASMSTORE_PORT: {exc}")
    if args.tls is None and env.get("WASMSTORE_TLS"):
        try:
            args.tls = _tls_pair(env["WASMSTORE_TLS"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"WASMSTORE_TLS: {exc}")
    return args


def main(argv=None):
    """Run the server until SIGTERM or Ctrl-C; then finish in-flight requests and return 0."""
    parser = build_parser()
    args = _options_from(parser, parser.parse_args(argv))
    try:
        auth = AuthTable(args.auth)
    except ServerError as exc:
        parser.error(f"--auth: {exc}")              # the message never contains a key
    root = os.path.expanduser(args.root)
    try:
        store = wasmstore.Store(root)
        server = make_server(store, args.host, args.port, auth=auth, tls=args.tls, cors=args.cors,
                             max_body=args.max_body, quiet=args.quiet, timeout=args.timeout)
    except (wasmstore.StoreError, ServerError, OSError, ssl.SSLError) as exc:
        print(f"http_server.py: error: {one_line(exc)}", file=sys.stderr)
        return 1
    stop = threading.Event()
    _install_signal_handlers(stop)
    thread = threading.Thread(target=server.serve_forever, name="wasmstore-accept", daemon=True)
    thread.start()
    print(f"wasmstore: serving {store.root} on {server.url}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finished = server.graceful_shutdown()
    if not finished:
        print("http_server.py: shutdown grace period over; some requests were cut", file=sys.stderr)
    return 0


def _install_signal_handlers(stop):
    if threading.current_thread() is not threading.main_thread():
        return                                      # embedded use: the caller owns signals
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())


if __name__ == "__main__":
    sys.exit(main())
