# SPDX-License-Identifier: Apache-2.0
"""The wasmstore REST API: an HTTP/1.1 server over a `wasmstore.Store`.

Standard library only (plus `wasmstore.py`): `http.server.ThreadingHTTPServer` with keep-alive,
Content-Length on every API response, zero-copy downloads (`os.sendfile` of the object file; plain
reads through TLS), uploads streamed into the store, keys with permissions and path scopes, TLS,
CORS, a WebSocket watch (RFC 6455), Prometheus metrics, bounded request heads and bodies, strict
body framing, connection timeouts, a connection cap with a separate cap for watch sessions, Host
and Origin checks against DNS rebinding and cross-site requests, graceful shutdown on SIGTERM /
Ctrl-C, running stored modules (call, run, exports) on kvhost, stored wasi:http components
answering HTTP requests (mounted with --app, reached by store path under /api/v1/app, or the
one app of a port with --serve: what `wasmstore.py serve` runs), and the read side of the OCI
distribution API under /v2/ (each store path a repository: `oras pull` fetches from it), and
the API of Wess, a WebAssembly function-execution service, under /wess (its clients work with
only the base URL changed).

As a command::

    python http_server.py [--root DIR] [--host H] [--port P] [--workers N] [--auth SPEC]
                          [--tls KEY,CERT] [--cors [ORIGINS]] [--allowed-host NAME]
                          [--max-body N] [--timeout S] [--max-watches N] [--quiet] [--kv URL]
                          [--run-timeout S] [--fuel N] [--max-memory N] [--max-guests N]
                          [--run-queue N] [--namespace-map P=NS] [--app PREFIX=PATH]
                          [--serve PATH [--serve-ref REF]] [--metrics-port P]

Processes: `--workers N` (default: two per CPU) serves from N worker processes. The command's
process is their Supervisor: it binds and listens, makes what they share (WorkerShared), forks
them and then only waits. Each worker is a whole WasmstoreServer (its own Store, caches, watch
threads, kvhost Host and connection threads) around the inherited listening socket; the kernel
gives each new connection to one of them, and a connection stays with its worker. Bounds hold
for the whole server, not per worker: the run slots and the run queue (--max-guests,
--run-queue), the connection cap and the watch cap are POSIX semaphores shared by all, and a
module compiles at most once at a time (CompileLocks: a byte-range lock per module hash). Each
worker records its metrics in a shared memory region, and /metrics, from whichever worker
answers, sums them all (with per-worker series). A worker that exits unexpectedly is replaced;
SIGTERM or Ctrl-C drains every worker (as one process drains) and the command exits 0; a worker
whose supervisor is killed drains and exits too. Watch sessions see every commit whichever
worker (or process) made it, and the compile cache on disk is shared. Worker 0 also runs the
background compiler (Precompiler). `--workers 1`, and make_server() in a library, serve from
the calling process alone, with the same classes over process-local counts.

As a library::

    import wasmstore, http_server
    server = http_server.make_server(wasmstore.Store("/srv/store"), "127.0.0.1", 0, auth="k:GET")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ...
    server.graceful_shutdown()

Map of this file (top-down):
    constants, exceptions (ServerError root)
    URL parsing        parse_target(), absolute_form(), decode_segment()
    replies            Reply, FileBody, error_reply(), error_headers(), the one ERROR_STATUS table
    route handlers     pure functions (store, call, body) -> Reply, LocateCache; history: log
                       and audit by pages, diff
    running modules    SlotPool (a semaphore and its per-worker counts), RunGate (guests at
                       once + a bounded queue -> 503; a first call compiles in its slot),
                       CompileLocks, GuestRuntime (a wasmstore.Runner, per-module metrics),
                       Precompiler (compiles what is added, in the background), the
                       call/run/exports handlers, a module's kv data (buckets, keys, values)
    HTTP apps          AppSelector, parse_app_ref (which version a request runs), AppMount,
                       AppTable (--app mounts, the app routes, --serve's one app), the target
                       as the guest sees it, AppRequestBody (the body streamed into the
                       guest), AppResponse (the sink kvhost.Host.handle_http writes to: framing,
                       lengths enforced, chunked), app_error_reply (status, Wasmstore-Error)
    Wess /wess         Wess's API (wess_create, wess_read, wess_replace, wess_delete,
                       wess_call, wess_count): each module the store path /wess/<id>, its
                       metadata in an appended custom section (wess_module, wess_split),
                       errors as {"message"} (wess_error_reply)
    OCI /v2/           the distribution API's read side: OciRepository (a store path's tags,
                       manifests, blobs), oci_v2 (its one route), oci_error_reply (JSON codes),
                       byte_range/ranged (Range: 206 on blob and manifest GETs)
    routing            Route, the ROUTES table (each route's permission and scope), match_route()
    auth               Access (what a key reaches), AuthTable (KEY:PERMS[@PREFIX] entries,
                       constant-time key comparison; the routes declare their permission)
    browser safety     parse_authority(), parse_origin(), HostAllowList (DNS rebinding),
                       OriginAllowList (the --cors option; cross-site requests and watches)
    body readers       body_framing() (400 for ambiguous framing), LimitedReader, ChunkedReader
                       (bounded, never read past the request)
    metrics            MetricValues (one process's numbers by key), Metrics (records requests
                       and runs; renders the Prometheus text format)
    watch              WatchHub (one Store.watch thread per branch -> bounded per-client queues)
    WebSocket framing  encode_frame(), FrameParser
    web page           PAGE_HTML (inline HTML, CSS and JavaScript reading the API routes) and
                       PAGE_CSP, wants_page() (a browser's GET /), page_reply()
    connection         request head parsing (Headers, read_headers), WasmstoreHandler
                       (one thread per connection)
    server             ConnectionLimits (connections and watch sessions, two pools),
                       WasmstoreServer, MetricsServer (--metrics-port), make_runtime(),
                       make_server()
    worker processes   SharedMetricValues (a worker's numbers in shared memory), WorkerShared
                       (made before forking), WorkerContext (one worker's view), listen(),
                       Supervisor (forks, replaces, drains), _serve_worker (a worker's life)
    command line       build_parser(), main()
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
    "ErrorMeaning",
    "error_meaning",
    "error_status",
    "AuthTable",
    "Access",
    "EVERYTHING",
    "PERMISSIONS",
    "HostAllowList",
    "OriginAllowList",
    "ConnectionLimits",
    "Metrics",
    "WatchHub",
    "LocateCache",
    "Headers",
    "WasmstoreHandler",
    "WasmstoreServer",
    "make_server",
    "parse_target",
    "parse_authority",
    "parse_origin",
    "body_framing",
    "Query",
    "RunGate",
    "SlotPool",
    "CompileLocks",
    "GuestRuntime",
    "Precompiler",
    "MetricValues",
    "SharedMetricValues",
    "WorkerShared",
    "WorkerContext",
    "Supervisor",
    "listen",
    "error_reply",
    "error_headers",
    "OciError",
    "OciRepository",
    "oci_error_reply",
    "main",
]

import argparse
import base64
import bisect
import collections
import contextlib
import fcntl
import hashlib
import hmac
import http
import http.server
import io
import ipaddress
import itertools
import json
import mmap
import multiprocessing
import os
import queue
import re
import select
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid

import wasmstore

try:
    import kvhost              # the runtime behind the call/run/exports routes (501 without it)
except ModuleNotFoundError as _missing:
    # Only "kvhost.py or wasmtime is not installed" means serving without running modules: an
    # import that fails inside them is a bug, and must say so rather than become a 501.
    if _missing.name != "kvhost" and (_missing.name or "").partition(".")[0] != "wasmtime":
        raise
    kvhost = None
    KVHOST_MISSING = f"{_missing.name} is missing"
else:
    KVHOST_MISSING = None

# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6384
DEFAULT_APP_PORT = 8080                    # the port of a one-app server, as `wasmtime serve`'s
DEFAULT_MAX_BODY = 128 * 1024 * 1024       # largest accepted module upload (413 above)
DEFAULT_TIMEOUT = 30.0                     # seconds an idle or stalled connection may hold a thread
DEFAULT_MAX_CONNECTIONS = 512              # beyond this, new connections get 503 (bounds threads)
DEFAULT_MAX_WATCHES = 128                  # watch sessions, a pool apart: idle watchers never
                                           # starve requests
MAX_REQUEST_LINE = 8 * 1024                # longer request line: 414
MAX_HEADER_BYTES = 32 * 1024               # larger header block: 431
MAX_HEADER_COUNT = 100                     # more header lines: 431
MAX_DISCARDED_BODY = 64 * 1024             # routes without a body accept (and drop) at most this
MIN_BODY_RATE = 1024                       # bytes/s: each KiB of a body adds 1 s to its time limit
MAX_ERROR_MESSAGE = 500                    # error bodies are one short line
API_PREFIX = ("api", "v1")
KNOWN_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
SAFE_METHODS = frozenset(["GET", "HEAD", "OPTIONS"])   # change nothing: no Origin check (but
                                                        # upgrades)
DEFAULT_PORTS = {"http": 80, "https": 443}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
WS_MAX_CLIENT_PAYLOAD = 64 * 1024          # the watch protocol needs nothing large from clients
WS_QUEUE_SIZE = 256                        # events buffered per client before it is dropped as slow
WS_POLL_SECONDS = 0.05                     # how often a session checks its queue and its socket
WS_PING_SECONDS = 20.0                     # keep-alive ping period on an otherwise silent watch
WATCH_POLL_SECONDS = 0.05                  # how often a branch watcher checks the branch head
# Server processes (--workers): two per CPU. A process runs one Python thread at a time, and its
# threads handing that lock to each other cost more than the system switching processes: on 2
# cores, a warm call under 16 connections ran 5,800 req/s with 2 workers and 9,800 with 4.
WORKERS_PER_CPU = 2
DEFAULT_WORKERS = WORKERS_PER_CPU * (os.cpu_count() or 1)
# Guests running at once in the whole server (--max-guests): one per default worker process.
# Most of a short guest's slot is host functions in Python, which its process runs one thread
# at a time, and a slot waits while its holder waits for that lock or a core: with one slot per
# CPU, requests queued behind idle slots (hello.wat under 8 connections on 2 cores: 5,200
# req/s with 2 slots, 6,100 with 4). A compute-bound guest then shares a core with another.
DEFAULT_MAX_GUESTS = max(2, DEFAULT_WORKERS)
DEFAULT_RUN_QUEUE = 64                     # callers waiting for a guest slot; beyond: 503
# Stores the guest engine's pooling allocator keeps room for, per guest slot: a running guest's
# and the watchers its writes start (kvhost.Host pooled_stores: a quarter of an instance's CPU)
POOLED_STORES_PER_GUEST = 2
DEFAULT_QUEUE_WAIT = 10.0                  # seconds a caller waits for a slot before 503
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024      # stdout (and stderr) kept per run
PRECOMPILE_POLL_SECONDS = 0.2              # how often the background compiler looks for adds
CACHE_STATS_SECONDS = 1.0                  # how often runs publish compile-cache memory hits
MAX_PRECOMPILE_SEEN = 100_000              # module hashes it remembers having queued
MAX_VERSION_INDEX = 999_999_999           # ?version=N, /version/N/: more than any path has
MAX_CONTENT_LENGTH = (1 << 63) - 1         # what a signed 64-bit length holds
DEFAULT_PAGE = 100                         # commits (or kv keys) per page of log, audit, kv-keys
MAX_PAGE = 1000                            # the largest page a client may ask for
HIDDEN_MESSAGE = "(not shown: this commit also changed paths out of this key's reach)"
MAX_STDERR_HEADER = 4096                   # stderr bytes sent in the Wasmstore-Stderr header
MAX_RUN_SERIES = 1000                      # (module, function) metric series; more go to "other"
CHUNK = 1 << 16
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
WASM_TYPE = "application/wasm"             # exactly: WebAssembly.instantiateStreaming checks it
CORS_ALLOW_HEADERS = ("Wasmstore-Auth, Wasmstore-Branch, Wasmstore-Author, Authorization, "
                      "Content-Type, If-None-Match")
CORS_EXPOSE_HEADERS = ("Wasmstore-Hash, ETag, Wasmstore-Exit-Status, Wasmstore-Stderr, "
                       "Wasmstore-Stderr-Truncated, Wasmstore-Stdout, Wasmstore-Stdout-Truncated, "
                       "Wasmstore-Error")

_SEGMENT_RE = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*\Z", re.S)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_METHOD_RE = re.compile(r"[A-Z]{1,16}\Z")
_AUTH_ENTRY_RE = re.compile(r"(?P<key>.+?):(?P<perms>[A-Za-z*, ]+)(?:@(?P<prefix>/.*))?\Z", re.S)

# The words an --auth entry may grant besides HTTP methods. Every route declares the one it
# needs (Route(..., permission=WORD)); an app route, or any route added later, declares "run"
# or whichever fits, and AuthTable.authorize is the one check.
PERMISSIONS = ("read", "write", "run", "admin")
ROUTE_SCOPES = ("path", "store", "filtered")     # what a route touches: see Route
_HOST_NAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")


# ---------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------

class ServerError(Exception):
    """Root of every error raised by this module (bad configuration, bad request)."""


class HttpError(ServerError):
    """A request-level error answered with `status` and a one-line message."""

    def __init__(self, status, message, *, close=False, headers=()):
        super().__init__(message)
        self.status = int(status)
        self.close = close            # the connection cannot be reused (unread or bad body)
        self.headers = list(headers)


class AppResponseError(ServerError):
    """A guest's response that cannot be sent as it is: a bad status or field, a body longer or
    shorter than its Content-Length, a second response, none. `kind` labels it for
    Wasmstore-Error and the metrics."""

    def __init__(self, message, kind="bad-response"):
        super().__init__(message)
        self.kind = kind



# ---------------------------------------------------------------------------
# URL parsing
# ---------------------------------------------------------------------------

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


class Query(dict):
    """name -> [values] of a query string; get() gives the last value, get_all() every one."""

    def get(self, name, default=None):
        """The last value of `name` (a query names a parameter once, as a rule)."""
        values = dict.get(self, name)
        return values[-1] if values else default

    def get_all(self, name):
        """Every value of `name`, in order."""
        return list(dict.get(self, name, ()))


def absolute_form(target):
    """urllib.parse.SplitResult of an absolute-form request target (RFC 9112 3.2.2,
    "http://host/path"), or None for any other form; HttpError 400 when it does not parse
    (urlsplit refuses "http://[::1/x" and a port out of range or not a number)."""
    if not target.startswith(("http://", "https://")):
        return None
    try:
        parts = urllib.parse.urlsplit(target)
        parts.port
    except ValueError as exc:
        raise HttpError(400, f"bad request target {target[:80]!r}: {exc}", close=True) from None
    return parts


def parse_target(target):
    """Split a request target into (decoded path segments, query dict); empty segments dropped."""
    absolute = absolute_form(target)
    if absolute is not None:
        target = absolute.path or "/"
        target = target.split("?", 1)[0]
    if not target.startswith("/"):
        raise HttpError(400, "request target must start with '/'")
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    if _CONTROL_RE.search(path) or " " in path:
        raise HttpError(400, "URL path contains a control character")
    segments = tuple([decode_segment(s) for s in path.split("/") if s])
    if not query:
        return segments, Query()
    try:
        params = urllib.parse.parse_qs(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "bad query string") from None
    return segments, Query(params)


# ---------------------------------------------------------------------------
# replies and the one exception -> status table
# ---------------------------------------------------------------------------

class FileBody:
    """A response body served from an open file (sent with os.sendfile).

    It holds the file's wasmstore.SharedFd: the descriptor is closed once the body is closed
    and nothing else (LocateCache, other replies of the same file) holds it."""

    __slots__ = ("file", "fd", "size", "start")

    def __init__(self, file, size, start=0):
        self.file = file              # the SharedFd
        self.fd = file.fd             # a raw fd: io.open's buffered object costs ~40 us here
        self.size = size              # bytes sent, from offset `start` of the file (a Range)
        self.start = start

    def read(self):
        """The whole body (for tests and non-socket callers)."""
        return os.pread(self.fd, self.size, self.start)

    def close(self):
        """Let the descriptor go (idempotent)."""
        self.file, self.fd = None, -1


def open_body(filename):
    """A FileBody for an object file; NotFound if gc removed it."""
    try:
        file = wasmstore.SharedFd(os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    except FileNotFoundError:
        raise wasmstore.NotFound("the module was removed meanwhile") from None
    return FileBody(file, os.fstat(file.fd).st_size)


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
        """The body's length in bytes (what Content-Length says)."""
        return self.body.size if isinstance(self.body, FileBody) else len(self.body)

    def close(self):
        """Release the body's file descriptor, if it has one."""
        if isinstance(self.body, FileBody):
            self.body.close()


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


def _reason(status):
    return _REASONS.get(status, "Unknown")


def text_reply(text, status=200):
    """A plain-text (UTF-8) Reply."""
    return Reply(status, [("Content-Type", TEXT_TYPE)], text.encode("utf-8"))


def json_reply(value, status=200):
    """A compact JSON Reply (UTF-8, non-ASCII kept)."""
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Reply(status, [("Content-Type", JSON_TYPE)], data)


ErrorMeaning = wasmstore.ErrorMeaning

# The one table of what each expected exception means: the HTTP status of its reply, the exit
# status of main() when it ends the start-up, and the label of metrics and access logs (the
# `outcome` of a run). The store's rows are wasmstore.py's (shared with its command line).
# error_meaning() walks the exception's MRO, so a subclass (InvalidModule, MergeConflict)
# finds its own row or its nearest parent's. None in a row: the exception carries it (an
# HttpError its status, a TrapError its kind). Anything not in the table is a bug: 500.
ERROR_STATUS = {
    HttpError: ErrorMeaning(None, 1, None),
    AppResponseError: ErrorMeaning(502, 1, None),       # Wasmstore-Error: its kind
    **wasmstore.ERROR_STATUS,
}


if kvhost is not None:
    # kvhost's rows (its exit status and label) with the HTTP status of each
    ERROR_STATUS.update({cls: ErrorMeaning(http_status, *kvhost.ERROR_STATUS[cls])
                         for cls, http_status in (
        (kvhost.NoSuchFunction, 404),       # the message lists them
        (kvhost.ArgumentError, 400),        # the message names which
        (kvhost.LinkError, 424),            # it names the import
        (kvhost.GuestError, 422),           # stored, but cannot run
        (kvhost.TrapError, 422),            # Wasmstore-Error: its kind
        (kvhost.KvError, 422))})
    # --serve of a component that is no HTTP app: a start-up error
    ERROR_STATUS[kvhost.NotHttpHandler] = ErrorMeaning(422, 1, "not-http-handler")

# An app request (the HTTP-app routes) answers from the same rows, as a gateway does: an error
# of the guest's (kvhost's errors, a response the server cannot send) is 502, or 504 for a
# timeout, with the row's label as Wasmstore-Error; any other keeps its status, labelled
# "busy" (503), "not-found", "request" (another 4xx) or "store" (5xx). See app_error_status.
_GUEST_FAILURES = (AppResponseError,) + (() if kvhost is None else (kvhost.KvError,))


def _http_label(status):
    if status == 503:
        return "busy"
    return "arguments" if 400 <= status < 500 else "error"


def error_meaning(exc):
    """The ErrorMeaning of an exception, with what the exception carries filled in; None for
    an unexpected exception (a bug)."""
    for cls in type(exc).__mro__:
        meaning = ERROR_STATUS.get(cls)
        if meaning is None:
            continue
        if isinstance(exc, HttpError):
            return meaning._replace(http_status=exc.status, label=_http_label(exc.status))
        if meaning.label is None:
            return meaning._replace(label=exc.kind)
        return meaning
    return None


def error_status(exc):
    """The HTTP status for an exception (None: not an expected error, i.e. a bug)."""
    meaning = error_meaning(exc)
    return None if meaning is None else meaning.http_status


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
    reply.headers.extend(error_headers(exc))
    return reply


def error_headers(exc):
    """The headers an error reply carries beside its body: an HttpError's own (Allow,
    Retry-After, ...), or a stopped guest's kind as Wasmstore-Error (timeout, fuel, ...)."""
    if isinstance(exc, HttpError):
        return list(exc.headers)
    if kvhost is not None and isinstance(exc, kvhost.TrapError):
        return [("Wasmstore-Error", exc.kind)]
    return []


# ---------------------------------------------------------------------------
# route handlers: pure functions (store, call, body) -> Reply, testable without a socket
# ---------------------------------------------------------------------------

class Call:
    """The parts of a request a handler needs."""

    __slots__ = ("params", "path", "branch", "author", "headers", "max_body", "locator", "query",
                 "runtime", "log", "access")

    def __init__(self, params=(), path="", branch=None, author=None, headers=None,
                 max_body=DEFAULT_MAX_BODY, locator=None, query=None, runtime=None, access=None):
        self.params = tuple(params)   # the route's named segments (hash, index, branch...)
        self.path = path              # the "*" rest joined with "/" ("" when absent)
        self.branch = branch          # Wasmstore-Branch or None (default branch)
        self.author = author          # Wasmstore-Author or None
        self.headers = headers or {}
        self.max_body = max_body
        self.locator = locator        # a LocateCache, or None: store.locate
        self.query = query or Query()  # the query string
        self.runtime = runtime        # a GuestRuntime, or None: the run routes answer 501
        self.log = {}                 # name -> value pairs the access-log line ends with
        self.access = access or EVERYTHING   # what the request's key reaches (see Access)


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


class LocateCache:
    """Serves module downloads without re-resolving the path or reopening the file.

    Paths: Store.locate's answers are kept per (branch, path) under Store.generation(), which
    any ref change (also by another process, or gc) moves. Files: an object file stays open,
    shared by the replies that send it (objects are immutable; sendfile reads at an explicit
    offset) through its wasmstore.SharedFd, closed once neither this cache nor a reply holds
    it. Each request asks Store.module_filename, which hash-checks again a file that changed
    since it was checked (one stat tells). Every syscall releases the GIL, and with many
    connections each release costs a thread switch: this is what keeps a download to five
    syscalls.
    """

    def __init__(self, store, size=4096, open_files=64):
        self.store = store
        self.paths = wasmstore.Cache(size)          # (generation, branch, path) -> (hash, file)
        self.files = wasmstore.Cache(open_files)    # hash -> (SharedFd, size)

    def locate(self, path, branch=None):
        """(hash, object file name) of the module at path on branch, as Store.locate."""
        generation = self.store.generation()    # read first: a change meanwhile shows next time
        key = (generation, branch, path)
        found = self.paths.get(key)
        if found is None:
            found = self.store.locate(path, branch=branch)
            if generation is not None:
                self.paths.put(key, found)
        return found

    def open(self, path, branch=None):
        """(hash, FileBody) of the module at path on branch; the caller closes the body."""
        digest, filename = self.locate(path, branch)
        self.store.module_filename(digest)          # CorruptObject if it changed and is bad
        opened = self.files.get(digest)
        if opened is None:
            body = open_body(filename)
            self.files.put(digest, (body.file, body.size))
            return digest, body
        return digest, FileBody(*opened)

    def close(self):
        """Let go of every open file (each is closed when the last reply sending it ends)."""
        self.files.clear()
        self.paths.clear()


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
    """GET /api/v1/module/*: the module's bytes (see module_reply)."""
    digest, file_body = _open_object(store, call)
    return module_reply(digest, file_body, call.headers)


def add_module(store, call, body):
    """`body` is a binary reader yielding exactly the request body (streamed, never buffered)."""
    digest = store.add_file(call.path, body, branch=call.branch, author=call.author,
                            size_limit=call.max_body)
    return text_reply(digest)


def delete_module(store, call, body):
    """DELETE /api/v1/module/*: remove a path (or every path of a hash)."""
    store.remove(call.path, branch=call.branch, author=call.author)
    return Reply(200)


def list_modules(store, call, body):
    """GET /api/v1/modules[/*]: {"/path": hash} under the prefix (what the key reaches)."""
    listing = store.list(call.path, branch=call.branch)
    if call.access.scoped:
        listing = {path: digest for path, digest in listing.items() if call.access.reaches(path)}
    return json_reply(listing)


def get_hash(store, call, body):
    """GET /api/v1/hash/*: the module hash (a directory: its tree hash)."""
    return text_reply(store.hash(call.path, branch=call.branch))


def set_hash(store, call, body):
    """POST /api/v1/hash/:hash/*: point the path at a stored module."""
    store.set(call.path, call.params[0], branch=call.branch, author=call.author)
    return Reply(200)


def get_versions(store, call, body):
    """GET /api/v1/versions/*: [[hash, commit], ...], oldest first."""
    versions = store.versions(call.path, branch=call.branch)
    return json_reply([[digest, commit] for digest, commit in versions])


def get_version(store, call, body):
    """GET /api/v1/version/:index/*: the bytes of that version."""
    index = wasmstore.parse_number(call.params[0], "version index", maximum=MAX_VERSION_INDEX)
    digest, _commit = store.version(index, call.path, branch=call.branch)
    return module_reply(digest, open_body(store.module_filename(digest)), call.headers)


def rollback(store, call, body):
    """POST /api/v1/rollback[/*]: revert a path (or the branch) to before its last change."""
    store.rollback(_path_or_none(call), branch=call.branch, author=call.author)
    return Reply(200)


def restore(store, call, body):
    """POST /api/v1/restore/:commit[/*]: a new commit with that commit's tree (or path)."""
    store.restore(call.params[0], _path_or_none(call), branch=call.branch, author=call.author)
    return Reply(200)


def snapshot(store, call, body):
    """GET /api/v1/snapshot: the branch's head commit."""
    return text_reply(store.snapshot(branch=call.branch))


def commit_info(store, call, body):
    """GET /api/v1/commit/:hash: the commit as JSON."""
    return json_reply(store.commit_info(call.params[0]))


def list_branches(store, call, body):
    """GET /api/v1/branches: the branch names."""
    return json_reply(store.branches())


def default_branch(store, call, body):
    """GET /api/v1/branch: the default branch's name."""
    return text_reply(store.default_branch)


def switch_branch(store, call, body):
    """PUT /api/v1/branch/:b: make :b the default branch (persisted)."""
    store.set_default_branch(call.params[0])
    return Reply(200)


def create_branch(store, call, body):
    """POST /api/v1/branch/:b: create :b from the request's branch."""
    store.create_branch(call.params[0], branch=call.branch)
    return Reply(200)


def delete_branch(store, call, body):
    """DELETE /api/v1/branch/:b: delete :b (never the default branch)."""
    store.delete_branch(call.params[0])
    return Reply(200)


def merge(store, call, body):
    """POST /api/v1/merge/:b: merge :b into the request's branch."""
    store.merge(call.params[0], branch=call.branch, author=call.author)
    return Reply(200)


def gc(store, call, body):
    """POST /api/v1/gc: squash the branch's history, delete unreachable objects; the count."""
    return text_reply(str(store.gc(branch=call.branch)))


def auth_ok(store, call, body):
    """* /api/v1/auth: 200 when the key may use this method."""
    return Reply(200)            # reaching a handler means the key passed for this method


# -- history over HTTP: log, audit, diff (pages of commit infos) -----------------------------------

def _query_count(call, name, default, maximum):
    """A count from the query string (ASCII digits, 0 to maximum), default when absent; 400
    otherwise."""
    raw = call.query.get(name)
    return default if raw is None else wasmstore.parse_number(raw, name, maximum=maximum)


def _page(commits, limit):
    """{"commits": the first `limit`, "next": the last one's hash when more follow, else null}:
    the client asks for the next page with ?after=<next>."""
    more = len(commits) > limit
    commits = commits[:limit]
    return {"commits": commits, "next": commits[-1]["hash"] if more and commits else None}


def get_log(store, call, body):
    """GET /api/v1/log?limit=N&after=COMMIT: the branch's commits, newest first, by pages."""
    limit = _query_count(call, "limit", DEFAULT_PAGE, MAX_PAGE)
    after = call.query.get("after")
    start = None
    if after is not None:
        parents = store.commit_info(after).get("parents")
        if not parents:
            store.log(0, branch=call.branch)              # still 404 for an unknown branch
            return json_reply(_page([], limit))
        start = parents[0]
    return json_reply(_page(store.log(limit + 1, branch=call.branch, start=start), limit))


def _visible_info(store, access, info):
    """A commit info as a key that reaches only some paths may see it: with a fixed text in
    place of the message when the commit also changed paths out of its reach."""
    if access.scoped:
        parent = info.get("parents", [None])[0]
        if not all(map(access.reaches, store.changes(parent, info["hash"]))):
            info = dict(info, message=HIDDEN_MESSAGE)
    return info


def get_tree(store, call, body):
    """GET /api/v1/tree[/*]: {"/path": {"hash", "size", "kind", "changed": commit info}} of
    every module under the prefix (that the key reaches)."""
    details = store.list_details(call.path, branch=call.branch)
    infos = {}
    tree = {}
    for path, entry in details.items():
        if not call.access.reaches(path):
            continue
        commit = entry["changed"]
        if commit is not None and commit not in infos:
            infos[commit] = _visible_info(store, call.access, store.commit_info(commit))
        tree[path] = dict(entry, changed=infos.get(commit))
    return json_reply(tree)


def get_audit(store, call, body):
    """GET /api/v1/audit/*?limit=N&after=COMMIT: the commits that changed a path, newest first.

    A key limited to some paths does not see the message of a commit that also changed paths
    out of its reach (messages name paths)."""
    limit = _query_count(call, "limit", DEFAULT_PAGE, MAX_PAGE)
    commits = store.audit(call.path, branch=call.branch)
    after = call.query.get("after")
    if after is not None:
        wasmstore.validate_hash(after, "commit")
        after = after.lower()
        position = next((i for i, info in enumerate(commits) if info["hash"] == after), None)
        if position is None:
            raise HttpError(404, f"commit {after} did not change {_printed(call.path.split('/'))}")
        commits = commits[position + 1:]
    page = _page(commits[:limit + 1], limit)
    page["commits"] = [_visible_info(store, call.access, info) for info in page["commits"]]
    return json_reply(page)


def get_diff(store, call, body):
    """GET /api/v1/diff/:old/:new[/*]: what changed from commit old to commit new (under the
    path, when one is given), in the watch event format."""
    old, new = (store.commit_info(commit)["hash"] for commit in call.params)
    changes = store.changes(old, new)
    if call.path:
        prefix = tuple(wasmstore.validate_path(call.path))
        changes = {path: change for path, change in changes.items()
                   if tuple(path.split("/")[1:])[:len(prefix)] == prefix}
    return json_reply(changes)


# ---------------------------------------------------------------------------
# running modules: the run gate, per-module metrics, the call/run/exports handlers
# ---------------------------------------------------------------------------

class SlotPool:
    """At most `limit` holders at once, across every process of the server (thread-safe).

    Alone, it is a threading.Semaphore and a count. In a server of several worker processes
    the semaphore is a POSIX one the supervisor made before forking them (shared by all), and
    `counts` a shared array of the slots each worker holds: `held` sums it, and the supervisor
    gives back the slots of a worker that died holding some (release_for)."""

    def __init__(self, limit, semaphore=None, counts=None, index=0):
        self.limit = int(limit)
        self._semaphore = threading.Semaphore(self.limit) if semaphore is None else semaphore
        self._counts = [0] if counts is None else counts
        self._index = index
        self._lock = threading.Lock()

    def acquire(self, timeout=0):
        """Take a slot, waiting up to `timeout` seconds for one (0: not at all); True if taken."""
        if timeout > 0:
            taken = self._semaphore.acquire(True, timeout)
        else:
            taken = self._semaphore.acquire(False)
        if taken:
            with self._lock:
                self._counts[self._index] += 1
        return taken

    def release(self):
        """Give a slot back."""
        with self._lock:
            self._counts[self._index] -= 1
        self._semaphore.release()

    @property
    def held(self):
        """Slots taken now, by every process of the server."""
        return sum(self._counts)

    def busier_than_another(self):
        """True if another worker of the server holds fewer slots than this one."""
        mine = self._counts[self._index]
        return any(count < mine for count in self._counts)

    def release_for(self, index):
        """Give back every slot worker `index` held (it died); only the supervisor calls this."""
        count, self._counts[index] = self._counts[index], 0
        for _ in range(max(0, count)):
            self._semaphore.release()


class RunGate:
    """At most `running` guests at once in the whole server; up to `waiting` more callers
    queue for at most `wait` seconds; everyone else gets 503 with Retry-After at once (the
    queue is bounded). A module's first call compiles it inside its slot, so compiles count
    against both bounds. slots, places: the SlotPools of a server of several workers."""

    def __init__(self, running=DEFAULT_MAX_GUESTS, waiting=DEFAULT_RUN_QUEUE,
                 wait=DEFAULT_QUEUE_WAIT, slots=None, places=None):
        if int(running) < 1 or int(waiting) < 0 or not float(wait) > 0:
            raise ServerError(f"bad run gate: {running} running, {waiting} waiting, {wait} s")
        self.running_limit, self.waiting_limit = int(running), int(waiting)
        self.wait = float(wait)
        self.slots = SlotPool(self.running_limit) if slots is None else slots
        self.places = SlotPool(self.waiting_limit) if places is None else places

    @property
    def running(self):
        """Guests running (or compiling for their first call) now, in the whole server."""
        return self.slots.held

    @property
    def waiting(self):
        """Callers waiting for a slot now, in the whole server."""
        return self.places.held

    def _busy(self):
        return HttpError(503, "too many guests are running; try again later",
                         headers=[("Retry-After", str(max(1, round(self.wait))))])

    def enter(self):
        """Take a slot, waiting in the bounded queue if none is free (HttpError 503 otherwise)."""
        if self.slots.acquire():
            return
        if not self.places.acquire():
            raise self._busy()
        try:
            if not self.slots.acquire(self.wait):
                raise self._busy()
        finally:
            self.places.release()

    def leave(self):
        """Give the slot back (a waiting caller takes it)."""
        self.slots.release()

    @contextlib.contextmanager
    def slot(self):
        """A context manager holding a slot (enter() on entry, leave() on exit)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()


class CompileLocks:
    """One compile of a module at a time in the whole server: a lock per module hash among the
    threads of this process and, in a server of several workers, a byte-range lock (fcntl) of
    one file every worker shares, which the system releases if its holder dies. A caller that
    waited finds the module compiled, in kvhost's compile cache."""

    def __init__(self, shared_file=None):
        self._file = shared_file
        self._lock = threading.Lock()
        self._held = {}                   # digest -> [threading.Lock, users]

    @contextlib.contextmanager
    def hold(self, digest):
        """Hold the lock of one module hash (64 hex digits)."""
        with self._lock:
            entry = self._held.setdefault(digest, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0], self._file_lock(digest):
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._held[digest]

    @contextlib.contextmanager
    def _file_lock(self, digest):
        if self._file is None:
            yield
            return
        offset = int(digest[:15], 16)     # a byte per module (its hash's first 60 bits)
        fcntl.lockf(self._file, fcntl.LOCK_EX, 1, offset)
        try:
            yield
        finally:
            fcntl.lockf(self._file, fcntl.LOCK_UN, 1, offset)


def outcome_of(exc):
    """The metric/log label of how a run ended: "ok", the label ERROR_STATUS gives the error
    (a trap's kind: timeout, fuel, memory, data, crash, exit, trap), or "error" for a bug."""
    if exc is None:
        return "ok"
    meaning = error_meaning(exc)
    return "error" if meaning is None else meaning.label


class GuestRuntime:
    """What the call/run/exports routes share: a wasmstore.Runner (kvhost), the RunGate, the
    CompileLocks, the largest output kept, and the metrics each run records (per module and
    function)."""

    def __init__(self, runner, gate, metrics, max_output=DEFAULT_MAX_OUTPUT, compile_locks=None):
        self.runner = runner
        self.gate = gate
        self.metrics = metrics
        self.max_output = int(max_output)
        self.compile_locks = CompileLocks() if compile_locks is None else compile_locks
        self.precompiler = None           # a Precompiler, when make_runtime starts one
        self._cache_stats_due = 0.0       # when a run next publishes the compile-cache counts

    def load(self, target):
        """The kvhost Guest of a target, compiled at most once at a time in the whole server
        (a caller that waited for another's compile finds it in the compile cache)."""
        guest = self.runner.host.loaded(target.digest)
        if guest is None:
            with self.compile_locks.hold(target.digest):
                guest = self.runner.load(target)
            self._publish_cache_stats()             # a compile or a disk hit shows at once
        return guest

    def _publish_cache_stats(self):
        """Record the Host's compile-cache counts in the metrics, where every worker's /metrics
        reads them. A run of a loaded guest only adds a memory hit: runs publish at most every
        CACHE_STATS_SECONDS (a worker's own /metrics publishes first), not each time."""
        self._cache_stats_due = time.monotonic() + CACHE_STATS_SECONDS
        self.metrics.record_cache_stats(self.runner.host.cache_stats())

    def execute(self, call, function, version, work, gated=True, resolve=None):
        """Resolve the module, then load it and work(target, stats) in a gate slot; records the
        outcome in the metrics and the access log. gated=False (exports, which never compiles):
        nothing is loaded, and only a module not compiled yet takes a slot (reading its types
        is work too: a component's take a stubbed compile). resolve: a function giving the
        Target, when the caller picks it otherwise than by call.path, call.branch and version
        (an app)."""
        started = time.monotonic()
        stats = {}
        error = None
        try:
            if resolve is None:
                target = self.runner.resolve(call.path, branch=call.branch, version=version)
            else:
                target = resolve()
            loaded = self.runner.host.is_loaded(target.digest)
            if not gated and loaded:
                return work(target, stats)
            with self.gate.slot():
                if gated and not loaded:
                    self.load(target)               # a first call's compile holds its slot
                return work(target, stats)
        except Exception as exc:
            error = exc
            raise
        finally:
            self._record(call, function, error, time.monotonic() - started, stats.get("fuel", 0))

    def _record(self, call, function, error, seconds, fuel):
        outcome = outcome_of(error)
        module = call.path if call.path.startswith("/") else "/" + call.path
        call.log.update(module=module, function=function, outcome=outcome, fuel=fuel)
        if outcome not in ("not-found", "busy"):        # bounded label sets: real modules only
            self.metrics.observe_run(module, function, outcome, seconds, fuel)
        if self.runner is not None and time.monotonic() >= self._cache_stats_due:
            self._publish_cache_stats()

    def close(self):
        """Stop the background compiler, the guests' worker processes and the kv backend
        (idempotent)."""
        if self.precompiler is not None:
            self.precompiler.stop()
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()


class Precompiler:
    """Compiles what is added to the store in the background, before anyone calls it.

    One thread notices new commits on every branch through Store.generation() (so adds by
    any process count: this server's routes, the command line, imports, pulls), queues the
    modules they add or update, and compiles them one at a time into kvhost's compile cache
    (memory and disk; a compile never runs twice at once, see CompileLocks). A module queued
    once is not queued again. In a server of several workers, one worker runs it; the others
    find its work in the disk cache. A command-line add while no server runs is compiled by
    its first call (and cached on disk for every later one)."""

    def __init__(self, runtime, poll_interval=PRECOMPILE_POLL_SECONDS, log=None):
        self.runtime = runtime
        self.log = log or (lambda text: None)
        self.store = runtime.runner.store
        self.poll_interval = poll_interval
        self.queue = collections.deque()
        self.seen = set()                   # hashes queued once (bounded: cleared when full)
        self.stop_event = threading.Event()
        self.heads = self._heads()
        self.thread = threading.Thread(target=self._run, name="wasmstore-precompile",
                                       daemon=True)

    def start(self):
        """Start the thread (changes from now on are compiled)."""
        self.thread.start()

    def stop(self):
        """Stop after the compile in progress, if any."""
        self.stop_event.set()

    def _heads(self):
        heads = {}
        for branch in self.store.branches():
            try:
                heads[branch] = self.store.head(branch=branch)
            except wasmstore.NotFound:              # deleted meanwhile
                pass
        return heads

    def _run(self):
        generation = self.store.generation()
        while not self.stop_event.wait(self.poll_interval):
            current = self.store.generation()
            if current is None or current != generation:
                generation = current
                self._scan()
            while self.queue and not self.stop_event.is_set():
                self._compile(*self.queue.popleft())

    def _scan(self):
        """Queue the modules that new commits on any branch added or changed."""
        heads = self._heads()
        for branch, head in heads.items():
            old = self.heads.get(branch)
            if head is None or head == old:
                continue
            try:
                changes = self.store.changes(old, head)
            except wasmstore.StoreError:             # e.g. the old head squashed away by gc
                continue
            for path, change in changes.items():
                if change["action"] in ("added", "updated"):
                    digest = change["hash"]
                    self._enqueue(digest["new"] if isinstance(digest, dict) else digest, path)
        self.heads = heads

    def _enqueue(self, digest, path):
        if digest in self.seen or self.runtime.runner.host.is_loaded(digest):
            return
        if len(self.seen) >= MAX_PRECOMPILE_SEEN:
            self.seen.clear()
        self.seen.add(digest)
        self.queue.append((digest, path))

    def _compile(self, digest, path):
        try:
            self.runtime.load(wasmstore.Target(digest, None, path, None))
            result = "compiled"
        except _RUNTIME_ERRORS + (wasmstore.StoreError,):
            result = "failed"                        # not runnable here: its first call says why
        except Exception:
            if self.stop_event.is_set():             # the server closed the runtime meanwhile
                return
            self.log(f"background compile of {path}: " + traceback.format_exc())
            result = "failed"
        self.runtime.metrics.add(("precompiles", result), 1)


def _runtime(call):
    if call.runtime is None:
        raise HttpError(501, "running modules needs kvhost.py next to http_server.py and the "
                             f"wasmtime package ({KVHOST_MISSING or 'not configured'})")
    return call.runtime


def _version_query(call):
    return _query_count(call, "version", None, MAX_VERSION_INDEX)


_RESULT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def read_body(reader, limit):
    """The whole request body (b"" without one), or HttpError 413 past `limit` bytes."""
    chunks, size = [], 0
    if isinstance(reader, LimitedReader) and reader.remaining <= limit:
        data = reader.source.read(reader.remaining)        # a known length: one buffered read
        reader.consumed += len(data)
        reader.remaining -= len(data)
        if reader.remaining:
            raise HttpError(400, "request body shorter than Content-Length", close=True)
        return data
    while reader is not None:
        chunk = reader.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes", close=True)
    return b"".join(chunks)


def _json_arguments(body, limit):
    data = read_body(body, limit)
    args = wasmstore.parse_json(data, "JSON body") if data.strip() else None
    if not isinstance(args, list):
        raise HttpError(400, "expected a JSON array of arguments as the body, e.g. [1, 2]")
    return args


def _link_reach(call):
    """What the stored modules a core module imports may be, for this request's key."""
    return call.access.reaches if call.access.scoped else None


def call_function(store, call, body):
    """POST /api/v1/call/:function/*: body a JSON array of arguments; 200 with the JSON result."""
    runtime = _runtime(call)
    function = call.params[0]
    args = _json_arguments(body, call.max_body)
    version = _version_query(call)

    def work(target, stats):
        return runtime.runner.call_captured(target, function, args, limit=MAX_STDERR_HEADER,
                                            stats=stats, reach=_link_reach(call))
    result = runtime.execute(call, function, version, work)
    data = _RESULT_JSON.encode(result.value).encode("utf-8")
    headers = [("Content-Type", JSON_TYPE)]
    for name, output, total in (("Stdout", result.stdout, result.stdout_total),
                                ("Stderr", result.stderr, result.stderr_total)):
        if total:
            headers += _output_headers(name, output, total)
    return Reply(200, headers, data)


def _output_headers(name, output, total):
    """A guest's stdout or stderr in Wasmstore-<name>: a JSON string (ASCII only) of its first
    MAX_STDERR_HEADER bytes, and Wasmstore-<name>-Truncated with the bytes written when cut."""
    text = output[:MAX_STDERR_HEADER].decode("utf-8", "replace")
    headers = [(f"Wasmstore-{name}", json.dumps(text))]
    if total > MAX_STDERR_HEADER:
        headers.append((f"Wasmstore-{name}-Truncated", str(total)))
    return headers


def run_module(store, call, body):
    """POST /api/v1/run/*: body = stdin, ?arg= = argv; 200 with stdout, Wasmstore-Exit-Status."""
    runtime = _runtime(call)
    stdin = read_body(body, call.max_body)
    argv = call.query.get_all("arg")
    version = _version_query(call)

    def work(target, stats):
        return runtime.runner.run_captured(target, argv, stdin=stdin, limit=runtime.max_output,
                                           stats=stats, reach=_link_reach(call))
    result = runtime.execute(call, "run", version, work)
    headers = [("Content-Type", "application/octet-stream"),
               ("Wasmstore-Exit-Status", str(result.status))]
    headers += _output_headers("Stderr", result.stderr, result.stderr_total)
    if result.stdout_total > len(result.stdout):
        headers.append(("Wasmstore-Stdout-Truncated", str(result.stdout_total)))
    return Reply(200, headers, result.stdout)


def get_exports(store, call, body):
    """GET /api/v1/exports/*: {"hash", "kind", "exports": [{"name", "params", "results"}],
    "imports": [...]} (kvhost.describe_exports, describe_imports)."""
    runtime = _runtime(call)
    version = _version_query(call)

    def work(target, stats):
        return dict(hash=target.digest, **runtime.runner.describe(target))
    return json_reply(runtime.execute(call, "exports", version, work, gated=False))


# -- the kv data of a stored module: its namespace's buckets, keys and values ----------------------

def _kv_of(call):
    """(backend, namespace) of the module a kv route names: the namespace the Runner gives the
    module when it runs (its path, a --namespace-map prefix's, sha256:<hash>; per branch as the
    Runner decides), so what is shown here is what the guest sees."""
    runtime = _runtime(call)
    target = runtime.runner.resolve(call.path, branch=call.branch)
    return runtime.runner.host.backend, target.namespace


def _kv_key(call):
    key = call.query.get("key")
    if key is None:
        raise HttpError(400, "name the key: ?key=KEY (percent-encoded)")
    return key


def _kv_refusal(exc):
    """A kv backend's refusal of what the client sent (a bad bucket id, key or cursor: values
    were bounded as they were read) as a 400."""
    return HttpError(400, one_line(exc))


def kv_buckets(store, call, body):
    """GET /api/v1/kv/*: {"namespace", "buckets": ids of the buckets holding keys}."""
    backend, namespace = _kv_of(call)
    return json_reply({"namespace": namespace, "buckets": backend.buckets(namespace)})


def kv_keys(store, call, body):
    """GET /api/v1/kv-keys/:bucket/*?limit=N&cursor=C: {"keys": sorted, "next": cursor or null}."""
    backend, namespace = _kv_of(call)
    limit = _query_count(call, "limit", DEFAULT_PAGE, MAX_PAGE)
    try:
        keys, cursor = backend.list_page(namespace, call.params[0], call.query.get("cursor"), limit)
    except (kvhost.ArgumentError, kvhost.OperationError) as exc:
        raise _kv_refusal(exc) from None
    return json_reply({"keys": keys, "next": cursor})


def kv_get(store, call, body):
    """GET /api/v1/kv-value/:bucket/*?key=K: the value's bytes (404 when the key is missing)."""
    backend, namespace = _kv_of(call)
    bucket, key = call.params[0], _kv_key(call)
    try:
        value = backend.get(namespace, bucket, key)
    except (kvhost.ArgumentError, kvhost.OperationError) as exc:
        raise _kv_refusal(exc) from None
    if value is None:
        raise HttpError(404, f"no key {key[:100]!r} in bucket {bucket!r} of {namespace[:200]}")
    return Reply(200, [("Content-Type", "application/octet-stream")], value)


def kv_set(store, call, body):
    """PUT /api/v1/kv-value/:bucket/*?key=K: body = the value (written to the backend directly:
    watcher guests are not told)."""
    backend, namespace = _kv_of(call)
    key = _kv_key(call)
    value = read_body(body, backend.max_value_size)
    try:
        backend.set(namespace, call.params[0], key, value)
    except (kvhost.ArgumentError, kvhost.OperationError) as exc:
        raise _kv_refusal(exc) from None
    return Reply(200)


def kv_delete(store, call, body):
    """DELETE /api/v1/kv-value/:bucket/*?key=K (a missing key is fine)."""
    backend, namespace = _kv_of(call)
    try:
        backend.delete(namespace, call.params[0], _kv_key(call))
    except (kvhost.ArgumentError, kvhost.OperationError) as exc:
        raise _kv_refusal(exc) from None
    return Reply(200)


# ---------------------------------------------------------------------------
# HTTP apps
# ---------------------------------------------------------------------------
#
# A stored component exporting wasi:http/incoming-handler answers HTTP requests. Three ways
# reach one: the whole port of a one-app server (`--serve PATH`, what `wasmstore.py serve`
# runs), a mount on the API server (`--app PREFIX=PATH`), and the app routes, which reach any
# stored app by its store path: /api/v1/app/<store path>/<path below the app> (the request's
# branch: Wasmstore-Branch or the default) and /api/v1/app-at/<ref>/<store path>/<path below>
# (ref: a branch, vN, BRANCH:vN or a commit). The guest sees the path below the app (at least
# "/") with the query as it came, the scheme of the connection and the Host it was sent to.
# kvhost runs the guest (Host.handle_http); this section frames what it reads and writes.

APP_ROUTES = ("app", "app-at")             # the route names under /api/v1/ that reach any app
MAX_APP_METHOD = 64                        # longest method name (extension methods too) for apps
MAX_APP_READ = 1 << 20                     # most body bytes one guest read returns
APP_HOLD_BYTES = 64 * 1024                 # response bytes gathered before they are sent
APP_FUNCTION = "http"                      # the `function` label of app requests in run metrics
MAX_APP_SERIES = 1000                      # apps with series of their own on /metrics
# Fields that describe the connection, not the message (RFC 9110 section 7.6.1; wasi:http
# refuses them too): the server frames each message itself, so guests never see or set them.
CONNECTION_FIELDS = frozenset(["connection", "keep-alive", "proxy-connection", "te", "trailer",
                               "transfer-encoding", "upgrade", "http2-settings"])
NO_BODY_STATUSES = frozenset([204, 304])   # responses that never have a body (RFC 9110 6.4.1)
_APP_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1," + str(MAX_APP_METHOD) + r"}\Z")
_FIELD_NAME_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE_BAD_RE = re.compile(rb"[\x00\r\n]")
_VERSION_REF_RE = re.compile(r"v([0-9]{1,9})\Z")      # ASCII digits only: \d takes "٣"


# -- which app: mounts, refs, the one app of a server ----------------------------------------------

class AppSelector:
    """A stored app as a request names it: a store path (or hash) and where to find it, the
    head of a branch (None: the store's default), a version index, or a commit."""

    __slots__ = ("path", "branch", "version", "commit")

    def __init__(self, path, branch=None, version=None, commit=None):
        self.path = path
        self.branch = branch
        self.version = version
        self.commit = commit

    def with_path(self, path):
        """The same branch, version and commit for another store path."""
        return AppSelector(path, self.branch, self.version, self.commit)

    def pinned(self, store):
        """This selector, or for a module hash with no version or commit the same pinned to the
        commit of its branch that holds it now: a hash keeps serving its module whatever the
        branch does next, as a path follows its branch (NotFound when the branch lacks it)."""
        if self.version is not None or self.commit is not None or \
                not wasmstore.HASH_TEXT.match(self.path or ""):
            return self
        _, commit = store.module_at(self.path, branch=self.branch)
        return AppSelector(self.path, self.branch, commit=commit)

    def __repr__(self):
        return (f"AppSelector({self.path!r}, branch={self.branch!r}, version={self.version!r}, "
                f"commit={self.commit!r})")


def parse_app_ref(text, branch=None):
    """An AppSelector (no path yet) from a ref of the app-at route or --serve-ref: a 64-hex
    commit, vN (version N of the path on `branch`), a branch name, or BRANCH:vN."""
    text = str(text)
    name, colon, version_text = text.partition(":")
    if colon:
        match = _VERSION_REF_RE.match(version_text)
        if not match or not name:
            raise HttpError(400, f"bad app ref {text[:80]!r}: expected BRANCH:vN, e.g. dev:v2")
        return AppSelector(None, _checked_branch(name), int(match.group(1)))
    if wasmstore.HASH_TEXT.match(text):
        return AppSelector(None, branch, commit=text.lower())
    match = _VERSION_REF_RE.match(text)
    if match:
        return AppSelector(None, branch, int(match.group(1)))
    return AppSelector(None, _checked_branch(text))


def _checked_branch(name):
    try:
        return wasmstore.validate_branch(name)
    except wasmstore.InvalidInput as exc:
        raise HttpError(400, f"bad app ref: {exc}") from None


class AppMount:
    """--app PREFIX=PATH: requests under the URL path PREFIX run the app stored at PATH, as the
    default branch's head holds it at each request (a new version serves the next request)."""

    __slots__ = ("prefix", "path", "label")

    def __init__(self, prefix, path):
        self.prefix = tuple(prefix)       # decoded URL path segments; () is "/"
        self.path = path                  # the printed store path
        self.label = "/" + "/".join(self.prefix)


def parse_app_mount(text):
    """An AppMount from "PREFIX=PATH" (ServerError when malformed). The API's own paths (/api,
    /v2, /metrics) cannot be mounted over."""
    prefix_text, sep, path = str(text).partition("=")
    if not sep or not prefix_text.startswith("/") or not path:
        raise ServerError(f"bad app mount {str(text)[:200]!r}: expected PREFIX=PATH, e.g. "
                          "/hello=/apps/hello.wasm")
    try:
        prefix = [decode_segment(part) for part in prefix_text.split("/") if part]
        segments = wasmstore.validate_path(path)
    except (HttpError, wasmstore.InvalidInput) as exc:
        raise ServerError(f"bad app mount {str(text)[:200]!r}: {exc}") from None
    if prefix[:1] in (["api"], ["v2"], ["metrics"]):
        raise ServerError(f"bad app mount {str(text)[:200]!r}: /{prefix[0]} belongs to the API")
    return AppMount(prefix, wasmstore.format_path(segments))


class AppTable:
    """Where the app requests of a server go: `serve` (an AppSelector) makes every request of
    the port one app's; otherwise the mounts (longest prefix first) and the app routes."""

    def __init__(self, mounts=(), serve=None):
        self.serve = serve
        self.mounts = sorted(mounts, key=lambda mount: -len(mount.prefix))
        prefixes = [mount.prefix for mount in self.mounts]
        if len(set(prefixes)) != len(prefixes):
            raise ServerError("two app mounts have the same prefix")

    def match(self, raw_segments):
        """(AppMount, segments used) for the raw URL path segments (without the leading ""),
        or None when no mount holds the path."""
        for mount in self.mounts:
            size = len(mount.prefix)
            if len(raw_segments) < size:
                continue
            try:
                if all(decode_segment(raw) == want
                       for raw, want in zip(raw_segments, mount.prefix)):
                    return mount, size
            except HttpError:
                continue                  # a segment no prefix can equal
        return None


def split_app_target(target):
    """(raw path segments after the leading "/", query suffix "?..." or "") of a request target
    as an app receives it: the path is not decoded (the app reads it as it came)."""
    parts = absolute_form(target)
    if parts is not None:
        target = (parts.path or "/") + (f"?{parts.query}" if "?" in target else "")
    if not target.startswith("/"):
        raise HttpError(400, "request target must start with '/'")
    if _CONTROL_RE.search(target) or "#" in target:
        raise HttpError(400, "request target has a control character or a fragment")
    path, question, query = target.partition("?")
    return path.split("/")[1:], question + query


def app_path_with_query(raw_segments, query):
    """The path-with-query a guest sees: the segments below the app joined, at least "/"."""
    return "/" + "/".join(raw_segments) + query


# -- the request body, as the guest reads it -------------------------------------------------------

class _OneReceive:
    """The connection's buffered input as an app's body readers use it: readinto returns what
    is there (one receive at most), so a guest can answer a part before the client sends more."""

    __slots__ = ("rfile",)

    def __init__(self, rfile):
        self.rfile = rfile

    def readinto(self, buffer):
        return self.rfile.readinto1(buffer)

    def readline(self, limit=-1):
        return self.rfile.readline(limit)


class AppRequestBody:
    """The request body handed to a guest: read(n) returns at most n bytes as they arrive,
    b"" at the end, so an upload of any size streams through (never whole in memory).

    Bounded like every body (see body_framing, LimitedReader, ChunkedReader): a Content-Length
    over --max-body is refused before the guest starts, a chunked body past it fails the read
    (HttpError 413). A read that fails (a short or malformed body, a stalled client) raises
    ServerError or OSError; `error` keeps it, and the connection is not reused. `on_first_read`
    runs before the first read: the 100 Continue a client waits for, sent only when the guest
    asks for the body."""

    def __init__(self, reader, on_first_read=None):
        self._reader = reader             # a LimitedReader / ChunkedReader, or None: no body
        self._on_first_read = on_first_read
        self.consumed = 0
        self.error = None

    def read(self, size=CHUNK):
        """Up to `size` bytes of the body (b"" at its end); blocks until some arrive."""
        reader = self._reader
        if reader is None or size <= 0 or reader.exhausted:
            return b""
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        try:
            data = reader.read(min(size, MAX_APP_READ))
        except (ServerError, OSError, ValueError) as exc:
            self.error = exc
            raise
        self.consumed += len(data)
        return data

    @property
    def exhausted(self):
        """True once the whole body has been read (or there is none)."""
        return self._reader is None or self._reader.exhausted

    @property
    def remaining(self):
        """Bytes still to come when known (a Content-Length body), else None."""
        if self._reader is None:
            return 0
        return getattr(self._reader, "remaining", None)


# -- the response, as the guest writes it ----------------------------------------------------------

class AppResponse:
    """The sink of a guest's response (kvhost.Host.handle_http calls it): start(status,
    headers) once, write(data) for each piece of the body (blocking: a slow client holds the
    guest back), flush() when the guest flushes, finish(trailers or None) at the end.

    Framing is the server's: a Content-Length the guest sets is kept and enforced (a body that
    runs over or stops short is an AppResponseError: a clean 502 when nothing was sent yet, a
    closed connection otherwise, never a reply that looks whole); without one, a body the guest
    finishes before APP_HOLD_BYTES have gathered (and before any flush) is sent with its
    Content-Length, a longer one chunked (trailers go in the last chunk), and an HTTP/1.0
    client reads to the end of the connection. HEAD, 204 and 304 send no body (HEAD keeps the
    Content-Length a GET would get). Connection fields (CONNECTION_FIELDS) a guest sets are
    dropped; Date is added unless it set one. A request body that failed (over --max-body,
    malformed, stalled) fails the response too, even one the guest finished: its error reply
    when nothing was sent yet, else the connection closed before the response's end.

    kvhost calls flush() before the guest waits (a poll, a sleep), so that what it wrote
    reaches the client while it waits; between waits, bytes gather for fewer, larger sends. A
    response finished whole (nothing sent before) is held, its head and body one piece, until
    the guest waits or returns: send_held() then sends it after the guest's run slot is given
    back, so that a slot holds no send (on loopback, about a sixth of a hello request's CPU).
    """

    def __init__(self, handler, head_only=False, request_body=None):
        self._handler = handler
        self._head_only = head_only
        self._request_body = request_body     # its failure before the head is sent is the answer
        self.status = None
        self.headers = []
        self.length = None                # the guest's Content-Length
        self.written = 0                  # body bytes the guest wrote
        self.bytes_out = 0                # body bytes sent
        self.started = False
        self.sent = False                 # the head went out: an error now can only close
        self.finished = False
        self.failure = None               # the first error; the connection is not reused
        self._chunked = False
        self._pending = []
        self._pending_size = 0
        self._held = None                 # (bytes, body bytes) finished whole, not sent yet

    @property
    def _has_body(self):
        return not self._head_only and self.status not in NO_BODY_STATUSES

    def _fail(self, error):
        if self.failure is None:
            self.failure = error
        raise error

    def start(self, status, headers):
        """The guest set its response: status (an int) and [(name, value bytes), ...]."""
        if self.failure is not None:
            raise self.failure
        if self.started:
            self._fail(AppResponseError("the guest set its response twice"))
        self.started = True
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 999:
            self._fail(AppResponseError(f"the guest's status {status!r} is not a final HTTP "
                                        "status (200-999)"))
        self.status = status
        kept, lengths = [], []
        for name, value in headers:
            raw_name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
            value = bytes(value)
            if not _FIELD_NAME_RE.match(raw_name) or _FIELD_VALUE_BAD_RE.search(value):
                self._fail(AppResponseError(f"the guest set a malformed header {raw_name[:80]!r}"))
            lower = raw_name.lower()
            if lower == b"content-length":
                lengths.append(value.strip())
            elif lower.decode("latin-1") not in CONNECTION_FIELDS:
                kept.append((raw_name, value))
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 19:
                self._fail(AppResponseError("the guest set a bad Content-Length: "
                                            + ", ".join(repr(v[:40]) for v in lengths[:4])))
            self.length = int(lengths[0])
        self.headers = kept

    def write(self, data):
        """Body bytes; sent as they gather (at most APP_HOLD_BYTES held back)."""
        if self.failure is not None:
            raise self.failure
        if not self.started or self.finished:
            self._fail(AppResponseError("the guest wrote a body outside its response"))
        size = len(data)
        if self.length is not None and self.written + size > self.length:
            self._fail(AppResponseError(f"the guest wrote more than its Content-Length of "
                                        f"{self.length} bytes"))
        self.written += size
        if not size or not self._has_body:
            return
        self._pending.append(bytes(data))
        self._pending_size += size
        if self._pending_size >= APP_HOLD_BYTES and self.written != self.length:
            self._send(final=False)

    def flush(self):
        """Send what the guest wrote so far (held back only while it completes a known length,
        so that a body running over it is still caught before the client has it whole)."""
        if self.failure is not None:
            raise self.failure
        if self._held is not None:
            self.send_held()
        elif self.started and not self.finished and self.written != self.length:
            self._send(final=False)

    def finish(self, trailers=None):
        """The body is complete; trailers ([(name, value bytes)] or None) follow a chunked one."""
        if self.failure is not None:
            raise self.failure
        if not self.started or self.finished:
            self._fail(AppResponseError("the guest finished a response it had not set"))
        self.finished = True
        if self.length is not None and self.written != self.length and self._has_body:
            self._fail(AppResponseError(f"the guest wrote {self.written} bytes of its "
                                        f"Content-Length of {self.length}"))
        tail = []
        for name, value in trailers or ():
            raw_name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
            value = bytes(value)
            if not _FIELD_NAME_RE.match(raw_name) or _FIELD_VALUE_BAD_RE.search(value):
                self._fail(AppResponseError(f"the guest set a malformed trailer {raw_name[:80]!r}"))
            tail.append(raw_name + b": " + value + b"\r\n")
        self._send(final=True, trailers=tail)

    def _send(self, final, trailers=()):
        pieces = []
        failed = None if self._request_body is None else self._request_body.error
        if failed is not None and (final or not self.sent):
            # a broken request (over --max-body, malformed, stalled) gets its own error reply,
            # or once the head is out a response cut short: never one that looks whole
            self._fail(failed)
        if not self.sent:
            pieces.append(self._head(final))
        body, self._pending, self._pending_size = self._pending, [], 0
        if self._chunked:
            for data in body:
                pieces += [b"%x\r\n" % len(data), data, b"\r\n"]
            if final:
                pieces += [b"0\r\n"] + list(trailers) + [b"\r\n"]
        else:
            pieces += body
        whole = final and not self.sent
        self.sent = True
        if not pieces:
            return
        sending = (b"".join(pieces), sum(len(data) for data in body))
        if whole:
            self._held = sending
            self._handler.app_reply_started(self.status)
            return
        self._transmit(*sending)

    def send_held(self):
        """Send the response held since it was finished whole, if any (ConnectionError when
        the client is gone)."""
        held, self._held = self._held, None
        if held is not None:
            self._transmit(*held)

    def _transmit(self, data, body_bytes):
        try:
            self._handler.send_app_bytes(data)
        except (OSError, ssl.SSLError) as exc:
            self._fail(ConnectionError(f"the client stopped reading: {exc}"))
        self.bytes_out += body_bytes

    def _head(self, final):
        handler = self._handler
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status).encode("latin-1"))]
        has_date = False
        for name, value in self.headers:
            has_date = has_date or name.lower() == b"date"
            lines.append(name + b": " + value + b"\r\n")
        if not has_date:
            lines.append(b"Date: " + handler.date_time_string().encode("latin-1") + b"\r\n")
        if self.length is not None and self.status not in NO_BODY_STATUSES:
            lines.append(b"Content-Length: %d\r\n" % self.length)
        elif self._has_body:
            if final:
                lines.append(b"Content-Length: %d\r\n" % self._pending_size)
            elif handler.request_version == "HTTP/1.1":
                lines.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
            else:
                handler.close_connection = True       # the body ends with the connection
        elif final and self._head_only and self.status not in NO_BODY_STATUSES:
            lines.append(b"Content-Length: %d\r\n" % self.written)   # what GET would send
        lines.append(handler.app_connection_field(final))
        lines.append(b"\r\n")
        return b"".join(lines)


def _decoded_or_none(raw):
    """A URL path segment decoded (decode_segment), or None when it is malformed."""
    try:
        return decode_segment(raw)
    except HttpError:
        return None


def _store_segments(raw):
    """The decoded URL path segments an app route's store path is looked for in: up to the
    first empty one, at most a store path's length (HttpError 400 for a malformed one)."""
    segments = []
    for part in raw[:wasmstore.MAX_SEGMENTS]:
        if not part:
            break
        segments.append(decode_segment(part))
    return tuple(segments)


def _unfinished(sink):
    """The error of a guest that returned without a whole response (None when it gave one)."""
    if not sink.started:
        return AppResponseError("the guest returned without setting a response", "no-response")
    if not sink.finished:
        return AppResponseError("the guest returned without finishing its response body",
                                "unfinished")
    return None


def app_error_status(exc):
    """(HTTP status, Wasmstore-Error kind) of an app request that failed before a response,
    from the ERROR_STATUS row (see the rule beside the table); (None, None) for an unexpected
    error (a bug)."""
    meaning = error_meaning(exc)
    if meaning is None:
        return None, None
    if isinstance(exc, _GUEST_FAILURES) and not isinstance(exc, HttpError):
        return (504 if meaning.label == "timeout" else 502), meaning.label
    status = meaning.http_status
    if status == 503 or meaning.label == "not-found":
        return status, "busy" if status == 503 else "not-found"
    return status, "request" if 400 <= status < 500 else "store"


def app_error_reply(exc):
    """The plain-text one-line Reply of a failed app request, with Wasmstore-Error: KIND."""
    status, kind = app_error_status(exc)
    if status is None:
        reply = text_reply("internal server error\n", 500)
        reply.headers.append(("Wasmstore-Error", "internal"))
        return reply
    reply = text_reply(one_line(exc) + "\n", status)
    if isinstance(exc, HttpError):
        reply.headers.extend(exc.headers)
    reply.headers.append(("Wasmstore-Error", kind))
    return reply


# ---------------------------------------------------------------------------
# Wess /wess: Wess's API, whose clients work with only the base URL changed
# ---------------------------------------------------------------------------
# Wess (a WebAssembly function-execution service) keeps each module under a UUID with metadata
# naming the function to call: POST /wess {"wasm": [bytes], "metadata": {"functionName",
# "returnType", "args"}} -> 202 {"message": {"id"}}; PUT and DELETE /wess/<id> -> 202;
# GET /wess/<id> -> 202 {"message": {"wasm", "metadata"}} (Wess answers reads with 202 too);
# GET /wess -> 202 {"message": <number of modules>}; POST /wess/<id> [args] -> 200
# {"message": [results]}; errors {"message": "..."}. Here each module is the store path
# /wess/<id>, versioned like any other, with its metadata in a custom section appended to it
# (WESS_SECTION), so a version, a rollback or a restore keeps module and metadata together;
# GET gives back exactly the bytes that were sent.

WESS_PREFIX = ("wess",)
WESS_SECTION = b"wess.metadata"             # the custom section holding a module's metadata
WESS_TYPES = ("I32", "I64", "F32", "F64", "V128", "ExternRef", "FuncRef")   # Wess's type names
WESS_TRAILER = struct.Struct(">QI")         # ends the section: module length, metadata length


def _leb_u32(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _wess_section(metadata_json, module_length):
    """The custom section appended to a module: WESS_SECTION, the metadata's JSON, then
    WESS_TRAILER (so it is found from the end, and checked by writing it again)."""
    payload = (_leb_u32(len(WESS_SECTION)) + WESS_SECTION + metadata_json
               + WESS_TRAILER.pack(module_length, len(metadata_json)))
    return b"\x00" + _leb_u32(len(payload)) + payload


def wess_module(wasm, metadata):
    """The bytes stored for a Wess module: the module and its metadata section."""
    metadata_json = json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return wasm + _wess_section(metadata_json, len(wasm))


def wess_split(data):
    """(module bytes as sent, metadata) of stored bytes; WessError 422 if they end otherwise."""
    if len(data) >= WESS_TRAILER.size:
        length, metadata_length = WESS_TRAILER.unpack_from(data, len(data) - WESS_TRAILER.size)
        start = len(data) - WESS_TRAILER.size - metadata_length
        if length < start and data[length:] == _wess_section(data[start:-WESS_TRAILER.size],
                                                             length):
            return data[:length], _stored_wess_metadata(data[start:-WESS_TRAILER.size])
    raise WessError(422, "this module was not stored through /wess: it has no Wess metadata")


def _stored_wess_metadata(text):
    """The metadata of a stored module's section, checked as an upload's is: a module stored
    through /api/v1/ may carry any bytes there (WessError 422)."""
    try:
        return _wess_metadata(wasmstore.parse_json(text, "Wess metadata"))
    except (wasmstore.InvalidInput, WessError) as exc:
        raise WessError(422, "this module's Wess metadata section is not Wess's: "
                        f"{one_line(exc)}") from None


class WessError(HttpError):
    """An error of the /wess API: Wess's message prefix ("Invalid Id", "Invalid Json", ...)."""


def wess_error_reply(exc):
    """Wess's error body, {"message": "..."}, with the status of the one ERROR_STATUS table."""
    status = error_status(exc)
    if status is None:
        return json_reply({"message": "internal server error"}, 500)
    reply = json_reply({"message": one_line(exc)}, status)
    reply.headers.extend(error_headers(exc))
    return reply


def _wess_message(value, status=202):
    return json_reply({"message": value}, status)


def _canonical_wess_id(text):
    """The canonical spelling of a Wess id (a UUID, as POST /wess names modules), or None."""
    try:
        if "/" in text or len(text) > 64:
            raise ValueError
        return str(uuid.UUID(text))
    except ValueError:
        return None


def _wess_id(call, strict):
    """The canonical id (and its store path) of /wess/<id>. Wess answers a malformed id with
    400 on reads (strict) and 404 on writes and calls (it looks the id up first)."""
    text = call.path
    canonical = _canonical_wess_id(text)
    if canonical is None:
        if strict:
            raise WessError(400, f"Invalid ID: {text[:80]!r} is not a UUID")
        raise WessError(404, "Invalid Id: Not found")
    return canonical, f"/wess/{canonical}"


def _wess_stored(store, call, strict=False):
    """(id, path, stored bytes) of an existing module; WessError 404 if there is none."""
    module_id, path = _wess_id(call, strict)
    try:
        return module_id, path, store.find(path, branch=call.branch)
    except wasmstore.NotFound:
        raise WessError(404, "Invalid Id: Not found") from None


def _wess_upload(body, limit):
    """(module bytes, metadata) of a Wess upload, checked as Wess's JSON schema has it."""
    data = read_body(body, limit)
    try:
        document = wasmstore.parse_json(data, "JSON body")   # as a call's arguments
    except wasmstore.InvalidInput as exc:
        raise WessError(400, f"Invalid Json: {one_line(exc)}") from None
    metadata = document.get("metadata") if isinstance(document, dict) else None
    wasm = document.get("wasm") if isinstance(document, dict) else None
    if not isinstance(wasm, list) or not isinstance(metadata, dict):
        raise WessError(400, 'Invalid Json: expected {"wasm": [bytes...], "metadata": '
                             '{"functionName", "returnType", "args"}}')
    if set(map(type, wasm)) - {int}:
        raise WessError(400, "Invalid Json: wasm must be an array of numbers 0 to 255")
    try:
        module = bytes(wasm)
    except ValueError:
        raise WessError(400, "Invalid Json: wasm must be an array of numbers 0 to 255") from None
    return module, _wess_metadata(metadata)


def _wess_metadata(metadata):
    """Wess metadata as its JSON schema has it, {"functionName", "returnType", "args"}, or
    WessError 400."""
    if not isinstance(metadata, dict):
        raise WessError(400, "Invalid Json: metadata must be an object")
    name = metadata.get("functionName")
    if not isinstance(name, str) or not name:
        raise WessError(400, "Invalid Json: metadata.functionName must be a function name")
    for field in ("returnType", "args"):
        types = metadata.get(field)
        if not isinstance(types, list) or any(t is not None and t not in WESS_TYPES for t in types):
            raise WessError(400, f"Invalid Json: metadata.{field} must be a list of "
                                 f"{', '.join(WESS_TYPES)} (or null)")
    return {"functionName": name, "returnType": metadata["returnType"],
            "args": metadata["args"]}


def _wess_add(store, call, path, body):
    module, metadata = _wess_upload(body, call.max_body)
    try:
        wasmstore.validate_module(module)
    except wasmstore.InvalidModule as exc:
        raise WessError(400, f"Invalid Wasm: {one_line(exc)}") from None
    store.add(path, wess_module(module, metadata), branch=call.branch, author=call.author)


def wess_count(store, call, body):
    """GET /wess: how many modules there are (what Wess's load test reads at its end): the
    paths /wess/<id> the id routes reach, not other modules stored under /wess."""
    try:
        modules = store.list("/wess", branch=call.branch)
    except wasmstore.NotFound:
        modules = {}
    return _wess_message(sum(1 for path in modules if call.access.reaches(path)
                             and _is_wess_path(path)))


def _is_wess_path(path):
    parent, _, name = path.rpartition("/")
    return parent == "/wess" and _canonical_wess_id(name) == name


def wess_create(store, call, body):
    """POST /wess: store the module under a new id (a uuid4)."""
    module_id = str(uuid.uuid4())
    _wess_add(store, call, f"/wess/{module_id}", body)
    return _wess_message({"id": module_id})


def wess_read(store, call, body):
    """GET /wess/<id>: the module as it was sent and its metadata."""
    _, _, data = _wess_stored(store, call, strict=True)
    module, metadata = wess_split(data)
    return _wess_message({"wasm": list(module), "metadata": metadata})


def wess_replace(store, call, body):
    """PUT /wess/<id>: a new version of the module and its metadata."""
    module_id, path, _ = _wess_stored(store, call)
    _wess_add(store, call, path, body)
    return _wess_message({"id": module_id})


def wess_delete(store, call, body):
    """DELETE /wess/<id> (its versions stay in the history)."""
    module_id, path, _ = _wess_stored(store, call)
    store.remove(path, branch=call.branch, author=call.author)
    return _wess_message({"id": module_id})


def wess_call(store, call, body):
    """POST /wess/<id> with a JSON array of arguments: calls the metadata's functionName;
    200 {"message": [results]} (no result: [], several: each)."""
    runtime = _runtime(call)
    _, path, data = _wess_stored(store, call)
    _, metadata = wess_split(data)
    try:
        args = _json_arguments(body, call.max_body)
    except (HttpError, wasmstore.InvalidInput) as exc:
        if isinstance(exc, HttpError) and exc.status != 400:
            raise
        raise WessError(400, f"Invalid Json: {one_line(exc)}") from None
    function = metadata["functionName"]
    call.path = path.lstrip("/")
    kinds = {}

    def work(target, stats):
        kinds["kind"] = runtime.load(target).kind
        return runtime.runner.call(target, function, args, stats=stats, reach=_link_reach(call))
    result = runtime.execute(call, function, None, work)
    if result is None:
        results = []
    elif kinds.get("kind") == "module" and isinstance(result, list):
        results = result                          # a core function's several results
    else:
        results = [result]
    return Reply(200, [("Content-Type", JSON_TYPE)],
                 _RESULT_JSON.encode({"message": results}).encode("utf-8"))


# ---------------------------------------------------------------------------
# OCI /v2/: the distribution API's read side, each store path a repository
# ---------------------------------------------------------------------------

OCI_PREFIX = ("v2",)
OCI_API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
OCI_BLOB_TYPE = "application/octet-stream"
OCI_MAX_PAGE = 10_000                      # largest n a tag listing accepts
OCI_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 405: "UNSUPPORTED",
                   413: "SIZE_INVALID", 429: "TOOMANYREQUESTS"}


class OciError(HttpError):
    """An error of the /v2/ API, with its distribution-spec error code."""

    def __init__(self, status, code, message, headers=()):
        super().__init__(status, message, headers=headers)
        self.code = code


def oci_error_reply(exc):
    """The distribution spec's JSON error body ({"errors": [{"code", "message"}]}); a 401
    carries the Basic challenge OCI clients answer with the key as password."""
    status = error_status(exc)
    if status is None or status >= 500:
        return error_reply(exc)
    code = getattr(exc, "code", None) or OCI_ERROR_CODES.get(status, "UNSUPPORTED")
    reply = json_reply({"errors": [{"code": code, "message": one_line(exc)}]}, status)
    reply.headers.append(OCI_API_VERSION)
    reply.headers.extend(error_headers(exc))
    if status == 401:
        reply.headers.append(("WWW-Authenticate", 'Basic realm="wasmstore", charset="UTF-8"'))
    return reply


class OciRepository:
    """A store path as an OCI repository. Tags: "latest" (the head of the request's branch,
    by default the store's default branch), every branch whose name is a valid tag other
    than "latest" and vN, and "v0", "v1", ... (the path's versions on the request's branch).
    Manifests and configs are wasmstore.module_artifact's, so their digests are stable.

    A store path whose name does not fit the distribution spec's repository grammar
    (lowercase [a-z0-9] components joined by '.', '_', '__' or '-') is not reachable here:
    NAME_INVALID. /api/v1/ serves every path."""

    def __init__(self, store, segments, branch):
        name = "/".join(segments)
        if not wasmstore.OCI_REPOSITORY.match(name):
            raise OciError(400, "NAME_INVALID", f"invalid repository name {name[:200]!r}: "
                           "expected lowercase [a-z0-9] components joined by '.', '_', '__' "
                           "or '-', separated by '/'")
        self.store = store
        self.name = name
        self.path = "/" + name
        self.branch = branch or store.default_branch
        latest = self._head(self.branch)
        self.history = store.versions(self.path, branch=self.branch) if latest else []
        self.tags = self._tags(latest)           # {tag: (branch, module hash)}
        if not self.tags:
            raise OciError(404, "NAME_UNKNOWN", f"no module at {self.path}")

    def _head(self, branch):
        try:
            return self.store.locate(self.path, branch=branch)[0]
        except wasmstore.NotFound:
            return None

    def _tags(self, latest):
        tags = {"latest": (self.branch, latest)} if latest else {}
        for branch in self.store.branches():
            if wasmstore.is_branch_tag(branch):
                head = self._head(branch)
                if head:
                    tags[branch] = (branch, head)
        for index, (digest, _) in enumerate(self.history):
            tags[f"v{index}"] = (self.branch, digest)
        return tags

    def artifact(self, tag):
        """The wasmstore.module_artifact a tag names."""
        branch, digest = self.tags[tag]
        history = self.history if branch == self.branch else None
        return wasmstore.module_artifact(self.store, self.path, branch=branch, digest=digest,
                                         history=history)

    def artifacts(self):
        """One artifact per distinct (branch, module) the tags name."""
        seen = {}
        for tag, key in self.tags.items():
            if key not in seen:
                seen[key] = self.artifact(tag)
        return seen.values()

    def manifest(self, reference):
        """The artifact whose manifest a tag or a manifest digest names (OciError 404)."""
        if reference in self.tags:
            return self.artifact(reference)
        if wasmstore.OCI_DIGEST.match(reference):
            for artifact in self.artifacts():
                if artifact.manifest_digest == reference:
                    return artifact
        raise OciError(404, "MANIFEST_UNKNOWN",
                       f"no manifest {reference[:80]!r} in repository {self.name!r}")


def _oci_headers(content_type, digest):
    return [("Content-Type", content_type), ("Docker-Content-Digest", digest),
            ("ETag", f'"{digest}"'), ("Accept-Ranges", "bytes"), OCI_API_VERSION]


_BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)\Z")


def byte_range(header, size):
    """(start, end) (end exclusive) of a Range header's one byte range over a body of `size`
    bytes; None to send the whole body (no header, or one this server ignores as RFC 9110
    allows: another unit, several ranges, a malformed one). OciError 416 when the range
    starts at or past the end."""
    match = _BYTE_RANGE.match((header or "").replace(" ", ""))
    if not match or match.groups() == ("", ""):
        return None
    try:
        first, last = (wasmstore.parse_number(text, "byte position") if text else None
                       for text in match.groups())
    except wasmstore.InvalidInput:              # a position of more digits than any file has
        return None
    if first is None:                           # "bytes=-N": the last N bytes
        return None if last == 0 or size == 0 else (max(0, size - last), size)
    if last is not None and last < first:
        return None
    if first >= size:
        raise OciError(416, "RANGE_INVALID", f"range starts at byte {first}, past the end "
                       f"of the {size} bytes", headers=[("Content-Range", f"bytes */{size}")])
    return first, size if last is None else min(last + 1, size)


def ranged(reply, call, digest):
    """reply (a whole 200 body) cut to the request's Range: 206 with Content-Range, as
    registries answer so that an interrupted download resumes. An If-Range naming another
    ETag gets the whole body."""
    if_range = call.headers.get("If-Range")
    span = byte_range(call.headers.get("Range"), reply.body_size)
    if span is None or (if_range is not None and if_range.strip() != f'"{digest}"'):
        return reply
    (start, end), size = span, reply.body_size
    if isinstance(reply.body, FileBody):
        reply.body = FileBody(reply.body.file, end - start, reply.body.start + start)
    else:
        reply.body = reply.body[start:end]
    reply.status = 206
    reply.headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    return reply


def oci_manifest(store, call, segments, reference):
    """GET /v2/<name>/manifests/<reference>: the OCI image manifest (a Range: 206)."""
    artifact = OciRepository(store, segments, call.branch).manifest(reference)
    digest = artifact.manifest_digest
    return ranged(Reply(200, _oci_headers(wasmstore.OCI_MANIFEST_TYPE, digest),
                        artifact.manifest), call, digest)


def oci_blob(store, call, segments, digest):
    """GET /v2/<name>/blobs/<digest>: the module (sendfile) or its config (a Range: 206)."""
    if not wasmstore.OCI_DIGEST.match(digest):
        raise OciError(400, "DIGEST_INVALID", f"invalid digest {digest[:80]!r}: expected "
                       "sha256: and 64 lowercase hex digits")
    repository = OciRepository(store, segments, call.branch)
    headers = _oci_headers(OCI_BLOB_TYPE, digest)
    if any("sha256:" + module == digest for _, module in repository.tags.values()):
        body = open_body(store.module_filename(digest[7:]))     # sendfile
        try:
            return ranged(Reply(200, headers, body), call, digest)
        except BaseException:
            body.close()
            raise
    for artifact in repository.artifacts():
        if artifact.config_digest == digest:
            return ranged(Reply(200, headers, artifact.config), call, digest)
    raise OciError(404, "BLOB_UNKNOWN", f"no blob {digest} in repository {repository.name!r}")


def oci_tags(store, call, segments):
    """GET /v2/<name>/tags/list[?n=&last=]: the repository's tags, paged."""
    repository = OciRepository(store, segments, call.branch)
    tags = sorted(repository.tags)
    last = call.query.get("last")
    if last is not None:
        tags = [tag for tag in tags if tag > last]
    raw_n = call.query.get("n")
    headers = [OCI_API_VERSION]
    if raw_n is not None:
        try:
            n = wasmstore.parse_number(raw_n, "n", maximum=OCI_MAX_PAGE)
        except wasmstore.InvalidInput:
            raise OciError(400, "UNSUPPORTED",
                           f"n must be an integer from 0 to {OCI_MAX_PAGE}") from None
        if 0 < n < len(tags):
            after = urllib.parse.urlencode({"n": n, "last": tags[n - 1]})
            headers.append(("Link", f'</v2/{repository.name}/tags/list?{after}>; rel="next"'))
        tags = tags[:n]
    reply = json_reply({"name": repository.name, "tags": tags})
    reply.headers.extend(headers)
    return reply


def _oci_reach(call, segments):
    """The repository's segments, or OciError DENIED for a key that does not reach its path
    (decided before the store is read, like every scope check)."""
    if not call.access.reaches(tuple(segments)):
        raise OciError(403, "DENIED", f"this key may not reach {_printed(segments)}")
    return segments


def oci_v2(store, call, body):
    """GET/HEAD /v2/...: the API version check, manifests, blobs and tag lists."""
    parts = call.path.split("/") if call.path else []
    if not parts:
        return Reply(200, [("Content-Type", JSON_TYPE), OCI_API_VERSION], b"{}")
    if len(parts) >= 3 and parts[-2] == "manifests":
        return oci_manifest(store, call, _oci_reach(call, parts[:-2]), parts[-1])
    if len(parts) >= 3 and parts[-2] == "blobs":
        return oci_blob(store, call, _oci_reach(call, parts[:-2]), parts[-1])
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return oci_tags(store, call, _oci_reach(call, parts[:-2]))
    raise OciError(404, "UNSUPPORTED", "no such /v2/ endpoint (this registry serves pulls: "
                   "manifests, blobs, tags/list)")


# ---------------------------------------------------------------------------
# routing: the ROUTES table and match_route()
# ---------------------------------------------------------------------------

class Route:
    """One row of the routing table: /api/v1/<name>/<params...>/<rest...> (or, with
    prefix=(), /<name>/...: the OCI API's /v2/).

    Every route declares what a key needs to use it: `permission`, one of PERMISSIONS (or
    None: only a key allowed the method, as /api/v1/auth), and `scope`, what the request
    touches: "path" (the rest of the URL, a store path: a key limited to a prefix reaches only
    paths under it; no rest means the whole store), "store" (the whole store: only keys
    without a prefix), or "filtered" (the handler keeps only what call.access reaches, or
    touches no path at all)."""

    __slots__ = ("method", "name", "nparams", "rest", "handler", "label", "upload", "websocket",
                 "body", "prefix", "permission", "scope", "store_prefix")

    def __init__(self, method, name, nparams, rest, handler, *, permission, scope="path",
                 upload=False, websocket=False, body=False, prefix=API_PREFIX, store_prefix=()):
        if permission is not None and permission not in PERMISSIONS:
            raise ValueError(f"route {name!r}: permission must be one of {PERMISSIONS} or None")
        if scope not in ROUTE_SCOPES:
            raise ValueError(f"route {name!r}: scope must be one of {ROUTE_SCOPES}")
        self.method = method          # "*" = any method
        self.name = name
        self.nparams = nparams
        self.rest = rest              # "none" | "optional"
        self.handler = handler
        self.upload = upload          # body streamed into the store
        self.body = body              # the handler reads a body of up to --max-body (may be absent)
        self.websocket = websocket
        self.prefix = prefix
        self.permission = permission
        self.scope = scope
        self.store_prefix = store_prefix   # the store path of the URL's rest is under it (/wess)
        parts = ["/".join(("",) + prefix), name] + [":p"] * nparams + \
            (["*"] if rest == "optional" else [])
        self.label = "/".join(parts)  # bounded metric label

    def reach(self, rest):
        """What authorize() checks for a request whose URL rest is `rest` (segments): see
        `scope`."""
        if self.scope == "path":
            return self.store_prefix + rest
        return () if self.scope == "store" else None


# (method, name, number of named params, rest of path, handler; what a key needs)
ROUTES = [
    Route("GET", "modules", 0, "optional", list_modules, permission="read", scope="filtered"),
    Route("GET", "tree", 0, "optional", get_tree, permission="read", scope="filtered"),
    Route("GET", "module", 0, "optional", get_module, permission="read"),
    Route("POST", "module", 0, "optional", add_module, permission="write", upload=True),
    Route("DELETE", "module", 0, "optional", delete_module, permission="write"),
    Route("GET", "hash", 0, "optional", get_hash, permission="read"),
    Route("POST", "hash", 1, "optional", set_hash, permission="write"),
    Route("GET", "versions", 0, "optional", get_versions, permission="read"),
    Route("GET", "version", 1, "optional", get_version, permission="read"),
    Route("POST", "rollback", 0, "optional", rollback, permission="write"),
    Route("POST", "restore", 1, "optional", restore, permission="write"),
    Route("GET", "snapshot", 0, "none", snapshot, permission="read", scope="store"),
    Route("GET", "commit", 1, "none", commit_info, permission="read", scope="store"),
    Route("GET", "branches", 0, "none", list_branches, permission="read", scope="filtered"),
    Route("GET", "branch", 0, "none", default_branch, permission="read", scope="filtered"),
    Route("PUT", "branch", 1, "none", switch_branch, permission="admin", scope="store"),
    Route("POST", "branch", 1, "none", create_branch, permission="write", scope="store"),
    Route("DELETE", "branch", 1, "none", delete_branch, permission="admin", scope="store"),
    Route("POST", "merge", 1, "none", merge, permission="admin", scope="store"),
    Route("POST", "gc", 0, "none", gc, permission="admin", scope="store"),
    Route("GET", "watch", 0, "none", None, permission="read", scope="filtered", websocket=True),
    Route("POST", "call", 1, "optional", call_function, permission="run", body=True),
    Route("POST", "run", 0, "optional", run_module, permission="run", body=True),
    Route("GET", "exports", 0, "optional", get_exports, permission="read"),
    Route("GET", "log", 0, "none", get_log, permission="read", scope="store"),
    Route("GET", "audit", 0, "optional", get_audit, permission="read"),
    Route("GET", "diff", 2, "optional", get_diff, permission="read"),
    Route("GET", "kv", 0, "optional", kv_buckets, permission="read"),
    Route("GET", "kv-keys", 1, "optional", kv_keys, permission="read"),
    Route("GET", "kv-value", 1, "optional", kv_get, permission="read"),
    Route("PUT", "kv-value", 1, "optional", kv_set, permission="admin", body=True),
    Route("DELETE", "kv-value", 1, "optional", kv_delete, permission="admin"),
    Route("*", "auth", 0, "none", auth_ok, permission=None, scope="filtered"),
    Route("GET", "v2", 0, "optional", oci_v2, permission="read", scope="filtered", prefix=()),
    Route("GET", "wess", 0, "none", wess_count, permission="read", scope="filtered", prefix=()),
    Route("POST", "wess", 0, "none", wess_create, permission="write", prefix=(), body=True,
          store_prefix=WESS_PREFIX),
    Route("GET", "wess", 0, "optional", wess_read, permission="read", prefix=(),
          store_prefix=WESS_PREFIX),
    Route("PUT", "wess", 0, "optional", wess_replace, permission="write", prefix=(), body=True,
          store_prefix=WESS_PREFIX),
    Route("DELETE", "wess", 0, "optional", wess_delete, permission="write", prefix=(),
          store_prefix=WESS_PREFIX),
    Route("POST", "wess", 0, "optional", wess_call, permission="run", prefix=(), body=True,
          store_prefix=WESS_PREFIX),
]


def word_methods(routes):
    """{permission word: the methods of the routes that need it} (GET routes serve HEAD too)."""
    methods = collections.defaultdict(set)
    for route in routes:
        if route.permission is not None and route.method != "*":
            methods[route.permission].add(route.method)
    return {word: frozenset(found) for word, found in methods.items()}


WORD_METHODS = word_methods(ROUTES)     # what /api/v1/auth answers for a key with words only


def match_route(method, segments, routes=ROUTES):
    """Find the route for (method, decoded segments): (Route, params, rest) or HttpError 404/405.

    HEAD is served by the GET route (same headers, no body).
    """
    if segments[:1] in (OCI_PREFIX, WESS_PREFIX):
        prefix, name, tail = (), segments[0], segments[1:]
    elif tuple(segments[:2]) == API_PREFIX and len(segments) >= 3:
        prefix, name, tail = API_PREFIX, segments[2], segments[3:]
    else:
        raise HttpError(404, "no such route")
    lookup = "GET" if method == "HEAD" else method
    allowed = []
    for route in routes:
        if route.name != name or route.prefix != prefix:
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


# ---------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------

class Access:
    """What an authorized request may reach: every path (prefixes None), or only the paths
    under one of `prefixes` (tuples of segments). Handlers whose answers span paths (listings,
    watch events) keep only what reaches() allows."""

    __slots__ = ("prefixes",)

    def __init__(self, prefixes=None):
        self.prefixes = prefixes

    @property
    def scoped(self):
        """True if the key reaches only some path prefixes (an @PREFIX entry)."""
        return self.prefixes is not None

    def reaches(self, segments):
        """True if the path (a tuple of segments, or a printed path) is within reach."""
        if self.prefixes is None:
            return True
        if isinstance(segments, str):
            segments = tuple(s for s in segments.split("/") if s)
        if len(segments) == 1 and wasmstore.HASH_TEXT.match(segments[0]):
            return False              # a module named by hash may live at any path
        return any(segments[:len(prefix)] == prefix for prefix in self.prefixes)

    def require(self, segments):
        """HttpError 403 unless the path is within reach; () stands for the whole store. The
        answer depends only on the key and the path asked for, never on what the store holds,
        so it tells nothing about paths out of reach."""
        if self.prefixes is None:
            return
        if not segments:
            raise HttpError(403, "this key is limited to " + ", ".join(
                wasmstore.format_path(p) + "/" for p in self.prefixes) +
                            ": this route needs a key for the whole store")
        if not self.reaches(tuple(segments)):
            raise HttpError(403, f"this key may not reach {_printed(segments)}")


EVERYTHING = Access()


def _printed(segments):
    return ("/" + "/".join(segments))[:200]


class _AuthEntry:
    """One KEY:PERMS[@PREFIX] entry of an --auth spec."""

    __slots__ = ("key", "methods", "words", "prefix")

    def __init__(self, key, methods, words, prefix):
        self.key = key                # bytes
        self.methods = methods        # frozenset of method names, or AuthTable.ALL
        self.words = words            # frozenset of PERMISSIONS
        self.prefix = prefix          # tuple of path segments, or None: the whole store

    def grants(self, method, permission):
        if self.methods is AuthTable.ALL or method in self.methods:
            return True
        if permission is None:        # method-level routes (/api/v1/auth): any word using it
            return any(method in WORD_METHODS.get(word, ()) for word in self.words)
        return permission in self.words


class AuthTable:
    """Keys and what each may do, from a spec of `;`-separated entries `KEY:PERMS[@PREFIX]`.

    PERMS is a comma list of HTTP methods (`*` for all) and the words read (GET/HEAD of
    data), write (add, remove, set hash, rollback, restore, create branch), run (call, run,
    HTTP apps) and admin (gc, merge, delete or switch a branch, kv writes); the route table
    says which word each route needs. `@/PREFIX` limits the entry to paths under PREFIX;
    routes that span the whole store (log, commits, gc, merge...) need an entry without one.
    A key may appear in several entries: a request is allowed when one of them grants it.
    The original form "KEY1:GET,POST;KEY2:GET" means what it meant.

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
        entries = []
        for number, part in enumerate(spec.split(";"), 1):
            part = part.strip()
            if not part:
                continue
            match = _AUTH_ENTRY_RE.match(part)
            if not match or not match.group("key").strip():
                raise ServerError(f"auth entry {number}: expected KEY:PERMS or KEY:PERMS@/PREFIX")
            key = match.group("key").strip()
            if _CONTROL_RE.search(key) or "," in key:
                raise ServerError(f"auth entry {number}: the key has a control character or ','")
            methods, words = AuthTable._permissions(number, match.group("perms"))
            prefix = None
            if match.group("prefix") is not None:
                prefix = AuthTable._prefix(number, match.group("prefix"))
            entries.append(_AuthEntry(key.encode("utf-8"), methods, words, prefix))
        if not entries:
            raise ServerError("auth spec has no KEY:PERMS entry")
        return entries

    @staticmethod
    def _prefix(number, text):
        try:
            prefix = tuple(wasmstore.validate_path(text[:-1] if text.endswith("/") else text))
        except wasmstore.InvalidInput as exc:
            raise ServerError(f"auth entry {number}: bad prefix: {exc}") from None
        if not prefix:
            raise ServerError(f"auth entry {number}: a prefix names a directory, as in @/apps/")
        return prefix

    @staticmethod
    def _permissions(number, text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        words = frozenset(name.lower() for name in names if name.lower() in PERMISSIONS)
        methods = [name.upper() for name in names if name.lower() not in PERMISSIONS]
        if "*" in methods:
            if len(methods) > 1:
                raise ServerError(f"auth entry {number}: '*' already allows every method")
            return AuthTable.ALL, words
        unknown = [m for m in methods if m not in KNOWN_METHODS]
        if not names or unknown:
            raise ServerError(f"auth entry {number}: {', '.join(unknown)[:100]!r} is neither '*', "
                              f"an HTTP method nor one of the words {', '.join(PERMISSIONS)}")
        return frozenset(methods), words

    @property
    def enabled(self):
        """True when keys are required."""
        return bool(self.entries)

    def authorize(self, presented, method, permission=None, segments=None):
        """The Access a request gets: HttpError 401 (no or unknown key) or 403 (no entry of
        the key grants the method or `permission`, or the path is out of reach).

        permission: the word the route needs (None: any word whose routes use the method);
        segments: the path the request touches (() = the whole store; None = the handler
        filters what it answers by the Access)."""
        if not self.entries:
            return EVERYTHING
        if not presented:
            raise HttpError(401, "missing key (send it in Wasmstore-Auth)")
        candidate = presented.encode("latin-1", "replace")
        mine = [entry for entry in self.entries if hmac.compare_digest(candidate, entry.key)]
        if not mine:
            raise HttpError(401, "unknown key")
        wanted = "GET" if method == "HEAD" else method
        granting = [entry for entry in mine if entry.grants(wanted, permission)]
        if not granting:
            if permission is None:
                raise HttpError(403, f"key not allowed to use {method}")
            # the route's word, and the method that grants it too: not always the request's
            # (an app request of any method needs run, or POST)
            raise HttpError(403, f"key not allowed here: this route needs {permission} "
                                 f"(or {wanted})")
        prefixes = [entry.prefix for entry in granting]
        access = EVERYTHING if None in prefixes else Access(tuple(prefixes))
        if segments is not None:
            access.require(segments)
        return access

    def check(self, presented, method):
        """Raise HttpError 401 (no or unknown key) or 403 (method not allowed for the key)."""
        self.authorize(presented, method)


def presented_key(headers):
    """The key a request presents: Wasmstore-Auth, a Bearer token or a Basic password."""
    key = headers.get("Wasmstore-Auth")
    if key is None:
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":          # OCI clients: the key is the password
            key = _basic_password(value.strip())
    return key


def _basic_password(value):
    """The password of a Basic credential ("" when malformed; the user name is ignored)."""
    try:
        pair = base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return pair.partition(":")[2]


# ---------------------------------------------------------------------------
# browser safety: which Host names and which Origins the server answers to
# ---------------------------------------------------------------------------

def parse_authority(text):
    """(host, port or None) of a Host header or a URL authority; ValueError if malformed.

    The host comes back lower-case, an IPv6 literal without its brackets."""
    if not text or _CONTROL_RE.search(text) or any(c in text for c in " @/?#\\"):
        raise ValueError(f"expected HOST or HOST:PORT, got {text!r}")
    try:
        url = wasmstore.parse_url("http://" + text, "authority")
    except wasmstore.InvalidInput:
        raise ValueError(f"expected HOST or HOST:PORT, got {text!r}") from None
    return url.host, url.port


def parse_origin(text):
    """(scheme, host, port) of an Origin header value or a --cors entry; None for "null" or
    anything that is not exactly scheme://host[:port] with scheme http or https."""
    if not text or _CONTROL_RE.search(text) or " " in text:
        return None
    scheme, sep, authority = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    try:
        host, port = parse_authority(authority)
    except ValueError:
        return None
    return scheme, host, DEFAULT_PORTS[scheme] if port is None else port


def _ip_literal(host):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def host_name(text):
    """A --allowed-host entry, normalized (lower-case, IPv6 without brackets); ServerError if
    bad."""
    name = text.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if _ip_literal(name) is None and not _HOST_NAME_RE.fullmatch(name):
        raise ServerError(f"expected a host name like wasmstore.example or an IP address "
                          f"(no scheme, no port), got {text!r}")
    return name


class HostAllowList:
    """The names the server answers to (the Host header): the guard against DNS rebinding.

    A page on an attacker's domain can have that name resolve to 127.0.0.1 once it is loaded;
    its script then reaches a loopback server as its own origin, but every request still names
    the attacker's domain in Host. So a server bound to a loopback address answers only to
    loopback names: `localhost`, IPv4 127.0.0.0/8 and ::1, with any port, plus the names given
    with --allowed-host (other Hosts: 421). A server bound elsewhere (a LAN address, 0.0.0.0, ::)
    is reached by names it cannot know: it answers to any Host unless --allowed-host names are
    given, and then to those, `localhost` and IP literals (a rebinding page always presents a
    DNS name, never an address). A request without Host is not checked: browsers always send one.
    """

    def __init__(self, bound_host, names=()):
        self.names = frozenset(host_name(name) for name in names)
        address = _ip_literal(bound_host)
        self.loopback = address is not None and address.is_loopback
        self.any_host = not self.loopback and not self.names

    def allows(self, host):
        """`host`: the Host header's host part as parse_authority returns it."""
        if self.any_host or host == "localhost" or host in self.names:
            return True
        address = _ip_literal(host)
        return address is not None and (address.is_loopback or not self.loopback)


class OriginAllowList:
    """The --cors option: the other origins whose pages may drive the server and read its answers.

    Without it, only same-origin pages may (no CORS headers are sent). `True` or "*" allows
    every origin (answers carry `Access-Control-Allow-Origin: *`). A list, or a comma-separated
    string, of origins like "https://app.example,http://localhost:3000" allows those only, and
    an answer to an allowed origin echoes it in Access-Control-Allow-Origin, with
    `Vary: Origin`. The origin "null" (sandboxed frames, file: pages, some redirects) is
    allowed only when listed, never by "*".
    """

    def __init__(self, spec=None):
        self.any_origin = False
        self.origins = set()              # (scheme, host, port) triples, and "null" if listed
        if spec is True:
            self.any_origin = True
        elif spec:
            entries = spec.split(",") if isinstance(spec, str) else list(spec)
            for entry in (e.strip() for e in entries):
                if entry == "*":
                    self.any_origin = True
                elif entry.lower() == "null":
                    self.origins.add("null")
                elif entry:
                    key = parse_origin(entry.rstrip("/"))
                    if key is None:
                        raise ServerError(f"expected origins like https://app.example or "
                                          f"http://localhost:3000 (or '*'), got {entry!r}")
                    self.origins.add(key)
            if not self.any_origin and not self.origins:
                raise ServerError(f"no origin in {spec!r}")

    @property
    def enabled(self):
        """True when some other origin is allowed (CORS headers are sent)."""
        return self.any_origin or bool(self.origins)

    def __bool__(self):
        return self.enabled

    def allows(self, origin, own_origin=None):
        """May a page of `origin` (an Origin header value) change things or open a watch?
        `own_origin` is the server's (scheme, host, port) as this request reached it."""
        if origin == "null":
            return "null" in self.origins
        key = parse_origin(origin)
        if key is None:
            return False
        return key == own_origin or self.any_origin or key in self.origins

    def reply_headers(self, origin):
        """The CORS response headers for a request with this Origin header (None: none sent)."""
        if self.any_origin:
            return [("Access-Control-Allow-Origin", "*"),
                    ("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)]
        if not self.origins:
            return []
        if origin is not None and self.allows(origin):
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                    ("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)]
        return [("Vary", "Origin")]


# ---------------------------------------------------------------------------
# body readers: bounded views of the connection's input
# ---------------------------------------------------------------------------

CHUNKED = -1                                # body_framing(): a chunked body of unknown length
_HEX_RE = re.compile(rb"[0-9a-fA-F]+\Z")


def body_framing(headers, version):
    """The request body's length (0 when there is none) or CHUNKED; HttpError 400 otherwise.

    Framing that two parties could read differently is refused, and the connection closed,
    because a proxy in front may have read it the other way (request smuggling, RFC 9112
    sections 6.1 and 6.3): more than one Transfer-Encoding field, a coding list other than
    exactly "chunked", Transfer-Encoding with Content-Length or in an HTTP/1.0 request, and
    Content-Length fields that disagree or are not a plain decimal number.
    """
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings is not None:
        if len(codings) > 1:
            raise HttpError(400, "more than one Transfer-Encoding header", close=True)
        if lengths is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding", close=True)
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
        if codings[0].strip().lower() != "chunked":
            raise HttpError(400, f"Transfer-Encoding must be exactly 'chunked', got {codings[0]!r}",
                            close=True)
        return CHUNKED
    if lengths is None:
        return 0
    values = {value.strip() for value in lengths}
    value = values.pop()
    try:
        if values:
            raise wasmstore.InvalidInput("two lengths")
        return wasmstore.parse_number(value, "Content-Length", maximum=MAX_CONTENT_LENGTH)
    except wasmstore.InvalidInput:
        raise HttpError(400, "bad Content-Length: " + ", ".join(repr(v) for v in lengths[:4]),
                        close=True) from None


class LimitedReader(io.RawIOBase):
    """Yields exactly `length` bytes of `source`; a short body is an error, not a silent EOF."""

    def __init__(self, source, length):
        self.source = source
        self.remaining = length
        self.consumed = 0

    def readable(self):
        """Always True: a reader."""
        return True

    def readinto(self, buffer):
        """Read up to len(buffer) bytes of what is left; HttpError 400 if the body ends early."""
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
        """True once the whole body was read."""
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
        """Always True: a reader."""
        return True

    def _line(self):
        line = self.source.readline(1026)
        if not line.endswith(b"\n"):
            raise HttpError(400, "bad chunked encoding", close=True)
        return line

    def _next_chunk(self):
        size_text = self._line().split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not _HEX_RE.match(size_text):
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
        """Read decoded body bytes (0 at the end of the body); HttpError on bad framing."""
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
        """True once the last chunk and the trailers were read."""
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


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------

def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricValues:
    """The numbers one process records, by key: a tuple of a series name and its labels.

    Metrics keeps its counters and gauges here and renders them from snapshot(); a server of
    several worker processes gives each worker a SharedMetricValues instead, which its
    siblings can read."""

    def __init__(self):
        self.numbers = {}

    def add(self, key, delta):
        """Add delta to the number at key (0 when new); the caller holds Metrics.lock."""
        self.numbers[key] = self.numbers.get(key, 0) + delta

    def get(self, key, default=0):
        """The number at key, or default."""
        return self.numbers.get(key, default)

    def snapshot(self):
        """{key: number} of everything recorded."""
        return dict(self.numbers)


def _merge(snapshots):
    """One {key: number} summing several snapshots."""
    total = {}
    for snapshot in snapshots:
        for key, value in snapshot.items():
            total[key] = total.get(key, 0) + value
    return total


def _series(name, labels):
    """name{label="value",...} in the Prometheus text format (no braces without labels)."""
    if not labels:
        return name
    inner = ",".join(f'{label}="{_label(value)}"' for label, value in labels)
    return f"{name}{{{inner}}}"


def _number(value):
    return f"{value:.6f}" if isinstance(value, float) else str(value)


class _Exposition:
    """Builds the Prometheus text exposition: families of samples, HELP and TYPE first."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, text, samples):
        """samples: [(labels, value)], labels a list of (name, value) pairs."""
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{_series(name, labels)} {_number(value)}")

    def histogram(self, name, text, rows):
        """rows: [(labels, per-bucket counts (the last one past every bound), sum)]."""
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, counts, total in rows:
            cumulative = list(itertools.accumulate(counts))
            for bound, count in zip(LATENCY_BUCKETS + ("+Inf",), cumulative):
                self.lines.append(f"{_series(name + '_bucket', labels + [('le', bound)])} {count}")
            self.lines.append(f"{_series(name + '_sum', labels)} {total:.6f}")
            self.lines.append(f"{_series(name + '_count', labels)} {cumulative[-1]}")

    def text(self):
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def _histograms(numbers, name, label_names):
    """[(labels, counts, sum)] of the histogram stored as (name, *labels, bucket) keys."""
    width = len(LATENCY_BUCKETS) + 1
    rows = {}
    for key, value in numbers.items():
        if key[0] == name:
            counts = rows.setdefault(key[1:-1], [0] * width)
            counts[key[-1]] += value
    return [(list(zip(label_names, labels)), counts, numbers.get((name + "_sum",) + labels, 0.0))
            for labels, counts in sorted(rows.items())]


def _samples(numbers, name, label_names):
    """[(labels, value)] of the series stored as (name, *labels) keys, sorted."""
    found = [(key[1:], value) for key, value in numbers.items() if key[0] == name]
    return [(list(zip(label_names, labels)), value) for labels, value in sorted(found)]


class Metrics:
    """Request counters, a latency histogram per route, byte counters, guest runs (by module,
    function and outcome) and gauges, rendered in the Prometheus text format (thread-safe).

    values: where this process records (MetricValues by default); peers: None, or a function
    returning [(worker label, snapshot)] of every worker of the server, this one included:
    render() then sums them and adds per-worker series."""

    def __init__(self, values=None, peers=None):
        self.lock = threading.Lock()
        self.values = MetricValues() if values is None else values
        self.peers = peers
        self.runtime = None                            # a GuestRuntime: its gate and cache gauges
        self._run_series = set()                       # (module, function) pairs recorded
        self._app_series = set()                       # apps recorded
        self._cache_seen = {}                          # compile-cache counts recorded so far

    @property
    def connections(self):
        """Open client connections of this process."""
        return self.values.get(("connections",))

    @property
    def websocket_clients(self):
        """Connected watch clients of this process."""
        return self.values.get(("websocket_clients",))

    @property
    def requests(self):
        """{(route, method, status): count} of this process."""
        return collections.Counter({key[1:]: value for key, value in self.values.snapshot().items()
                                    if key[0] == "http_requests"})

    def observe(self, route, method, status, seconds, bytes_in, bytes_out, app=None):
        """One HTTP request: its route label, method, status, duration and body sizes; app:
        the store path or hash of the stored HTTP app that answered it, if one did."""
        if method not in KNOWN_METHODS:
            method = "OTHER"                           # bounded label set, even under fuzzing
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self.lock:
            add = self.values.add
            add(("http_requests", route, method, status), 1)
            add(("http_duration", route, bucket), 1)
            add(("http_duration_sum", route), seconds)
            add(("bytes_in",), bytes_in)
            add(("bytes_out",), bytes_out)
            if app is not None:
                self._observe_app(app, status, seconds, bucket, bytes_in, bytes_out)

    def observe_run(self, module, function, outcome, seconds, fuel):
        """One call, run or exports of a stored module, by module and function."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self.lock:
            key = (module, function)
            if key not in self._run_series:
                if len(self._run_series) >= MAX_RUN_SERIES:
                    key = ("other", "other")           # bounded series, whatever modules exist
                self._run_series.add(key)
            add = self.values.add
            add(("guest_calls",) + key + (outcome,), 1)
            add(("guest_duration",) + key + (bucket,), 1)
            add(("guest_duration_sum",) + key, seconds)
            add(("guest_fuel",) + key, fuel)

    def _observe_app(self, app, status, seconds, bucket, bytes_in, bytes_out):
        """observe()'s series of the app that answered (the caller holds the lock)."""
        if app not in self._app_series:
            if len(self._app_series) >= MAX_APP_SERIES:
                app = "other"                          # bounded series, whatever apps exist
            self._app_series.add(app)
        add = self.values.add
        add(("app_requests", app, status), 1)
        add(("app_duration", app, bucket), 1)
        add(("app_duration_sum", app), seconds)
        add(("app_bytes_in", app), bytes_in)
        add(("app_bytes_out", app), bytes_out)

    def add_gauge(self, name, delta):
        """Move the gauge `name` (connections, websocket_clients, in_flight) by delta."""
        self.add((name,), delta)

    def add(self, key, delta):
        """Add delta to the number at key (a tuple: a series name and its labels)."""
        with self.lock:
            self.values.add(key, delta)

    def record_cache_stats(self, stats):
        """The compile cache's counts ({"memory_hits", "disk_hits", "compiles"}) of this
        process's kvhost.Host, as cache_stats() gives them (added since the last record, so a
        worker that replaces a dead one continues its counters)."""
        with self.lock:
            for result, count in stats.items():
                self.values.add(("compile_cache", result), count - self._cache_seen.get(result, 0))
                self._cache_seen[result] = count

    def _snapshots(self):
        if self.peers is None:
            with self.lock:
                return [(None, self.values.snapshot())]
        return self.peers()

    def render(self, store=None):
        """The Prometheus text exposition format (version 0.0.4) of the whole server."""
        if self.runtime is not None:
            self.record_cache_stats(self.runtime.runner.host.cache_stats())
        workers = self._snapshots()
        numbers = _merge(snapshot for _, snapshot in workers)
        out = _Exposition()
        self._render_http(out, numbers)
        self._render_runs(out, numbers)
        self._render_apps(out, numbers)
        if self.peers is not None:
            self._render_workers(out, workers)
        if store is not None:
            try:
                out.lines.extend(self._store_gauges(store))
            except wasmstore.StoreError:
                pass                                   # e.g. default branch deleted meanwhile
        return out.text()

    @staticmethod
    def _render_http(out, numbers):
        out.family("wasmstore_http_requests_total", "counter",
                   "HTTP requests by route, method and status.",
                   _samples(numbers, "http_requests", ("route", "method", "status")))
        out.histogram("wasmstore_http_request_duration_seconds",
                      "Time from request line to last byte sent.",
                      _histograms(numbers, "http_duration", ("route",)))
        for name, key, kind, text in (
                ("http_request_body_bytes_total", "bytes_in", "counter",
                 "Request body bytes received."),
                ("http_response_body_bytes_total", "bytes_out", "counter",
                 "Response body bytes sent."),
                ("http_connections", "connections", "gauge", "Open client connections."),
                ("websocket_clients", "websocket_clients", "gauge", "Connected watch clients."),
                ("http_requests_in_flight", "in_flight", "gauge",
                 "Requests being served (this one included).")):
            out.family("wasmstore_" + name, kind, text, [([], numbers.get((key,), 0))])

    def _render_runs(self, out, numbers):
        names = ("module", "function")
        out.family("wasmstore_guest_calls_total", "counter",
                   "Calls and runs of stored modules by module, function and outcome.",
                   _samples(numbers, "guest_calls", names + ("outcome",)))
        out.histogram("wasmstore_guest_call_duration_seconds",
                      "Time a call or run took, queueing included.",
                      _histograms(numbers, "guest_duration", names))
        out.family("wasmstore_guest_fuel_total", "counter",
                   "Fuel (roughly wasm instructions) used by calls and runs.",
                   _samples(numbers, "guest_fuel", names))
        runtime = self.runtime
        if runtime is None:
            return
        out.family("wasmstore_guests_running", "gauge", "Guests running now.",
                   [([], runtime.gate.running)])
        out.family("wasmstore_guests_waiting", "gauge", "Callers waiting for a guest slot.",
                   [([], runtime.gate.waiting)])
        out.family("wasmstore_compile_cache_total", "counter",
                   "Guests found compiled in memory or on disk, or compiled.",
                   [([("result", result)], numbers.get(("compile_cache", result), 0))
                    for result in ("memory_hits", "disk_hits", "compiles")])
        out.family("wasmstore_background_compiles_total", "counter",
                   "Modules compiled after an add, before their first call (or that failed to).",
                   [([("result", result)], numbers.get(("precompiles", result), 0))
                    for result in ("compiled", "failed")])

    @staticmethod
    def _render_apps(out, numbers):
        out.family("wasmstore_app_requests_total", "counter",
                   "Requests answered by stored HTTP apps, by app and status.",
                   _samples(numbers, "app_requests", ("app", "status")))
        out.histogram("wasmstore_app_request_duration_seconds",
                      "Time from an app request's line to its last byte sent.",
                      _histograms(numbers, "app_duration", ("app",)))
        out.family("wasmstore_app_request_body_bytes_total", "counter",
                   "Request body bytes apps read.", _samples(numbers, "app_bytes_in", ("app",)))
        out.family("wasmstore_app_response_body_bytes_total", "counter",
                   "Response body bytes apps sent.", _samples(numbers, "app_bytes_out", ("app",)))

    @staticmethod
    def _render_workers(out, workers):
        serving = [(label, snapshot) for label, snapshot in workers if label != "supervisor"]
        starts = sum(snapshot.get(("worker_starts",), 0) for _, snapshot in workers)
        out.family("wasmstore_workers", "gauge", "Worker processes of the server.",
                   [([], len(serving))])
        out.family("wasmstore_worker_restarts_total", "counter",
                   "Worker processes started to replace one that exited.",
                   [([], max(0, starts - len(serving)))])
        out.family("wasmstore_worker_http_requests_total", "counter",
                   "HTTP requests served by each worker process.",
                   [([("worker", label)], sum(value for key, value in snapshot.items()
                                              if key[0] == "http_requests"))
                    for label, snapshot in serving])
        out.family("wasmstore_worker_http_connections", "gauge",
                   "Open client connections of each worker process.",
                   [([("worker", label)], snapshot.get(("connections",), 0))
                    for label, snapshot in serving])

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


# ---------------------------------------------------------------------------
# watch: one poller thread per watched branch, broadcasting into bounded per-client queues
# ---------------------------------------------------------------------------

class Subscription:
    """A watch client's mailbox. The hub never blocks on it: a full queue drops the client.

    A client whose key reaches only some paths (access) gets only their changes: an event
    about nothing it reaches is not sent at all."""

    def __init__(self, branch, size=WS_QUEUE_SIZE, access=None):
        self.branch = branch
        self.queue = queue.Queue(size)
        self.closed = None            # (code, reason) once the hub wants the client gone
        self.access = access or EVERYTHING

    def offer(self, message, changes=None):
        """Queue one event: its JSON text, and the changes it encodes (for a scoped client)."""
        if self.closed:
            return
        if self.access.scoped and changes is not None:
            reaches = self.access.reaches
            changes = {path: change for path, change in changes.items() if reaches(path)}
            if not changes:
                return
            message = _event_text(changes)
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            self.closed = (1008, "too slow: event queue overflowed")


def _event_text(changes):
    return json.dumps(changes, separators=(",", ":"), ensure_ascii=False)


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
                self.hub.broadcast(self, _event_text(changes), changes)
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

    def subscribe(self, branch=None, access=None):
        """Register a client on `branch` (None = default) that gets the changes `access`
        reaches (default: all); NotFound if the branch does not exist."""
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
            subscription = Subscription(branch, access=access)
            watcher.subscribers.add(subscription)
            return subscription

    def unsubscribe(self, subscription):
        """Remove a client; the branch's watcher stops with its last client."""
        with self.lock:
            watcher = self.watchers.get(subscription.branch)
            if watcher is None:
                return
            watcher.subscribers.discard(subscription)
            if not watcher.subscribers:
                watcher.stop_event.set()
                del self.watchers[subscription.branch]

    def broadcast(self, watcher, message, changes=None):
        """Offer a message (and the changes it encodes) to every client of the watcher's branch."""
        with self.lock:
            subscribers = list(watcher.subscribers)
        for subscription in subscribers:
            subscription.offer(message, changes)

    def end_branch(self, watcher, reason):
        """Close every client of a watcher that ended (e.g. its branch was deleted)."""
        with self.lock:
            if self.watchers.get(watcher.branch) is watcher:
                del self.watchers[watcher.branch]
            subscribers = list(watcher.subscribers)
        for subscription in subscribers:
            subscription.closed = reason

    def close(self, reason=(1001, "server shutting down")):
        """Stop every watcher and ask every client to close with `reason`."""
        with self.lock:
            watchers = list(self.watchers.values())
            self.watchers.clear()
        for watcher in watchers:
            watcher.stop_event.set()
            for subscription in list(watcher.subscribers):
                subscription.closed = reason


# ---------------------------------------------------------------------------
# WebSocket framing (RFC 6455): unmasked server frames, masked client frames
# ---------------------------------------------------------------------------

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def websocket_accept(key):
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
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
    """A client broke RFC 6455: the session closes with `code`."""
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class FrameParser:
    """Incremental parser of client frames: feed bytes, take complete (opcode, payload) frames."""

    def __init__(self, max_payload=WS_MAX_CLIENT_PAYLOAD):
        self.buffer = bytearray()
        self.max_payload = max_payload

    def feed(self, data):
        """Add bytes received from the client."""
        self.buffer += data

    def frames(self):
        """Yield each complete (opcode, unmasked payload) frame buffered so far."""
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
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length,
                                                                                       "big")
        return opcode, data


# ---------------------------------------------------------------------------
# web page
# ---------------------------------------------------------------------------

# GET / for a browser (a request that accepts text/html) serves one page: inline HTML, CSS and
# JavaScript, nothing loaded from anywhere else (its Content-Security-Policy allows only this
# script and style, and requests to this origin). It holds no store data, so it needs no key;
# it reads everything through the API routes, sending the key the tab was given (sessionStorage)
# when the server asks for one. Stable URLs: #/ (modules), #/log, #/module/<path>, each with
# ?branch=NAME for a branch other than the default.

_PAGE_STYLE = r"""
:root { color-scheme: light dark; --line: #8884; --dim: #888; --accent: #3b6fd4; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; display: grid;
       grid-template: "top top" auto "main side" 1fr / 1fr 18rem; min-height: 100vh; }
header { grid-area: top; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap;
         padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
header .brand { font-weight: 700; font-size: 1.1rem; text-decoration: none; color: inherit; }
header nav a { margin-right: .75rem; }
main { grid-area: main; padding: 1rem; min-width: 0; }
aside { grid-area: side; padding: 1rem; border-left: 1px solid var(--line); font-size: 12px; }
aside ol { padding-left: 1rem; margin: 0; }
a { color: var(--accent); }
h1 { font-size: 1.3rem; margin: .2rem 0 .8rem; word-break: break-all; }
h2 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; border-bottom: 1px solid var(--line); }
h3 { font-size: .95rem; margin: .8rem 0 .3rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.dir td { color: var(--dim); font-family: ui-monospace, monospace; padding-top: .6rem; }
td.name { padding-left: 1.5rem; }
td.change { color: var(--dim); }
tr.current { background: #3b6fd41a; }
.badge { margin-left: .4rem; padding: 0 .4rem; border-radius: .6rem; background: var(--accent);
         color: #fff; font-size: 11px; }
code, pre, textarea, input[type=text] { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: #8881; padding: .5rem; overflow: auto; white-space: pre-wrap;
      word-break: break-all; }
pre.error, p.error { color: #c62828; }
.empty, .loading { color: var(--dim); }
label.arg, form label { display: block; margin: .3rem 0; }
textarea { width: 100%; }
button { margin: .3rem .3rem .3rem 0; }
.diff div { margin: .2rem 0; }
#live.on { color: #2e7d32; }
#live.off { color: var(--dim); }
#auth { position: fixed; inset: 0; background: #0008; display: grid; place-items: center; }
#auth[hidden] { display: none; }
#auth form { background: Canvas; color: CanvasText; padding: 1.5rem; border-radius: .5rem;
             min-width: 20rem; }
#auth input { width: 100%; margin: .5rem 0; }
.hint { color: var(--dim); font-size: 12px; }
@media (max-width: 800px) { body { grid-template: "top" auto "main" 1fr "side" auto / 1fr; }
                            aside { border-left: 0; border-top: 1px solid var(--line); } }
"""

_PAGE_SCRIPT = r"""
"use strict";
// The wasmstore web page. Every request below is a route of the documented API; nothing is
// loaded from anywhere else. The DOM is built with textContent only: store data never becomes
// markup.
const API = "/api/v1";
const KEY_ITEM = "wasmstore-key";             // sessionStorage: kept for this tab only
const PAGE = 100;                             // rows asked for per page of log, audit, keys
const state = {branch: null, defaultBranch: null, socket: null, socketBranch: undefined,
               retry: 0, view: 0, refresh: null};
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- the key: asked for once (every request that meets a 401 waits for the same answer) --------

let keyWaiters = null;

function askKey(message) {
  if (keyWaiters === null) {
    keyWaiters = [];
    $("auth-message").textContent = message;
    $("auth").hidden = false;
    $("auth-key").focus();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("auth-key").value;
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("auth-key").value = "";
  $("auth").hidden = true;
  $("forget-key").hidden = false;
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((resolve) => resolve());
  openWatch(true);
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  location.reload();
});

async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.set("Wasmstore-Auth", key);
    if (state.branch) headers.set("Wasmstore-Branch", state.branch);
    const response = await fetch(API + path, {method: options.method || "GET", headers,
                                              body: options.body, cache: "no-store"});
    if (response.status === 401) {
      const text = (await response.text()).trim();
      if (sessionStorage.getItem(KEY_ITEM) !== key) continue;    // a new key came meanwhile
      if (key) sessionStorage.removeItem(KEY_ITEM);
      await askKey(key ? `The server refused the key (${text}): enter another one.`
                       : "This server needs a key.");
      continue;
    }
    if (!response.ok) {
      const text = options.method === "HEAD" ? "" : (await response.text()).trim();
      throw new ApiError(response.status, text || response.statusText);
    }
    return response;
  }
}

const getJSON = async (path) => (await api(path)).json();
const enc = (path) => "/" + path.split("/").filter(Boolean).map(encodeURIComponent).join("/");

// -- formatting -------------------------------------------------------------------------------

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = bytes / 1024, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

const date = (seconds) => new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
const short = (hash) => el("code", {class: "hash", title: hash, text: hash.slice(0, 12)});

function errorBox(error) {
  const status = error instanceof ApiError ? `${error.status}: ` : "";
  return el("p", {class: "error", text: status + error.message});
}

function commitCells(info) {
  if (!info) return [el("td"), el("td"), el("td"), el("td")];
  return [el("td", {}, short(info.hash)), el("td", {text: info.author}),
          el("td", {text: date(info.date)}), el("td", {text: info.message})];
}

// -- navigation: #/ (modules), #/log, #/module/<path>; ?branch=NAME picks a branch ------------

function parseHash() {
  const text = location.hash.slice(1) || "/";
  const cut = text.indexOf("?");
  const route = cut < 0 ? text : text.slice(0, cut);
  return {route, params: new URLSearchParams(cut < 0 ? "" : text.slice(cut + 1))};
}

function href(route) {
  return "#" + route + (state.branch ? "?branch=" + encodeURIComponent(state.branch) : "");
}

const moduleHref = (path) => href("/module" + enc(path));

function modulePath(route) {
  return "/" + route.slice("/module/".length).split("/").filter(Boolean)
    .map(decodeURIComponent).join("/");
}

async function render(quiet) {
  const {route, params} = parseHash();
  const branch = params.get("branch") || null;
  if (branch !== state.branch) {
    state.branch = branch;
    openWatch(true);
  }
  const token = ++state.view;
  const view = $("view");
  if (!quiet) view.replaceChildren(el("p", {class: "loading", text: "Loading…"}));
  state.refresh = null;
  let node;
  try {
    await loadBranches();
    if (route.startsWith("/module/")) node = moduleView(modulePath(route));
    else if (route === "/log") node = await logView();
    else node = await treeView();
  } catch (error) {
    node = errorBox(error);
  }
  if (token === state.view) view.replaceChildren(node);
  document.body.dataset.view = route === "/log" ? "log" : route.startsWith("/module/")
    ? "module" : "tree";
}

window.addEventListener("hashchange", () => render(false));

async function loadBranches() {
  const [branches, current] = await Promise.all([
    getJSON("/branches"), api("/branch").then((response) => response.text())]);
  state.defaultBranch = current.trim();
  const select = $("branch");
  const shown = state.branch || state.defaultBranch;
  select.replaceChildren(...branches.map((name) => el("option", {
    value: name, selected: name === shown,
    text: name === state.defaultBranch ? `${name} (default)` : name})));
}

$("branch").addEventListener("change", (event) => {
  const name = event.target.value;
  state.branch = name === state.defaultBranch ? null : name;
  location.hash = href(parseHash().route);
});

// -- the tree of paths ------------------------------------------------------------------------

async function treeView() {
  const tree = await getJSON("/tree");
  const table = el("table", {id: "tree"}, el("thead", {}, el("tr", {},
    ["Path", "Kind", "Size", "Hash", "Last change"].map((name) => el("th", {text: name})))));
  const body = el("tbody");
  let directory = null;
  for (const [path, entry] of Object.entries(tree)) {
    const cut = path.lastIndexOf("/");
    const parent = path.slice(0, cut + 1);
    if (parent !== directory) {
      directory = parent;
      body.append(el("tr", {class: "dir"}, el("td", {colspan: 5, text: parent})));
    }
    const change = entry.changed;
    body.append(el("tr", {"data-path": path},
      el("td", {class: "name"}, el("a", {href: moduleHref(path), text: path.slice(cut + 1)})),
      el("td", {text: entry.kind}),
      el("td", {class: "num", title: `${entry.size} bytes`, text: size(entry.size)}),
      el("td", {}, short(entry.hash)),
      el("td", {class: "change", text: change
        ? `${date(change.date)} · ${change.author} · ${change.message}` : ""})));
  }
  table.append(body);
  state.refresh = () => render(true);
  const name = state.branch || state.defaultBranch;
  return el("div", {}, el("h1", {text: `Modules on ${name}`}), Object.keys(tree).length
    ? table : el("p", {id: "tree", class: "empty", text: "No modules on this branch yet."}));
}

// -- pages of commits (log, audit) ------------------------------------------------------------

function commitTable(id, route) {
  const body = el("tbody");
  const more = el("button", {type: "button", class: "more", hidden: true, text: "More"});
  const table = el("table", {id}, el("thead", {}, el("tr", {},
    ["Commit", "Author", "Date", "Message"].map((name) => el("th", {text: name})))), body);
  let after = null;
  const load = async () => {
    const separator = route.includes("?") ? "&" : "?";
    const page = await getJSON(`${route}${separator}limit=${PAGE}` +
                               (after ? `&after=${after}` : ""));
    body.append(...page.commits.map((info) => el("tr", {"data-hash": info.hash},
                                                  commitCells(info))));
    after = page.next;
    more.hidden = !after;
  };
  more.addEventListener("click", () => load().catch((error) => more.replaceWith(errorBox(error))));
  return {node: el("div", {}, table, more), load};
}

async function logView() {
  const log = commitTable("log", "/log");
  await log.load();
  state.refresh = () => render(true);
  return el("div", {}, el("h1", {text: `Log of ${state.branch || state.defaultBranch}`}), log.node);
}

// -- one module -------------------------------------------------------------------------------

function section(id, title) {
  const body = el("div", {class: "body"});
  return {node: el("section", {id}, el("h2", {text: title}), body), body};
}

function fill(part, work) {
  part.body.replaceChildren(el("p", {class: "loading", text: "Loading…"}));
  return Promise.resolve().then(work).then((node) => part.body.replaceChildren(node))
    .catch((error) => part.body.replaceChildren(errorBox(error)));
}

function moduleView(path) {
  const parts = {
    versions: section("versions", "Versions"),
    iface: section("interface", "Exports and imports"),
    diff: section("diff", "Diff between versions"),
    call: section("call", "Call a function"),
    run: section("run", "Run as a command"),
    kv: section("kv", "Key-value data"),
    audit: section("audit", "Audit"),
  };
  const head = el("p", {id: "module-head"});
  const exportsOf = getJSON("/exports" + enc(path));
  exportsOf.catch(() => {});
  const history = historyOf(path);
  history.catch(() => {});
  const showVersions = () => fill(parts.versions, async () => versionsTable(await historyOf(path),
                                                                             head));
  fill(parts.versions, async () => versionsTable(await history, head));
  fill(parts.iface, async () => interfaceOf(await exportsOf));
  fill(parts.diff, async () => diffForm(path, await history));
  const showKv = () => fill(parts.kv, async () => kvBrowser(path));
  fill(parts.call, async () => callForm(path, await exportsOf, showKv));
  fill(parts.run, async () => runForm(path, showKv));
  showKv();
  fill(parts.audit, async () => {
    const audit = commitTable("audit-table", "/audit" + enc(path));
    await audit.load();
    return audit.node;
  });
  state.refresh = (changes) => (changes === null || path in changes ? showVersions() : null);
  return el("div", {id: "module", "data-path": path},
    el("p", {}, el("a", {href: href("/"), text: "← all modules"})),
    el("h1", {text: path}), head, Object.values(parts).map((part) => part.node));
}

async function historyOf(path) {
  const [versions, current] = await Promise.all([
    getJSON("/versions" + enc(path)),
    api("/hash" + enc(path)).then((response) => response.text(), () => null)]);
  const wanted = new Set(versions.map(([, commit]) => commit));
  const infos = new Map();
  let after = null;
  do {
    const page = await getJSON("/audit" + enc(path) + "?limit=1000" +
                               (after ? `&after=${after}` : ""));
    page.commits.forEach((info) => infos.set(info.hash, info));
    after = page.next;
  } while (after && [...wanted].some((commit) => !infos.has(commit)));
  return {versions, current: current && current.trim(), infos};
}

function versionsTable(history, head) {
  const {versions, current, infos} = history;
  head.replaceChildren(current ? ["current ", short(current)] : "not on this branch now");
  const rows = versions.map(([hash, commit], index) => el("tr", {
    "data-hash": hash, class: hash === current ? "current" : null},
    el("td", {class: "num", text: index}), commitCells(infos.get(commit) ||
                                                       {hash: commit, author: "", date: 0,
                                                        message: ""}),
    el("td", {}, short(hash), hash === current ? el("span", {class: "badge", text: "current"})
                                               : null)));
  return el("table", {id: "versions-table"}, el("thead", {}, el("tr", {},
    ["#", "Commit", "Author", "Date", "Message", "Hash"].map((name) => el("th", {text: name})))),
    el("tbody", {}, rows.reverse()));
}

function signature(entry) {
  const params = entry.params.map((p) => (p.name === null ? p.type : `${p.name}: ${p.type}`));
  const results = entry.results.length === 0 ? "" : " -> " + (entry.results.length === 1
    ? entry.results[0] : `(${entry.results.join(", ")})`);
  return `${entry.name}(${params.join(", ")})${results}`;
}

const importName = (entry) => (entry.module === undefined ? entry.name
                                                          : `${entry.module} ${entry.name}`);
const importType = (entry) => (entry.type === undefined ? "" : entry.type);

function interfaceOf(described) {
  const list = (id, items) => (items.length ? el("ul", {id}, items)
                                            : el("p", {id, class: "empty", text: "none"}));
  return el("div", {},
    el("p", {text: `${described.kind}, hash `}, short(described.hash)),
    el("h3", {text: "Exports"}),
    list("exports", described.exports.map((entry) => el("li", {}, el("code", {
      text: signature(entry)})))),
    el("h3", {text: "Imports"}),
    list("imports", (described.imports || []).map((entry) => el("li", {}, el("code", {
      text: [importName(entry), importType(entry)].filter(Boolean).join(": ")})))));
}

// -- a diff between two versions: exports and imports added, removed or changed; size ---------

function compareMaps(before, after) {
  const out = {added: [], removed: [], changed: []};
  for (const [name, value] of after) {
    if (!before.has(name)) out.added.push(`${name}: ${value}`);
    else if (before.get(name) !== value) {
      out.changed.push(`${name}: ${before.get(name)} → ${value}`);
    }
  }
  for (const [name, value] of before) if (!after.has(name)) out.removed.push(`${name}: ${value}`);
  return out;
}

async function versionFacts(path, index) {
  const [described, head] = await Promise.all([
    getJSON(`/exports${enc(path)}?version=${index}`),
    api(`/version/${index}${enc(path)}`, {method: "HEAD"})]);
  return {exports: new Map(described.exports.map((e) => [e.name, signature(e)])),
          imports: new Map((described.imports || []).map((e) => [importName(e), importType(e)])),
          size: Number(head.headers.get("Content-Length"))};
}

function diffForm(path, history) {
  const count = history.versions.length;
  if (count < 2) return el("p", {class: "empty", text: "Only one version so far."});
  const pick = (id, chosen) => el("select", {id}, history.versions.map((_, index) =>
    el("option", {value: index, selected: index === chosen, text: `version ${index}`})));
  const from = pick("diff-from", count - 2), to = pick("diff-to", count - 1);
  const out = el("div", {id: "diff-result"});
  const form = el("form", {id: "diff-form"}, from, " → ", to, " ",
                  el("button", {text: "Compare"}), out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    out.replaceChildren(el("p", {class: "loading", text: "Comparing…"}));
    try {
      const [a, b] = await Promise.all([versionFacts(path, from.value),
                                        versionFacts(path, to.value)]);
      const block = (title, diff) => el("div", {class: "diff"}, el("h3", {text: title}),
        ["added", "removed", "changed"].map((kind) => el("div", {class: kind, "data-kind": kind},
          el("strong", {text: `${kind}: `}), diff[kind].length ? diff[kind].join("; ") : "none")));
      const delta = b.size - a.size;
      out.replaceChildren(el("p", {id: "diff-size", text: `size ${a.size} → ${b.size} bytes (` +
                                   (delta >= 0 ? "+" : "") + `${delta})`}),
                          block("Exports", compareMaps(a.exports, b.exports)),
                          block("Imports", compareMaps(a.imports, b.imports)));
    } catch (error) {
      out.replaceChildren(errorBox(error));
    }
  });
  return form;
}

// -- calling a function: a form built from the export's types ---------------------------------

const NUMBER_TYPES = new Set(["i32", "i64", "f32", "f64", "u8", "u16", "u32", "u64", "s8",
                              "s16", "s32", "s64", "float32", "float64"]);
const NUMBER_TEXT = /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/;

// The JSON text of one argument, built as text so that 64-bit integers keep every digit.
function argumentText(type, input) {
  if (type === "bool") return input.checked ? "true" : "false";
  const text = input.value.trim();
  if (type === "string" || type === "char") return JSON.stringify(input.value);
  if (NUMBER_TYPES.has(type)) return NUMBER_TEXT.test(text) ? text : JSON.stringify(text);
  return text || "null";
}

function argumentInput(param, index) {
  const id = `arg-${index}`;
  const label = param.name === null ? `#${index + 1}` : param.name;
  let input;
  if (param.type === "bool") input = el("input", {id, type: "checkbox"});
  else if (NUMBER_TYPES.has(param.type) || param.type === "string" || param.type === "char") {
    input = el("input", {id, type: "text", placeholder: param.type, autocomplete: "off"});
  } else {
    input = el("textarea", {id, rows: 2, placeholder: `${param.type} as JSON`});
  }
  return {input, node: el("label", {class: "arg"}, el("span", {text: `${label}: `}),
                          el("code", {text: param.type}), " ", input)};
}

// A call or a run may change the module's kv data: `ran` shows it again afterwards.
function callForm(path, described, ran) {
  if (!described.exports.length) {
    return el("p", {class: "empty", text: "No function JSON can call."});
  }
  const select = el("select", {id: "call-function"}, described.exports.map((entry) =>
    el("option", {value: entry.name, text: signature(entry)})));
  const fields = el("div", {id: "call-args"});
  const result = el("pre", {id: "call-result"});
  let inputs = [];
  const build = () => {
    const entry = described.exports.find((e) => e.name === select.value);
    inputs = entry.params.map((param, index) => ({param, ...argumentInput(param, index)}));
    fields.replaceChildren(...inputs.map((item) => item.node));
  };
  select.addEventListener("change", build);
  build();
  const form = el("form", {id: "call-form"}, select, fields, el("button", {text: "Call"}), result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = "[" + inputs.map((item) => argumentText(item.param.type, item.input))
      .join(",") + "]";
    result.className = "pending";
    result.textContent = "calling…";
    try {
      const response = await api(`/call/${encodeURIComponent(select.value)}${enc(path)}`,
                                 {method: "POST", body,
                                  headers: {"Content-Type": "application/json"}});
      const text = await response.text();     // class and text change together
      result.className = "ok";
      result.textContent = text;
    } catch (error) {
      result.className = "error";
      result.textContent = error instanceof ApiError ? `${error.status}: ${error.message}`
                                                     : String(error);
    }
    ran();
  });
  return form;
}

// -- running a command: stdin and arguments ---------------------------------------------------

function runForm(path, ran) {
  const args = el("textarea", {id: "run-args", rows: 2, placeholder: "one argument per line"});
  const stdin = el("textarea", {id: "run-stdin", rows: 3, placeholder: "stdin"});
  const out = el("div", {id: "run-result"});
  const form = el("form", {id: "run-form"}, el("label", {}, "Arguments ", args),
                  el("label", {}, "Standard input ", stdin), el("button", {text: "Run"}), out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = args.value.split("\n").filter((line) => line !== "")
      .map((arg) => "arg=" + encodeURIComponent(arg)).join("&");
    out.replaceChildren(el("p", {class: "loading", text: "running…"}));
    try {
      const response = await api(`/run${enc(path)}${query ? "?" + query : ""}`,
                                 {method: "POST", body: stdin.value});
      const stderr = response.headers.get("Wasmstore-Stderr");
      out.replaceChildren(
        el("p", {id: "run-status", text:
          `exit status ${response.headers.get("Wasmstore-Exit-Status")}`}),
        el("h3", {text: "stdout"}), el("pre", {id: "run-stdout", text: await response.text()}),
        el("h3", {text: "stderr"}), el("pre", {id: "run-stderr",
                                                text: stderr ? JSON.parse(stderr) : ""}));
    } catch (error) {
      out.replaceChildren(errorBox(error));
    }
    ran();
  });
  return form;
}

// -- kv data: buckets, keys a page at a time, values as text or hex ---------------------------

function asText(bytes) {
  try {
    const text = new TextDecoder("utf-8", {fatal: true}).decode(bytes);
    return /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/.test(text) ? null : text;
  } catch (error) {
    return null;
  }
}

const asHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0"))
  .join(" ").replace(/((?:\S\S ){16})/g, "$1\n");

function valueView(bytes) {
  const text = asText(bytes);
  const pre = el("pre", {id: "kv-value"});
  let hex = text === null;
  const toggle = el("button", {type: "button", id: "kv-toggle"});
  const show = () => {
    pre.textContent = hex ? asHex(bytes) : text;
    pre.dataset.format = hex ? "hex" : "text";
    toggle.textContent = hex ? "as text" : "as hex";
    toggle.hidden = text === null;
  };
  toggle.addEventListener("click", () => { hex = !hex; show(); });
  show();
  return el("div", {}, el("p", {text: `${bytes.length} bytes `}, toggle), pre);
}

async function kvBrowser(path) {
  const data = await getJSON("/kv" + enc(path));
  const keys = el("div", {id: "kv-keys"});
  const value = el("div", {id: "kv-value-box"});
  const openBucket = async (bucket) => {
    value.replaceChildren();
    const list = el("ul");
    const more = el("button", {type: "button", class: "more", hidden: true, text: "More keys"});
    keys.replaceChildren(el("h3", {text: `Bucket ${bucket}`}), list, more);
    let cursor = null;
    const load = async () => {
      const page = await getJSON(`/kv-keys/${encodeURIComponent(bucket)}${enc(path)}` +
        `?limit=${PAGE}` + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      list.append(...page.keys.map((key) => el("li", {}, el("a", {
        href: "#", "data-key": key, text: key, onclick: (event) => {
          event.preventDefault();
          showValue(bucket, key);
        }}))));
      cursor = page.next;
      more.hidden = !cursor;
    };
    more.addEventListener("click", () => load().catch((error) => keys.append(errorBox(error))));
    await load();
  };
  const showValue = async (bucket, key) => {
    value.replaceChildren(el("p", {class: "loading", text: "Loading…"}));
    try {
      const response = await api(`/kv-value/${encodeURIComponent(bucket)}${enc(path)}?key=` +
                                 encodeURIComponent(key));
      const bytes = new Uint8Array(await response.arrayBuffer());
      value.replaceChildren(el("h3", {text: key}), valueView(bytes));
    } catch (error) {
      value.replaceChildren(errorBox(error));
    }
  };
  const buckets = data.buckets.length ? el("ul", {id: "kv-buckets"}, data.buckets.map((bucket) =>
    el("li", {}, el("a", {href: "#", "data-bucket": bucket, text: bucket, onclick: (event) => {
      event.preventDefault();
      openBucket(bucket).catch((error) => keys.replaceChildren(errorBox(error)));
    }})))) : el("p", {id: "kv-buckets", class: "empty", text: "No data yet."});
  return el("div", {}, el("p", {text: "namespace "}, el("code", {text: data.namespace})),
            buckets, keys, value);
}

// -- live updates over the watch WebSocket ----------------------------------------------------

function setLive(on) {
  const live = $("live");
  live.textContent = on ? "live" : "offline";
  live.className = on ? "on" : "off";
}

function openWatch(force) {
  if (!force && state.socket && state.socketBranch === state.branch) return;
  if (state.socket) {
    state.socket.onclose = null;
    state.socket.close();
  }
  const url = new URL(API + "/watch", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (state.branch) url.searchParams.set("branch", state.branch);
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) url.searchParams.set("auth", key);
  const socket = new WebSocket(url);
  state.socket = socket;
  state.socketBranch = state.branch;
  socket.onopen = () => {
    state.retry = 0;
    setLive(true);
    refreshFor(null);                           // what changed before the watch began
  };
  socket.onmessage = (event) => onChanges(JSON.parse(event.data));
  socket.onclose = () => {
    setLive(false);
    if (state.socket !== socket) return;
    const wait = Math.min(10000, 500 * 2 ** state.retry++);
    setTimeout(() => { if (state.socket === socket) openWatch(true); }, wait);
  };
}

function onChanges(changes) {
  const when = new Date().toISOString().slice(11, 19);
  const items = Object.entries(changes).map(([path, change]) => el("li", {"data-path": path},
    `${when} ${change.action} `, el("a", {href: moduleHref(path), text: path})));
  $("events").prepend(...items);
  while ($("events").children.length > 50) $("events").lastChild.remove();
  refreshFor(changes);
}

// One refresh of the view at a time; changes that arrive meanwhile are gathered for the next
// one, so a burst of commits costs two fetches, not one per commit. null means "anything".
const refresher = {running: false, pending: undefined};

function refreshFor(changes) {
  const before = refresher.pending;
  refresher.pending = before === undefined ? changes
    : before === null || changes === null ? null : {...before, ...changes};
  if (!refresher.running) runRefreshes();
}

async function runRefreshes() {
  refresher.running = true;
  while (refresher.pending !== undefined) {
    const changes = refresher.pending;
    refresher.pending = undefined;
    if (state.refresh) await Promise.resolve(state.refresh(changes)).catch(() => {});
  }
  refresher.running = false;
}

if (sessionStorage.getItem(KEY_ITEM)) $("forget-key").hidden = false;
render(false).then(() => openWatch(false));
"""

_PAGE_BODY = """
<header>
  <a class="brand" href="#/">wasmstore</a>
  <nav><a id="nav-tree" href="#/">Modules</a><a id="nav-log" href="#/log">Log</a></nav>
  <label>Branch <select id="branch"></select></label>
  <span id="live" class="off">offline</span>
  <button id="forget-key" type="button" hidden>Forget the key</button>
</header>
<main id="view"><p class="loading">Loading…</p></main>
<aside><h2>Live changes</h2><ol id="events"></ol></aside>
<div id="auth" hidden>
  <form id="auth-form">
    <h2>Key</h2>
    <p id="auth-message"></p>
    <input id="auth-key" type="password" autocomplete="off" aria-label="key">
    <button>Use this key</button>
    <p class="hint">Kept for this tab only, until it closes.</p>
  </form>
</div>
"""


def _csp_source(text):
    """The CSP hash source of an inline script or style."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


PAGE_CSP = ("default-src 'none'; script-src " + _csp_source(_PAGE_SCRIPT) + "; style-src " +
            _csp_source(_PAGE_STYLE) + "; connect-src 'self'; img-src data:; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
PAGE_HTML = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
             '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
             '<title>wasmstore</title><link rel="icon" href="data:,">\n'
             f"<style>{_PAGE_STYLE}</style></head>\n<body>{_PAGE_BODY}"
             f"<script>{_PAGE_SCRIPT}</script></body></html>\n").encode("utf-8")


def wants_page(method, segments, headers):
    """True for a browser's request of the page: GET or HEAD of / accepting text/html (API
    clients asking / for anything else keep their answer)."""
    return not segments and method in ("GET", "HEAD") and \
        "text/html" in (headers.get("Accept") or "").lower()


def page_reply():
    """The web page, with headers that keep it to itself (CSP, no framing, no sniffing)."""
    return Reply(200, [("Content-Type", "text/html; charset=utf-8"),
                       ("Content-Security-Policy", PAGE_CSP), ("Cache-Control", "no-cache"),
                       ("Vary", "Accept"), ("X-Content-Type-Options", "nosniff"),
                       ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")],
                 PAGE_HTML)


# ---------------------------------------------------------------------------
# connection handling
# ---------------------------------------------------------------------------

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
        """Append one field (repeats are kept, in order)."""
        self.items_.append((name, value))
        self.index.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        """The first value of a field (case-insensitive name), or default."""
        values = self.index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        """Every value of a field, in order, or default."""
        values = self.index.get(name.lower())
        return list(values) if values else default

    def items(self):
        """Every (name, value) pair, in order."""
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


def _log_value(value):
    """A value for the access log: no spaces, quotes or control characters (paths come from
    users)."""
    text = str(value).encode("unicode_escape").decode("ascii")
    return text.replace(" ", "\\x20").replace('"', '\\"')[:300]


class WasmstoreHandler(http.server.BaseHTTPRequestHandler):
    """One connection: parses requests, authorizes, routes, and writes replies."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"   # so that early errors still get a status line
    server_version = "wasmstore/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True        # else keep-alive replies stall ~40 ms (Nagle + ACKs)

    # -- connection lifecycle ----------------------------------------------------------------------

    def setup(self):
        """Wrap the socket: the TLS handshake (in this thread) and the deadline reader."""
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
        self._allowed_host = ("", None)              # the last allowed Host text and its authority
        server.metrics.add_gauge("connections", 1)

    def finish(self):
        """Close the connection (and the TLS socket) and update the gauge."""
        self.server.metrics.add_gauge("connections", -1)
        try:
            super().finish()
        except OSError:
            pass
        if self._tls_socket is not None:
            # socketserver closes the raw socket it accepted, which wrap_socket detached.
            self._tls_socket.close()

    def handle_one_request(self):
        """Read one request line and serve the request; errors become replies."""
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
        self._call = None
        self._body_done = False
        self._reply_started = False
        self._expect_continue = False
        self._framing = 0
        self._error_reply = error_reply
        self._app = None

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
        self._framing = body_framing(self.headers, version)
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
        """Remember Expect: 100-continue; it is answered once auth and size pass."""
        self._expect_continue = True               # answered only once auth and size are checked
        return True

    # -- request processing ------------------------------------------------------------------------

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
            self.server.log_text(f"error in {self.command} {self._safe_path()}:\n"
                                 + traceback.format_exc())
        elif status >= 500:                         # known failure (corrupt object): one line
            self.server.log_text(f"error in {self.command} {self._safe_path()}: {one_line(exc)}")
        return self._error_reply(exc)

    def _dispatch(self, method):
        server = self.server
        app = self._app_request()
        if app is not None:
            return self._serve_app(*app)
        if not _METHOD_RE.match(method or "") or method not in KNOWN_METHODS:
            raise HttpError(501, "unsupported method", close=True)
        segments, query = parse_target(self.path)
        self._check_request_source(method)
        if segments[:1] == OCI_PREFIX:
            self._error_reply = oci_error_reply     # OCI clients read JSON error codes
        elif segments[:1] == WESS_PREFIX:
            self._error_reply = wess_error_reply    # Wess clients read {"message": ...}
        if method == "OPTIONS" and server.cors.enabled:
            self._route_label = "preflight"
            return self._preflight()
        if wants_page(method, segments, self.headers):
            self._route_label = "/"
            self._consume_body(upload=False)
            return page_reply()
        if segments == ("metrics",):
            self._route_label = "/metrics"
            server.auth.authorize(presented_key(self.headers), method, "read", ())   # names paths
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "method not allowed", headers=[("Allow", "GET, HEAD")])
            self._consume_body(upload=False)
            reply = Reply(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                          server.metrics.render(server.store))
            return reply
        try:
            route, params, rest = match_route(method, segments)
        except HttpError:
            self._route_label = "unmatched"
            server.auth.check(presented_key(self.headers), method)   # no probing without a key
            raise
        self._route_label = route.label
        access = EVERYTHING
        if server.auth.enabled:
            key = presented_key(self.headers)
            if key is None and route.websocket:
                key = query.get("auth")             # browsers cannot set headers on a WebSocket
            access = server.auth.authorize(key, method, route.permission,
                                           route.reach(tuple(rest.split("/")) if rest else ()))
        call = Call(params, rest, branch=self._header("Wasmstore-Branch"),
                    author=self._header("Wasmstore-Author"), headers=self.headers,
                    max_body=server.max_body, locator=server.locate_cache, query=query,
                    runtime=server.runtime, access=access)
        self._call = call
        if route.websocket:
            call.branch = call.branch or query.get("branch") or None
            return self._serve_watch(call)
        reads_body = route.upload or route.body
        body = self._consume_body(upload=reads_body, required=route.upload)
        try:
            return route.handler(server.store, call, body)
        finally:
            if reads_body and body is not None:
                self._bytes_in += body.consumed
                self._body_done = body.exhausted

    def _check_request_source(self, method):
        """Refuse what a web page could make its visitor's browser send against their will:
        a Host this server does not answer to (421: DNS rebinding, see HostAllowList), and a
        state-changing request (any method but GET, HEAD, OPTIONS) or a WebSocket upgrade whose
        Origin is neither this server's own origin nor one --cors allows (403: cross-site
        requests and watches, see OriginAllowList). Requests without Origin (curl, the CLI,
        the Python and Node clients) are not affected by the second check."""
        server = self.server
        authority = self._addressed_authority()
        origins = self.headers.get_all("Origin")
        if origins is None or (method in SAFE_METHODS and not self._is_websocket_upgrade()):
            return
        scheme = "https" if server.ssl_context is not None else "http"
        own = None if authority is None else \
            (scheme, authority[0], authority[1] or DEFAULT_PORTS[scheme])
        if len(origins) != 1 or not server.cors.allows(origins[0], own):
            self._route_label = "refused"
            raise HttpError(403, f"request from the origin {', '.join(origins)!r} refused: "
                                 "not this server's origin nor one --cors allows")

    def _addressed_authority(self):
        """(host, port or None) the client addressed: the absolute-form target's authority,
        else the Host header; None without either. HttpError 400 when malformed or repeated,
        421 when the server does not answer to that host. The connection's last allowed Host
        is remembered: keep-alive clients repeat theirs."""
        absolute = absolute_form(self.path)
        if absolute is not None:
            text = absolute.netloc
        else:
            hosts = self.headers.get_all("Host") or [""]
            if len(hosts) > 1:
                raise HttpError(400, "more than one Host header", close=True)
            text = hosts[0]
        if not text:
            return None
        if text == self._allowed_host[0]:
            return self._allowed_host[1]
        try:
            authority = parse_authority(text)
        except ValueError:
            raise HttpError(400, f"bad Host {text!r}", close=True) from None
        if not self.server.allowed_hosts.allows(authority[0]):
            self._route_label = "refused"
            raise HttpError(421, f"this server does not answer to the host {authority[0]!r} "
                                 "(see --allowed-host)", close=True)
        self._allowed_host = (text, authority)
        return authority

    def _is_websocket_upgrade(self):
        return "websocket" in (self.headers.get("Upgrade") or "").lower()

    def _header(self, name):
        """A Wasmstore-* header as text: clients send UTF-8 bytes, which arrive latin-1-decoded."""
        value = self.headers.get(name)
        if value is None or value == "":
            return None
        try:
            return value.encode("latin-1").decode("utf-8").strip()
        except UnicodeError:
            return value.strip()

    def _consume_body(self, upload, required=True):
        """Return a bounded body reader for uploads (None: no body, when not `required`); read
        and drop any body elsewhere."""
        length = self._framing                      # checked with the headers: body_framing()
        reader = None
        limit = self.server.max_body if upload else MAX_DISCARDED_BODY
        if length == CHUNKED:
            reader = ChunkedReader(self.rfile, limit)
        elif "Content-Length" in self.headers:
            if length > limit:
                message = (f"request body of {length} bytes is over the limit of {limit} bytes"
                           if upload else "this route takes no request body")
                raise HttpError(413, message, close=True)
            reader = LimitedReader(self.rfile, length)
        elif upload and required:
            raise HttpError(411, "Content-Length required", close=True)
        elif upload:
            self._body_done = True
            return None
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
        return not self._body_done and self._framing != 0

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

    # -- HTTP apps -------------------------------------------------------------------------------

    def _app_request(self):
        """What an app request needs, when an app answers this request's path (else None):
        (route label, AppSelector, raw segments below the app's prefix or None for the app
        routes' store-path walk, query suffix). Every path of a one-app server is its app's;
        on the API server, mounts take what the API does not use, and the app routes theirs."""
        apps = self.server.apps
        if apps.serve is not None:
            raw, query = split_app_target(self.path)
            return "app", apps.serve, raw, query
        path = self.path
        if not apps.mounts and not path.startswith("/api/v1/app"):
            return None                             # the API's hot path: nothing to split
        raw, query = split_app_target(path)
        head = [_decoded_or_none(part) for part in raw[:3]]
        if head[:1] in (["api"], ["v2"], ["metrics"]):
            if head[:2] != ["api", "v1"] or len(head) < 3 or head[2] not in APP_ROUTES:
                return None
            branch = self._header("Wasmstore-Branch")
            if head[2] == "app":
                return "/api/v1/app/*", AppSelector(None, branch), raw[3:], query
            if len(raw) < 4 or not raw[3]:
                raise HttpError(404, "no such route: /api/v1/app-at/REF/PATH")
            return "/api/v1/app-at/:p/*", parse_app_ref(decode_segment(raw[3]), branch), \
                raw[4:], query
        found = apps.match(raw)
        if found is None:
            return None
        mount, used = found
        return "mount:" + mount.label, AppSelector(mount.path), raw[used:], query

    def _serve_app(self, label, selector, raw, query):
        """Run one request through a stored app; its response is streamed by AppResponse."""
        server = self.server
        method = self.command
        self._error_reply = app_error_reply
        self._route_label = label
        if not _APP_METHOD_RE.match(method or ""):
            raise HttpError(400, "malformed method", close=True)
        if server.apps.serve is None:               # an app run by a request to the API server
            self._check_request_source(method)
            if method == "OPTIONS" and server.cors.enabled:
                self._route_label = "preflight"
                return self._preflight()
        else:
            self._addressed_authority()             # the Host check (DNS rebinding) applies
        wanted = _store_segments(raw) if selector.path is None else \
            tuple(wasmstore.validate_path(selector.path))
        # running an app is running code: the run permission (or POST), for the path it is at
        # (for the app routes: the URL's path, checked before the store is read)
        access = server.auth.authorize(presented_key(self.headers), "POST", "run", wanted)
        runtime = _runtime(self._call_for_app(selector, access))
        body = self._app_body()
        target, below = self._app_target(runtime, selector, raw, wanted)
        access.require(tuple(wasmstore.validate_path(self._call.path)))
        request = kvhost.HttpRequest(method, "https" if server.ssl_context else "http",
                                     self._app_authority(), app_path_with_query(below, query),
                                     self._app_headers(), body)
        sink = AppResponse(self, head_only=(method == "HEAD"), request_body=body)
        self._app = (target.path or target.digest, sink, body)

        def work(resolved, stats):
            return runtime.runner.handle_http(resolved, request, sink, stats=stats)
        error = None
        try:
            runtime.execute(self._call, APP_FUNCTION, None, work, resolve=lambda: target)
        except Exception as exc:                    # the guest's, the host's or the request's
            error = exc
        sent = self._send_held(sink)                # out of the slot: see AppResponse
        if sink.failure is None and sink.finished:
            error = sent                            # answered in full (whatever failed after)
        else:                                       # the root cause first: the body, framing
            error = body.error or sink.failure or error or _unfinished(sink)
        self._bytes_in += body.consumed
        self._bytes_out += sink.bytes_out
        self._body_done = body.exhausted
        if error is None:
            if body.error is not None:
                self.close_connection = True        # the rest of the body cannot be trusted
            else:
                self._after_app_body(body)
            return None
        self.close_connection = True
        if sink.sent:                               # too late for an error reply: cut it short
            self.server.log_text(f"app {self._safe_path()}: {one_line(error)} (connection closed)")
            return None
        raise error

    def _send_held(self, sink):
        """Send the app's response held since the guest finished it whole, if any (the guest's
        run slot is given back by now); the error when the client is gone, else None."""
        try:
            sink.send_held()
        except ConnectionError as exc:
            return exc
        return None

    def _call_for_app(self, selector, access):
        self._call = Call((), selector.path or "", branch=selector.branch, headers=self.headers,
                          max_body=self.server.max_body, runtime=self.server.runtime,
                          access=access)
        return self._call

    def _app_target(self, runtime, selector, raw, segments):
        """(kvhost Target, raw segments below the app): the selector's path, or for the app
        routes the shortest prefix of the URL path (`segments`, decoded) naming a module."""
        runner = runtime.runner
        if selector.path is not None:
            target = runner.resolve(selector.path, branch=selector.branch,
                                    version=selector.version, commit=selector.commit)
            below = raw
        else:
            target, used = runner.resolve_prefix(segments, branch=selector.branch,
                                                 version=selector.version, commit=selector.commit)
            below = raw[used:]
        self._call.path = target.path or target.digest
        return target, below

    def _app_authority(self):
        """The authority the client addressed (absolute-form target or Host), else the server's."""
        absolute = absolute_form(self.path)
        if absolute is not None:
            return absolute.netloc
        host = self.headers.get("Host")
        if host:
            return host
        address = self.server.server_address[0]
        host = f"[{address}]" if ":" in address else address
        return f"{host}:{self.server.port}"

    def _app_headers(self):
        """The request's fields as the guest gets them: names in lower case, values as bytes,
        in order with repeats; without connection fields and without the key that reached the
        server (Wasmstore-Auth, or the Authorization that carried it): a guest never sees it."""
        named = {token.strip().lower() for value in self.headers.get_all("Connection") or ()
                 for token in value.split(",")}
        hidden = CONNECTION_FIELDS | named | {"wasmstore-auth"}
        if self.server.auth.enabled and "Wasmstore-Auth" not in self.headers:
            hidden = hidden | {"authorization"}
        return [(name.lower(), value.encode("latin-1")) for name, value in self.headers.items()
                if name.lower() not in hidden]

    def _app_body(self):
        """The AppRequestBody of this request: bounded by --max-body, 413 before the guest
        starts for a Content-Length over it."""
        length = self._framing
        limit = self.server.max_body
        source = _OneReceive(self.rfile)
        if length == CHUNKED:
            reader = ChunkedReader(source, limit)
        elif length:
            if length > limit:
                raise HttpError(413, f"request body of {length} bytes is over the limit of "
                                     f"{limit} bytes", close=True)
            reader = LimitedReader(source, length)
        else:
            self._body_done = True
            return AppRequestBody(None)
        on_first_read = self._send_continue if self._expect_continue else None
        return AppRequestBody(reader, on_first_read)

    def _send_continue(self):
        self._expect_continue = False
        if self._reply_started:
            return              # the final head is out (the guest answered before reading)
        self._reader.arm(self.timeout)
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _after_app_body(self, body):
        """Keep the connection for the next request only if the body was read to its end (or
        what is left of it, at most MAX_DISCARDED_BODY bytes, can be read and dropped now)."""
        if body.exhausted:
            return
        if not self._expect_continue and (body.remaining or 0) <= MAX_DISCARDED_BODY:
            try:
                self._bytes_in += drain(body._reader, MAX_DISCARDED_BODY)
                self._body_done = True
                return
            except (ServerError, OSError):
                pass
        self.close_connection = True

    def _keeps_unread_body(self, body):
        remaining = body.remaining
        return (not self._expect_continue and remaining is not None
                and remaining <= MAX_DISCARDED_BODY)

    def app_connection_field(self, final):
        """The Connection field of an app's response head (b"" when none is needed). A request
        body the guest has not read to its end lets the connection stay only if the rest is
        small enough to read and drop (_after_app_body): for a response sent whole (final) that
        is known now; for one sent while the guest runs, only at its end (the guest may still
        read it all), and then the connection may close without having said so."""
        app = self._app
        if final and app is not None and not app[2].exhausted and \
                not self._keeps_unread_body(app[2]):
            self.close_connection = True            # unread body bytes would be read as a request
        if self.server.draining:
            self.close_connection = True
        if self.close_connection:
            return b"Connection: close\r\n"
        if self.request_version == "HTTP/1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def app_reply_started(self, status):
        """The app's response head is out or held to be sent: no error reply can follow."""
        self._reply_started = True
        self._status = status

    def send_app_bytes(self, data):
        """Send part of an app's response (the head first), within the connection timeout."""
        if not self._reply_started:
            self.app_reply_started(self._app[1].status)
        self._reader.arm(self.timeout)
        self.connection.sendall(data)

    # -- replies -----------------------------------------------------------------------------------

    def _send_reply(self, reply, head_only=False):
        """Write status, headers (always Content-Length) and the body in as few sends as
        possible."""
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
            if self.server.cors.enabled:
                for name, value in self.server.cors.reply_headers(self.headers.get("Origin")):
                    lines.append(f"{name}: {value}")
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
                chunk = os.pread(body.fd, min(256 * 1024, body.size - sent), body.start + sent)
                if not chunk:
                    break
                sock.sendall(chunk)
                sent += len(chunk)
            return sent
        # socket.sendfile() builds a selector per call; the socket is non-blocking (it has a
        # timeout), so loop on os.sendfile and wait for room only when the kernel says so.
        out, offset, size = sock.fileno(), body.start, body.start + body.size
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
        return offset - body.start

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
        """The Date header's value (formatted once per second)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        cached = WasmstoreHandler._date_cache
        if cached[0] != now:                       # formatting costs more than the lookup
            cached = WasmstoreHandler._date_cache = (now, super().date_time_string(now))
        return cached[1]

    def log_request(self, code="-", size="-"):
        """Unused: _account() writes one access-log line per request."""
        pass                                       # one access-log line per request: _account()

    def log_message(self, format, *args):
        """http.server's diagnostics go to the server's log."""
        self.server.log_text(format % args)

    def _safe_path(self):
        """The request path for logs: no query (it may hold a key), control chars escaped."""
        path = (self.path or "").split("?", 1)[0][:2048]
        return path.encode("unicode_escape").decode("ascii").replace('"', '\\"')

    def _account(self):
        elapsed = time.monotonic() - self._started
        status = self._status or 0
        method = self.command or "-"
        self.server.metrics.observe(self._route_label, method, status, elapsed, self._bytes_in,
                                    self._bytes_out, None if self._app is None else self._app[0])
        if not self.server.quiet:
            method_text = method if _METHOD_RE.match(method) else "-"
            extra = "" if self._call is None else "".join(
                f" {name}={_log_value(value)}" for name, value in self._call.log.items())
            self.server.log_text(f'{self.client_address[0]} "{method_text} {self._safe_path()}" '
                                 f"{status} {self._bytes_out} {elapsed * 1000:.1f}ms{extra}")

    # -- WebSocket watch ---------------------------------------------------------------------------

    def _serve_watch(self, call):
        headers = self.headers
        upgrade = "upgrade" in (headers.get("Connection") or "").lower()
        if not self._is_websocket_upgrade() or not upgrade:
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
        limits = self.server.limits
        if not limits.become_watch():
            raise HttpError(503, f"too many watch sessions (the limit is {limits.max_watches}); "
                                 "retry later",
                            headers=[("Retry-After", "1")])
        self.close_connection = True                # it holds a watch slot: it ends with the watch
        subscription = self.server.hub.subscribe(call.branch, call.access)  # 404 before upgrade
        try:
            self._status = 101
            self._reply_started = True
            self._reader.arm(self.timeout)
            self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n"
                              ).encode("ascii"))
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
        reader.set_deadline(None)                   # a session lasts while the client answers pings
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


# ---------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------

class ConnectionLimits:
    """The threads clients may hold, in two pools: ordinary connections and watch sessions.

    An accepted connection takes an ordinary slot (none left: 503 at once, before any thread
    starts). A connection that upgrades to a WebSocket watch moves to the watch pool for the
    rest of its life (full: the upgrade is refused with 503 and Retry-After, the connection
    keeps its ordinary slot), so watchers, which may idle for hours, never hold a slot an
    ordinary request needs. The pool each connection holds is kept per thread: one thread
    serves a connection from accept to close. Both bound the whole server: in a server of
    several workers, `pools` gives the two shared SlotPools.
    """

    def __init__(self, max_connections=DEFAULT_MAX_CONNECTIONS, max_watches=DEFAULT_MAX_WATCHES,
                 pools=None):
        for name, value in (("max_connections", max_connections), ("max_watches", max_watches)):
            if not isinstance(value, int) or value < 1:
                raise ServerError(f"{name} must be an integer >= 1, got {value!r}")
        self.max_connections = max_connections
        self.max_watches = max_watches
        if pools is None:
            pools = (SlotPool(max_connections), SlotPool(max_watches))
        self._connections, self._watches = pools
        self._held = threading.local()

    def busier_than_another(self):
        """True if another worker of the server holds fewer ordinary connections than this."""
        return self._connections.busier_than_another()

    def admit(self):
        """Take an ordinary slot for a new connection (accept loop); False when none is left."""
        return self._connections.acquire()

    def unadmit(self):
        """Give back a slot taken by admit() for a connection that never got its thread."""
        self._connections.release()

    @contextlib.contextmanager
    def serving(self):
        """Wraps a connection's thread; releases whichever slot the connection holds at its end."""
        self._held.pool = self._connections
        try:
            yield
        finally:
            pool, self._held.pool = self._held.pool, None
            pool.release()

    def become_watch(self):
        """Move the calling connection to the watch pool; False (nothing changes) when it is
        full."""
        if not self._watches.acquire():
            return False
        self._held.pool.release()
        self._held.pool = self._watches
        return True


class WasmstoreServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer serving one Store, with graceful shutdown, a connection cap and a
    separate cap for watch sessions (see ConnectionLimits), and Host/Origin checks.

    listener: a bound, listening socket to serve instead of binding (host and port are then
    unused); worker: the WorkerContext of one process of a server of several (see the worker
    processes section), which shares the bounds and metrics with its siblings."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, store, host=DEFAULT_HOST, port=DEFAULT_PORT, *, auth=None, tls=None,
                 cors=False, max_body=DEFAULT_MAX_BODY, quiet=False, timeout=DEFAULT_TIMEOUT,
                 max_connections=DEFAULT_MAX_CONNECTIONS, max_watches=DEFAULT_MAX_WATCHES,
                 allowed_hosts=(), log=None, run=None, listener=None, worker=None, apps=(),
                 serve=None):
        if isinstance(store, (str, os.PathLike)):
            store = wasmstore.Store(store)
        if int(max_body) < 0:
            raise ServerError(f"max_body must be >= 0, got {max_body!r}")
        if not float(timeout) > 0:
            raise ServerError(f"timeout must be > 0, got {timeout!r}")
        self.store = store
        self.auth = auth if isinstance(auth, AuthTable) else AuthTable(auth)
        self.ssl_context = self._ssl_context(tls)
        self.cors = cors if isinstance(cors, OriginAllowList) else OriginAllowList(cors)
        allowed_names = [host_name(name) for name in allowed_hosts]    # checked before binding
        self.apps = AppTable([mount if isinstance(mount, AppMount) else parse_app_mount(mount)
                              for mount in apps],
                             AppSelector(serve) if isinstance(serve, str) else serve)
        self.max_body = int(max_body)
        self.quiet = bool(quiet)
        self.request_timeout = float(timeout)
        self.worker = worker
        self.metrics = Metrics() if worker is None else worker.metrics()
        self._log = log or sys.stderr
        self._log_lock = threading.Lock()
        self.hub = WatchHub(store, log=self.log_text)
        self.locate_cache = LocateCache(store)
        self.draining = False
        self.metrics_server = None                 # a MetricsServer, once serve_metrics()
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        pools = None if worker is None else (worker.pool("connections"), worker.pool("watches"))
        self.limits = ConnectionLimits(max_connections, max_watches, pools)
        self.runtime = make_runtime(store, self.metrics, worker=worker, log=self.log_text,
                                    **(run or {}))
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), WasmstoreHandler, bind_and_activate=listener is None)
        if listener is not None:
            self._adopt(listener)
        self.allowed_hosts = HostAllowList(self.server_address[0], allowed_names)

    def _adopt(self, listener):
        """Serve a socket bound and listening already (shared by sibling workers: accepting
        never blocks, a connection a sibling took first is no error)."""
        self.socket.close()
        self.socket = listener
        self.address_family = listener.family
        self.server_address = listener.getsockname()
        self.server_name, self.server_port = self.server_address[:2]
        listener.setblocking(False)

    def get_request(self):
        """Accept a connection; it is blocking whatever the listening socket is (on BSD and
        macOS an accepted socket inherits the listener's O_NONBLOCK). Every worker is woken
        by a new connection and the first to accept gets it, so a worker serving more
        connections than a sibling lets that sibling try first: keep-alive clients connect
        once, and without this a burst of them could all land on one worker."""
        if self.worker is not None and self.limits.busier_than_another():
            time.sleep(ACCEPT_DEFER_SECONDS)
        request, address = self.socket.accept()
        request.setblocking(True)
        return request, address

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
        """The port the server listens on (the real one when bound to port 0)."""
        return self.server_address[1]

    @property
    def url(self):
        """http(s)://host:port of the server."""
        host = self.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup): not needed here.
        """Bind without http.server's FQDN lookup (a DNS query at every start)."""
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def log_text(self, text):
        """Write one line (or a traceback) to the server's log."""
        with self._log_lock:
            try:
                self._log.write(text.rstrip("\n") + "\n")
                self._log.flush()
            except (OSError, ValueError):
                pass

    # -- connection cap ----------------------------------------------------------------------------

    def process_request(self, request, client_address):
        """Admit the connection (503 when the cap is reached) and start its thread."""
        if self.draining or not self.limits.admit():
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.limits.unadmit()
            raise

    def process_request_thread(self, request, client_address):
        """Serve one connection in its thread, holding its slot."""
        with self.limits.serving():
            super().process_request_thread(request, client_address)

    def _refuse(self, request):
        try:
            if self.ssl_context is None:
                request.settimeout(0.5)
                body = b"server busy, retry later\n"
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        """Log an unexpected error of a connection (not resets or failed handshakes)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            return                     # failed TLS handshakes, resets: the client's problem
        self.log_text("unexpected error on a connection:\n" + traceback.format_exc())

    # -- graceful shutdown -------------------------------------------------------------------------

    @property
    def in_flight(self):
        """Requests this process is serving now."""
        return self._inflight

    def request_started(self):
        """A request line was read: it counts as in flight until request_finished()."""
        with self._inflight_cond:
            self._inflight += 1
        self.metrics.add_gauge("in_flight", 1)

    def request_finished(self):
        """The request's last byte was sent (or it failed): graceful_shutdown may go on."""
        self.metrics.add_gauge("in_flight", -1)
        with self._inflight_cond:
            self._inflight -= 1
            if self.draining:                     # graceful_shutdown waits (it sets draining first)
                self._inflight_cond.notify_all()

    def serve_forever(self, poll_interval=0.5):
        """Accept connections until shutdown(); graceful_shutdown() calls that."""
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
        if self.runtime is not None:
            self.runtime.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()        # scraped until the last request is done
            self.metrics_server.server_close()
        return True

    def serve_metrics(self, listener):
        """Serve GET /metrics on the listening socket `listener` too, from a thread of its own
        (see MetricsServer), until graceful_shutdown()."""
        self.metrics_server = MetricsServer(self, listener=listener)
        threading.Thread(target=self.metrics_server.serve_forever, name="wasmstore-metrics",
                         daemon=True).start()

    def preload_app(self):
        """Find and compile the one app of a --serve server before it takes requests: a path
        that holds nothing, or a component that cannot be run, is an error at startup."""
        if self.runtime is None:
            raise ServerError("serving an app needs kvhost.py next to http_server.py and the "
                              "wasmtime package")
        app = self.apps.serve
        runner = self.runtime.runner
        guest = self.runtime.load(runner.resolve(app.path, branch=app.branch,
                                                 version=app.version, commit=app.commit))
        runner.host.check_http_handler(guest)

    def server_close(self):
        """Close the listening socket (and, unless draining, the guests' processes)."""
        super().server_close()
        if self.runtime is not None and not self.draining:
            self.runtime.close()          # stops the guests' worker processes


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """GET /metrics of the server a MetricsServer reports on; nothing else."""

    protocol_version = "HTTP/1.1"
    server_version = "wasmstore/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True

    def do_GET(self):
        """The metrics (GET and HEAD), 404 for any other path, 421 for a Host not answered to."""
        host = (self.headers.get("Host") or "").strip()
        try:
            allowed = not host or self.server.allowed_hosts.allows(parse_authority(host)[0])
        except ValueError:
            allowed = False
        if not allowed:
            status, body, kind = 421, b"this server does not answer to that host\n", TEXT_TYPE
        elif self.path.split("?", 1)[0] != "/metrics":
            status, body, kind = 404, b"only /metrics is served here\n", TEXT_TYPE
        else:
            source = self.server.source
            status, body = 200, source.metrics.render(source.store)
            kind = "text/plain; version=0.0.4; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):
        pass                                       # scrapes are not requests of the server


class MetricsServer(http.server.ThreadingHTTPServer):
    """--metrics-port: GET /metrics of a WasmstoreServer on a port of its own, so that a
    one-app server's apps keep every path of theirs and scrapes stay apart from app traffic.
    listener: a bound, listening socket to serve (a server of several workers binds it once,
    and one worker reports: the numbers are the whole server's); else (host, port) is bound."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, source, host=DEFAULT_HOST, port=0, listener=None):
        self.source = source
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), _MetricsHandler, bind_and_activate=listener is None)
        if listener is not None:
            self.socket.close()
            self.socket = listener
            self.address_family = listener.family
            self.server_address = listener.getsockname()
        self.allowed_hosts = HostAllowList(self.server_address[0], source.allowed_hosts.names)

    @staticmethod
    def url_of(sock):
        """http://HOST:PORT of a listening socket."""
        host, port = sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def url(self):
        """http://HOST:PORT of the metrics port."""
        return self.url_of(self.socket)

    def server_bind(self):
        """Bind as TCPServer does: HTTPServer's own bind adds a reverse DNS lookup."""
        http.server.socketserver.TCPServer.server_bind(self)


def make_runtime(store, metrics, *, kv=None, timeout=None, fuel=None, max_memory=None,
                 max_guests=DEFAULT_MAX_GUESTS, run_queue=DEFAULT_RUN_QUEUE,
                 queue_wait=DEFAULT_QUEUE_WAIT, namespace_map=(), stub_imports=False,
                 max_output=DEFAULT_MAX_OUTPUT, cache_dir=None, provider_kv=None,
                 max_table_elements=None, allow_buckets=None, env=None, dirs=None,
                 allow_outbound=None, precompile=True, worker=None, log=None, links=None):
    """The GuestRuntime of a server (None when kvhost.py or wasmtime is missing: 501 then).

    kv: backend URL (default sqlite under the store root), or "component:PATH", a wasi:keyvalue
    provider stored at PATH (as the default branch holds it when the server starts) over the
    backend provider_kv (see wasmstore.kv_options); timeout (seconds), fuel, max_memory
    (bytes), max_table_elements: each guest's limits (kvhost's defaults when None);
    allow_buckets, env ({name: value}), dirs ([(host, guest)]), allow_outbound (HTTP apps'
    destinations): what a guest may open and see (kvhost.Host); max_guests running at once,
    run_queue callers waiting up to queue_wait seconds; namespace_map: ["PREFIX=NS", ...];
    precompile: compile added modules in the background (see Precompiler); worker: the
    WorkerContext whose shared run slots, queue and compile locks bound the whole server;
    links: {import module name: store path} (see wasmstore.Runner, wasmstore.parse_links)."""
    if kvhost is None:
        return None
    limits = {name: value for name, value in (
        ("timeout", timeout), ("fuel", fuel), ("max_memory", max_memory),
        ("max_table_elements", max_table_elements), ("allow_buckets", allow_buckets),
        ("env", env), ("dirs", dirs), ("allow_outbound", allow_outbound)) if value is not None}
    # output="discard": nothing a guest writes reaches the server's own streams (a call's and a
    # run's output is captured into its reply; watchers and providers they trigger are dropped)
    runner = wasmstore.Runner(store, namespaces=wasmstore.parse_namespace_map(namespace_map),
                              links=links,
                              output="discard", kv=kv, provider_kv=provider_kv, workers=max_guests,
                              pooled_stores=POOLED_STORES_PER_GUEST * max_guests,
                              stub_imports=stub_imports, cache_dir=cache_dir, **limits)
    runner.host.start_workers(1)      # the first guest that needs a worker process finds one ready
    if worker is None:
        gate, locks = RunGate(max_guests, run_queue, queue_wait), CompileLocks()
    else:
        gate = RunGate(max_guests, run_queue, queue_wait, worker.pool("run_slots"),
                       worker.pool("run_queue"))
        locks = CompileLocks(worker.compile_file)
    runtime = GuestRuntime(runner, gate, metrics, max_output, locks)
    metrics.runtime = runtime
    if precompile and (worker is None or worker.index == 0):
        runtime.precompiler = Precompiler(runtime, log=log)
        runtime.precompiler.start()
    return runtime


def make_server(store, host=DEFAULT_HOST, port=DEFAULT_PORT, **options):
    """A WasmstoreServer bound to (host, port); run it with serve_forever().

    options: auth (spec string or AuthTable), tls ((keyfile, certfile) or SSLContext), cors
    (True: any origin; origins as a list or comma-separated string; see OriginAllowList),
    allowed_hosts (extra Host names, see HostAllowList), apps ("PREFIX=PATH" texts or
    AppMounts: stored HTTP apps mounted beside the API), serve (a store path or an
    AppSelector: the port serves that one app and no API), max_body (bytes), quiet, timeout
    (seconds), max_connections, max_watches, log (a text stream), run (a dict of
    make_runtime() options: kv, timeout, fuel, max_memory, max_guests, run_queue, ...).
    """
    return WasmstoreServer(store, host, port, **options)


# ---------------------------------------------------------------------------
# worker processes: one listening socket, N processes, bounds shared by all
# ---------------------------------------------------------------------------

ACCEPT_DEFER_SECONDS = 0.002       # a worker busier than a sibling waits this long to accept
WORKER_REGION_BYTES = 4 << 20       # metric numbers a worker publishes (only touched pages cost)
WORKER_START_SECONDS = 60.0         # a first worker not serving by then failed to start
# ... unless it serves one app (--serve), which it compiles first: an 18 MB component takes
# tens of seconds on a loaded machine (then it is in the compile cache for every next start)
APP_WORKER_START_SECONDS = 900.0
WORKER_GRACE_SECONDS = 35.0         # a draining worker still alive after this is killed
WORKER_RESTART_DELAY = (0.1, 30.0)  # first and longest pause before replacing a worker
GAUGE_NAMES = frozenset({"connections", "websocket_clients", "in_flight"})
_REGION_HEADER = 16                 # the end of the entries (u64), then the entries


def _pad8(length):
    return (length + 7) & ~7


class SharedMetricValues:
    """MetricValues in a memory region shared by the workers of a server, so that the worker
    answering /metrics can read its siblings' numbers.

    One process writes a region (writer=True; the lock of its Metrics serializes its
    threads), any process reads it. Entries are appended: [u32 key length][u32 kind (0
    integer, 1 float)][the key as JSON, padded to 8 bytes][the value, 8 bytes], and the
    region's end is published after the entry is complete, so a reader never sees half of
    one. A writer that takes over a dead worker's region continues its counters and starts
    its gauges at 0."""

    def __init__(self, region, writer=False):
        self.region = region
        # key -> (its value as a one-number view of the region, whether a float): adding to a
        # view costs a tenth of a struct unpack and pack (a request adds about twenty numbers)
        self.cells = {}
        self.dropped = 0                  # new keys that did not fit
        if writer:
            for key, offset, fmt, _ in self._entries():
                cell = self._cell(offset, fmt)
                if key[0] in GAUGE_NAMES:
                    cell[0] = 0
                self.cells[key] = (cell, fmt == "d")

    def _cell(self, offset, fmt):
        return memoryview(self.region)[offset:offset + 8].cast(fmt)

    def _entries(self):
        region = self.region
        end = max(_REGION_HEADER, struct.unpack_from("Q", region, 0)[0])
        position = _REGION_HEADER
        while position < end:
            length, kind = struct.unpack_from("II", region, position)
            start = position + 8
            try:
                key = tuple(json.loads(bytes(region[start:start + length])))
            except ValueError:                # torn by a writer on a weakly ordered CPU
                return
            offset = start + _pad8(length)
            fmt = "d" if kind else "q"
            yield key, offset, fmt, struct.unpack_from(fmt, region, offset)[0]
            position = offset + 8

    def _append(self, key, kind):
        data = json.dumps(list(key), separators=(",", ":")).encode("utf-8")
        end = max(_REGION_HEADER, struct.unpack_from("Q", self.region, 0)[0])
        offset = end + 8 + _pad8(len(data))
        if offset + 8 > len(self.region):
            self.dropped += 1
            return None
        struct.pack_into("II", self.region, end, len(data), kind)
        self.region[end + 8:end + 8 + len(data)] = data
        fmt = "d" if kind else "q"
        struct.pack_into(fmt, self.region, offset, 0)
        struct.pack_into("Q", self.region, 0, offset + 8)
        entry = self.cells[key] = (self._cell(offset, fmt), bool(kind))
        return entry

    def add(self, key, delta):
        """Add delta to the number at key (0 when new); the caller holds Metrics.lock."""
        entry = self.cells.get(key) or self._append(key, isinstance(delta, float))
        if entry is not None:
            cell, is_float = entry
            cell[0] += delta if is_float else int(delta)

    def get(self, key, default=0):
        """The number at key, or default."""
        entry = self.cells.get(key)
        return default if entry is None else entry[0][0]

    def snapshot(self):
        """{key: number} of everything in the region (from any process)."""
        return {key: value for key, _, _, value in self._entries()}


class WorkerShared:
    """What the workers of one server share, made by the supervisor before it forks them: a
    metric region per worker (and one for the supervisor's own counters), the SlotPools'
    POSIX semaphores and their per-worker counts (run slots, run queue, connections, watch
    sessions), and the file whose byte-range locks are the CompileLocks. Anonymous shared
    maps and unnamed semaphores: nothing to clean up after the server, whatever ends it."""

    def __init__(self, workers, limits):
        self.workers = int(workers)
        self.limits = dict(limits)                  # pool name -> limit
        context = multiprocessing.get_context("fork")
        self.semaphores = {name: context.Semaphore(limit) for name, limit in self.limits.items()}
        self.regions = []
        for _ in range(self.workers + 1):
            region = mmap.mmap(-1, WORKER_REGION_BYTES)
            struct.pack_into("Q", region, 0, _REGION_HEADER)
            self.regions.append(region)
        self._counts = mmap.mmap(-1, max(8, 8 * self.workers * len(self.limits)))
        view = memoryview(self._counts).cast("q")
        self.counts = {name: view[i * self.workers:(i + 1) * self.workers]
                       for i, name in enumerate(self.limits)}
        self.compile_file = tempfile.TemporaryFile(prefix="wasmstore-compile-")

    def close(self):
        """Release the maps and the lock file (after every worker has exited)."""
        self.compile_file.close()

    def pool(self, name, index):
        """Worker `index`'s view of the shared pool `name`."""
        return SlotPool(self.limits[name], self.semaphores[name], self.counts[name], index)

    def worker_died(self, index):
        """Give back what a dead worker held: its slots in every pool, its gauges."""
        for name in self.limits:
            self.pool(name, index).release_for(index)
        SharedMetricValues(self.regions[index], writer=True)

    def supervisor_metrics(self):
        """The supervisor's own numbers (worker starts), in the last region."""
        return SharedMetricValues(self.regions[-1], writer=True)

    def snapshots(self):
        """[(worker label, snapshot)] of every worker, then the supervisor's ("supervisor")."""
        labels = [str(index) for index in range(self.workers)] + ["supervisor"]
        return [(label, SharedMetricValues(region).snapshot())
                for label, region in zip(labels, self.regions)]


class WorkerContext:
    """One worker's part of a WorkerShared: what make_server needs to be that worker."""

    def __init__(self, shared, index):
        self.shared = shared
        self.index = index                # 0 also runs the background compiler
        self.compile_file = shared.compile_file

    def pool(self, name):
        """This worker's view of a shared SlotPool."""
        return self.shared.pool(name, self.index)

    def metrics(self):
        """A Metrics that writes this worker's region and renders every worker's."""
        values = SharedMetricValues(self.shared.regions[self.index], writer=True)
        return Metrics(values, peers=self.shared.snapshots)


def listen(host, port, backlog=WasmstoreServer.request_queue_size):
    """A TCP socket bound to (host, port) and listening, as WasmstoreServer binds its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    """Runs a server as `workers` processes serving one listening socket.

    The supervisor binds the socket and makes the WorkerShared, then forks the workers (it
    has no thread of its own, so forking is safe); each builds its own WasmstoreServer around
    the inherited socket with build(listener, WorkerContext) and serves with its own threads,
    and the kernel hands each new connection to one of them. The supervisor only waits: a
    worker that exits unexpectedly is replaced (its slots and gauges given back first; a
    worker that keeps dying is replaced after a growing pause), and SIGTERM or SIGINT is
    passed to every worker, which drains as a single-process server does, before serve()
    returns 0. A worker whose supervisor is gone (killed) drains and exits too: it watches a
    pipe the supervisor holds open."""

    def __init__(self, workers, listener, shared, build, log=None,
                 start_seconds=WORKER_START_SECONDS):
        self.workers = workers
        self.start_seconds = start_seconds  # the first workers not serving by then: an error
        self.listener = listener
        self.shared = shared
        self.build = build
        self.log = log or sys.stderr
        self.children = {}                # pid -> (worker index, started at, ready pipe)
        self.stopping = False
        self._alive_read, self._alive_write = os.pipe()
        self._wakeup_read, self._wakeup_write = os.pipe()
        self._numbers = shared.supervisor_metrics()

    def _say(self, text):
        try:
            self.log.write(f"wasmstore: {text}\n")
            self.log.flush()
        except (OSError, ValueError):
            pass

    def serve(self, on_ready=None):
        """Start the workers, call on_ready() once all of them serve, supervise until SIGTERM
        or SIGINT, drain. Returns None, or the error that kept the first workers from starting
        (they are stopped)."""
        previous = self._install_signals()
        try:
            for index in range(self.workers):
                self._start(index)
            error = self._await_ready()
            if error is not None:
                self._stop_all(kill=True)
                return error
            if on_ready is not None:
                on_ready()
            self._supervise()
            self._stop_all()
            return None
        finally:
            self._restore_signals(previous)

    # -- starting and replacing workers ----------------------------------------------------

    def _start(self, index):
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:                                      # the worker: never returns
            os.close(ready_read)
            self._become_worker(index, ready_write)
        os.close(ready_write)
        self.children[pid] = (index, time.monotonic(), ready_read)
        self._numbers.add(("worker_starts",), 1)

    def _become_worker(self, index, ready_write):
        status = 1
        try:
            inherited = [self._alive_write, self._wakeup_read, self._wakeup_write]
            inherited += [ready for _, _, ready in self.children.values() if ready is not None]
            for fd in inherited:
                os.close(fd)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            status = _serve_worker(self.build, self.listener, WorkerContext(self.shared, index),
                                   ready_write, self._alive_read)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(status)

    def _await_ready(self):
        """None once every first worker serves, else the first one's error message."""
        deadline = time.monotonic() + self.start_seconds
        waiting = {ready: pid for pid, (_, _, ready) in self.children.items()}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"the workers did not start within {self.start_seconds:g} s"
            readable, _, _ = select.select(list(waiting), [], [], left)
            for ready in readable:
                message = os.read(ready, 4096).decode("utf-8", "replace")
                pid = waiting.pop(ready)
                self._forget_ready(pid)
                if message != "ready":
                    return message or "a worker exited while starting"
        return None

    def _forget_ready(self, pid):
        index, started, ready = self.children[pid]
        if ready is not None:
            os.close(ready)
            self.children[pid] = (index, started, None)

    def _supervise(self):
        failures = {}                                     # index -> quick deaths in a row
        restarts = []                                     # (when, index)
        while not self.stopping:
            timeout = 1.0
            if restarts:
                timeout = max(0.0, min(when for when, _ in restarts) - time.monotonic())
            readable, _, _ = select.select([self._wakeup_read], [], [], timeout)
            if readable:                                  # a signal came (SIGCHLD, SIGTERM)
                os.read(self._wakeup_read, 4096)
            for pid, index, started, status in self._reap():
                quick = time.monotonic() - started < 5.0
                failures[index] = failures.get(index, 0) + 1 if quick else 0
                delay = min(WORKER_RESTART_DELAY[1],
                            WORKER_RESTART_DELAY[0] * (2 ** failures[index]))
                self.shared.worker_died(index)
                self._say(f"worker {index} (pid {pid}) {_exit_text(status)}; starting another "
                          f"in {delay:.1f} s")
                restarts.append((time.monotonic() + delay, index))
            now = time.monotonic()
            for entry in [r for r in restarts if r[0] <= now and not self.stopping]:
                restarts.remove(entry)
                self._start(entry[1])

    def _reap(self):
        """[(pid, index, started, wait status)] of the workers that exited."""
        ended = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                self._forget_ready(pid)
                index, started, _ = self.children.pop(pid)
                ended.append((pid, index, started, status))
        return ended

    # -- stopping ---------------------------------------------------------------------------

    def _stop_all(self, kill=False):
        """SIGTERM (or SIGKILL) to every worker, then wait for them (SIGKILL after the grace)."""
        self.stopping = True
        if self._alive_write is not None:
            os.close(self._alive_write)                   # workers see their supervisor go
            self._alive_write = None
        self._signal_all(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + WORKER_GRACE_SECONDS
        while self.children:
            self._reap()
            if not self.children:
                break
            if time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
        for pid in list(self.children):
            self._forget_ready(pid)

    def _signal_all(self, signum):
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _install_signals(self):
        def stop(_signum, _frame):
            self.stopping = True
        previous = {signum: signal.signal(signum, stop)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        os.set_blocking(self._wakeup_write, False)
        previous["wakeup"] = signal.set_wakeup_fd(self._wakeup_write)
        return previous

    @staticmethod
    def _restore_signals(previous):
        signal.set_wakeup_fd(previous.pop("wakeup"))
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_text(status):
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _serve_worker(build, listener, context, ready_write, alive_read):
    """The life of one worker process: build its server, say "ready" (or the error) through
    ready_write, serve until SIGTERM / SIGINT or until its supervisor is gone, drain; returns
    the exit status."""
    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        server = build(listener, context)
    except _STARTUP_ERRORS as exc:
        os.write(ready_write, one_line(exc).encode("utf-8"))
        return 3
    os.write(ready_write, b"ready")
    os.close(ready_write)
    watcher = threading.Thread(target=_await_eof, args=(alive_read, stop), daemon=True,
                               name="wasmstore-supervisor-watch")
    watcher.start()
    threading.Thread(target=server.serve_forever, name="wasmstore-accept", daemon=True).start()
    while not stop.wait(0.5):
        pass
    server.graceful_shutdown()
    return 0


def _await_eof(fd, event):
    """Set event when the pipe's other end is closed (its process ended)."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    event.set()


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def _option_type(parse):
    """An argparse type from a parser of this file or wasmstore.py: its error (ServerError,
    StoreError) becomes argparse's, so a bad option is one usage line (exit status 2)."""
    def convert(text, *args, **kwargs):
        try:
            return parse(text, *args, **kwargs)
        except (ServerError, wasmstore.StoreError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.lstrip("_")
    return convert


_option_number = _option_type(wasmstore.parse_number)   # ASCII digits only, in bounds
_byte_size = _option_type(wasmstore.parse_size)         # 134217728 or 128M


def _port(text):
    return _option_number(text, "port number", maximum=65535)


def _tls_pair(text):
    keyfile, sep, certfile = text.partition(",")
    if not sep or not keyfile.strip() or not certfile.strip():
        raise argparse.ArgumentTypeError("expected KEY_FILE,CERT_FILE")
    return keyfile.strip(), certfile.strip()


@_option_type
def _origins(text):
    OriginAllowList(text)                   # checked here, built by the server
    return text


_host_name = _option_type(host_name)


def _host_names(text):
    return [_host_name(name) for name in text.split(",") if name.strip()]


def _positive_seconds(text):
    value = _option_number(text, "number of seconds", fraction=True)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


_EPILOG = """\
environment: WASMSTORE_ROOT, WASMSTORE_HOST, WASMSTORE_PORT, WASMSTORE_AUTH, WASMSTORE_TLS,
  WASMSTORE_KV, WASMSTORE_PROVIDER_KV, WASMSTORE_RUN_TIMEOUT, WASMSTORE_FUEL,
  WASMSTORE_MAX_MEMORY, WASMSTORE_MAX_GUESTS, WASMSTORE_RUN_QUEUE, WASMSTORE_ALLOWED_HOSTS
  (comma-separated), WASMSTORE_MAX_WATCHES, WASMSTORE_WORKERS, WASMSTORE_APPS
  (comma-separated PREFIX=PATH) (used when the matching option is absent)

HTTP apps (stored components exporting wasi:http/incoming-handler):
  --app /hello=/apps/hello.wasm serves the app stored at /apps/hello.wasm under /hello/ (the
  default branch's head at each request); any stored app answers at
  /api/v1/app/<store path>/<its own path> (the request's branch) and at
  /api/v1/app-at/<ref>/<store path>/<its own path>, ref a branch, vN (version N), BRANCH:vN
  or a commit. The guest sees the path below the app ("/" at least) with the query as sent,
  the connection's scheme and the Host the client sent. App requests need a key with the
  run permission (or POST) for the app's path, pass the Host and Origin checks, and the
  guest never sees the key's header.
  --serve PATH makes the whole port that one app (no API; what `wasmstore.py serve` runs);
  --metrics-port P serves /metrics on a port of its own.

browser safety:
  A request whose Origin header names another origin than the server's own (as reached
  through the Host header) is refused with 403 when it changes anything (any method but
  GET, HEAD, OPTIONS) or opens a watch, unless --cors allows that origin; requests without
  Origin (curl, scripts, the clients) are not affected. Bound to a loopback address, the
  server answers only to loopback Host names (localhost, 127.x.x.x, ::1) and the
  --allowed-host names: other Hosts get 421 (DNS rebinding). Bound to another address, it
  answers to any Host unless --allowed-host is given (then: those names, localhost and IP
  addresses).

examples:
  python http_server.py                                   # ~/.wasmstore on http://127.0.0.1:6384
  python http_server.py --auth 'SECRET:*;READER:GET'      # keys in the Wasmstore-Auth header
  python http_server.py --auth 'SECRET:*;CI:read,run@/apps/'   # CI reads and runs /apps/ only
  python http_server.py --tls key.pem,cert.pem --cors     # HTTPS, pages of any origin
  python http_server.py --cors http://localhost:3000      # pages of that origin only
  python http_server.py --host 0.0.0.0 --allowed-host store.lan   # on the LAN, as store.lan
  curl --data-binary @a.wasm http://127.0.0.1:6384/api/v1/module/a.wasm
  curl -d '[2, 3]' http://127.0.0.1:6384/api/v1/call/add/a.wasm   # add(2, 3) of a stored module
  python http_server.py --app /hello=/apps/hello.wasm    # curl http://127.0.0.1:6384/hello/
"""


PROGRAM = "http_server.py"                 # the name usage lines and errors give
AS_PROGRAM = "--as-program"                # first in argv: another name (wasmstore.py's commands)


def build_parser(program=PROGRAM):
    """The command line's parser (main() fills absent options from the environment)."""
    parser = argparse.ArgumentParser(
        prog=program,
        description="Serve a wasmstore over HTTP (REST API, WebSocket watch, /metrics).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    _add_server_options(parser)
    _add_run_options(parser.add_argument_group(
        "running stored modules (POST /api/v1/call, /api/v1/run)"))
    _add_app_options(parser.add_argument_group("HTTP apps (see below)"))
    return parser


_app_mount = _option_type(parse_app_mount)


def _app_mounts(text):
    return [_app_mount(part.strip()) for part in text.split(",") if part.strip()]


@_option_type
def _app_path(text):
    """--serve's store path (printed as paths are), or a module hash as it is."""
    segments = wasmstore.validate_path(text)
    if len(segments) == 1 and wasmstore.HASH_TEXT.match(segments[0]):
        return segments[0].lower()
    return wasmstore.format_path(segments)


_app_ref = _option_type(parse_app_ref)


def _add_app_options(group):
    add = group.add_argument
    add("--app", action="append", type=_app_mount, default=None, dest="apps",
        metavar="PREFIX=PATH",
        help="serve the app stored at PATH under the URL path PREFIX (repeatable; env "
             "WASMSTORE_APPS, comma-separated)")
    add("--serve", type=_app_path, default=None, metavar="PATH",
        help=f"serve only the app stored at PATH, on every path of the port (default port "
             f"{DEFAULT_APP_PORT}); no API. A module HASH serves that module for good (as the "
             "branch held it at the start)")
    add("--serve-ref", type=_app_ref, default=None, metavar="REF",
        help="with --serve: the app as a branch, vN (version N), BRANCH:vN or a commit holds it "
             "(default: the head of the default branch, at each request)")
    add("--metrics-port", type=_port, default=None, metavar="P",
        help="also serve GET /metrics on port P of --host (for --serve, whose apps own every "
             "path of their port)")


def _add_server_options(parser):
    env = os.environ
    add = parser.add_argument
    add("--root", default=env.get("WASMSTORE_ROOT") or os.path.join("~", ".wasmstore"),
        help="store directory (default: $WASMSTORE_ROOT or ~/.wasmstore)")
    add("--host", default=env.get("WASMSTORE_HOST") or DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST})")
    add("--port", type=_port, default=None,
        help=f"TCP port, 0 = any free port (default: {DEFAULT_PORT})")
    add("--auth", default=env.get("WASMSTORE_AUTH") or None, metavar="SPEC",
        help="require keys: 'KEY:PERMS[@/PREFIX];...', PERMS a comma list of HTTP methods "
             "('*' = all) and the words read, write, run, admin; @/PREFIX limits the entry "
             "to paths under PREFIX (e.g. 'A:*;R:read;CI:run@/apps/')")
    add("--tls", type=_tls_pair, default=None, metavar="KEY,CERT",
        help="serve HTTPS with this PEM key file and certificate file")
    add("--cors", nargs="?", const="*", default=None, type=_origins, metavar="ORIGINS",
        help="let web pages of other origins use the API (CORS headers, preflight answers): "
             "alone, any origin; with a comma-separated list such as "
             "https://app.example,http://localhost:3000, only those")
    add("--allowed-host", action="append", type=_host_name, default=None, metavar="NAME",
        help="also answer to this Host name (repeatable); see 'browser safety' below")
    add("--max-body", type=_byte_size, default=DEFAULT_MAX_BODY, metavar="N",
        help="largest accepted upload in bytes, suffix K/M/G allowed (default: 128M)")
    add("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="S",
        help=f"close idle or stalled connections after S seconds (default: "
             f"{DEFAULT_TIMEOUT:g}); a request body gets S seconds plus 1 per "
             f"{MIN_BODY_RATE // 1024} KiB received")
    add("--max-watches", type=_positive_int, default=None, metavar="N",
        help=f"WebSocket watch sessions at once, apart from the {DEFAULT_MAX_CONNECTIONS} "
             f"ordinary connections; more get 503 (default: {DEFAULT_MAX_WATCHES})")
    add("--workers", type=_positive_int, default=None, metavar="N",
        help="serve from N processes sharing the listening socket, each with its own threads; "
             "run slots, the run queue and connection caps bound all of them together "
             f"(env WASMSTORE_WORKERS; default: two per CPU, {DEFAULT_WORKERS})")
    add("--quiet", action="store_true", help="no access log on stderr")
    add("--version", action="version", version=f"%(prog)s {__version__}")


def _add_run_options(group):
    env = os.environ
    add = group.add_argument
    add("--kv", default=env.get("WASMSTORE_KV") or None, metavar="URL",
        help="key-value backend of the guests: sqlite:PATH, memory: or redis://HOST:PORT/DB, "
             "or component:PATH, a wasi:keyvalue provider component stored at PATH that serves "
             "the guests' wasi:keyvalue (env WASMSTORE_KV; default: sqlite:<root>/kv.sqlite3)")
    add("--provider-kv", default=env.get("WASMSTORE_PROVIDER_KV") or None, metavar="URL",
        help="the backend beneath a --kv component:PATH provider (env WASMSTORE_PROVIDER_KV; "
             "default: sqlite:<root>/kv.sqlite3)")
    add("--max-guests", type=_positive_int, default=None, metavar="N",
        help=f"guests running at once (env WASMSTORE_MAX_GUESTS; default {DEFAULT_MAX_GUESTS})")
    add("--run-queue", type=_nonnegative_int, default=None, metavar="N",
        help="callers waiting for a guest slot; more get 503 with Retry-After "
             f"(env WASMSTORE_RUN_QUEUE; default {DEFAULT_RUN_QUEUE})")
    add("--queue-wait", type=_positive_seconds, default=DEFAULT_QUEUE_WAIT, metavar="S",
        help=f"longest wait for a guest slot before 503 (default {DEFAULT_QUEUE_WAIT:g})")
    add("--max-output", type=_byte_size, default=DEFAULT_MAX_OUTPUT, metavar="N",
        help="stdout (and stderr) kept per run; the rest is counted, not sent (default 16M)")
    add("--namespace-map", action="append", default=[], metavar="PREFIX=NS",
        help=wasmstore.NAMESPACE_MAP_HELP)
    if kvhost is not None:        # the sandbox options are kvhost's, parsed as everywhere
        kvhost.add_sandbox_options(group, "a path in the store, in the same commit as the "
                                          "module run", flags=SANDBOX_FLAGS, env=SANDBOX_ENV)


# kvhost's sandbox options as this server names them (its --timeout is its connections') and
# the environment variables they fall back to
SANDBOX_FLAGS = {"timeout": "--run-timeout"}
SANDBOX_ENV = {"timeout": "WASMSTORE_RUN_TIMEOUT", "fuel": "WASMSTORE_FUEL",
               "max_memory": "WASMSTORE_MAX_MEMORY"}


def _positive_int(text):
    return _option_number(text, "positive integer", minimum=1)


def _nonnegative_int(text):
    return _option_number(text, "integer", minimum=0)


# option -> (environment variable, parser) for the options that fall back to the environment
ENV_OPTIONS = {"port": ("WASMSTORE_PORT", _port), "tls": ("WASMSTORE_TLS", _tls_pair),
               "max_guests": ("WASMSTORE_MAX_GUESTS", _positive_int),
               "max_watches": ("WASMSTORE_MAX_WATCHES", _positive_int),
               "workers": ("WASMSTORE_WORKERS", _positive_int),
               "allowed_host": ("WASMSTORE_ALLOWED_HOSTS", _host_names),
               "apps": ("WASMSTORE_APPS", _app_mounts),
               "run_queue": ("WASMSTORE_RUN_QUEUE", _nonnegative_int)}


def run_options(args):
    """The make_runtime() options of parsed command-line arguments."""
    sandbox = vars(args).get            # kvhost's sandbox options (none without kvhost.py)
    env = sandbox("env")
    return {"kv": args.kv, "provider_kv": args.provider_kv, "timeout": sandbox("run_timeout"),
            "fuel": sandbox("fuel"), "max_memory": sandbox("max_memory"),
            "max_guests": args.max_guests or DEFAULT_MAX_GUESTS,
            "run_queue": DEFAULT_RUN_QUEUE if args.run_queue is None else args.run_queue,
            "queue_wait": args.queue_wait, "namespace_map": args.namespace_map,
            "stub_imports": bool(sandbox("stub_imports")), "max_output": args.max_output,
            "max_table_elements": sandbox("max_table_elements"),
            "allow_buckets": sandbox("allow_buckets"),
            "env": None if env is None else dict(env), "dirs": sandbox("dirs"),
            "allow_outbound": sandbox("allow_outbound"), "cache_dir": sandbox("cache_dir"),
            "links": wasmstore.parse_links(sandbox("links"))}


def _options_from(parser, args):
    """Fill options not given on the command line from the environment (validated alike)."""
    env = os.environ
    if args.serve is None and args.serve_ref is not None:
        parser.error("--serve-ref needs --serve PATH")
    if args.serve is not None and args.port is None:
        args.port = DEFAULT_APP_PORT              # an app's port, as `wasmtime serve`'s
    for option, (variable, convert) in ENV_OPTIONS.items():
        if getattr(args, option) is None and env.get(variable):
            try:
                setattr(args, option, convert(env[variable]))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{variable}: {exc}")
    if args.port is None:
        args.port = DEFAULT_PORT
    if kvhost is not None:
        try:
            kvhost.fill_sandbox_from_env(args, SANDBOX_ENV, SANDBOX_FLAGS)
        except kvhost.ArgumentError as exc:
            parser.error(str(exc))
    try:
        wasmstore.parse_links(vars(args).get("links"))
    except wasmstore.StoreError as exc:
        parser.error(str(exc))
    return args


def main(argv=None):
    """Run the server until SIGTERM or Ctrl-C; then finish in-flight requests and return 0.

    --workers 1 serves from this process; more fork that many workers under a Supervisor.
    wasmstore.py's server and serve commands run this file with AS_PROGRAM and their own name
    first ("wasmstore serve"), so that usage and errors name the command the user typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    program = PROGRAM
    if argv[:1] == [AS_PROGRAM] and len(argv) > 1:
        program, argv = argv[1], argv[2:]
    parser = build_parser(program)
    error_prefix = program.split(" ")[0]      # "wasmstore: error: ...", as its commands print
    args = _options_from(parser, parser.parse_args(argv))
    try:
        auth = AuthTable(args.auth)
    except ServerError as exc:
        parser.error(f"--auth: {exc}")              # the message never contains a key
    root = os.path.expanduser(args.root)
    options = dict(auth=auth, tls=args.tls, cors=args.cors,
                   allowed_hosts=args.allowed_host or (),
                   max_watches=args.max_watches or DEFAULT_MAX_WATCHES,
                   max_body=args.max_body, quiet=args.quiet, timeout=args.timeout,
                   run=run_options(args), apps=args.apps or (), serve=_served_app(args))
    workers = _worker_count(parser, args)
    try:
        store = wasmstore.Store(root)
        if options["serve"] is not None:
            options["serve"] = options["serve"].pinned(store)
        metrics = None if args.metrics_port is None else listen(args.host, args.metrics_port)
        if workers == 1:
            server = make_server(store, args.host, args.port, **options)
            _prepare(server, metrics)
            return _serve_alone(server)
        if args.tls:
            WasmstoreServer._ssl_context(args.tls)  # a bad key or certificate: said once, here
        listener = listen(args.host, args.port)
    except _STARTUP_ERRORS as exc:
        print(f"{error_prefix}: error: {one_line(exc)}", file=sys.stderr)
        meaning = error_meaning(exc)
        return 1 if meaning is None else meaning.exit_status
    error = _serve_workers(store, listener, workers, options, metrics)
    if error is not None:
        print(f"{error_prefix}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _worker_count(parser, args):
    """--workers, or two per CPU; one when a kv backend lives inside one process (memory:),
    which more workers could not share (asked for explicitly: a usage error)."""
    local = [option for option, url in (("--kv", args.kv), ("--provider-kv", args.provider_kv))
             if str(url).partition(":")[0] == "memory"]
    if not local:
        return args.workers or DEFAULT_WORKERS
    if (args.workers or 1) > 1:
        parser.error(f"{local[0]} memory: keeps data inside one process, and each of the "
                     f"{args.workers} worker processes would have its own: use --workers 1, or "
                     "a backend every worker shares (sqlite, the default, or redis)")
    return 1


def _serve_alone(server):
    stop = threading.Event()
    _install_signal_handlers(stop)
    thread = threading.Thread(target=server.serve_forever, name="wasmstore-accept", daemon=True)
    thread.start()
    print(f"wasmstore: serving {_what_is_served(server.store, server.apps)} on {server.url}",
          file=sys.stderr, flush=True)
    if server.metrics_server is not None:
        print(f"wasmstore: metrics on {server.metrics_server.url}/metrics", file=sys.stderr,
              flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    if not server.graceful_shutdown():
        print("wasmstore: shutdown grace period over; some requests were cut",
              file=sys.stderr)
    return 0


def _serve_workers(store, listener, workers, options, metrics=None):
    """Serve from `workers` processes until SIGTERM: None, or why they could not start."""
    run = options["run"]
    shared = WorkerShared(workers, {"run_slots": run["max_guests"], "run_queue": run["run_queue"],
                                    "connections": DEFAULT_MAX_CONNECTIONS,
                                    "watches": options["max_watches"]})

    def build(listener, context):
        server = make_server(wasmstore.Store(store.root), listener=listener, worker=context,
                             **options)
        _prepare(server, metrics if context.index == 0 else None)   # one worker reports
        return server

    host, port = listener.getsockname()[:2]
    scheme = "https" if options["tls"] else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def ready():
        what = _what_is_served(store, AppTable(serve=options["serve"]))
        print(f"wasmstore: serving {what} on {url} ({workers} worker processes)",
              file=sys.stderr, flush=True)
        if metrics is not None:
            print(f"wasmstore: metrics on {MetricsServer.url_of(metrics)}/metrics",
                  file=sys.stderr, flush=True)

    try:
        start_seconds = WORKER_START_SECONDS if options["serve"] is None else \
            APP_WORKER_START_SECONDS
        error = Supervisor(workers, listener, shared, build,
                           start_seconds=start_seconds).serve(on_ready=ready)
    finally:
        listener.close()
        shared.close()
    return error


_RUNTIME_ERRORS = () if kvhost is None else (kvhost.KvError,)   # e.g. a --kv URL that fails
_STARTUP_ERRORS = (wasmstore.StoreError, ServerError, OSError, ssl.SSLError) + _RUNTIME_ERRORS


def _prepare(server, metrics):
    """What a server does before its first request: a one-app server finds and compiles its
    app (a missing path or a component that is no HTTP handler is a startup error), and the
    process that reports metrics on --metrics-port starts doing so."""
    if server.apps.serve is not None:
        server.preload_app()
    if metrics is not None:
        server.serve_metrics(metrics)


def _what_is_served(store, apps):
    return store.root if apps.serve is None else f"{apps.serve.path} of {store.root}"


def _served_app(args):
    """The AppSelector of --serve PATH [--serve-ref REF], or None."""
    if args.serve is None:
        return None
    return (args.serve_ref or AppSelector(None)).with_path(args.serve)


def _install_signal_handlers(stop):
    if threading.current_thread() is not threading.main_thread():
        return                                      # embedded use: the caller owns signals
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())


if __name__ == "__main__":
    sys.exit(main())
