# SPDX-License-Identifier: Apache-2.0
"""kvhost: run WebAssembly components and modules against wasi:keyvalue (memory, SQLite, Redis).

A host on the `wasmtime` package that links both ``wasi:keyvalue@0.2.0-draft`` and
``@0.2.0-draft2`` (store, atomics, batch; the watcher export) beside WASIp2 into one
component linker, runs components and core modules (WASI preview 1, linked to other modules
through a resolver) sandboxed (timeout even while a guest waits in a host call, fuel,
memory and table limits, no ambient authority) and keeps their data in a real backend.

Library use::

    import kvhost
    host = kvhost.Host(kv="sqlite:/tmp/kv.sqlite3", namespace="demo")
    guest = host.load("guests/host/kv-probe.wat")          # .wat or .wasm, component or core module
    print(host.call(guest, "incr", ["counter", "hits", 1]))  # {'ok': 1}  (JSON-style values)
    host.close()

HTTP apps (a component exporting wasi:http/incoming-handler, e.g. built by `jco componentize`)::

    request = kvhost.HttpRequest("GET", "http", "localhost:8080", "/hello",
                                 [("accept", b"*/*")], None)
    host.handle_http(host.load("app.wasm"), request, sink)   # sink.start / write / finish

Command line::

    python kvhost.py run  [options] GUEST.wasm [ARGS ...]        # wasi:cli/run
    python kvhost.py call [options] GUEST.wasm FUNCTION [JSON ...]  # one line of JSON
    python kvhost.py exports [--json] GUEST.wasm                    # callable functions and types
    python kvhost.py kv   [--kv URL] [--namespace NS] get|set|delete|list|incr BUCKET [KEY [VALUE]]

Composition: ``Host(kv="component:provider.wasm", provider_kv="sqlite:/tmp/kv.sqlite3")`` (CLI
``--kv component:FILE --provider-kv URL``) runs guests whose wasi:keyvalue imports are served
by a provider component's exports, the provider's own imports by the host (WASIp2 and
wasi:keyvalue on provider_kv).

Map of this file, top-down:
  constants and exceptions (ERROR_STATUS: the one table of what each error means, exit status
                  and metric label; error_meaning)
  cache           _BoundedCache: the one bounded map (validated names, Redis key prefixes,
                  compiled guests)
  input           parse_number, parse_json, parse_url: every number, JSON text and URL from
                  outside (ASCII digits only, bounded nesting, ports in range)
  backends        Backend (validation, cursors) -> MemoryBackend, SqliteBackend, RedisBackend;
                  open_backend()
  wasm reader     the one reader of the binary format (WasmReader): framing, core_signatures,
                  component_interface, module_spans, stub_function_bodies, check_core_imports
                  (what wasmtime's validator accepts and its compiler refuses)
  wasmtime C API  the one place below wasmtime-py's public API (its docstring lists every
                  private name and the figures that justify it): _CApi (bound as _C, or None
                  with a clear error on a wasmtime it was not written for), bounded record
                  access (_span, _field), _GuestStore, core calls by address
  value codecs    type descriptors of component values and converters that read and write
                  wasmtime's value records in place (host + JSON dialects)
  host glue       the wasi:keyvalue functions of both versions, dispatched without per-call
                  type walks
  engine          compile cache on disk (checksummed, mapped by wasmtime), Guest and what it
                  exports and imports (describe_exports, describe_imports), Host (load / call /
                  call_captured / run / run_captured / exports / imports / link_plan /
                  attach_watcher; _Capture, the bounded sink for guest output), _Session (one
                  Store per call)
  composition     Provider; a consumer's wasi:keyvalue forwarded to a provider component's
                  exports (_forward), one provider instance per consumer call (_ProviderLink)
  HTTP apps       the wasi:http proxy world defined here (wasi:http types and outgoing-handler,
                  wasi:io, wasi:clocks, wasi:cli, wasi:random, wasi:filesystem without preopens:
                  add_http_to_linker), HttpRequest / HttpOutcome, _HttpState (one request's
                  resources), _OutboundCall (outgoing requests), _HttpSession (Host.handle_http)
  sandbox         worker processes for guests that can block (_WorkerPool, _Worker, _Channel,
                  _RemoteBackend; _worker_main), killed at the deadline
  CLI             shared with wasmstore.py and http_server.py: the one table of sandbox
                  options (SANDBOX_OPTIONS, add_sandbox_options, fill_sandbox_from_env,
                  sandbox_argv, parse_size, link_table), host_from_args, run_with_deadline,
                  report; main()

Why the value codecs exist: wasmtime-py's component host functions re-read and re-walk the
function type on every call (~100 us) and cannot return an err for result<option<T>, E> (its
lowering tries the ok case first). kvhost registers its host functions through the C API with
converters built once from the WIT (descriptors below), writing wasmtime_component_val_t
records in place; guests' imports are checked against the same descriptors at load time.
"""

__version__ = "0.1.0"

__all__ = [
    "KvError", "ArgumentError", "BackendError", "AccessDeniedError", "NoSuchStoreError",
    "OperationError",
    "NoSuchFunction", "GuestError", "LinkError", "NotHttpHandler", "TrapError", "GuestExit", "Err",
    "ErrorMeaning", "ERROR_STATUS", "error_meaning",
    "HttpRequest", "HttpOutcome", "parse_outbound",
    "Backend", "MemoryBackend", "SqliteBackend", "RedisBackend", "open_backend",
    "Guest", "Host", "RunResult", "CallResult", "Provider", "provider_of", "provider_exports",
    "PROVIDER_PREFIX", "describe_exports", "describe_imports", "outline", "format_export",
    "json_float", "float_from_json",
    "WasmFormatError", "WasmReader", "wasm_kind", "core_signatures", "check_core_imports",
    "sections_fit", "module_spans", "stub_function_bodies", "component_interface",
    "CORE_HEADER", "COMPONENT_HEADER",
    "add_store_options", "add_sandbox_options", "sandbox_argv", "link_table", "host_from_args",
    "parse_json_args",
    "print_json", "print_exports",
    "run_with_deadline", "end_process", "report", "DeadlineExceeded", "main", "console_main",
    "parse_number", "parse_json", "json_depth", "parse_url", "Url", "MAX_JSON_DEPTH",
    "DEFAULT_KV_URL", "MAX_KEY_BYTES", "DEFAULT_MAX_VALUE_BYTES", "PAGE_SIZE", "STDIN_INHERIT",
]

import argparse
import base64
import binascii
import collections
import contextlib
import ctypes
import hashlib
import itertools
import json
import math
import mmap
import os
import re
import select
import socket
import struct
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import wasmtime
from wasmtime import component as wc


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

DEFAULT_KV_URL = "sqlite:~/.wasmstore/kv.sqlite3"   # durable, embedded, nothing to install
MAX_KEY_BYTES = 4096                                 # keys at most 4 KiB (every backend agrees)
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024           # values at most 16 MiB (configurable)
PAGE_SIZE = 1000                                     # list-keys pages hold at most 1,000 keys
DEFAULT_TIMEOUT = 10.0                               # seconds; --timeout default
STDIN_INHERIT = "inherit"                            # run(stdin=...): the guest reads our stdin
BUCKET_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
# What Redis INCRBY accepts (no sign on zero, no leading zeros, no '+'); every backend uses it.
DECIMAL_RE = re.compile(rb"(0|-?[1-9][0-9]{0,19})\Z")
S64 = (-(1 << 63), (1 << 63) - 1)
U64 = (0, (1 << 64) - 1)
CURSOR_PREFIX = "k1."                                # draft2 cursors: "k1." + base64url(last key)
CORE_SCRATCH_VALUES = 16                             # core params/results in a thread's scratch
EPOCH_TICK = 0.05                                    # seconds per epoch tick of the timeout thread
CACHE_MAGIC = b"KVHCACHE2\n"                         # header of a compile-cache entry's .sum file
KV_VERSIONS = ("0.2.0-draft", "0.2.0-draft2")
MAX_JSON_DEPTH = 64                                  # JSON from outside nests at most this deep
MAX_NUMBER_CHARS = 40                                # a longer number from outside: refused unread
_NOT_IN_URL = re.compile(r"[^\x21-\x7e]")     # spaces, control and non-ASCII characters (RFC 3986)
CACHE_ORPHAN_SECONDS = 3600                          # a lone cache file this old is debris
# What kvhost writes into a cache directory (anything else there is left alone).
CACHE_FILE_RE = re.compile(r"([0-9a-f]{64}\.(?:component|module))(\.sum)?\Z|\.tmp-[a-z0-9_]{8}\Z")


# ---------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------

class KvError(Exception):
    """Root of every error kvhost raises."""


class ArgumentError(KvError, ValueError):
    """Bad input from the caller (CLI exit status 2)."""


class OperationError(KvError):
    """A key-value operation refused by the semantics (not a number, too large, bad cursor)."""


class BackendError(KvError):
    """The backend failed (Redis down, disk full, database locked)."""


class AccessDeniedError(BackendError):
    """The backend refused access (e.g. a Redis ACL): the guest gets error::access-denied."""


class NoSuchStoreError(BackendError):
    """The backend has no such store: the guest gets error::no-such-store."""


class NoSuchFunction(ArgumentError):
    """The guest exports no callable function of that name; .available lists the ones it has."""

    def __init__(self, message, available=()):
        super().__init__(message)
        self.available = list(available)


class GuestError(KvError):
    """A guest could not be loaded (not WebAssembly, does not compile, kv imports off the WIT)."""


class LinkError(GuestError):
    """A guest's imports cannot be satisfied; the message names the import."""


class NotHttpHandler(GuestError):
    """The guest is not an HTTP handler: it does not export wasi:http/incoming-handler."""


class TrapError(KvError):
    """A guest stopped before it answered (CLI exit status 1). .kind says why: "trap" (it
    trapped), "timeout", "fuel", "memory" (a store limit), "data" (a host call carried more
    data than wasmtime allows), "crash" (its worker process died), "exit" (GuestExit)."""

    def __init__(self, message, kind="trap"):
        super().__init__(message)
        self.kind = kind


class GuestExit(TrapError):
    """A guest called exit (wasi:cli/exit or proc_exit) during a call; .status is its status."""

    def __init__(self, status):
        super().__init__(f"guest exited with status {status}", "exit")
        self.status = status


class ErrorMeaning(collections.namedtuple("ErrorMeaning", "exit_status label")):
    """What a kvhost error means to a caller: the exit status of a command line and the label
    metrics and logs count it under (None in the table: the TrapError's kind). A server adds
    the HTTP status to each row (http_server.py's rows are (http_status, exit_status, label))."""

    __slots__ = ()


# The one table of what each kvhost error means, read by report() (kvhost's and wasmstore.py's
# command lines) and by http_server.py. A subclass without its own row uses its nearest
# parent's (see error_meaning): AccessDeniedError is a KvError, GuestExit a TrapError.
ERROR_STATUS = {
    NoSuchFunction: ErrorMeaning(2, "not-found"),     # the message lists the functions there are
    ArgumentError: ErrorMeaning(2, "arguments"),      # the message names which argument
    LinkError: ErrorMeaning(2, "link"),               # the message names the import
    GuestError: ErrorMeaning(2, "guest"),             # refused before it runs
    TrapError: ErrorMeaning(1, None),                 # stopped: timeout, fuel, memory, trap...
    KvError: ErrorMeaning(1, "error"),                # a backend or an operation failed
}


def error_meaning(exc):
    """The ErrorMeaning of a kvhost exception (its class's row or its nearest parent's, a
    TrapError's kind as the label); None for any other exception."""
    for cls in type(exc).__mro__:
        meaning = ERROR_STATUS.get(cls)
        if meaning is not None:
            return meaning._replace(label=exc.kind) if meaning.label is None else meaning
    return None


# ---------------------------------------------------------------------------
# cache: the one bounded map
# ---------------------------------------------------------------------------
# Every memo kvhost keeps (names already validated, Redis key prefixes, compiled guests) is a
# _BoundedCache, so none grows without bound when callers pick its keys. wasmstore.py has its
# own cache type: kvhost must keep working copied alone.

class _BoundedCache(collections.OrderedDict):
    """A dict that forgets its least recently used entries once it holds more than max_items
    of them, or once weight(value) summed over them passes max_weight (the newest entry stays,
    however heavy). Lookups are plain dict lookups (a host call makes several); only get_recent
    marks an entry used. Change it through put() only, so the weight stays true."""

    def __init__(self, max_items=None, max_weight=None, weight=None):
        super().__init__()
        self.max_items = max_items
        self.max_weight = max_weight
        self._weight_of = weight or (lambda value: 1)
        self.weight = 0             # weight(value) summed over the entries

    def put(self, key, value):
        """Store value under key as the most recently used entry, then evict down to bounds."""
        if key in self:
            self.weight -= self._weight_of(super().pop(key))
        self[key] = value
        self.weight += self._weight_of(value)
        while len(self) > 1 and ((self.max_items is not None and len(self) > self.max_items)
                                 or (self.max_weight is not None
                                     and self.weight > self.max_weight)):
            self.weight -= self._weight_of(self.popitem(last=False)[1])
        return value

    def add(self, key):
        """put(key, True): the set-like use (a key that has passed a check)."""
        return self.put(key, True)

    def get_recent(self, key):
        """The value under key (None if absent), marked as the most recently used."""
        value = self.get(key)
        if value is not None:
            try:
                self.move_to_end(key)
            except KeyError:        # evicted by another thread meanwhile
                pass
        return value


# ---------------------------------------------------------------------------
# input from outside: numbers, JSON, URLs
# ---------------------------------------------------------------------------
# Every number, JSON text and URL kvhost takes from a user, a file or a peer goes through one of
# these three, so each rule holds everywhere: only ASCII digits are digits (str.isdigit() takes
# "²", int() takes "٣" and "1_0"), JSON nests at most MAX_JSON_DEPTH levels (the decoder
# recurses: 1,000 levels in 2 KB raise RecursionError), a URL's port is a number in range.
# wasmstore.py has the same three for its own input, so that each file works copied alone;
# http_server.py uses wasmstore.py's.

_INTEGER_TEXT = re.compile(r"-?[0-9]+\Z")
_FRACTION_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_USERINFO = re.compile(r"//[^/@]*@")


def parse_number(text, what, *, minimum=0, maximum=None, fraction=False):
    """The number `text` (str or bytes) spells in ASCII digits: an int, or with fraction=True a
    finite float (a decimal point and an exponent allowed). A leading "-" is the only sign; no
    space, "_", "+", nan or inf. ArgumentError naming `what` when the text is not such a number
    or the number is outside [minimum, maximum] (None: unbounded)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    pattern = _FRACTION_TEXT if fraction else _INTEGER_TEXT
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS or not pattern.match(text):
        shown = (repr(text) if not isinstance(text, str) or len(text) <= 40
                 else repr(text[:37] + "..."))
        kind = "a number" if fraction else "an integer"
        raise ArgumentError(f"invalid {what} {shown}: expected {kind} in ASCII digits")
    value = float(text) if fraction else int(text)
    if not math.isfinite(value):
        raise ArgumentError(f"invalid {what} {text!r}: expected a finite number")
    if (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise ArgumentError(f"invalid {what} {text!r}: expected {bounds}")
    return value


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON (write \"NaN\", \"Infinity\" or \"-Infinity\" as "
                     "strings)")


_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def json_depth(text):
    """How deep the arrays and objects of JSON text nest (brackets inside strings do not count;
    for text that is not JSON, how deep a decoder would get before it finds out)."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(data, what="JSON", *, max_depth=MAX_JSON_DEPTH):
    """The value of strict JSON (no NaN or Infinity) given as str or bytes (UTF-8, or the
    UTF-16/32 that json detects), nested at most max_depth levels: deeper input is refused
    before the decoder sees it. ArgumentError naming `what` otherwise."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        try:
            data = data.decode(json.detect_encoding(data))
        except UnicodeDecodeError:
            raise ArgumentError(f"invalid {what}: not UTF-8 text") from None
    if not isinstance(data, str):
        raise ArgumentError(f"invalid {what}: expected JSON text, not {type(data).__name__}")
    if data.count("[") + data.count("{") > max_depth and json_depth(data) > max_depth:
        raise ArgumentError(f"invalid {what}: nested deeper than {max_depth} levels")
    try:
        return _STRICT_JSON.decode(data)
    except ValueError as exc:              # json.JSONDecodeError, and numbers over 4,300 digits
        raise ArgumentError(f"invalid {what}: {exc}") from None


class Url(collections.namedtuple("Url", "scheme username password host port path query")):
    """A URL parse_url() checked; netloc is "host[:port]" (IPv6 hosts in brackets)."""

    __slots__ = ()

    @property
    def netloc(self):
        """host[:port] as a URL writes it (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_url(text, what, schemes):
    """A URL from outside as a Url (host lowercased, IPv6 without brackets, port None when not
    given); ArgumentError naming `what` unless its scheme is one of `schemes`, it names a host
    (printable ASCII only: no space) and its port, if any, is 0-65535 in ASCII digits."""
    shown = repr(_USERINFO.sub("//", str(text))[:200])            # never a password in a message
    if not isinstance(text, str) or _NOT_IN_URL.search(text):
        raise ArgumentError(f"invalid {what} {shown}: not a URL")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:              # "Invalid IPv6 URL", a port out of range or not a number
        raise ArgumentError(f"invalid {what} {shown}: {exc}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ArgumentError(f"invalid {what} {shown}: expected {' or '.join(schemes)}://HOST")
    return Url(parts.scheme, parts.username, parts.password, parts.hostname, port, parts.path,
               parts.query)


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------

def _check_namespace(namespace):
    if not isinstance(namespace, str) or not namespace or len(namespace) > 1024 \
            or "\0" in namespace:
        raise ArgumentError(f"invalid namespace {namespace!r}: expected 1-1024 characters, no NUL")


def _check_bucket(bucket):
    if not isinstance(bucket, str) or not BUCKET_ID_RE.match(bucket):
        raise ArgumentError(f"invalid bucket {bucket!r}: expected [A-Za-z0-9._-]{{1,128}}")


def _check_key(key):
    if type(key) is str and len(key) <= MAX_KEY_BYTES // 4 and key.isascii():
        return   # the common case, decided without encoding
    if not isinstance(key, str):
        raise ArgumentError(f"invalid key {key!r}: expected a string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ArgumentError(f"invalid key {key!r}: not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise OperationError(f"key too large ({size} bytes, limit {MAX_KEY_BYTES})")


def _parse_counter(raw, bounds):
    """The integer a stored value holds, or OperationError if it is not a counter in bounds."""
    if raw is None:
        return 0
    if not DECIMAL_RE.match(raw):
        raise OperationError("value is not a decimal integer")
    number = int(raw)
    if not bounds[0] <= number <= bounds[1]:
        raise OperationError("value is out of range for this increment")
    return number


def _add_checked(current, delta, bounds):
    total = current + delta
    if not bounds[0] <= total <= bounds[1]:
        raise OperationError("increment overflows")
    return total


def encode_cursor(last_key):
    """The opaque draft2 cursor that resumes listing after `last_key`."""
    return CURSOR_PREFIX + base64.urlsafe_b64encode(last_key.encode("utf-8")).decode("ascii")


def decode_cursor(cursor):
    """The key a draft2 cursor resumes after; OperationError('invalid cursor') if malformed."""
    if not isinstance(cursor, str) or not cursor.startswith(CURSOR_PREFIX):
        raise OperationError("invalid cursor")
    try:
        raw = base64.b64decode(cursor[len(CURSOR_PREFIX):].encode("ascii"),
                               altchars=b"-_", validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise OperationError("invalid cursor") from None


class Backend:
    """A key-value store shared by namespaces and buckets; subclasses implement the `_` methods.

    The public methods validate input and enforce the limits, so every backend behaves the same.
    Failures of the underlying store raise BackendError; semantic refusals raise OperationError.
    """

    url = "?"

    def __init__(self, max_value_size=DEFAULT_MAX_VALUE_BYTES):
        if not isinstance(max_value_size, int) or max_value_size < 0:
            raise ArgumentError(f"invalid max_value_size {max_value_size!r}")
        self.max_value_size = max_value_size
        self._checked = _BoundedCache(max_items=10_000)  # (namespace, bucket) pairs validated

    def _check(self, namespace, bucket, key=None):
        if (namespace, bucket) not in self._checked:
            _check_namespace(namespace)
            _check_bucket(bucket)
            self._checked.add((namespace, bucket))
        # the common case is decided without a call or an encode
        if key is not None and not (type(key) is str and len(key) <= MAX_KEY_BYTES // 4
                                    and key.isascii()):
            _check_key(key)

    def _check_value(self, value):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ArgumentError(f"invalid value of type {type(value).__name__}: expected bytes")
        if len(value) > self.max_value_size:
            raise OperationError(f"value too large ({len(value)} bytes, limit "
                                 f"{self.max_value_size})")
        return bytes(value)

    def get(self, namespace, bucket, key):
        """The value of `key`, or None when it is missing."""
        self._check(namespace, bucket, key)
        return self._get(namespace, bucket, key)

    def set(self, namespace, bucket, key, value):
        """Write `value` (bytes) under `key`, replacing any value there."""
        self._check(namespace, bucket, key)
        self._set(namespace, bucket, key, self._check_value(value))

    def delete(self, namespace, bucket, key):
        """Remove `key`; a missing key is fine."""
        self._check(namespace, bucket, key)
        self._delete(namespace, bucket, key)

    def exists(self, namespace, bucket, key):
        """True if `key` holds a value."""
        self._check(namespace, bucket, key)
        return self._exists(namespace, bucket, key)

    def list_page(self, namespace, bucket, cursor=None, limit=PAGE_SIZE):
        """(keys, next_cursor): sorted keys after `cursor` (draft2 opaque string); the cursor is
        None when done."""
        self._check(namespace, bucket)
        after = None if cursor is None else decode_cursor(cursor)
        keys = self._keys_after(namespace, bucket, after, limit + 1)
        if len(keys) > limit:
            keys = keys[:limit]
            return keys, encode_cursor(keys[-1])
        return keys, None

    def buckets(self, namespace):
        """The sorted ids of the buckets of `namespace` that hold at least one key (what a
        person inspecting a guest's data starts from; guests themselves open buckets by id)."""
        _check_namespace(namespace)
        return self._bucket_ids(namespace)

    def list_page_at(self, namespace, bucket, offset=None, limit=PAGE_SIZE):
        """(keys, next_offset): sorted keys from numeric `offset` (draft cursor); None when done."""
        self._check(namespace, bucket)
        offset = 0 if offset is None else offset
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise OperationError("invalid cursor")
        keys = self._keys_at(namespace, bucket, offset, limit + 1)
        if len(keys) > limit:
            return keys[:limit], offset + limit
        return keys, None

    def increment(self, namespace, bucket, key, delta, signed=True):
        """Add `delta` atomically; the value is ASCII decimal, a missing key starts at 0.

        `signed` picks the s64 range (draft2) or the u64 range (draft). A non-decimal value
        or an overflow raises OperationError and leaves the value unchanged.
        """
        self._check(namespace, bucket, key)
        bounds = S64 if signed else U64
        delta_bounds = S64 if signed else U64
        if not isinstance(delta, int) or isinstance(delta, bool) \
                or not delta_bounds[0] <= delta <= delta_bounds[1]:
            raise ArgumentError(f"invalid delta {delta!r}")
        return self._increment(namespace, bucket, key, delta, bounds)

    def compare_and_swap(self, namespace, bucket, key, expected, value):
        """Write `value` only if the current value is still `expected` (None: missing). True if
        written."""
        self._check(namespace, bucket, key)
        if expected is not None:
            expected = bytes(expected)
        return self._compare_and_swap(namespace, bucket, key, expected, self._check_value(value))

    def get_many(self, namespace, bucket, keys):
        """Values for `keys`, positionally (None for a missing key; duplicates answered each
        time)."""
        self._check(namespace, bucket)
        keys = list(keys)
        for key in keys:
            _check_key(key)
        return self._get_many(namespace, bucket, keys) if keys else []

    def set_many(self, namespace, bucket, items):
        """Write all (key, value) pairs in one transaction where the backend has one."""
        self._check(namespace, bucket)
        checked = []
        for key, value in items:
            _check_key(key)
            checked.append((key, self._check_value(value)))
        if checked:
            self._set_many(namespace, bucket, checked)

    def delete_many(self, namespace, bucket, keys):
        """Delete `keys` (missing ones are fine), as one transaction where the backend has them."""
        self._check(namespace, bucket)
        keys = list(keys)
        for key in keys:
            _check_key(key)
        if keys:
            self._delete_many(namespace, bucket, keys)

    def namespaces(self, limit=10_000):
        """The sorted namespaces that hold at least one key, at most `limit` of them (where a
        person looks first when a guest's data is not under the namespace they tried)."""
        return self._namespace_ids(limit)

    def close(self):
        """Release connections; the backend must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.url}>"

    # Defaults built on the single-key primitives; backends override them with batched forms.
    def _get_many(self, namespace, bucket, keys):
        return [self._get(namespace, bucket, key) for key in keys]

    def _keys_at(self, namespace, bucket, offset, limit):
        return self._keys_after(namespace, bucket, None, offset + limit)[offset:]


class MemoryBackend(Backend):
    """Process-local, thread-safe store; data lives as long as the object."""

    url = "memory:"

    def __init__(self, max_value_size=DEFAULT_MAX_VALUE_BYTES):
        super().__init__(max_value_size)
        self._lock = threading.Lock()
        self._buckets = {}

    def _table(self, namespace, bucket):
        return self._buckets.setdefault((namespace, bucket), {})

    def _get(self, namespace, bucket, key):
        with self._lock:
            return self._table(namespace, bucket).get(key)

    def _set(self, namespace, bucket, key, value):
        with self._lock:
            self._table(namespace, bucket)[key] = value

    def _delete(self, namespace, bucket, key):
        with self._lock:
            self._table(namespace, bucket).pop(key, None)

    def _exists(self, namespace, bucket, key):
        with self._lock:
            return key in self._table(namespace, bucket)

    def _bucket_ids(self, namespace):
        with self._lock:
            return sorted(bucket for (ns, bucket), table in self._buckets.items()
                          if ns == namespace and table)

    def _keys_after(self, namespace, bucket, after, limit):
        with self._lock:
            keys = sorted(self._table(namespace, bucket))
        if after is not None:
            keys = [k for k in keys if k > after]
        return keys[:limit]

    def _increment(self, namespace, bucket, key, delta, bounds):
        with self._lock:
            table = self._table(namespace, bucket)
            total = _add_checked(_parse_counter(table.get(key), bounds), delta, bounds)
            table[key] = str(total).encode("ascii")
            return total

    def _compare_and_swap(self, namespace, bucket, key, expected, value):
        with self._lock:
            table = self._table(namespace, bucket)
            if table.get(key) != expected:
                return False
            table[key] = value
            return True

    def _set_many(self, namespace, bucket, items):
        with self._lock:
            self._table(namespace, bucket).update(items)

    def _delete_many(self, namespace, bucket, keys):
        with self._lock:
            table = self._table(namespace, bucket)
            for key in keys:
                table.pop(key, None)

    def _namespace_ids(self, limit):
        with self._lock:
            found = {namespace for (namespace, _), table in self._buckets.items() if table}
        return sorted(found)[:limit]


class SqliteBackend(Backend):
    """Durable store in one SQLite file: WAL, one transaction per operation, one connection per
    thread.

    Single-statement operations run in autocommit mode (SQLite makes each its own transaction);
    read-modify-write operations (increment, compare-and-swap) and batches run inside
    BEGIN IMMEDIATE, so they are atomic across threads and processes sharing the file.
    """

    def __init__(self, path, max_value_size=DEFAULT_MAX_VALUE_BYTES, busy_timeout=5.0):
        super().__init__(max_value_size)
        self.path = os.path.abspath(os.path.expanduser(path))
        self.url = "sqlite:" + self.path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._all = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._run(lambda db: db.execute(
            "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT "
            "NULL,"
            " value BLOB NOT NULL, PRIMARY KEY (ns, bucket, key)) WITHOUT ROWID"))

    def connection(self):
        """This thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise BackendError("sqlite backend is closed")
            parent = os.path.dirname(self.path)
            try:
                os.makedirs(parent, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                     check_same_thread=False)
                self._use_wal(db)
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA fullfsync=ON")     # macOS: F_FULLFSYNC, past the drive's cache
            except FileExistsError as e:       # makedirs met a file where a directory goes
                raise BackendError(f"sqlite: cannot open {self.path}: {e.filename} is not a "
                                   "directory") from None
            except OSError as e:
                raise BackendError(f"sqlite: cannot open {self.path}: "
                                   f"{e.strerror or e}") from None
            except sqlite3.Error as e:
                raise BackendError(f"sqlite: cannot open {self.path}: {e}") from None
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    def _use_wal(self, db):
        """Put the file in WAL mode (it stays so). Switching needs an exclusive lock, and SQLite
        answers "database is locked" at once, without its busy handler, when another connection
        opening the same new file holds a lock meanwhile: retry until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _queue_writer(self):
        """Writers of this process queue on a lock before asking SQLite for its write lock:
        SQLite's busy handler polls with growing sleeps, and under load a thread could starve
        past the busy timeout while others keep winning. Other processes still meet the
        busy timeout. The caller releases self._write_lock."""
        if not self._write_lock.acquire(timeout=self.busy_timeout):
            raise BackendError("sqlite: database is locked (by this process)")

    @contextlib.contextmanager
    def _writer(self, write):
        if not write:
            yield
            return
        self._queue_writer()
        try:
            yield
        finally:
            self._write_lock.release()

    def _run(self, work, immediate=False):
        """Run work(db) in one transaction; sqlite errors become BackendError."""
        db = self.connection()
        with self._writer(immediate):
            try:
                db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    result = work(db)
                    db.execute("COMMIT")
                    return result
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise BackendError(f"sqlite: {e}") from None

    def _one(self, sql, params, write=False):
        """One statement in autocommit mode: SQLite runs it as its own transaction. The hot path
        of every get and set, so it queues writers itself (no _writer generator per call)."""
        db = getattr(self._local, "db", None) or self.connection()
        if write:
            self._queue_writer()
        try:
            return db.execute(sql, params).fetchone()
        except sqlite3.Error as e:
            raise BackendError(f"sqlite: {e}") from None
        finally:
            if write:
                self._write_lock.release()

    def _get(self, namespace, bucket, key):
        row = self._one("SELECT value FROM kv WHERE ns=? AND bucket=? AND key=?",
                        (namespace, bucket, key))
        return None if row is None else bytes(row[0])

    def _set(self, namespace, bucket, key, value):
        self._one("INSERT OR REPLACE INTO kv (ns, bucket, key, value) VALUES (?, ?, ?, ?)",
                  (namespace, bucket, key, value), write=True)

    def _delete(self, namespace, bucket, key):
        self._one("DELETE FROM kv WHERE ns=? AND bucket=? AND key=?",
                  (namespace, bucket, key), write=True)

    def _exists(self, namespace, bucket, key):
        return self._one("SELECT 1 FROM kv WHERE ns=? AND bucket=? AND key=?",
                         (namespace, bucket, key)) is not None

    def _bucket_ids(self, namespace):
        def work(db):
            rows = db.execute("SELECT DISTINCT bucket FROM kv WHERE ns=? ORDER BY bucket",
                              (namespace,))
            return [row[0] for row in rows]
        return self._run(work)

    def _keys_after(self, namespace, bucket, after, limit):
        # TEXT compares as UTF-8 bytes, which is code-point order: the same order as Python's
        # sorted().
        def work(db):
            if after is None:
                rows = db.execute("SELECT key FROM kv WHERE ns=? AND bucket=? ORDER BY key LIMIT ?",
                                  (namespace, bucket, limit))
            else:
                rows = db.execute("SELECT key FROM kv WHERE ns=? AND bucket=? AND key>? ORDER BY "
                                  "key LIMIT ?",
                                  (namespace, bucket, after, limit))
            return [row[0] for row in rows]
        return self._run(work)

    def _keys_at(self, namespace, bucket, offset, limit):
        return self._run(lambda db: [row[0] for row in db.execute(
            "SELECT key FROM kv WHERE ns=? AND bucket=? ORDER BY key LIMIT ? OFFSET ?",
            (namespace, bucket, limit, offset))])

    def _namespace_ids(self, limit):
        return self._run(lambda db: [row[0] for row in db.execute(
            "SELECT DISTINCT ns FROM kv ORDER BY ns LIMIT ?", (limit,))])

    def _increment(self, namespace, bucket, key, delta, bounds):
        def work(db):
            row = db.execute("SELECT value FROM kv WHERE ns=? AND bucket=? AND key=?",
                             (namespace, bucket, key)).fetchone()
            current = _parse_counter(None if row is None else bytes(row[0]), bounds)
            total = _add_checked(current, delta, bounds)
            db.execute("INSERT OR REPLACE INTO kv (ns, bucket, key, value) VALUES (?, ?, ?, ?)",
                       (namespace, bucket, key, str(total).encode("ascii")))
            return total
        return self._run(work, immediate=True)

    def _compare_and_swap(self, namespace, bucket, key, expected, value):
        def work(db):
            row = db.execute("SELECT value FROM kv WHERE ns=? AND bucket=? AND key=?",
                             (namespace, bucket, key)).fetchone()
            if (None if row is None else bytes(row[0])) != expected:
                return False
            db.execute("INSERT OR REPLACE INTO kv (ns, bucket, key, value) VALUES (?, ?, ?, ?)",
                       (namespace, bucket, key, value))
            return True
        return self._run(work, immediate=True)

    def _get_many(self, namespace, bucket, keys):
        def work(db):
            found = {}
            for key in set(keys):
                row = db.execute("SELECT value FROM kv WHERE ns=? AND bucket=? AND key=?",
                                 (namespace, bucket, key)).fetchone()
                if row is not None:
                    found[key] = bytes(row[0])
            return [found.get(key) for key in keys]
        return self._run(work)

    def _set_many(self, namespace, bucket, items):
        self._run(lambda db: db.executemany(
            "INSERT OR REPLACE INTO kv (ns, bucket, key, value) VALUES (?, ?, ?, ?)",
            [(namespace, bucket, k, v) for k, v in items]), immediate=True)

    def _delete_many(self, namespace, bucket, keys):
        self._run(lambda db: db.executemany(
            "DELETE FROM kv WHERE ns=? AND bucket=? AND key=?",
            [(namespace, bucket, k) for k in keys]), immediate=True)

    def close(self):
        """Close every thread's connection; later operations fail."""
        self._closed = True
        with self._all_lock:
            connections, self._all = self._all, []
        for db in connections:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class _RedisReplyError(Exception):
    """An error reply (-ERR ...) from Redis: the connection itself is still fine."""


def _reply_number(text, minimum):
    """The number in a RESP header line; a peer that sends anything else broke the protocol."""
    try:
        return parse_number(text, "number in a redis reply", minimum=minimum)
    except ArgumentError as exc:
        raise ConnectionError(f"bad reply from redis: {exc}") from None


class _RespConnection:
    """One RESP2 connection over a plain socket.

    Every command is encoded into one bytes object and sent with one sendall; replies are read
    with recv_into into one reusable buffer (no 64 KiB allocation per recv, no buffer shifting
    per reply), and a bulk reply is copied out exactly once.
    """

    BUFFER = 1 << 16        # bytes; grown for a larger reply, shrunk back once it is consumed

    def __init__(self, host, port, timeout, username, password, db):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking mode with kernel timeouts: Python's own timeouts add a poll() to every call.
        seconds = int(timeout)
        interval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
        self.sock.settimeout(None)
        self._new_buffer(self.BUFFER)
        try:
            if password is not None:
                self.call(b"AUTH", *([username] if username else []), password)
            if db:
                self.call(b"SELECT", str(db))
        except BaseException:
            self.close()
            raise

    def _new_buffer(self, size):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0       # unread bytes are buf[start:end]

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            if type(arg) is bytes:
                out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
                continue
            if isinstance(arg, str):
                arg = arg.encode("utf-8")
            elif isinstance(arg, int):
                arg = str(arg).encode("ascii")
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(out)

    def call(self, *args):
        self.sock.sendall(self._encode(args))
        return self.read_reply()

    def call_key(self, verb, name):
        """A one-key command (GET, EXISTS, DEL): the hot path, encoded with one format."""
        self.sock.sendall(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(verb), verb, len(name), name))
        return self.read_reply()

    def set(self, name, value):
        self.sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                          % (len(name), name, len(value), value))
        return self.read_reply()

    def pipeline(self, commands):
        """Send all commands in one write, read all replies (errors returned, not raised)."""
        self.sock.sendall(b"".join(self._encode(c) for c in commands))
        replies = []
        for _ in commands:
            try:
                replies.append(self.read_reply())
            except _RedisReplyError as e:
                replies.append(e)
        return replies

    def _fill(self, need=1):
        """Read until at least `need` unread bytes are buffered; a kernel timeout surfaces as
        BlockingIOError (see __init__)."""
        while self.end - self.start < need:
            if self.start == self.end:
                if len(self.buf) > self.BUFFER:        # a big reply is consumed: free its memory
                    self._new_buffer(self.BUFFER)
                self.start = self.end = 0
            if len(self.buf) - self.start < need or self.end == len(self.buf):
                self._compact(need)
            received = self.sock.recv_into(self.view[self.end:])
            if not received:
                raise ConnectionError("connection closed by redis")
            self.end += received

    def _compact(self, need):
        """Move the unread bytes to the front, growing the buffer when `need` does not fit."""
        pending = bytes(self.view[self.start:self.end])
        if len(self.buf) < need or len(self.buf) - len(pending) < 4096:
            self._new_buffer(max(need, 2 * len(self.buf)))
        self.buf[:len(pending)] = pending
        self.start, self.end = 0, len(pending)

    def _line(self):
        while True:
            end = self.buf.find(b"\r\n", self.start, self.end)
            if end >= 0:
                line = bytes(self.view[self.start:end])
                self.start = end + 2
                return line
            if self.end - self.start > self.BUFFER:     # a reply header is a few bytes
                raise ConnectionError("bad reply from redis: header line too long")
            self._fill(self.end - self.start + 1)

    def _bulk(self, size):
        """The next `size` bytes and their CRLF terminator, copied out once."""
        if self.end - self.start < size + 2:
            self._fill(size + 2)
        start = self.start
        if self.buf[start + size:start + size + 2] != b"\r\n":
            raise ConnectionError("bad bulk reply from redis: no CRLF after the data")
        self.start = start + size + 2
        return bytes(self.view[start:start + size])

    def read_reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"$":
            size = _reply_number(rest, -1)
            return None if size < 0 else self._bulk(size)
        if kind == b":":
            return _reply_number(rest, None)
        if kind == b"-":
            raise _RedisReplyError(rest.decode("utf-8", "replace"))
        if kind == b"*":
            count = _reply_number(rest, -1)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise ConnectionError(f"bad reply from redis: {line[:40]!r}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# Compare-and-swap as one server-side step; ARGV[1] says whether the key must be missing.
_CAS_SCRIPT = (b"local v = redis.call('GET', KEYS[1]) "
               b"if (ARGV[1] == '1' and v == false) or (ARGV[1] == '0' and v == ARGV[2]) then "
               b"redis.call('SET', KEYS[1], ARGV[3]) return 1 end return 0")


class RedisBackend(Backend):
    """Redis over RESP2 on a stdlib socket, with a small connection pool and timeouts.

    Keys are stored as ``kv:<quoted namespace>:<bucket>:<key>``; listing scans the bucket's
    prefix and sorts, so cursors follow the same rules as the other backends.
    """

    def __init__(self, url, max_value_size=DEFAULT_MAX_VALUE_BYTES, timeout=5.0, pool_size=8):
        super().__init__(max_value_size)
        parts = parse_url(url, "redis URL (expected redis://[:password@]host:port/db)", ("redis",))
        self.port = parts.port or 6379
        db_text = parts.path.lstrip("/")
        self.db = parse_number(db_text, "redis database number") if db_text else 0
        self.host = parts.host
        self.password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.url = f"redis://{self.host}:{self.port}/{self.db}"
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool = []
        self._pool_lock = threading.Lock()
        self._prefixes = _BoundedCache(max_items=10_000)    # (namespace, bucket) -> key prefix

    def _acquire(self):
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        try:
            return _RespConnection(self.host, self.port, self.timeout,
                                   self.username, self.password, self.db)
        except _RedisReplyError as e:
            if str(e).startswith(("WRONGPASS", "NOPERM", "NOAUTH")):
                raise AccessDeniedError(f"redis: {e}") from None
            raise BackendError(f"redis: cannot connect to {self.host}:{self.port}: {e}") from None
        except OSError as e:
            raise BackendError(f"redis: cannot connect to {self.host}:{self.port}: {e}") from None

    def _release(self, conn):
        with self._pool_lock:
            if len(self._pool) < self.pool_size:
                self._pool.append(conn)
                return
        conn.close()

    def _with_connection(self, work):
        """Run work(conn); a broken connection is dropped, never returned to the pool."""
        conn = self._acquire()
        try:
            result = work(conn)
        except BaseException as e:
            self._failed(conn, e)
        self._release(conn)
        return result

    def _failed(self, conn, error):
        """After `error` on `conn`: keep the connection only if Redis itself answered, then raise
        what callers see (BackendError / AccessDeniedError; anything else unchanged)."""
        if isinstance(error, _RedisReplyError):
            self._release(conn)
            if str(error).startswith(("NOPERM", "NOAUTH")):
                raise AccessDeniedError(f"redis: {error}") from None
            raise BackendError(f"redis: {error}") from None
        conn.close()
        if isinstance(error, (BlockingIOError, socket.timeout)):
            raise BackendError(f"redis: timed out after {self.timeout} s") from None
        if isinstance(error, (OSError, ValueError)):
            raise BackendError(f"redis: {error or type(error).__name__}") from None
        raise error

    # The single-key commands guests call most skip _with_connection's closure and generic encoder.
    def _key_command(self, verb, name):
        conn = self._acquire()
        try:
            reply = conn.call_key(verb, name)
        except BaseException as e:
            self._failed(conn, e)
        self._release(conn)
        return reply

    def _prefix(self, namespace, bucket):
        prefix = self._prefixes.get((namespace, bucket))
        if prefix is None:
            quoted = urllib.parse.quote(namespace, safe="")
            prefix = self._prefixes.put((namespace, bucket),
                                        ("kv:%s:%s:" % (quoted, bucket)).encode("utf-8"))
        return prefix

    def _key(self, namespace, bucket, key):
        return self._prefix(namespace, bucket) + key.encode("utf-8")

    def _get(self, namespace, bucket, key):
        return self._key_command(b"GET", self._key(namespace, bucket, key))

    def _set(self, namespace, bucket, key, value):
        name = self._key(namespace, bucket, key)
        conn = self._acquire()
        try:
            conn.set(name, value)
        except BaseException as e:
            self._failed(conn, e)
        self._release(conn)

    def _delete(self, namespace, bucket, key):
        self._key_command(b"DEL", self._key(namespace, bucket, key))

    def _exists(self, namespace, bucket, key):
        return self._key_command(b"EXISTS", self._key(namespace, bucket, key)) == 1

    def _all_keys(self, namespace, bucket):
        prefix = self._prefix(namespace, bucket)

        def work(conn):
            keys, cursor = set(), b"0"
            while True:
                cursor, batch = conn.call(b"SCAN", cursor, b"MATCH",
                                          prefix + b"*", b"COUNT", b"1000")
                keys.update(batch)
                if cursor == b"0":
                    return sorted(k[len(prefix):].decode("utf-8") for k in keys)
        return self._with_connection(work)

    def _bucket_ids(self, namespace):
        # Keys are kv:<quoted namespace>:<bucket>:<key>; quoting leaves no glob character, and
        # a bucket id has no ':'.
        prefix = ("kv:%s:" % urllib.parse.quote(namespace, safe="")).encode("utf-8")

        def work(conn):
            buckets, cursor = set(), b"0"
            while True:
                cursor, batch = conn.call(b"SCAN", cursor, b"MATCH", prefix + b"*",
                                          b"COUNT", b"1000")
                buckets.update(name[len(prefix):].split(b":", 1)[0] for name in batch)
                if cursor == b"0":
                    return sorted(bucket.decode("ascii") for bucket in buckets)
        return self._with_connection(work)

    def _keys_after(self, namespace, bucket, after, limit):
        keys = self._all_keys(namespace, bucket)
        if after is not None:
            keys = [k for k in keys if k > after]
        return keys[:limit]

    def _keys_at(self, namespace, bucket, offset, limit):
        return self._all_keys(namespace, bucket)[offset:offset + limit]

    def _increment(self, namespace, bucket, key, delta, bounds):
        name = self._key(namespace, bucket, key)
        if bounds == S64:
            try:
                return self._with_connection(lambda c: c.call(b"INCRBY", name, delta))
            except BackendError as e:
                if "redis: ERR" not in str(e):
                    raise
                # Redis refused and changed nothing: report it in the words every backend uses.
                current = _parse_counter(self._get(namespace, bucket, key), bounds)
                _add_checked(current, delta, bounds)
                raise
        return self._with_connection(lambda c: self._increment_watched(c, name, delta, bounds))

    @staticmethod
    def _increment_watched(conn, name, delta, bounds):
        """Optimistic read-modify-write for ranges Redis cannot check (u64)."""
        while True:
            conn.call(b"WATCH", name)
            try:
                total = _add_checked(_parse_counter(conn.call(b"GET", name), bounds), delta, bounds)
            except OperationError:
                conn.call(b"UNWATCH")
                raise
            replies = conn.pipeline([[b"MULTI"], [b"SET", name, str(total)], [b"EXEC"]])
            if replies[-1] is not None:
                return total

    def _compare_and_swap(self, namespace, bucket, key, expected, value):
        name = self._key(namespace, bucket, key)
        args = [b"EVAL", _CAS_SCRIPT, b"1", name,
                b"1" if expected is None else b"0", expected or b"", value]
        return self._with_connection(lambda c: c.call(*args)) == 1

    def _get_many(self, namespace, bucket, keys):
        names = [self._key(namespace, bucket, k) for k in keys]
        return self._with_connection(lambda c: c.call(b"MGET", *names))

    def _set_many(self, namespace, bucket, items):
        args = [b"MSET"]
        for key, value in items:
            args += [self._key(namespace, bucket, key), value]
        self._with_connection(lambda c: c.call(*args))

    def _delete_many(self, namespace, bucket, keys):
        names = [self._key(namespace, bucket, k) for k in keys]
        self._with_connection(lambda c: c.call(b"DEL", *names))

    def _namespace_ids(self, limit):
        def work(conn):
            found, cursor = set(), b"0"
            while True:
                cursor, batch = conn.call(b"SCAN", cursor, b"MATCH", b"kv:*", b"COUNT", b"1000")
                found.update(name.split(b":", 2)[1] for name in batch if name.count(b":") >= 3)
                if cursor == b"0":
                    break
            names = (urllib.parse.unquote(name.decode("utf-8", "replace")) for name in found)
            return sorted(names)[:limit]
        return self._with_connection(work)

    def close(self):
        """Close the pooled connections."""
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()


def open_backend(url=DEFAULT_KV_URL, max_value_size=DEFAULT_MAX_VALUE_BYTES):
    """A Backend for `url`: "memory:", "sqlite:PATH" (default ~/.wasmstore/kv.sqlite3) or
    "redis://[[user]:password@]host:port/db"."""
    if not isinstance(url, str):
        raise ArgumentError(f"invalid backend URL {url!r}")
    if url == "memory:":
        return MemoryBackend(max_value_size)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):] or DEFAULT_KV_URL[len("sqlite:"):]
        return SqliteBackend(path, max_value_size)
    if url.startswith("redis://"):
        return RedisBackend(url, max_value_size)
    raise ArgumentError(f"invalid backend URL {url!r}: expected memory:, sqlite:PATH or "
                        "redis://host:port/db")


# ---------------------------------------------------------------------------
# wasm reader: the binary format
# ---------------------------------------------------------------------------
# The one reader of the WebAssembly binary format in the project (wasmstore.py imports it):
# framing (the header, sections, the core modules inside a component), the import encoding
# wasmtime's validator accepts and its compiler refuses (compact imports), a component's
# interface names (what an OCI config lists), the types of a core module's imports and
# exports, and the stubbing of function bodies (a big component is checked by compiling it
# with every body replaced by `unreachable`). Types are read from the bytes because
# wasmtime-py aborts the whole process (a Rust panic) when asked the kind of a v128 or of a
# typed (GC) reference type, which any stored module may use in a signature; wasmtime is then
# only asked to call functions whose types are i32/i64/f32/f64. Pure Python: none of it needs
# wasmtime.

WASM_MAGIC = b"\0asm"
CORE_HEADER = WASM_MAGIC + b"\x01\x00\x00\x00"          # a core module, version 1
COMPONENT_HEADER = WASM_MAGIC + b"\x0d\x00\x01\x00"     # a component, layer 1
MAX_COMPONENT_NESTING = 64                              # nested components read at most this deep

_VALTYPE_NAMES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
                  0x70: "funcref", 0x6F: "externref"}
_REF_SHORTHANDS = frozenset(range(0x69, 0x75)) - {0x70, 0x6F}       # anyref, eqref, i31ref, ...
_EXTERN_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
_COMPACT_IMPORTS = (0x7E, 0x7F)      # what follows an empty field name in the compact encoding


class WasmFormatError(KvError, ValueError):
    """Bytes that break the WebAssembly binary format; .offset is where (None if unknown)."""

    def __init__(self, message, offset=None):
        super().__init__(message if offset is None else f"{message} (at offset {offset:#x})")
        self.offset = offset


class WasmReader:
    """Sequential reads of a WebAssembly binary (bytes, bytearray, memoryview or mmap) from
    `pos` up to `end`; WasmFormatError, with the offset, on anything malformed."""

    def __init__(self, data, pos=0, end=None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def fail(self, message):
        """Raise WasmFormatError with `message` at the current offset."""
        raise WasmFormatError(message, self.pos)

    def byte(self):
        """The next byte."""
        if self.pos >= self.end:
            self.fail("unexpected end-of-file")
        self.pos += 1
        return self.data[self.pos - 1]

    def leb(self, signed=False, bits=64):
        """A LEB128 number of at most `bits` bits."""
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift >= bits + 7:
                self.fail("invalid LEB128 number")
        if signed and b & 0x40:
            result -= 1 << shift
        return result

    def u32(self):
        """An unsigned LEB128 number of at most 32 bits."""
        return self.leb(bits=32)

    def skip(self, size):
        """Step over `size` bytes."""
        if size > self.end - self.pos:
            self.fail("unexpected end-of-file")
        self.pos += size

    def name(self):
        """A name: its length, then UTF-8."""
        size = self.u32()
        start = self.pos
        self.skip(size)
        try:
            return bytes(self.data[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise WasmFormatError("malformed UTF-8 name", start) from None

    def sections(self):
        """(section id, a WasmReader over its payload) of each section up to the end."""
        while self.pos < self.end:
            section_id = self.byte()
            size = self.u32()
            start = self.pos
            self.skip(size)
            yield section_id, WasmReader(self.data, start, self.pos)

    def header(self):
        """"module" or "component" from the 8-byte header at pos (WasmFormatError otherwise)."""
        head = bytes(self.data[self.pos:self.pos + 8])
        if not head.startswith(WASM_MAGIC):
            self.fail("not WebAssembly: the magic header \\0asm is missing")
        if len(head) < 8:
            self.fail("unexpected end-of-file")
        self.skip(8)
        if head == CORE_HEADER:
            return "module"
        if head == COMPONENT_HEADER:
            return "component"
        raise WasmFormatError(f"unknown WebAssembly version {head[4:].hex()}", self.pos - 4)

    # -- core types --------------------------------------------------------------------------------

    def valtype(self):
        """A core value type's name ("i32", "v128", "funcref", "ref", ...)."""
        b = self.byte()
        if b in _VALTYPE_NAMES:
            return _VALTYPE_NAMES[b]
        if b in _REF_SHORTHANDS:
            return "ref"
        if b in (0x63, 0x64):               # (ref null? heaptype)
            self.leb(signed=True)
            return "ref"
        self.fail(f"unknown value type 0x{b:02x}")

    def limits(self):
        """Step over the limits of a memory or table."""
        flags = self.byte()
        self.leb()
        if flags & 1:
            self.leb()
        if flags & 8:                       # a custom page size (its log2)
            self.u32()

    def functype_entry(self, types):
        """One entry of the type section (a rec group adds several); function types as
        (params, results), other types as None."""
        form = self.byte()
        if form == 0x4E:                                        # rec group
            for _ in range(self.u32()):
                self.functype_entry(types)
            return
        if form in (0x50, 0x4F):                                # sub / sub final
            for _ in range(self.u32()):
                self.u32()
            form = self.byte()
        if form == 0x60:
            params = tuple(self.valtype() for _ in range(self.u32()))
            results = tuple(self.valtype() for _ in range(self.u32()))
            types.append((params, results))
        elif form in (0x5F, 0x5E):                              # struct / array
            for _ in range(self.u32() if form == 0x5F else 1):
                if self.pos < self.end and self.data[self.pos] in (0x78, 0x77):   # packed i8/i16
                    self.byte()
                else:
                    self.valtype()
                self.byte()                                     # mutability
            types.append(None)
        else:
            self.fail(f"unknown type form 0x{form:02x}")

    def import_entry(self, types=None):
        """(module, name, kind, signature) of one import; a function's signature is its type
        (None when `types`, the module's function types, is not given)."""
        module, name = self.name(), self.name()
        at = self.pos
        kind = self.byte()
        signature = None
        if kind == 0:
            index = self.u32()
            if types is not None:
                if index >= len(types):
                    raise WasmFormatError(f"unknown type {index}", at)
                signature = types[index]
        elif kind == 1:
            self.valtype()
            self.limits()
        elif kind == 2:
            self.limits()
        elif kind == 3:
            self.valtype()
            self.byte()
        elif kind == 4:
            self.byte()
            self.u32()
        elif kind in _COMPACT_IMPORTS and not name:
            # wasmtime's validator accepts this encoding; its compiler does not (wasmtime 50)
            raise WasmFormatError(f"invalid leading byte 0x{kind:02X} with compact imports "
                                  "proposal disabled", at)
        else:
            raise WasmFormatError(f"unknown import kind {kind}", at)
        return module, name, _EXTERN_KINDS[kind], signature

    # -- component imports and exports -------------------------------------------------------------

    def extern_name(self):
        """A component import or export name (with its attributes, which are skipped)."""
        kind = self.byte()
        name = self.name()
        if kind == 0x02:                          # name followed by attributes
            for _ in range(self.u32()):
                if self.byte() not in (0x00, 0x01, 0x02):
                    self.fail("unknown import/export attribute")
                self.name()
        elif kind not in (0x00, 0x01):
            self.fail(f"unknown import/export name kind {kind:#x}")
        return name

    def skip_extern_type(self):
        """Step over a component extern type (of an import, or an export's explicit type)."""
        kind = self.byte()
        if kind == 0x00:                          # core module: 0x11 and a type index
            self.byte()
            self.u32()
        elif kind in (0x01, 0x04, 0x05):          # func, component, instance: type index
            self.u32()
        elif kind == 0x02:                        # value: eq index or a value type
            if self.byte() == 0x00:
                self.u32()
            else:
                self.leb(signed=True, bits=33)
        elif kind == 0x03:                        # type: eq index or sub resource
            if self.byte() == 0x00:
                self.u32()
        else:
            self.fail(f"unknown extern type {kind:#x}")

    def skip_sort_index(self):
        """Step over an export's sort and index."""
        if self.byte() == 0x00:                   # a core sort has a second byte
            self.byte()
        self.u32()


def wasm_kind(data):
    """"module" or "component", from the header of `data` (WasmFormatError if neither)."""
    return WasmReader(data).header()


def core_signatures(data):
    """(imports, exports) of a core module binary: imports [(module, name, kind, signature)],
    exports {name: (kind, signature)}, where a function's signature is (params, results) as type
    names ("i32", "v128", "ref", ...) and other kinds have None. WasmFormatError if
    unreadable."""
    reader = WasmReader(memoryview(data))
    if reader.header() != "module":
        raise WasmFormatError("a component has no core signatures", 0)
    types, imports, exports, functions = [], [], {}, []
    for section, body in reader.sections():
        if section == 1:
            for _ in range(body.u32()):
                body.functype_entry(types)
        elif section == 2:
            for _ in range(body.u32()):
                entry = body.import_entry(types)
                imports.append(entry)
                if entry[2] == "func":
                    functions.append(entry[3])
        elif section == 3:
            for _ in range(body.u32()):
                index = body.u32()
                if index >= len(types):
                    body.fail(f"unknown type {index}")
                functions.append(types[index])
        elif section == 7:
            for _ in range(body.u32()):
                name, kind, index = body.name(), body.byte(), body.u32()
                if kind == 0 and index >= len(functions):
                    body.fail(f"unknown function {index}")
                exports[name] = (_EXTERN_KINDS.get(kind, "other"),
                                 functions[index] if kind == 0 else None)
    return imports, exports


def check_core_imports(data, start=0, end=None):
    """Refuse (WasmFormatError) the import encoding of the core module at start..end that
    wasmtime's validator accepts and its compiler refuses: compact imports. Only the import
    section is read."""
    reader = WasmReader(data, start, end)
    reader.header()
    for section, body in reader.sections():
        if section == 2:
            for _ in range(body.u32()):
                body.import_entry()
            return


def sections_fit(data):
    """True if every top-level section of a module or component ends inside `data` (after a
    WebAssembly header: a file that is not WebAssembly is not "truncated")."""
    try:
        reader = WasmReader(data)
        reader.header()
        for _ in reader.sections():
            pass
    except WasmFormatError as e:
        return not str(e).startswith("unexpected end-of-file")
    return True


def module_spans(data, start=0, end=None, depth=0):
    """(start, end) of every core module in a module or component (nested components
    included), in order; WasmFormatError if the framing is broken."""
    reader = WasmReader(data, start, end)
    if reader.header() == "module":
        for _ in reader.sections():
            pass
        return [(start, reader.end)]
    if depth >= MAX_COMPONENT_NESTING:
        reader.fail("components nested too deeply")
    spans = []
    for section, body in reader.sections():
        if section == 1:                            # a core module
            if WasmReader(data, body.pos, body.end).header() != "module":
                body.fail("a core module section holds no core module")
            spans.append((body.pos, body.end))
        elif section == 4:                          # a nested component
            spans += module_spans(data, body.pos, body.end, depth + 1)
    return spans


def stub_function_bodies(buffer, start, end):
    """Replace every function body of the (validated) core module at start..end of the
    writable `buffer` by `unreachable`, `nop`... `end` of the same size, in place (offsets in
    messages stay the original's)."""
    reader = WasmReader(buffer, start, end)
    reader.header()
    for section, body in reader.sections():
        if section != 10:                           # the code section
            continue
        for _ in range(body.u32()):
            size = body.u32()
            at = body.pos
            body.skip(size)
            if size >= 3:                           # no locals, unreachable, nop..., end
                buffer[at:at + size] = b"\x00\x00" + b"\x01" * (size - 3) + b"\x0b"


def component_interface(data):
    """(kind, imports, exports) of a module or component binary: for a component, the names of
    its top-level imports and exports (interface names such as "wasi:cli/run@0.2.0", or plain
    names) in order, without repeats; a core module has none listed. Only section headers and
    a component's import and export sections are read."""
    reader = WasmReader(data)
    kind = reader.header()
    if kind == "module":
        return "module", [], []
    imports, exports = [], []
    for section, body in reader.sections():
        if section == 10:
            for _ in range(body.u32()):
                imports.append(body.extern_name())
                body.skip_extern_type()
        elif section == 11:
            for _ in range(body.u32()):
                exports.append(body.extern_name())
                body.skip_sort_index()
                if body.byte() == 0x01:             # an optional explicit type
                    body.skip_extern_type()
    return "component", list(dict.fromkeys(imports)), list(dict.fromkeys(exports))


# ---------------------------------------------------------------------------
# wasmtime C API: the one section below wasmtime-py's public API
# ---------------------------------------------------------------------------

"""What kvhost does below wasmtime-py's public API, all of it here; the rest of the file uses
the names this section defines (``_C``, the record accessors ``_read``/``_write``/``_span``,
``_pointer_at``, the layout constants) and wasmtime-py's public API.

Why, as measured on wasmtime-py 50.0.1 (2026-12-07):

- Component host functions: wasmtime-py's ``add_func`` re-reads and re-walks the function
  type on every call (~100 us, 8-12k calls/s) and cannot return an err from
  ``result<option<T>, E>`` (its lowering tries the ok case first). kvhost registers C
  callbacks (``wasmtime_component_linker_instance_add_func``) whose converters are built once
  from the WIT and read and write ``wasmtime_component_val_t`` records in place: 150-170k
  calls/s of ``bucket.exists``.
- Core calls: one export lookup and no type reads per call (wasmtime-py wraps every export
  and re-reads a Func's type on each call); a fresh Store, instance and call of a core
  ``add`` costs about half of wasmtime-py's.
- Short C calls keep the GIL (a ``ctypes.PyDLL`` opened by the path wasmtime-py loaded, not
  from its handle): ``python bench.py run --only http`` (figure 1: warm calls of ``add`` over 8
  connections, a threaded server) used 209/249/316 us of server CPU per call (three runs)
  against 252/328/337 us with every function bound through wasmtime-py's CDLL, and with one
  other thread running Python a ``val_new`` + ``val_free`` took 0.6 us against 19.7 us (each
  call hands the GIL over). ``bench.py kv``'s single-threaded figures do not move. Calls that
  run guest code (instantiation, function calls, a provider's destructors) release the GIL.
- HTTP handlers: a request's Store is a bare C store and its component is instantiated and its
  handler found through the C API (``instantiate_component``, ``component_func``): with a
  wasmtime.Store and wasmtime-py's instantiate and get_func, a request cost 158 us of CPU
  against 146 us (guests/http/hello.wat; the jco handler 969 against 923 us).

Memory is reached only through bounded ctypes arrays over what wasmtime handed over (a
record, a vector's data, a box): ``_span(address, size)``.

Written for wasmtime-py 50 (WASMTIME_SERIES). On any other version ``_C`` is None and
Host() raises KvError saying which wasmtime to install; the backends, the wasm reader and
``kvhost kv`` need none of this and keep working.

Private names of wasmtime-py relied upon (nothing else outside its public API is used):
  wasmtime._ffi.dll (its ``_name``: the library's path)
  wasmtime._ffi structures: wasmtime_component_val_t, wasmtime_component_valrecord_entry,
      wasmtime_val_t, wasmtime_instance_t, wasmtime_extern_t, wasmtime_error_t, wasm_trap_t,
      wasmtime_component_instance_t, wasmtime_component_func_t (sizes and offsets checked
      against the constants below when binding, or only sized)
  wasmtime._ffi constants: WASMTIME_COMPONENT_<KIND> (checked against _KIND),
      WASMTIME_I32, WASMTIME_I64, WASMTIME_F32, WASMTIME_F64, WASMTIME_EXTERN_FUNC
  wasmtime.WasmtimeError._from_ptr, wasmtime.Trap._from_ptr (take over a C error or trap)
  .ptr() of Config, Engine, Module, Store, component Linker, LinkerInstance, Component,
      ExportIndex and ResourceType; Store._context()
  wasmtime.component.Func._func, wasmtime.Instance._instance (their C structures)
C functions (wasmtime's C API, bound by name in _CApi): see _CApi.__init__.
"""

WASMTIME_SERIES = "50."            # the wasmtime-py release series this section was written for

# wasmtime_component_val_t (component/val.h): 32 bytes, its kind (u8) at +0, its payload at +8.
_VAL_SIZE = 32
_VAL_PAYLOAD = 8
_ENTRY_SIZE = 48                   # wasmtime_component_valrecord_entry: name {size, data}, val
_KIND = {name: code for code, name in enumerate((
    "bool", "s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64", "f32", "f64", "char", "string",
    "list", "record", "tuple", "variant", "enum", "option", "result", "flags", "resource"))}
_CORE_VAL_SIZE = 32                # wasmtime_val_t: kind at +0, value at +8
_CORE_KINDS = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}

_SMALL_SPANS = {}                  # size -> ctypes array type, for the sizes records come in


def _span(address, size):
    """The `size` bytes at `address` as a writable ctypes array (a bounded view of memory that
    wasmtime handed over: a record, a vector's data, a box)."""
    kind = _SMALL_SPANS.get(size)
    if kind is None:
        kind = ctypes.c_char * size
        if size <= 256:
            _SMALL_SPANS[size] = kind
    return kind.from_address(address)


def _field(fmt):
    """(read, write) of the struct `fmt` (one to three fields) stored at an address, each through
    a bounded view of exactly its size: read(address) -> the fields (the field itself when
    there is one); write(address, *fields). Fixed arities: these run several times per host
    call."""
    layout = struct.Struct(fmt)
    unpack, pack = layout.unpack_from, layout.pack_into
    at = (ctypes.c_char * layout.size).from_address
    count = len(layout.unpack_from(bytes(layout.size)))

    def read_one(address):
        return unpack(at(address))[0]

    def read_all(address):
        return unpack(at(address))

    def write_one(address, value):
        pack(at(address), 0, value)

    def write_two(address, first, second):
        pack(at(address), 0, first, second)

    def write_three(address, first, second, third):
        pack(at(address), 0, first, second, third)
    writers = {1: write_one, 2: write_two, 3: write_three}
    return (read_one if count == 1 else read_all), writers[count]


_pointer_at, _write_pointer = _field("<Q")
_vec_at = _field("<QQ")[0]                   # (size, data address) of a {size, data} vector
_kind_at, _set_kind = _field("<B")           # a val's kind (and a bool's value, at +8)
_write_kind_pointer = _field("<B7xQ")[1]     # kind, then a pointer at +8
_write_result = _field("<B7x?7xQ")[1]        # kind, is_ok at +8, box at +16
_is_ok_box_at = _field("<?7xQ")[0]           # a result's payload: is_ok, box


_vp, _sz = ctypes.c_void_p, ctypes.c_size_t
# ctx, args and results arrive as plain addresses: no pointer objects are built per call.
_FUNC_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, _vp, _vp, _vp, _vp, _sz, _vp, _sz)
_DTOR_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, _vp, _vp, ctypes.c_uint32)
_FINALIZER = ctypes.CFUNCTYPE(None, _vp)


def _wasmtime_version():
    """The installed wasmtime version, part of every compile-cache key (read from its
    dist-info directory: importlib.metadata alone costs ~50 ms)."""
    if not _WASMTIME_VERSION:
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(wasmtime.__file__)))
        try:
            found = [name[len("wasmtime-"):-len(".dist-info")] for name in os.listdir(package_dir)
                     if name.startswith("wasmtime-") and name.endswith(".dist-info")]
        except OSError:
            found = []
        if len(found) != 1:
            from importlib.metadata import version
            found = [version("wasmtime")]
        _WASMTIME_VERSION.append(found[0])
    return _WASMTIME_VERSION[0]


_WASMTIME_VERSION = []
# wasmtime_pooling_allocation_config_*_set functions taking a size_t (the others take a uint32)
_POOL_SIZE_T_SETTINGS = frozenset({"max_memory_size", "table_elements", "max_core_instance_size",
                                   "linear_memory_keep_resident", "table_keep_resident",
                                   "max_component_instance_size"})


class _CApi:
    """wasmtime's C functions and structures as kvhost calls them, bound once (see the
    section's docstring). Functions take and return plain addresses (ints)."""

    def __init__(self, ffi):
        self.ffi = ffi
        self._check_layout(ffi)
        library = ffi.dll._name
        # dlopen of the path wasmtime-py loaded hands back the same library.
        self._keep_gil = ctypes.PyDLL(library)
        self._release_gil = ctypes.CDLL(library)
        quick, slow = self._quick, self._slow
        p_vp, u32, i64, u64 = ctypes.POINTER(_vp), ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64
        # resources and values: short, never block, keep the GIL
        self.any_to_host = quick("wasmtime_component_resource_any_to_host", _vp, _vp, _vp, p_vp)
        self.any_drop = quick("wasmtime_component_resource_any_drop", _vp, _vp, _vp)
        self.any_delete = quick("wasmtime_component_resource_any_delete", None, _vp)
        self.host_new = quick("wasmtime_component_resource_host_new", _vp, ctypes.c_bool, u32, u32)
        self.host_rep = quick("wasmtime_component_resource_host_rep", u32, _vp)
        self.host_delete = quick("wasmtime_component_resource_host_delete", None, _vp)
        self.host_to_any = quick("wasmtime_component_resource_host_to_any", _vp, _vp, _vp, p_vp)
        self.byte_vec_new = quick("wasm_byte_vec_new", None, _vp, _sz, ctypes.c_char_p)
        self.val_new = quick("wasmtime_component_val_new", _vp, _vp)
        self.val_delete = quick("wasmtime_component_val_delete", None, _vp)  # contents, in place
        self.val_free = quick("wasmtime_component_val_free", None, _vp)      # a val_new box
        self.error_new = quick("wasmtime_error_new", _vp, ctypes.c_char_p)
        self.seq_new = {kind: quick(f"wasmtime_component_val{kind}_new_uninit", None, _vp, _sz)
                        for kind in ("list", "tuple", "record", "flags")}
        self.seq_delete = {kind: quick(f"wasmtime_component_val{kind}_delete", None, _vp)
                           for kind in ("list", "tuple", "record", "flags")}
        # stores: short setup and teardown keep the GIL too
        self.store_new = quick("wasmtime_store_new", _vp, _vp, _vp, _vp)
        self.store_context = quick("wasmtime_store_context", _vp, _vp)
        self.store_delete = quick("wasmtime_store_delete", None, _vp)
        self.set_fuel = quick("wasmtime_context_set_fuel", _vp, _vp, u64)
        self.get_fuel = quick("wasmtime_context_get_fuel", _vp, _vp, ctypes.POINTER(u64))
        self.set_epoch_deadline = quick("wasmtime_context_set_epoch_deadline", None, _vp, u64)
        self.store_limiter = quick("wasmtime_store_limiter", None, _vp, i64, i64, i64, i64, i64)
        self.concurrency_support = quick("wasmtime_config_concurrency_support_set", None, _vp,
                                         ctypes.c_bool)
        self.export_get = quick("wasmtime_instance_export_get", ctypes.c_bool, _vp, _vp,
                                ctypes.c_char_p, _sz, _vp)
        self.add_func = quick("wasmtime_component_linker_instance_add_func", _vp, _vp,
                              ctypes.c_char_p, _sz, _FUNC_CALLBACK, _vp, _FINALIZER)
        self.add_resource = quick("wasmtime_component_linker_instance_add_resource", _vp, _vp,
                                  ctypes.c_char_p, _sz, _vp, _DTOR_CALLBACK, _vp, _FINALIZER)
        # calls that run guest code release the GIL (the epoch ticker must keep running)
        self.instance_new = slow("wasmtime_instance_new", _vp, _vp, _vp, _vp, _sz, _vp, _vp)
        self.core_call = slow("wasmtime_func_call", _vp, _vp, _vp, _vp, _sz, _vp, _sz, _vp)
        self.component_call = slow("wasmtime_component_func_call", _vp, _vp, _vp, _vp, _sz, _vp,
                                   _sz)                                  # runs post-return too
        self.provider_drop = slow("wasmtime_component_resource_any_drop", _vp, _vp, _vp)
        self.component_instantiate = slow("wasmtime_component_linker_instantiate", _vp, _vp, _vp,
                                          _vp, _vp)                      # runs start functions
        self.component_get_func = quick("wasmtime_component_instance_get_func", ctypes.c_bool,
                                        _vp, _vp, _vp, _vp)
        self.component_instance_size = ctypes.sizeof(ffi.wasmtime_component_instance_t)
        self.component_func_size = ctypes.sizeof(ffi.wasmtime_component_func_t)
        self.scratch = _CoreScratch(ffi)

    def _quick(self, name, restype, *argtypes):
        return self._bind(self._keep_gil, name, restype, argtypes)

    def _slow(self, name, restype, *argtypes):
        return self._bind(self._release_gil, name, restype, argtypes)

    @staticmethod
    def _bind(library, name, restype, argtypes):
        function = library[name]          # a new function object: wasmtime-py's stay untouched
        function.restype = restype
        function.argtypes = argtypes
        return function

    @staticmethod
    def _check_layout(ffi):
        """Refuse to bind if a structure or constant is not what the code here assumes."""
        val = ffi.wasmtime_component_val_t
        facts = [(ctypes.sizeof(val), _VAL_SIZE), (val.of.offset, _VAL_PAYLOAD),
                 (ctypes.sizeof(ffi.wasmtime_component_valrecord_entry), _ENTRY_SIZE),
                 (ctypes.sizeof(ffi.wasmtime_val_t), _CORE_VAL_SIZE),
                 (ffi.wasmtime_val_t.of.offset, 8), (ffi.WASMTIME_EXTERN_FUNC.value, 0)]
        facts += [(getattr(ffi, "WASMTIME_COMPONENT_" + name.upper()).value, code)
                  for name, code in _KIND.items()]
        facts += [(getattr(ffi, "WASMTIME_" + name.upper()).value, code)
                  for name, code in _CORE_KINDS.items()]
        for found, expected in facts:
            if found != expected:
                raise ValueError(f"the layout of wasmtime's C values changed ({found} != "
                                 f"{expected})")

    # -- pointers of wasmtime-py objects and errors ------------------------------------------------

    @staticmethod
    def address(managed):
        """The C pointer of an Engine, Module, Store, LinkerInstance or ResourceType."""
        return ctypes.cast(managed.ptr(), _vp).value

    @staticmethod
    def context_address(store):
        """The address of a wasmtime.Store's wasmtime_context_t."""
        return ctypes.cast(store._context(), _vp).value

    @staticmethod
    def func_address(func):
        """The address of a wasmtime.component.Func's wasmtime_component_func_t."""
        return ctypes.addressof(func._func)

    @staticmethod
    def instance_address(instance):
        """A core instance's address (instantiate_module() gives one; a linker gives a
        wasmtime.Instance)."""
        return instance if isinstance(instance, int) else ctypes.addressof(instance._instance)

    def error(self, pointer):
        """The wasmtime.WasmtimeError of a wasmtime_error_t address (which it now owns)."""
        return wasmtime.WasmtimeError._from_ptr(
            ctypes.cast(pointer, ctypes.POINTER(self.ffi.wasmtime_error_t)))

    def check(self, error, trap=None):
        """Raise what a wasmtime call reported through its error and trap out-pointers."""
        if error:
            raise self.error(error)
        if trap:
            raise wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(self.ffi.wasm_trap_t)))

    def trap_pointer(self, message):
        """A new wasmtime_error_t for a host callback to return (the guest traps with it)."""
        return self.error_new(message.encode("utf-8", "replace"))

    def disable_concurrency_support(self, config):
        """Turn off a wasmtime.Config's component-model concurrency support (wasmtime-py has no
        setter for it)."""
        self.concurrency_support(self.address(config), False)

    def use_pooling_allocator(self, config, limits):
        """Make engines of a wasmtime.Config take instances, memories and tables from a pool
        reserved once (wasmtime-py has no setter for it): a fresh Store, instance and teardown
        then costs a quarter (no mmap/munmap per request). `limits`: {setting: value}, the
        setters of wasmtime_pooling_allocation_config_* (see _pool_limits)."""
        pool = self._keep_gil["wasmtime_pooling_allocation_config_new"]
        pool.restype, pool.argtypes = _vp, ()
        pooling = pool()
        try:
            for name, value in limits.items():
                setter = self._keep_gil[f"wasmtime_pooling_allocation_config_{name}_set"]
                setter.restype = None
                setter.argtypes = (_vp, _sz if name in _POOL_SIZE_T_SETTINGS else ctypes.c_uint32)
                setter(pooling, value)
            strategy = self._keep_gil["wasmtime_pooling_allocation_strategy_set"]
            strategy.restype, strategy.argtypes = None, (_vp, _vp)
            strategy(self.address(config), pooling)        # copies the pool's settings
        finally:
            delete = self._keep_gil["wasmtime_pooling_allocation_config_delete"]
            delete.restype, delete.argtypes = None, (_vp,)
            delete(pooling)

    # -- registering host functions and resources --------------------------------------------------

    def define_func(self, instance, name, callback, func_id, finalizer):
        """Define function `name` of a component LinkerInstance as the C callback `callback`,
        which gets `func_id` back as its data."""
        raw = name.encode("utf-8")
        self.check(self.add_func(self.address(instance), raw, len(raw), callback, func_id,
                                 finalizer))

    def define_resource(self, instance, name, type_id, dtor, finalizer):
        """Define resource type `name` of a LinkerInstance as host type `type_id`."""
        raw = name.encode("utf-8")
        ty = wc.ResourceType.host(type_id)
        self.check(self.add_resource(self.address(instance), raw, len(raw), self.address(ty),
                                     dtor, type_id, finalizer))

    # -- resources ---------------------------------------------------------------------------------

    def resource_rep(self, ctx, any_ptr):
        """The rep of the host resource behind a resource_any (which keeps owning any_ptr)."""
        host_ptr = _vp()
        self.check(self.any_to_host(ctx, any_ptr, ctypes.byref(host_ptr)))
        try:
            return self.host_rep(host_ptr)
        finally:
            self.host_delete(host_ptr)

    def resource_new(self, ctx, rep, type_id):
        """A new owned resource_any for host resource `rep` of `type_id` (its address)."""
        host_ptr = self.host_new(True, rep, type_id)
        any_ptr = _vp()
        try:
            self.check(self.host_to_any(ctx, host_ptr, ctypes.byref(any_ptr)))
        finally:
            self.host_delete(host_ptr)
        return any_ptr.value

    # -- calls -------------------------------------------------------------------------------------

    def call_component(self, context, func, args, nargs, result, nresults):
        """Call a component Func (its address) on plain val_t arrays; raises WasmtimeError."""
        self.check(self.component_call(func, context, args, nargs, result, nresults))

    def instantiate_component(self, context, linker, component):
        """A new instance of a component in a store (addresses of its context, a component
        Linker and a Component): its wasmtime_component_instance_t, in a buffer of its own."""
        instance = ctypes.create_string_buffer(self.component_instance_size)
        self.check(self.component_instantiate(linker, context, component,
                                              ctypes.addressof(instance)))
        return instance

    def component_func(self, context, instance, index):
        """The wasmtime_component_func_t (a buffer) of an instance's export at `index` (an
        ExportIndex's address), or None when that export is not a function."""
        func = ctypes.create_string_buffer(self.component_func_size)
        if not self.component_get_func(ctypes.addressof(instance), context, index,
                                       ctypes.addressof(func)):
            return None
        return func

    def instantiate_module(self, context, module):
        """The address of an instance of a core module without imports (`module`: its
        address), in this thread's scratch (valid until the thread's next instantiation)."""
        scratch = self.scratch
        scratch.trap.value = None
        error = self.instance_new(context, module, None, 0, scratch.instance_address,
                                  scratch.trap_address)
        self.check(error, scratch.trap.value)
        return scratch.instance_address

    def call_core(self, context, instance, name, params, results, args):
        """Call a core export of known i32/i64/f32/f64 types (context: a store context's
        address; instance: an instance's address): one export lookup and no type reads."""
        scratch = self.scratch
        raw = name.encode("utf-8")
        if not self.export_get(context, instance, raw, len(raw), scratch.item_address) \
                or scratch.item.kind != 0:
            raise NoSuchFunction(f"no function {name!r}")
        if max(len(params), len(results)) <= CORE_SCRATCH_VALUES:
            values, first_output = scratch.values, CORE_SCRATCH_VALUES
        else:
            values = (self.ffi.wasmtime_val_t * (len(params) + len(results)))()
            first_output = len(params)
        inputs = ctypes.addressof(values)
        outputs = inputs + first_output * _CORE_VAL_SIZE
        for index, (kind, value) in enumerate(zip(params, args)):
            slot = values[index]
            slot.kind = _CORE_KINDS[kind]
            setattr(slot.of, kind, value)
        scratch.trap.value = None
        error = self.core_call(context, scratch.func_address, inputs, len(params), outputs,
                               len(results), scratch.trap_address)
        self.check(error, scratch.trap.value)
        return [getattr(values[first_output + index].of, kind)
                for index, kind in enumerate(results)]


class _CoreScratch(threading.local):
    """Per-thread C structures for core calls (making ctypes objects costs ~1 us each). A core
    call never makes another on the same thread before it returns: its imports are WASI or
    other core modules, never Python host functions."""

    def __init__(self, ffi):
        self.instance = ffi.wasmtime_instance_t()
        self.instance_address = ctypes.addressof(self.instance)
        self.item = ffi.wasmtime_extern_t()
        self.item_address = ctypes.addressof(self.item)
        self.func_address = self.item_address + type(self.item).of.offset
        self.trap = ctypes.c_void_p()
        self.trap_address = ctypes.addressof(self.trap)
        self.values = (ffi.wasmtime_val_t * (2 * CORE_SCRATCH_VALUES))()


def _bind_wasmtime():
    """(_CApi, None), or (None, why not) when the installed wasmtime is not the one this
    section was written for."""
    version = _wasmtime_version()
    wanted = f"pip install 'wasmtime=={WASMTIME_SERIES}*'"
    if not version.startswith(WASMTIME_SERIES):
        return None, (f"kvhost {__version__} runs guests through wasmtime-py {WASMTIME_SERIES}x "
                      f"and wasmtime {version} is installed: {wanted}")
    try:
        from wasmtime import _ffi
        return _CApi(_ffi), None
    except (ImportError, AttributeError, OSError, ValueError) as e:
        return None, f"kvhost {__version__} cannot bind wasmtime {version}'s C API ({e}): {wanted}"


_C, _WASMTIME_PROBLEM = _bind_wasmtime()


class _GuestStore:
    """A wasmtime Store with its fuel, epoch deadline and limits. A core module without
    imports and an HTTP handler run in a bare C store (made and freed keeping the GIL, used by
    address); everything else (linkers, WASI, components) in a wasmtime.Store, made by
    wasmtime-py."""

    __slots__ = ("wrapper", "raw", "address", "metered")

    def __init__(self, engine, engine_address, fuel, epoch_deadline, limits, wrapped):
        if wrapped:
            self.wrapper = wasmtime.Store(engine)
            self.raw = None
            store = _C.address(self.wrapper)
            self.address = _C.context_address(self.wrapper)
        else:
            self.wrapper = None
            self.raw = store = _C.store_new(engine_address, None, None)
            self.address = _C.store_context(store)
        self.metered = fuel is not None
        if self.metered:
            error = _C.set_fuel(self.address, fuel)
            if error:
                self.close()
                _C.check(error)
        _C.set_epoch_deadline(self.address, epoch_deadline)
        _C.store_limiter(store, *limits)

    def fuel_left(self):
        """Fuel left, or None when the store is not metered."""
        if not self.metered:
            return None
        left = ctypes.c_uint64(0)
        error = _C.get_fuel(self.address, ctypes.byref(left))
        if error:
            _C.error(error)            # taken over, and so freed
            return None
        return left.value

    def close(self):
        raw, self.raw = self.raw, None
        if raw is not None:
            _C.store_delete(raw)
        if self.wrapper is not None:
            self.wrapper.close()


# ---------------------------------------------------------------------------
# value codecs: type descriptors and fast converters
# ---------------------------------------------------------------------------
#
# A descriptor is a plain tuple: ("string",), ("u64",), ("list", D), ("option", D),
# ("result", OK|None, ERR|None), ("record", ((name, D), ...)), ("tuple", (D, ...)),
# ("variant", ((name, D|None), ...)), ("enum", names), ("flags", names), ("own", type_id),
# ("borrow", type_id). The host functions' descriptors are written below from the WIT; guest
# imports and exports are described once per component (describe_valtype), so no call ever
# re-walks a wasmtime type. Converters are closures built once per descriptor.
#
# Two dialects share the converters: "host" values (bytes, tuples, Variant, Err marker for
# result errors) for the glue, and "json" values ({"ok": ..}, {"tag": .., "value": ..},
# lists) for `call`.
#
# Converters read and write wasmtime_component_val_t records in place, through the C API
# section's bounded accessors (_read, _write, _span), and call the C API only to allocate
# (strings, lists, boxes, resources). Ownership: lifting only reads, and the val's owner frees
# it (wasmtime drops a host call's arguments after the callback; _Session.invoke deletes a
# call's result with one val_delete). A list<u8> is converted in bulk: its records are one
# strided slice of bytes, read or written in one step per 64 Ki elements.

_INT_BOUNDS = {"s8": (-(1 << 7), (1 << 7) - 1), "u8": (0, 255), "s16": (-(1 << 15), (1 << 15) - 1),
               "u16": (0, 65535), "s32": (-(1 << 31), (1 << 31) - 1), "u32": (0, (1 << 32) - 1),
               "s64": S64, "u64": U64}
_SCALAR_FORMAT = {"s8": "b", "u8": "B", "s16": "h", "u16": "H", "s32": "i", "u32": "I",
                  "s64": "q", "u64": "Q", "f32": "f", "f64": "d", "char": "I"}  # payload at +8
_BYTES_CHUNK = 1 << 16          # list<u8> elements converted per step (2 MiB of val_t)
_ZERO_HEAD = bytes(16)          # kind bool, payload false: what a val that owns nothing starts with
# The source of every new box (val_new moves from it, and it stays bool false: kind 0, zeros).
_BOOL_FALSE = ctypes.create_string_buffer(_VAL_SIZE)
_BOOL_FALSE_ADDRESS = ctypes.addressof(_BOOL_FALSE)
_U8_KIND = bytes((_KIND["u8"],))
_U8_TEMPLATE_RECORDS = 4096     # u8 records of a value up to this size start from a copy of:
_U8_TEMPLATE = bytearray(_U8_TEMPLATE_RECORDS * _VAL_SIZE)    # records of kind u8 (128 KiB)
_U8_TEMPLATE[0::_VAL_SIZE] = _U8_KIND * _U8_TEMPLATE_RECORDS


class Err:
    """Marks the err case of a result returned by a host function.

    wasmtime-py 50 lowers an untagged result by trying the ok case first, so an err returned for
    result<option<list<u8>>, error> fails ("value not valid for this variant"). kvhost lowers
    results with its own converters, where the case is explicit: Err(payload) or the ok value.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Err({self.value!r})"


def describe_valtype(ty):
    """The descriptor of a wasmtime component ValType (walked once, at load time)."""
    simple = {wc.Bool: "bool", wc.S8: "s8", wc.U8: "u8", wc.S16: "s16", wc.U16: "u16",
              wc.S32: "s32",
              wc.U32: "u32", wc.S64: "s64", wc.U64: "u64", wc.F32: "f32", wc.F64: "f64",
              wc.Char: "char",
              wc.String: "string"}
    for cls, name in simple.items():
        if isinstance(ty, cls):
            return (name,)
    if isinstance(ty, wc.ListType):
        return ("list", describe_valtype(ty.element))
    if isinstance(ty, wc.OptionType):
        return ("option", describe_valtype(ty.payload))
    if isinstance(ty, wc.ResultType):
        ok, err = ty.ok, ty.err
        return ("result", None if ok is None else describe_valtype(ok),
                None if err is None else describe_valtype(err))
    if isinstance(ty, wc.RecordType):
        return ("record", tuple((name, describe_valtype(t)) for name, t in ty.fields))
    if isinstance(ty, wc.TupleType):
        return ("tuple", tuple(describe_valtype(t) for t in ty.elements))
    if isinstance(ty, wc.VariantType):
        return ("variant",
                tuple((name, None if t is None else describe_valtype(t)) for name, t in ty.cases))
    if isinstance(ty, wc.EnumType):
        return ("enum", tuple(ty.names))
    if isinstance(ty, wc.FlagsType):
        return ("flags", tuple(ty.names))
    if isinstance(ty, wc.OwnType):
        return ("own", None)
    if isinstance(ty, wc.BorrowType):
        return ("borrow", None)
    return ("unsupported", type(ty).__name__)


def describe_functype(fty):
    """(parameter descriptors, result descriptor or None) of a component function type."""
    return (tuple(describe_valtype(t) for _, t in fty.params),
            None if fty.result is None else describe_valtype(fty.result))


def same_shape(expected, actual):
    """True if two descriptors match (resource identities are checked by wasmtime at link time)."""
    if expected is None or actual is None:
        return expected is actual
    if isinstance(expected, str) or isinstance(actual, str):
        return expected == actual
    if expected[0] in ("own", "borrow"):
        return actual[0] == expected[0]
    if len(expected) != len(actual) or expected[0] != actual[0]:
        return False
    return all(same_shape(e, a) if isinstance(e, tuple) or e is None else e == a
               for e, a in zip(expected[1:], actual[1:]))


def format_desc(desc):
    """WIT-like text for a descriptor, for error messages."""
    if desc is None:
        return "_"
    if isinstance(desc, str):
        return desc
    kind = desc[0]
    if kind in ("list", "option"):
        return f"{kind}<{format_desc(desc[1])}>"
    if kind == "result":                   # WIT: result, result<T>, result<_, E>, result<T, E>
        if desc[2] is None:
            return "result" if desc[1] is None else f"result<{format_desc(desc[1])}>"
        return f"result<{format_desc(desc[1])}, {format_desc(desc[2])}>"
    if kind == "tuple":
        return "tuple<" + ", ".join(format_desc(d) for d in desc[1]) + ">"
    if kind == "record":
        return "record{" + ", ".join(f"{n}: {format_desc(d)}" for n, d in desc[1]) + "}"
    if kind == "variant":
        cases = (n if d is None else f"{n}({format_desc(d)})" for n, d in desc[1])
        return "variant{" + ", ".join(cases) + "}"
    if kind in ("enum", "flags"):
        return f"{kind}{{{', '.join(desc[1])}}}"
    return kind


def _u8_vals_at(data, size):
    """The bytes held by `size` u8 val_t records at address `data`: each record is 32 bytes with
    its u8 at a fixed offset, so copy and take a strided slice, in chunks so that a large value
    costs at most 2 MiB more at once."""
    if size <= _BYTES_CHUNK:
        return _span(data, size * _VAL_SIZE).raw[_VAL_PAYLOAD::_VAL_SIZE]
    return b"".join(_u8_vals_at(data + start * _VAL_SIZE, min(_BYTES_CHUNK, size - start))
                    for start in range(0, size, _BYTES_CHUNK))


def _store_u8_vals(data, value):
    """Write `value` as u8 val_t records at address `data` (room for len(value) records)."""
    for start in range(0, len(value), _BYTES_CHUNK):
        part = value[start:start + _BYTES_CHUNK]
        size = len(part) * _VAL_SIZE
        if len(part) <= _U8_TEMPLATE_RECORDS:
            records = _U8_TEMPLATE[:size]       # the kind bytes come with the copy
        else:
            records = bytearray(size)
            records[0::_VAL_SIZE] = _U8_KIND * len(part)
        records[_VAL_PAYLOAD::_VAL_SIZE] = part
        offset = data + start * _VAL_SIZE
        _span(offset, size).raw = records


def _boxed(lower, ctx, value):
    """A heap val_t holding `value` (what option, result and variant payloads point to): the box
    is made as bool false, which owns nothing, and lowered in place."""
    box = _C.val_new(_BOOL_FALSE_ADDRESS)
    try:
        lower(ctx, value, box)
    except BaseException:
        _C.val_free(box)        # a lowering that raises leaves its slot owning nothing
        raise
    return box


def make_lift(desc, json_mode=False):
    """fn(ctx, addr) -> the Python value of the val_t at addr. It only reads: the val's owner
    frees it. ctx is the store context's address (resources need it)."""
    kind = desc[0]
    if kind == "bool":
        return lambda ctx, addr: _kind_at(addr + _VAL_PAYLOAD) != 0
    if kind in _SCALAR_FORMAT:
        read = _field("<" + _SCALAR_FORMAT[kind])[0]
        if json_mode and kind in ("f32", "f64"):
            return lambda ctx, addr: json_float(read(addr + _VAL_PAYLOAD))
        if kind == "char":
            return lambda ctx, addr: chr(read(addr + _VAL_PAYLOAD))
        return lambda ctx, addr: read(addr + _VAL_PAYLOAD)
    if kind in ("string", "enum"):
        return _lift_string
    if kind == "list" and desc[1] == ("u8",):
        return _lift_json_bytes if json_mode else _lift_bytes
    if kind == "list":
        return _make_lift_list(make_lift(desc[1], json_mode))
    if kind == "tuple":
        return _make_lift_tuple([make_lift(d, json_mode) for d in desc[1]], json_mode)
    if kind == "record":
        return _make_lift_record([(name, make_lift(d, json_mode)) for name, d in desc[1]])
    if kind == "option":
        return _make_lift_option(make_lift(desc[1], json_mode))
    if kind == "result":
        return _make_lift_result(None if desc[1] is None else make_lift(desc[1], json_mode),
                                 None if desc[2] is None else make_lift(desc[2], json_mode),
                                 json_mode)
    if kind == "variant":
        cases = {name: None if d is None else make_lift(d, json_mode) for name, d in desc[1]}
        return _make_lift_variant(cases, json_mode)
    if kind == "flags":
        return _lift_flags
    if kind in ("own", "borrow"):
        if json_mode:
            raise ArgumentError("resource handles cannot be converted to JSON")
        return _make_lift_borrow(desc[1]) if kind == "borrow" else _make_lift_own(desc[1])
    raise ArgumentError(f"unsupported component type {format_desc(desc)}")


def _make_lift_borrow(type_id):
    """A borrowed handle's rep. The guest's handles of a host resource type are exactly those this
    store handed over (_make_lower_own) and has not got back (dropped, or passed back as own): the
    canonical ABI refuses a dropped or mistyped handle before the host sees it. So when the guest
    holds one handle of the type, as a guest using one bucket does, the argument is that handle:
    one C call ends the borrow instead of three asking wasmtime for the rep. Otherwise, ask."""
    def lift_borrow(ctx, addr):
        state = _STATES.get(ctx)
        held = None if state is None else state.held.get(type_id)
        if held is not None and len(held) == 1:
            error = _C.any_drop(ctx, _pointer_at(addr + _VAL_PAYLOAD))     # ends the borrow
            if error:
                raise _C.error(error)
            (rep,) = held
            return rep
        return _C.resource_rep(ctx, _pointer_at(addr + _VAL_PAYLOAD))
    return lift_borrow


def _make_lift_own(type_id):
    """An owned handle passed back by the guest: its rep, and the guest no longer holds it."""
    def lift_own(ctx, addr):
        rep = _C.resource_rep(ctx, _pointer_at(addr + _VAL_PAYLOAD))
        state = _STATES.get(ctx)
        if state is not None:
            state.take_back(type_id, rep)
        return rep
    return lift_own


def _lift_string(ctx, addr):
    size, data = _vec_at(addr + _VAL_PAYLOAD)
    return str(_span(data, size).raw, "utf-8") if size else ""


def _lift_bytes(ctx, addr):
    size, data = _vec_at(addr + _VAL_PAYLOAD)
    return _u8_vals_at(data, size) if size else b""


def _lift_json_bytes(ctx, addr):
    return list(_lift_bytes(ctx, addr))


def _lift_flags(ctx, addr):
    size, data = _vec_at(addr + _VAL_PAYLOAD)
    names = []
    for i in range(size):       # a vector of {size, data} names
        length, text = _vec_at(data + 16 * i)
        names.append(str(_span(text, length).raw, "utf-8"))
    return names


def _make_lift_list(lift):
    def lift_list(ctx, addr):
        size, data = _vec_at(addr + _VAL_PAYLOAD)
        return [lift(ctx, data + i * _VAL_SIZE) for i in range(size)]
    return lift_list


def _make_lift_tuple(lifts, json_mode):
    def lift_tuple(ctx, addr):
        _, data = _vec_at(addr + _VAL_PAYLOAD)
        items = [lift(ctx, data + i * _VAL_SIZE) for i, lift in enumerate(lifts)]
        return items if json_mode else tuple(items)
    return lift_tuple


def _make_lift_record(fields):
    def lift_record(ctx, addr):
        _, data = _vec_at(addr + _VAL_PAYLOAD)
        # each entry is {name (16 bytes), val}
        return {name: lift(ctx,
                           data + i * _ENTRY_SIZE + 16) for i, (name, lift) in enumerate(fields)}
    return lift_record


def _make_lift_option(lift):
    def lift_option(ctx, addr):
        box = _pointer_at(addr + _VAL_PAYLOAD)
        return lift(ctx, box) if box else None
    return lift_option


def _make_lift_result(ok_lift, err_lift, json_mode):
    def lift_result(ctx, addr):
        is_ok, box = _is_ok_box_at(addr + _VAL_PAYLOAD)
        lift = ok_lift if is_ok else err_lift
        value = lift(ctx, box) if (lift is not None and box) else None
        if json_mode:
            return {"ok" if is_ok else "err": value}
        return value if is_ok else Err(value)
    return lift_result


def _make_lift_variant(cases, json_mode):
    def lift_variant(ctx, addr):
        tag = _lift_string(ctx, addr)
        box = _pointer_at(addr + _VAL_PAYLOAD + 16)
        lift = cases.get(tag)
        value = lift(ctx, box) if (lift is not None and box) else None
        if json_mode:
            return {"tag": tag} if lift is None else {"tag": tag, "value": value}
        return wc.Variant(tag, value)
    return lift_variant


def _bad(desc, value):
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ArgumentError(f"expected {format_desc(desc)}, got {shown}")


def make_lower(desc, json_mode=False):
    """fn(ctx, value, addr) writing `value` into the val_t at addr, whose old contents must own
    nothing (they are overwritten). A bad value raises ArgumentError and leaves the slot as it
    was, so whoever owns it can still free it."""
    kind = desc[0]
    if kind == "bool":
        return _make_lower_bool(desc)
    if kind in _INT_BOUNDS:
        return _make_lower_int(desc)
    if kind in ("f32", "f64"):
        return _make_lower_float(desc, json_mode)
    if kind == "char":
        return _make_lower_char(desc)
    if kind in ("string", "enum"):
        return _make_lower_string(desc)
    if kind == "list" and desc[1] == ("u8",):
        return _make_lower_bytes(desc, json_mode)
    if kind in ("list", "tuple", "record"):
        return _make_lower_sequence(desc, json_mode)
    if kind == "option":
        return _make_lower_option(make_lower(desc[1], json_mode))
    if kind == "result":
        return _make_lower_result(desc, json_mode)
    if kind == "variant":
        return _make_lower_variant(desc, json_mode)
    if kind == "flags":
        return _make_lower_flags(desc)
    if kind == "own" and not json_mode:
        return _make_lower_own(desc[1])
    raise ArgumentError(f"unsupported component type {format_desc(desc)}")


def _make_lower_bool(desc):
    write, code = _field("<B7x?")[1], _KIND["bool"]

    def lower_bool(ctx, v, addr):
        if not isinstance(v, bool):
            raise _bad(desc, v)
        write(addr, code, v)
    return lower_bool


def _make_lower_int(desc):
    (lo, hi), code = _INT_BOUNDS[desc[0]], _KIND[desc[0]]
    write = _field("<B7x" + _SCALAR_FORMAT[desc[0]])[1]

    def lower_int(ctx, v, addr):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(desc, v)
        write(addr, code, v)
    return lower_int


def _make_lower_float(desc, json_mode=False):
    """Floats; in JSON mode also the strings "NaN", "Infinity" and "-Infinity" (see json_float)."""
    kind = desc[0]
    write, code = _field("<B7x" + _SCALAR_FORMAT[kind])[1], _KIND[kind]

    def lower_float(ctx, v, addr):
        value = float_from_json(v, kind) if json_mode or not isinstance(v, str) else None
        if value is None:
            raise _bad(desc, v)
        write(addr, code, value)
    return lower_float


def _make_lower_char(desc):
    write, code = _field("<B7xI")[1], _KIND["char"]

    def lower_char(ctx, v, addr):
        if not isinstance(v, str) or len(v) != 1 or 0xD800 <= ord(v) <= 0xDFFF:
            raise _bad(desc, v)
        write(addr, code, ord(v))
    return lower_char


def _make_lower_string(desc):
    names = desc[1] if desc[0] == "enum" else None
    code = _KIND[desc[0]]

    def lower_string(ctx, v, addr):
        if not isinstance(v, str) or (names is not None and v not in names):
            raise _bad(desc, v)
        try:
            data = v.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(desc, v) from None
        _C.byte_vec_new(addr + _VAL_PAYLOAD, len(data), data)
        _set_kind(addr, code)
    return lower_string


_INT_ONLY = frozenset({int})


def _make_lower_bytes(desc, json_mode):
    new, code = _C.seq_new["list"], _KIND["list"]

    def lower_bytes(ctx, v, addr):
        if json_mode and isinstance(v, str):
            try:
                v = base64.b64decode(v, validate=True)
            except ValueError:             # binascii.Error, or a character that is not ASCII
                raise _bad(desc, v) from None
        elif json_mode and isinstance(v, list):
            # bytes() refuses what is not an int in 0..255 (at C speed), but takes True and
            # False: one pass over the element types refuses those
            try:
                data = bytes(v) if set(map(type, v)) <= _INT_ONLY else None
            except ValueError:
                data = None
            if data is None:
                raise _bad(desc, v)
            v = data
        elif not isinstance(v, (bytes, bytearray, memoryview)):
            raise _bad(desc, v)
        new(addr + _VAL_PAYLOAD, len(v))
        if len(v):
            _store_u8_vals(_vec_at(addr + _VAL_PAYLOAD)[1], v)
        _set_kind(addr, code)
    return lower_bytes


def _make_lower_sequence(desc, json_mode):
    """list<T> (T not u8), tuple<...> and record{...}: a vector of vals (a record's: of
    {name, val})."""
    kind = desc[0]
    names = [name.encode("utf-8") for name, _ in desc[1]] if kind == "record" else None
    if kind == "list":
        item_lower = make_lower(desc[1], json_mode)
    else:
        members = desc[1] if kind == "tuple" else [d for _, d in desc[1]]
        lowers = [make_lower(d, json_mode) for d in members]
    new, delete, code = _C.seq_new[kind], _C.seq_delete[kind], _KIND[kind]
    stride = _ENTRY_SIZE if kind == "record" else _VAL_SIZE

    def items_of(v):
        if kind == "record":
            if not isinstance(v, dict) or set(v) != {name for name, _ in desc[1]}:
                raise _bad(desc, v)
            return [v[name] for name, _ in desc[1]]
        if not isinstance(v, (list, tuple)) or (kind == "tuple" and len(v) != len(lowers)):
            raise _bad(desc, v)
        return v

    def lower_sequence(ctx, v, addr):
        items = items_of(v)
        n = len(items)
        new(addr + _VAL_PAYLOAD, n)
        data = _vec_at(addr + _VAL_PAYLOAD)[1]
        done = 0
        try:
            for i, item in enumerate(items):
                slot = data + i * stride
                if names is not None:
                    _C.byte_vec_new(slot, len(names[i]), names[i])
                    slot += 16
                (item_lower if kind == "list" else lowers[i])(ctx, item, slot)
                done += 1
        except BaseException:
            _abandon_sequence(data, done, n, stride, names is not None)
            delete(addr + _VAL_PAYLOAD)
            raise
        _set_kind(addr, code)
    return lower_sequence


def _abandon_sequence(data, done, n, stride, named):
    """Make the unwritten entries of a half-built vector own nothing, so deleting it frees only
    what was written (entry `done` may hold its name already)."""
    for j in range(done, n):
        slot = data + j * stride
        if named:
            if j > done:
                _span(slot, 16).raw = _ZERO_HEAD
            slot += 16
        _span(slot, 16).raw = _ZERO_HEAD


def _make_lower_option(inner):
    code = _KIND["option"]

    def lower_option(ctx, v, addr):
        _write_kind_pointer(addr, code, 0 if v is None else _boxed(inner, ctx, v))
    return lower_option


def _make_lower_result(desc, json_mode):
    ok_lower = None if desc[1] is None else make_lower(desc[1], json_mode)
    err_lower = None if desc[2] is None else make_lower(desc[2], json_mode)
    code = _KIND["result"]

    def lower_result(ctx, v, addr):
        if json_mode:
            if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in ("ok", "err"):
                raise _bad(desc, v)
            is_ok = "ok" in v
            payload = v["ok"] if is_ok else v["err"]
        else:
            is_ok = not isinstance(v, Err)
            payload = v if is_ok else v.value
        lower = ok_lower if is_ok else err_lower
        if lower is None and payload is not None:
            raise _bad(desc, v)
        box = 0 if lower is None else _boxed(lower, ctx, payload)
        _write_result(addr, code, is_ok, box)
    if not json_mode and desc[1] == ("option", ("list", ("u8",))):
        return _make_lower_ok_some_bytes(lower_result)
    return lower_result


def _make_lower_ok_some_bytes(generic):
    """result<option<list<u8>>, E>, what `get` returns, with ok(bytes) written in one frame: the
    same two boxes and list the generic lowering makes. Anything else goes to `generic`."""
    new_list = _C.seq_new["list"]
    list_code, option_code, result_code = _KIND["list"], _KIND["option"], _KIND["result"]

    def lower_ok_some_bytes(ctx, v, addr):
        if type(v) is not bytes:
            return generic(ctx, v, addr)
        some = _C.val_new(_BOOL_FALSE_ADDRESS)
        new_list(some + _VAL_PAYLOAD, len(v))
        if v:
            _store_u8_vals(_vec_at(some + _VAL_PAYLOAD)[1], v)
        _set_kind(some, list_code)
        ok = _C.val_new(_BOOL_FALSE_ADDRESS)
        _write_kind_pointer(ok, option_code, some)
        _write_result(addr, result_code, True, ok)
    return lower_ok_some_bytes


def _make_lower_variant(desc, json_mode):
    cases = {name: None if d is None else make_lower(d, json_mode) for name, d in desc[1]}
    code = _KIND["variant"]

    def lower_variant(ctx, v, addr):
        if json_mode:
            if not isinstance(v, dict) or v.get("tag") not in cases \
                    or not set(v) <= {"tag", "value"}:
                raise _bad(desc, v)
            tag, payload = v["tag"], v.get("value")
        else:
            tag, payload = v.tag, v.payload
        lower = cases[tag]
        if lower is None and payload is not None:
            raise _bad(desc, v)
        box = 0 if lower is None else _boxed(lower, ctx, payload)
        name = tag.encode("utf-8")
        _C.byte_vec_new(addr + _VAL_PAYLOAD, len(name), name)
        _write_pointer(addr + _VAL_PAYLOAD + 16, box)
        _set_kind(addr, code)
    return lower_variant


def _make_lower_flags(desc):
    allowed = set(desc[1])
    new, code = _C.seq_new["flags"], _KIND["flags"]

    def lower_flags(ctx, v, addr):
        if not isinstance(v, (list, set, tuple)) \
                or not all(isinstance(s, str) and s in allowed for s in v):
            raise _bad(desc, v)
        chosen = sorted(set(v))
        new(addr + _VAL_PAYLOAD, len(chosen))
        data = _vec_at(addr + _VAL_PAYLOAD)[1]
        for i, name in enumerate(chosen):
            raw = name.encode("utf-8")
            _C.byte_vec_new(data + 16 * i, len(raw), raw)
        _set_kind(addr, code)
    return lower_flags


def _make_lower_own(type_id):
    code = _KIND["resource"]

    def lower_own(ctx, rep, addr):
        _write_kind_pointer(addr, code, _C.resource_new(ctx, rep, type_id))
        state = _STATES.get(ctx)
        if state is not None:
            state.hand_over(type_id, rep)
    return lower_own


# ---------------------------------------------------------------------------
# host glue: wasi:keyvalue for both versions
# ---------------------------------------------------------------------------

BUCKET_TYPE = {"0.2.0-draft": 0x6B760001, "0.2.0-draft2": 0x6B760002}   # host resource type ids
CAS_TYPE = 0x6B760003
_STRING, _BYTES, _BOOL, _U64, _S64 = ("string",), ("list", ("u8",)), ("bool",), ("u64",), ("s64",)
_ERROR = ("variant", (("no-such-store", None), ("access-denied", None), ("other", _STRING)))
_CAS_ERROR = ("variant", (("store-error", _ERROR), ("cas-failed", ("own", CAS_TYPE))))


def _res(ok):
    return ("result", ok, _ERROR)


def _other(message):
    return Err(wc.Variant("other", str(message)))


class _CallState:
    """Everything a host function needs for one Store: tenant, handle tables, pending watch
    events."""

    def __init__(self, host, record_events=False, namespace=None):
        self.host = host
        self.backend = host.backend
        self.namespace = host.namespace if namespace is None else namespace
        self.buckets = {}       # rep -> bucket name
        self.cas = {}           # rep -> (bucket, key, value seen)
        self.held = {}          # resource type id -> reps the guest holds (see _make_lift_borrow)
        self.next_rep = 1
        self.events = [] if record_events else None
        self.provider = None    # the _ProviderLink serving this store's wasi:keyvalue, if any

    def new_handle(self, table, value):
        rep = self.next_rep
        self.next_rep += 1
        table[rep] = value
        return rep

    def hand_over(self, type_id, rep):
        """The guest now holds handle `rep` of resource type `type_id`."""
        self.held.setdefault(type_id, set()).add(rep)

    def take_back(self, type_id, rep):
        """The guest no longer holds `rep` (it dropped it, or passed it back as an own)."""
        held = self.held.get(type_id)
        if held:
            held.discard(rep)

    def bucket(self, rep):
        try:
            return self.buckets[rep]
        except KeyError:
            raise OperationError("unknown bucket handle") from None

    def record(self, op, bucket, key, value=None):
        if self.events is not None:
            self.events.append((op, bucket, key, value))


def _kv_open(state, identifier):
    name = identifier or "default"
    host = state.host
    if not BUCKET_ID_RE.match(name):
        return Err(wc.Variant("no-such-store"))
    if name in host.deny_buckets:
        return Err(wc.Variant("access-denied"))
    if host.allow_buckets is not None and name not in host.allow_buckets:
        return Err(wc.Variant("no-such-store"))
    return state.new_handle(state.buckets, name)


def _guest_sized(values):
    """Refuse data one host call could not carry (wasmtime caps it: GUEST_VALUE_LIMIT), so the
    guest gets error::other instead of a trap; `values` is one value or several."""
    total = sum(len(v) for v in values if v is not None)
    if total > GUEST_VALUE_LIMIT:
        raise OperationError(f"value too large for a guest ({total} bytes; one host call carries "
                             "at most "
                             f"{GUEST_VALUE_LIMIT})")


def _kv_get(state, rep, key):
    value = state.backend.get(state.namespace, state.bucket(rep), key)
    if value is not None and len(value) > GUEST_VALUE_LIMIT:
        _guest_sized((value,))
    return value


def _kv_set(state, rep, key, value):
    bucket = state.bucket(rep)
    _guest_sized((value,))
    state.backend.set(state.namespace, bucket, key, value)
    state.record("set", bucket, key, value)


def _kv_delete(state, rep, key):
    bucket = state.bucket(rep)
    state.backend.delete(state.namespace, bucket, key)
    state.record("delete", bucket, key)


def _kv_exists(state, rep, key):
    return state.backend.exists(state.namespace, state.bucket(rep), key)


def _kv_list_keys_draft2(state, rep, cursor):
    keys, cursor = state.backend.list_page(state.namespace, state.bucket(rep), cursor)
    return {"keys": keys, "cursor": cursor}


def _kv_list_keys_draft(state, rep, offset):
    keys, offset = state.backend.list_page_at(state.namespace, state.bucket(rep), offset)
    return {"keys": keys, "cursor": offset}


def _kv_increment_s64(state, rep, key, delta):
    return state.backend.increment(state.namespace, state.bucket(rep), key, delta, signed=True)


def _kv_increment_u64(state, rep, key, delta):
    return state.backend.increment(state.namespace, state.bucket(rep), key, delta, signed=False)


def _kv_cas_new(state, rep, key):
    bucket = state.bucket(rep)
    seen = state.backend.get(state.namespace, bucket, key)
    _guest_sized((seen,))
    return state.new_handle(state.cas, (bucket, key, seen))


def _kv_cas_current(state, rep):
    try:
        return state.cas[rep][2]
    except KeyError:
        raise OperationError("unknown cas handle") from None


def _kv_swap(state, rep, value):
    try:
        bucket, key, seen = state.cas.pop(rep)
    except KeyError:
        raise OperationError("unknown cas handle") from None
    _guest_sized((value,))
    if state.backend.compare_and_swap(state.namespace, bucket, key, seen, value):
        state.record("set", bucket, key, value)
        return None
    fresh = state.backend.get(state.namespace, bucket, key)
    return Err(wc.Variant("cas-failed", state.new_handle(state.cas, (bucket, key, fresh))))


def _kv_get_many(state, rep, keys):
    values = state.backend.get_many(state.namespace, state.bucket(rep), keys)
    _guest_sized(values)
    return [None if v is None else (k, v) for k, v in zip(keys, values)]


def _kv_set_many(state, rep, items):
    bucket = state.bucket(rep)
    _guest_sized([value for _, value in items])
    state.backend.set_many(state.namespace, bucket, items)
    for key, value in items:
        state.record("set", bucket, key, value)


def _kv_delete_many(state, rep, keys):
    bucket = state.bucket(rep)
    state.backend.delete_many(state.namespace, bucket, keys)
    for key in keys:
        state.record("delete", bucket, key)


def _guarded(func, arity, wrap_error=lambda err: err):
    """Host functions never raise: wasmtime-py routes exceptions through a process-global slot.
    The common arities get their own wrapper (no *args tuple per call)."""
    if arity == 2:
        def guarded(state, a, b):
            try:
                return func(state, a, b)
            except Exception as e:
                return wrap_error(_error_result(e))
    elif arity == 3:
        def guarded(state, a, b, c):
            try:
                return func(state, a, b, c)
            except Exception as e:
                return wrap_error(_error_result(e))
    else:
        def guarded(state, *args):
            try:
                return func(state, *args)
            except Exception as e:
                return wrap_error(_error_result(e))
    guarded.__name__ = func.__name__
    return guarded


def _error_result(error):
    """The wasi:keyvalue error a guest gets for an exception of a host function."""
    if isinstance(error, AccessDeniedError):
        return Err(wc.Variant("access-denied"))
    if isinstance(error, NoSuchStoreError):
        return Err(wc.Variant("no-such-store"))
    if isinstance(error, KvError):
        return _other(error)
    # a bug or an unexpected backend error: the guest still gets an answer
    return _other(f"internal error: {type(error).__name__}: {error}")


def _kv_interfaces():
    """{import name: (resources {name: (type id, table)}, functions {name: (params, result,
    func)})}."""
    interfaces = {}
    for version in KV_VERSIONS:
        draft2 = version == "0.2.0-draft2"
        own_bucket, bucket = ("own", BUCKET_TYPE[version]), ("borrow", BUCKET_TYPE[version])
        cursor = _STRING if draft2 else _U64
        key_response = ("record", (("keys", ("list", _STRING)), ("cursor", ("option", cursor))))
        store_resources = {"bucket": (BUCKET_TYPE[version], "buckets")}
        interfaces[f"wasi:keyvalue/store@{version}"] = (store_resources, {
            "open": ((_STRING,), _res(own_bucket), _kv_open),
            "[method]bucket.get": ((bucket, _STRING), _res(("option", _BYTES)), _kv_get),
            "[method]bucket.set": ((bucket, _STRING, _BYTES), _res(None), _kv_set),
            "[method]bucket.delete": ((bucket, _STRING), _res(None), _kv_delete),
            "[method]bucket.exists": ((bucket, _STRING), _res(_BOOL), _kv_exists),
            "[method]bucket.list-keys": ((bucket, ("option", cursor)), _res(key_response),
                                         _kv_list_keys_draft2 if draft2 else _kv_list_keys_draft),
        })
        number = _S64 if draft2 else _U64
        atomics = {"increment": ((bucket, _STRING, number), _res(number),
                                 _kv_increment_s64 if draft2 else _kv_increment_u64)}
        resources = {}
        if draft2:
            own_cas = ("own", CAS_TYPE)
            resources = {"cas": (CAS_TYPE, "cas")}
            atomics.update({
                "[static]cas.new": ((bucket, _STRING), _res(own_cas), _kv_cas_new),
                "[method]cas.current": ((("borrow", CAS_TYPE),),
                                        _res(("option", _BYTES)), _kv_cas_current),
                "swap": ((own_cas, _BYTES), ("result", None, _CAS_ERROR), _kv_swap),
            })
        interfaces[f"wasi:keyvalue/atomics@{version}"] = (resources, atomics)
        pair = ("tuple", (_STRING, _BYTES))
        interfaces[f"wasi:keyvalue/batch@{version}"] = ({}, {
            "get-many": ((bucket, ("list", _STRING)),
                         _res(("list", ("option", pair))), _kv_get_many),
            "set-many": ((bucket, ("list", pair)), _res(None), _kv_set_many),
            "delete-many": ((bucket, ("list", _STRING)), _res(None), _kv_delete_many),
        })
    return interfaces


KV_INTERFACES = _kv_interfaces()


def _kv_named_types(version):
    """The value types an interface of `version` may export by name."""
    cursor = _STRING if version == "0.2.0-draft2" else _U64
    return {"error": _ERROR, "cas-error": _CAS_ERROR,
            "key-response": ("record",
                             (("keys", ("list", _STRING)), ("cursor", ("option", cursor))))}
WATCHER_FUNCS = {version: {
    "on-set": ((("own", BUCKET_TYPE[version]), _STRING, _BYTES), None),
    "on-delete": ((("own", BUCKET_TYPE[version]), _STRING), None),
} for version in KV_VERSIONS}

# The C callbacks find their Python side through these tables (wasmtime gives back an integer).
_HOST_FUNCS = {}     # function id -> (name, func, lifts, lower, number of parameters)
_STATES = {}         # address of a store's wasmtime_context_t -> _CallState
# type id -> the _CallState table of its handles
_RESOURCE_TABLES = {type_id: table for resources, _ in KV_INTERFACES.values()
                    for type_id, table in resources.values()}
_ids_lock = threading.Lock()
_next_id = [1]


def _trap_pointer(message):
    return _C.trap_pointer(message)


@_FUNC_CALLBACK
def _dispatch(data, ctx, _ty, args, nargs, results, nresults):
    """Every kv host call lands here: converters were built at registration, nothing is
    re-walked."""
    entry = _HOST_FUNCS.get(data or 0)
    if entry is None:
        return _trap_pointer("kvhost: unknown host function")
    name, func, lifts, lower, arity = entry
    try:
        if nargs != arity or nresults != (lower is not None):
            return _trap_pointer(f"kvhost: {name} called with a signature that does not match the "
                                 "WIT")
        state = _STATES.get(ctx)
        if state is None:
            return _trap_pointer(f"kvhost: {name} called from a store this host did not create")
        if nargs == 1:      # most HTTP functions: (self)
            result = func(state, lifts[0](ctx, args))
        elif nargs == 2:    # most kv functions: (bucket, key); no list or enumerate per call
            result = func(state, lifts[0](ctx, args), lifts[1](ctx, args + _VAL_SIZE))
        elif nargs == 3:
            result = func(state, lifts[0](ctx, args), lifts[1](ctx, args + _VAL_SIZE),
                          lifts[2](ctx, args + 2 * _VAL_SIZE))
        elif nargs == 0:
            result = func(state)
        else:
            result = func(state, *[lift(ctx, args + i * _VAL_SIZE) for i, lift in enumerate(lifts)])
        if lower is not None:
            lower(ctx, result, results)
        return 0
    except BaseException as e:   # a conversion bug: trap this guest only, never another thread
        return _trap_pointer(f"kvhost: {name}: {type(e).__name__}: {e}")


@_DTOR_CALLBACK
def _drop_resource(data, ctx, rep):
    """The guest dropped an own handle; `data` is the resource's type id."""
    state = _STATES.get(ctx)
    if state is not None:
        state.take_back(data, rep)
        getattr(state, _RESOURCE_TABLES.get(data, "buckets")).pop(rep, None)
    return 0


@_FINALIZER
def _forget_function(data):
    _HOST_FUNCS.pop(data or 0, None)


@_FINALIZER
def _forget_nothing(data):
    return None


def _new_func_id():
    with _ids_lock:
        func_id = _next_id[0]
        _next_id[0] += 1
    return func_id


def _add_host_func(instance, name, params, result, func, *, guarded=True, lower=None):
    """Register `func` under `name` with converters built now, once, from the WIT descriptors.
    guarded: its exceptions become wasi:keyvalue errors (else they trap the guest); lower: a
    converter for the result other than make_lower(result)'s."""
    wrap = ((lambda err: Err(wc.Variant("store-error", err.value))) if name == "swap"
            else (lambda err: err))
    func_id = _new_func_id()
    if lower is None and result is not None:
        lower = make_lower(result)
    _HOST_FUNCS[func_id] = (name, _guarded(func, len(params), wrap) if guarded else func,
                            [make_lift(p) for p in params], lower, len(params))
    _C.define_func(instance, name, _dispatch, func_id, _forget_function)


def _add_host_resource(instance, name, type_id, dtor=_drop_resource):
    """Define resource type `name` as host type `type_id`; dtor(type id, ctx, rep) hears the
    guest's drops."""
    _C.define_resource(instance, name, type_id, dtor, _forget_nothing)


def add_keyvalue_to_linker(linker):
    """Define both wasi:keyvalue versions in a component linker."""
    with linker.root() as root:
        for import_name, (resources, functions) in KV_INTERFACES.items():
            with root.add_instance(import_name) as instance:
                for res_name, (type_id, _table) in resources.items():
                    _add_host_resource(instance, res_name, type_id)
                for func_name, (params, result, func) in functions.items():
                    _add_host_func(instance, func_name, params, result, func)


def check_kv_imports(component_type, engine):
    """Refuse a guest whose wasi:keyvalue imports do not match the WIT (GuestError names the
    import)."""
    for import_name, item in component_type.imports(engine).items():
        if not import_name.startswith("wasi:keyvalue/"):
            continue
        if import_name not in KV_INTERFACES:
            raise GuestError(f"guest imports {import_name}, which this host does not provide "
                             f"(it provides {', '.join(sorted(KV_INTERFACES))})")
        check_kv_instance("guest import", import_name, item.ty, engine)


def check_kv_instance(label, interface, ty, engine):
    """The functions of a wasi:keyvalue instance (a guest's import or a provider's export);
    GuestError names the first member whose type is not the WIT's. `label` says whose ("guest
    import")."""
    if not isinstance(ty, wc.ComponentInstanceType):
        raise GuestError(f"{label} {interface} is not an instance")
    functions = KV_INTERFACES[interface][1]
    found = []
    for name, export in ty.exports(engine).items():
        member = export.ty
        if isinstance(member, wc.ResourceType):
            continue   # wasmtime checks resource identity when it links
        if isinstance(member, wc.ValType):
            version = interface.rsplit("@", 1)[1]
            want = _kv_named_types(version).get(name)
            if want is None or not same_shape(want, describe_valtype(member)):
                raise GuestError(f"{label} {interface} expects type {name!r} = "
                                 f"{format_desc(describe_valtype(member))}, which is not in the "
                                 "WIT")
            continue
        if name not in functions:
            raise GuestError(f"{label} {interface} expects function {name!r}, not in the WIT")
        params, result = describe_functype(member)
        want_params, want_result, _ = functions[name]
        if len(params) != len(want_params) or not all(map(same_shape, want_params, params)) \
                or not same_shape(want_result, result):
            raise GuestError(
                f"{label} {interface}#{name} has type func({', '.join(map(format_desc, params))})"
                f" -> {format_desc(result)}; the WIT says "
                f"func({', '.join(map(format_desc, want_params))})"
                f" -> {format_desc(want_result)}")
        found.append(name)
    return found


# ---------------------------------------------------------------------------
# engine: compile cache, guests, the Host
# ---------------------------------------------------------------------------

# What an engine is made with; part of every compile-cache key, since code compiled for fuel
# metering or epoch interruption differs from code compiled without it.
ENGINE_SETTINGS = ("consume_fuel={fuel};epoch_interruption={epoch};cranelift_opt_level=speed;"
                   "concurrency_support=0")
DEFAULT_MAX_MEMORY = 256 << 20                  # bytes per linear memory: a shared host's default
DEFAULT_MAX_TABLE_ELEMENTS = 1_000_000          # per table (memory limits do not bound table.grow)
# per Store (one call); py-counter needs 11/2/1
STORE_LIMITS = {"instances": 100, "tables": 20, "memories": 8}
# an instance's own state (its vmctx) in a pooled engine: wasmtime's default, 1 MiB, is too
# small for some toolchains' modules; only checked, not reserved
POOL_INSTANCE_BYTES = 16 << 20
# bytes of a pooled memory (and of a table) reset by memset rather than returned to the system:
# the next instance then takes no page faults there (a fresh instance of hello.wat: 15 -> 11 us)
POOL_KEEP_RESIDENT = 1 << 20
# memories (and tables) one pooled engine reserves at most: about 1 TiB of address space, an
# eighth of what x86-64 gives a process, so that many engines (a test suite's servers) still fit
POOL_MAX_SLOTS = 256
# wasmtime's limit of data per host call: 128 MiB of 48-byte values
HOSTCALL_VALUE_BYTES = (128 << 20) // 48
# The largest value a guest gets or sets: what one host call carries, less the longest key
# (its bytes count as values too) and the call's other values (a handle, a result, an option)
GUEST_VALUE_LIMIT = HOSTCALL_VALUE_BYTES - MAX_KEY_BYTES - 64          # 2,792,042 bytes
GUEST_CACHE_BYTES = 256 << 20                   # compiled code a Host keeps in memory (_register)
DEFAULT_CAPTURE_BYTES = 16 << 20                # run_captured keeps this much stdout and stderr
WORKER_GRACE = 0.5                              # seconds past the timeout before a worker is killed
WORKER_START_SECONDS = 30                       # for a worker to load its guest before that counts
ISOLATIONS = ("auto", "thread", "process", "one-shot")
OUTPUTS = ("inherit", "discard")                   # where a guest's uncaptured output goes
BLOCKING_PREVIEW1 = frozenset({"poll_oneoff", "sock_accept", "sock_recv",
                               "sock_send", "sock_shutdown"})
CORE_JSON_TYPES = frozenset({"i32", "i64", "f32", "f64"})
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_DIGEST_RE = re.compile(r"[0-9a-f]{64}\Z")
_COMPONENT_TEXT_RE = re.compile(r"\A(?:\s+|;;[^\n]*\n|\(;.*?;\))*\(\s*component\b", re.S)


def _pool_limits(stores, max_memory, max_table_elements):
    """The pooling allocator's settings for `stores` Stores alive at once, each within
    STORE_LIMITS and the sandbox's memory and table limits: what fits a Store fits the pool.
    Reserving costs address space only (a memory's slot is its 4 GiB reservation plus guards),
    so memories and tables are capped at POOL_MAX_SLOTS: most guests have one memory."""
    return {"total_component_instances": stores * STORE_LIMITS["instances"],
            "total_core_instances": stores * STORE_LIMITS["instances"],
            "total_memories": min(stores * STORE_LIMITS["memories"], POOL_MAX_SLOTS),
            "total_tables": min(stores * STORE_LIMITS["tables"], POOL_MAX_SLOTS),
            "max_core_instances_per_component": STORE_LIMITS["instances"],
            "max_memories_per_component": STORE_LIMITS["memories"],
            "max_tables_per_component": STORE_LIMITS["tables"],
            "max_memories_per_module": STORE_LIMITS["memories"],
            "max_tables_per_module": STORE_LIMITS["tables"],
            "max_memory_size": max_memory,
            "table_elements": max_table_elements,
            "max_core_instance_size": POOL_INSTANCE_BYTES,
            "max_component_instance_size": POOL_INSTANCE_BYTES,
            "linear_memory_keep_resident": POOL_KEEP_RESIDENT,
            "table_keep_resident": POOL_KEEP_RESIDENT}


def _new_engine(metered, interruptible, pool=None):
    """An engine for guests: fuel metering only when a fuel limit is set (it makes
    compute-bound code about 2.5x slower); epoch interruption (the timeout) unless the program
    ends itself at the deadline (isolation="one-shot"): its check at every loop head makes a
    tight loop up to 1.8x slower. Without the component model's concurrency support (async,
    which no guest here uses), wasmtime 50 can pass a host function two borrowed handles in one
    call (poll over several pollables); with it, such a call fails before the host sees it.
    pool: the pooling allocator's settings (_pool_limits), or None: each Store maps its own."""
    config = wasmtime.Config()
    config.consume_fuel = metered
    config.epoch_interruption = interruptible
    config.cranelift_opt_level = "speed"
    _C.disable_concurrency_support(config)
    if pool is not None:
        _C.use_pooling_allocator(config, pool)
    return wasmtime.Engine(config)


def _pool_bytes(pool):
    """More address space than a pool with these settings reserves (wasmtime 50: per memory
    its 4 GiB reservation, or the largest memory if bigger, and guard pages; per table 8 bytes
    an element, counted twice for room)."""
    memory_slot = max(4 << 30, pool["max_memory_size"]) + (128 << 20)
    tables = pool["total_tables"] * pool["table_elements"] * 16
    return pool["total_memories"] * memory_slot + tables + (1 << 30)


def _can_reserve(size):
    """True if `size` bytes of address space can be reserved now (wasmtime aborts the process
    when an engine's pool cannot be: an address-space ulimit, a 32-bit system)."""
    try:
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=0).close()     # prot=0: PROT_NONE
    except (OSError, ValueError, OverflowError, TypeError, AttributeError):
        return False                # TypeError, AttributeError: no such mmap (Windows)
    return True


def default_cache_dir():
    """Where compiled guests are cached when Host(cache_dir=None):
    $XDG_CACHE_HOME/wasmstore/kvhost."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wasmstore", "kvhost")


def _error_lines(error):
    """The non-empty lines of a wasmtime error's text, split at "Caused by:" into (context,
    causes)."""
    text = str(error).strip()
    head, _, tail = text.partition("Caused by:")
    lines = lambda part: [line.strip() for line in part.splitlines() if line.strip()]
    return lines(head), lines(tail)


def _trap_reason(error):
    """The line of a wasmtime error that says why (its message also carries a backtrace)."""
    head, causes = _error_lines(error)
    lines = causes or head
    for line in lines:
        if line.startswith("wasm trap:") or "fuel" in line or "interrupt" in line:
            return line
    return lines[0] if lines else type(error).__name__


def _link_reason(error):
    """What an instantiation error says, keeping the line that names the import (wasmtime puts
    it before "Caused by:", and the cause alone, e.g. "instance export 'fields' has the wrong
    type", does not say which import)."""
    head, causes = _error_lines(error)
    context = [line for line in head if not line.startswith(("error while executing", "0:"))
               and "wasm backtrace" not in line]
    causes = [re.sub(r"^\d+: ", "", line) for line in causes[:2]]
    return "; ".join((context[:1] + causes) or [type(error).__name__])


def _is_link_failure(reason):
    return "import" in reason or "matching implementation" in reason or "unknown import" in reason


def _trap_error(error, host):
    """The TrapError (or GuestExit) for a wasmtime error raised while a guest ran."""
    if isinstance(error, wasmtime.ExitTrap):
        return GuestExit(error.code)
    reason = _trap_reason(error)
    if "wasm trap: interrupt" in reason:
        return TrapError(f"timeout: the guest ran longer than {host.timeout} s ({reason})",
                         "timeout")
    if "all fuel consumed" in reason:
        return TrapError(f"out of fuel: the guest used all {host.fuel} units ({reason})", "fuel")
    if "hostcalls has been exhausted" in reason:
        return TrapError("value too large: the guest passed more data in one host call than "
                         "wasmtime "
                         f"allows (about {HOSTCALL_VALUE_BYTES} bytes of a list<u8>); a guest may "
                         "get "
                         f"and set values of at most {GUEST_VALUE_LIMIT} bytes", "data")
    if "limit" in reason and ("memory" in reason or "resource" in reason or "table" in reason):
        return TrapError(f"memory limit: {reason}", "memory")
    return TrapError(reason, "trap")


def _write_replacing(path, data):
    """Write a temp file in the same directory and rename it over `path`: a reader never sees
    half a file. Not synced: this is the compile cache, which can be rebuilt, and an entry that
    a crash left torn fails its checksum and is compiled again."""
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


# Directories where an open file descriptor N has a name, /DIR/N: Linux has /proc/self/fd (and
# /dev/fd, a link to it), macOS and the BSDs only /dev/fd (opening /dev/fd/N there dups N).
FD_DIRECTORIES = ("/proc/self/fd", "/dev/fd")


def _open_file_path(fd):
    """A path that opens the file open as fd, or None where the system has none."""
    for directory in FD_DIRECTORIES:
        if os.path.isdir(directory):
            return f"{directory}/{fd}"
    return None


def _prune_cache(directory, now=None):
    """Remove the cache files no reader can use, once CACHE_ORPHAN_SECONDS old (a writer may be
    between its two renames): an artifact without its .sum (the previous cache format, or a
    writer that died), a .sum without its artifact, a temp file left by a crash."""
    now = time.time() if now is None else now
    try:
        names = set(os.listdir(directory))
    except OSError:
        return
    for name in names:
        match = CACHE_FILE_RE.match(name)
        if match is None:
            continue
        artifact, is_sum = match.groups()
        if artifact is not None and (artifact if is_sum else artifact + ".sum") in names:
            continue                                    # half of a complete entry
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > CACHE_ORPHAN_SECONDS:
                os.unlink(path)


# -- guests and what they export -------------------------------------------------------------------

def _is_component_file(source):
    """True if `source` names a file that starts like a component binary (8 bytes are read)."""
    if not isinstance(source, (str, os.PathLike)) or (isinstance(source, str) and "\n" in source):
        return False
    try:
        with open(source, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith(b"\0asm") and head[6:8] != b"\0\0" and len(head) == 8


class Guest:
    """A compiled component or core module, ready to run in fresh Stores."""

    def __init__(self, kind, artifact, digest, name):
        self.kind = kind            # "component" or "module"
        self.artifact = artifact    # wasmtime.component.Component or wasmtime.Module
        self.digest = digest        # sha256 of the source
        self.name = name
        self.engine = None          # the Host engine it was compiled for
        self.may_block = False      # imports a host call that can wait (see _may_block)
        self.source = None          # kept only without a disk cache (worker processes need it)
        self.signatures = None      # core modules: core_signatures() of the binary
        self.needs_wasi = True      # imports WASI (a Store without WASI saves ~10 us per call)
        self.cache_key = None       # stat key of its checked compile-cache entry (workers trust it)
        self.compiled_bytes = None  # size of its compiled code (what the memory cache counts)
        self.links_needed = False   # a core module importing from other modules than WASI
        self.module_address = None  # core modules: the C address of the compiled module
        self._calls = {}            # function name -> (path, param lowers, result lift)
        self.http_handler = None    # export index of wasi:http/incoming-handler#handle, once found

    def __repr__(self):
        return f"<Guest {self.kind} {self.name} {self.digest[:12]}>"


def _may_block(kind, artifact, engine, signatures):
    """True if a guest imports a host call that can wait for as long as it asks (a WASI sleep or
    poll), which epoch interruption cannot stop: every blocking WASIp2 call waits on a pollable of
    wasi:io/poll, and preview 1 has poll_oneoff and the socket calls."""
    if kind == "component":
        return any(name.startswith("wasi:io/poll@") for name in artifact.type.imports(engine))
    return any(module == "wasi_snapshot_preview1" and name in BLOCKING_PREVIEW1
               for module, name, _, _ in signatures[0])


def _needs_wasi(kind, artifact, engine, signatures):
    """True if a guest imports any WASI function (its Store then needs a WASI configuration:
    a WASI call without one aborts the process)."""
    if kind == "component":
        return any(name.startswith("wasi:") and not name.startswith("wasi:keyvalue/")
                   for name in artifact.type.imports(engine))
    return any(module == "wasi_snapshot_preview1" for module, _, _, _ in signatures[0])


def _json_callable(desc):
    """True if values of this component type can be written as JSON (no resource handles)."""
    if desc is None:
        return True
    kind = desc[0]
    if kind in ("own", "borrow", "unsupported"):
        return False
    if kind in ("list", "option"):
        return _json_callable(desc[1])
    if kind == "result":
        return _json_callable(desc[1]) and _json_callable(desc[2])
    if kind == "tuple":
        return all(map(_json_callable, desc[1]))
    if kind in ("record", "variant"):
        return all(_json_callable(d) for _, d in desc[1])
    return True


def _component_functions(guest, engine):
    """[(callable name, FuncType)] of a component: world-level functions and "iface#name"
    members."""
    found = []
    for name, item in guest.artifact.type.exports(engine).items():
        if isinstance(item.ty, wc.FuncType):
            found.append((name, item.ty))
        elif isinstance(item.ty, wc.ComponentInstanceType):
            found += [(f"{name}#{member}", f.ty) for member, f in item.ty.exports(engine).items()
                      if isinstance(f.ty, wc.FuncType)]
    return found


# Exports that toolchains add for their own use, never an application's function: left out of
# describe_exports (they can still be called by name). Components: {name: its parameter names}.
TOOLCHAIN_COMPONENT_EXPORTS = {
    "exports#init": ("app-name", "symbols", "stub-wasi"),   # componentize-py, run when it builds
}
TOOLCHAIN_CORE_EXPORTS = ("__wasm_call_ctors", "cabi_realloc")   # wasm-ld; the canonical ABI
TOOLCHAIN_CORE_PREFIXES = ("cabi_post_",)                       # canonical ABI post-return


def _toolchain_internal(name, param_names=None):
    """True for an export a toolchain made for itself (see TOOLCHAIN_COMPONENT_EXPORTS)."""
    if param_names is not None:
        return TOOLCHAIN_COMPONENT_EXPORTS.get(name) == tuple(param_names)
    return name in TOOLCHAIN_CORE_EXPORTS or name.startswith(TOOLCHAIN_CORE_PREFIXES)


def describe_exports(guest, engine):
    """Every function a JSON caller can call: [{"name", "params": [{"name", "type"}],
    "results": [type]}].

    Types are WIT-style text for components and i32/i64/f32/f64 for core modules (whose
    parameters have no names: "name" is null). Functions taking or returning resource handles,
    references or vectors are left out: JSON cannot carry them; so are the exports toolchains
    add for themselves (componentize-py's exports#init, wasm-ld's __wasm_call_ctors)."""
    described = []
    if guest.kind == "component":
        for name, fty in _component_functions(guest, engine):
            if _toolchain_internal(name, [pname for pname, _ in fty.params]):
                continue
            params, result = describe_functype(fty)
            if not all(map(_json_callable, params)) or not _json_callable(result):
                continue
            described.append({"name": name,
                              "params": [{"name": pname, "type": format_desc(desc)}
                                         for (pname, _), desc in zip(fty.params, params)],
                              "results": [] if result is None else [format_desc(result)]})
        return described
    for name, (kind, signature) in guest.signatures[1].items():
        if kind != "func" or _toolchain_internal(name):
            continue
        params, results = list(signature[0]), list(signature[1])
        if set(params + results) <= CORE_JSON_TYPES:
            described.append({"name": name, "params": [{"name": None, "type": t} for t in params],
                              "results": results})
    return described


def describe_imports(guest, engine):
    """What a guest imports, in order: for a core module [{"module", "name", "kind", "type"}]
    ("type" like "func(i32, i32) -> i32", or the kind: "memory", "table", "global"); for a
    component [{"name"}] (interface names such as "wasi:keyvalue/store@0.2.0-draft2", or plain
    names)."""
    if guest.kind == "component":
        return [{"name": name} for name in guest.artifact.type.imports(engine)]
    return [{"module": module, "name": name, "kind": kind, "type": _extern_text(kind, signature)}
            for module, name, kind, signature in guest.signatures[0]]


_OUTLINE_ENGINE = []                   # the engine outline() compiles with, made on first use
_OUTLINE_LOCK = threading.Lock()


def _outline_engine():
    """An engine for reading a component's types: no optimisation, nothing metered."""
    with _OUTLINE_LOCK:
        if not _OUTLINE_ENGINE:
            config = wasmtime.Config()
            config.cranelift_opt_level = "none"
            _C.disable_concurrency_support(config)      # the types guests' engines see
            _OUTLINE_ENGINE.append(wasmtime.Engine(config))
        return _OUTLINE_ENGINE[0]


def outline(kind, data, name):
    """(an uncompiled Guest, the engine its types belong to) that describe_exports and
    describe_imports can read, for a binary no Host has compiled: a core module's types come
    from its bytes (core_signatures); a component is compiled with every function body
    replaced by `unreachable` and without optimisation (its types are all that is kept: for the
    18 MB componentize-py guest a fraction of a second, against seconds for its compile)."""
    guest = Guest(kind, None, None, name)
    try:
        if kind == "module":
            guest.signatures = core_signatures(data)
            return guest, None
        stubbed = bytearray(data)
        for start, end in module_spans(stubbed):
            stub_function_bodies(stubbed, start, end)
        engine = _outline_engine()
        guest.artifact = wc.Component(engine, bytes(stubbed))
    except WasmFormatError as e:
        raise GuestError(f"{name}: not a readable WebAssembly binary: {e}") from None
    except wasmtime.WasmtimeError as e:
        raise GuestError(f"{name}: cannot be compiled: {' '.join(str(e).split())}") from None
    guest.engine = engine
    return guest, engine


def format_export(entry):
    """One line for an export: "get(bucket: string, key: string) -> result<...>", "add(i32, i32) ->
    i32"."""
    params = ", ".join(p["type"] if p["name"] is None else f"{p['name']}: {p['type']}"
                       for p in entry["params"])
    results = entry["results"]
    shown = results[0] if len(results) == 1 else f"({', '.join(results)})"
    arrow = " -> " + shown if results else ""
    return f"{entry['name']}({params}){arrow}"


# -- JSON scalars that JSON itself cannot hold -----------------------------------------------------

def json_float(value):
    """A float as JSON can carry it: NaN and the infinities become the strings "NaN", "Infinity"
    and "-Infinity" (JSON has no literal for them); every other float is itself."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return value


_F32 = struct.Struct("<f")


def float_from_json(value, kind="f64"):
    """The float a JSON argument stands for as `kind` ("f32" or "f64"): a number that type can
    hold, or one of json_float's strings; None otherwise (an integer too big for a float, or for
    f32 a finite number that would round to infinity, such as 1e39)."""
    if isinstance(value, str):
        return NON_FINITE.get(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
        if kind == "f32":
            _F32.pack(number)
    except OverflowError:
        return None
    return number


# -- what one call or run asks for, and what it gave -----------------------------------------------

class _Request:
    """One call or run: everything a Store needs, so it can be carried to a worker process."""

    def __init__(self, op, *, function=None, args=(), argv=("guest",), namespace=None, stdin=None,
                 capture=None, links=(), record_events=False):
        self.op = op                        # "call" or "run"
        self.function = function
        self.args = list(args)
        self.argv = [str(a) for a in argv]
        self.namespace = namespace          # None: the Host's
        self.stdin = stdin                  # bytes, or None for an empty stdin
        self.capture = capture              # None: output where the Host says; N: keep N bytes
        self.links = list(links)            # [(import module name, Guest)], dependencies first
        self.record_events = record_events


class _Capture:
    """A guest's stdout or stderr kept in memory up to `limit` bytes; the rest is counted, not
    kept.

    The one sink for guest output that must not reach this process's own streams (a server's
    calls and runs, HTTP handlers, a provider serving them): write() never blocks, so a guest
    writing without end only spends its own time and fuel, and never more than `limit` bytes
    are held."""

    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.kept = 0
        self.total = 0

    def write(self, data):
        self.total += len(data)
        room = self.limit - self.kept
        if room > 0:
            piece = data[:room]
            self.chunks.append(piece)
            self.kept += len(piece)

    def value(self):
        return b"".join(self.chunks)


class RunResult:
    """What Host.run_captured gives back: the exit status and the guest's (bounded) output."""

    def __init__(self, status, stdout, stderr, stdout_total, stderr_total):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.stdout_total = stdout_total      # bytes the guest wrote; more than len(stdout) if cut
        self.stderr_total = stderr_total

    @classmethod
    def _of(cls, outcome):
        return cls(outcome.value, outcome.stdout.value(), outcome.stderr.value(),
                   outcome.stdout.total, outcome.stderr.total)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.status!r} stdout={len(self.stdout)}B "
                f"stderr={len(self.stderr)}B>")


class CallResult(RunResult):
    """What Host.call_captured gives back: the call's result (.value) and the guest's bounded
    output, as in RunResult."""

    @property
    def value(self):
        """The call's result (JSON-style values)."""
        return self.status


class _Outcome:
    """The result of one execution in this process or a worker: value (a call's result or a run's
    status), captured output, fuel used, and the kv events for watchers."""

    def __init__(self, value=None, stdout=None, stderr=None, fuel=0, events=None):
        self.value = value
        self.stdout = stdout          # _Capture or None
        self.stderr = stderr
        self.fuel = fuel
        self.events = events or []


class _SingleFlight:
    """Per-key locks, so N threads that want the same missing guest compile it once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._keys = {}               # key -> [lock, users]

    @contextlib.contextmanager
    def hold(self, key):
        with self._lock:
            entry = self._keys.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._keys[key]


# -- the Host --------------------------------------------------------------------------------------

def _check_limit(label, value, allow_none=True):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ArgumentError(f"invalid {label} {value!r}: expected a positive integer")


class Host:
    """Runs guests against wasi:keyvalue (both drafts) and WASIp2, each call in a fresh, limited
    Store.

    kv: a backend URL or a Backend; namespace: the tenant whose data guests see (each call may
    name another); allow_buckets / deny_buckets: bucket ids a guest may (not) open.
    Composition: kv="component:FILE" or a Provider makes a provider component serve the guests'
    wasi:keyvalue; provider_kv (URL or Backend, default "memory:") is then the backend beneath
    it, and allow/deny lists name the buckets the provider opens there. One provider instance
    per call, in the call's namespace (see the composition section).
    Sandbox: timeout (seconds, None for no limit), fuel, max_memory (bytes per linear memory),
    max_table_elements (per table), env ({name: value}) and dirs ([(host, guest)]): what WASI may
    see (nothing unless given; sockets are never granted). Limits hold whatever a guest does:
    isolation="auto" runs guests that import a call which can block (a WASI sleep or poll) in
    worker processes that are killed at the deadline ("process": every guest; "thread": none,
    for one-shot programs that end a guest blocked past the deadline themselves); `workers`
    bounds them. "one-shot" is "thread" for a program that ends itself at the deadline
    (run_with_deadline, host_from_args): its code is compiled without epoch checks, so a
    compute-bound guest runs at the engine's full speed, and nothing but the program's end
    stops it.
    stub_imports: define every import the host does not provide as a function that traps when
    called (componentize-js builds import wasi:http, for instance); off by default.
    cache_dir: compile cache (None: default_cache_dir(), False: off); stdout / stderr: file paths
    for the guest's output; output: where output goes that is neither captured (call_captured,
    run_captured) nor sent to those files: "inherit" (this process's stdout and stderr, the
    default, for command lines) or "discard" (for servers: then nothing a guest writes, nor a
    provider or watcher it triggers, reaches this process's streams or can block on them);
    max_value_size: value limit of a backend opened from a URL (a Backend carries its own);
    guest_cache_bytes: compiled code kept in memory for load() (bytes; least recently used
    guests go first).
    pooled_stores: Stores (calls and HTTP requests) alive at once that the engine's pooling
    allocator keeps room for (a server's setting: a fresh instance of hello.wat then costs
    11 us of CPU instead of 45, an HTTP request ~80 us instead of ~115); a call
    beyond them fails with a limit error, as does a guest that does not fit the pool; None (the
    default), or where the pool's address space cannot be reserved (.pooled is then False):
    each Store maps its own memory.
    HTTP handlers (handle_http): allow_outbound lists the destinations ("HOST" or "HOST:PORT",
    see parse_outbound) their outgoing requests may reach; any other is refused.
    """

    def __init__(self, kv="memory:", namespace="default", allow_buckets=None, deny_buckets=None,
                 timeout=DEFAULT_TIMEOUT,
                 fuel=None, max_memory=DEFAULT_MAX_MEMORY, env=None, dirs=None, cache_dir=None,
                 stdout=None,
                 stderr=None, max_value_size=None, max_table_elements=DEFAULT_MAX_TABLE_ELEMENTS,
                 isolation="auto", workers=None, stub_imports=False, provider_kv=None,
                 allow_outbound=None, output="inherit", guest_cache_bytes=GUEST_CACHE_BYTES,
                 pooled_stores=None):
        _check_namespace(namespace)
        _check_limit("guest_cache_bytes", guest_cache_bytes, allow_none=False)
        if output not in OUTPUTS:
            raise ArgumentError(f"invalid output {output!r}: expected one of {', '.join(OUTPUTS)}")
        self.output = output
        self.allow_outbound = parse_outbound(allow_outbound)
        provider = provider_of(kv)
        if provider is not None:
            kv = "memory:" if provider_kv is None else provider_kv
        elif provider_kv is not None:
            raise ArgumentError("a provider's backend (provider_kv, --provider-kv: "
                                f"{provider_kv!r}) needs a "
                                "provider: kv=\"component:FILE\" (or a Provider)")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or isinstance(timeout, bool)
                                    or not 0 < timeout < 1e9 or math.isnan(timeout)):
            raise ArgumentError(f"invalid timeout {timeout!r}: expected a positive number of "
                                "seconds")
        _check_limit("fuel", fuel)
        _check_limit("max_memory", max_memory, allow_none=False)
        _check_limit("max_table_elements", max_table_elements, allow_none=False)
        _check_limit("workers", workers)
        _check_limit("pooled_stores", pooled_stores)
        if isolation not in ISOLATIONS:
            raise ArgumentError(f"invalid isolation {isolation!r}: expected one of "
                                f"{', '.join(ISOLATIONS)}")
        self.allow_buckets = None if allow_buckets is None else frozenset(allow_buckets)
        self.deny_buckets = frozenset(deny_buckets or ())
        for bucket in (self.allow_buckets or frozenset()) | self.deny_buckets:
            _check_bucket(bucket)
        self.env = dict(env or {})
        for name, value in self.env.items():
            if not isinstance(name, str) or not name or "=" in name or not isinstance(value, str):
                raise ArgumentError(f"invalid environment variable {name!r}")
        self.dirs = [(str(h), str(g)) for h, g in (dirs or [])]
        for host_dir, _ in self.dirs:
            if not os.path.isdir(host_dir):
                raise ArgumentError(f"invalid --dir {host_dir!r}: not a directory")
        self._owns_backend = not isinstance(kv, Backend)
        if not self._owns_backend and max_value_size is not None:
            raise ArgumentError("max_value_size applies to a backend URL; a Backend object "
                                "carries its own limit (Backend(max_value_size=...))")
        self.backend = open_backend(kv, DEFAULT_MAX_VALUE_BYTES if max_value_size is None
                                    else max_value_size) if self._owns_backend else kv
        self.namespace = namespace
        self.timeout = timeout
        self.fuel = fuel
        self.max_memory = max_memory
        self.max_table_elements = max_table_elements
        self.isolation = isolation
        self.stub_imports = bool(stub_imports)
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        self.guest_cache_bytes = guest_cache_bytes
        self.stdout = stdout
        self.stderr = stderr
        self.watch_errors = []          # failures of watcher guests (they never reach the writer)
        self._watchers = []             # (guest, version, buckets)
        self._event_sink = None         # a worker process hands kv events to its parent instead
        self._valid_namespaces = _BoundedCache(max_items=10_000)  # call namespaces checked
        if _C is None:
            raise KvError(_WASMTIME_PROBLEM)
        pool = None if pooled_stores is None else _pool_limits(pooled_stores, max_memory,
                                                                max_table_elements)
        if pool is not None and not _can_reserve(_pool_bytes(pool)):
            pool = None                 # wasmtime would abort the process (an address ulimit)
        self.pooled = pool is not None  # the engine takes its Stores' memory from a pool
        self.engine = _new_engine(metered=fuel is not None, interruptible=isolation != "one-shot",
                                  pool=pool)
        self._engine_address = _C.address(self.engine)
        self._component_linker = None
        self._module_linker = None
        self._http_component_linker = None
        self._lock = threading.Lock()
        self._guests = _BoundedCache(max_weight=guest_cache_bytes,       # digest -> Guest
                                     weight=lambda guest: guest.compiled_bytes)
        self._compiling = _SingleFlight()
        self._cache_counts = collections.Counter()  # memory hits, disk hits, compiles
        self._ticker = None
        self._ticker_stop = threading.Event()
        self._pool = _WorkerPool(self, workers or max(2, os.cpu_count() or 2))
        self._limits = (max_memory, max_table_elements, STORE_LIMITS["instances"],
                        STORE_LIMITS["tables"],
                        STORE_LIMITS["memories"])
        self._provider = provider       # before any linker: consumers' kv imports forward to it
        self._composition = None
        if provider is not None:
            try:
                self._composition = _Composition(self, provider.load(self), trial=provider.trial)
            except BaseException:
                self.close()
                raise

    @property
    def provider(self):
        """The provider component (a Guest) serving guests' wasi:keyvalue, or None (see
        Provider)."""
        return None if self._composition is None else self._composition.guest

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self):
        """Stop the timeout thread and the worker processes; close the backend if this Host opened
        it."""
        self._ticker_stop.set()
        self._pool.close()
        if self._owns_backend:
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start_workers(self, count=1):
        """Start `count` worker processes now (in the background), so that the first guest that
        needs one does not wait for a Python interpreter to start."""
        if self.isolation not in ("thread", "one-shot"):
            self._pool.prestart(count)

    def cache_stats(self):
        """{"memory_hits", "disk_hits", "compiles"}: how guests were found by load()."""
        with self._lock:
            return {key: self._cache_counts[key]
                    for key in ("memory_hits", "disk_hits", "compiles")}

    # -- loading -----------------------------------------------------------------------------------

    def load(self, source, *, digest=None, name=None):
        """A Guest from a path (.wasm or .wat) or bytes/str; compiled once, cached on disk.

        digest: the SHA-256 of the source when the caller knows it (a store does): a guest this
        Host already holds is then returned without reading or hashing the source again.
        Concurrent loads of one guest compile it once."""
        if digest is not None:
            if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
                raise ArgumentError(f"invalid digest {digest!r}: expected 64 lowercase hex digits")
            guest = self._cached_guest(digest)
            if guest is None and _is_component_file(source):
                guest = self._from_cache("component", digest,
                                         os.fspath(source) if name is None else name)
            if guest is not None:
                return guest
        data, default_name = self._read_source(source)
        name = default_name if name is None else name
        kind, text = self._classify(data, name)
        digest = hashlib.sha256(data).hexdigest() if digest is None else digest
        with self._compiling.hold(digest):
            guest = self._cached_guest(digest)
            if guest is None:
                source = data if text is None else text
                guest = self._register(self._build_guest(kind, source, digest, name))
        return guest

    def loaded(self, digest):
        """The Guest whose source has this SHA-256 if this Host holds it compiled, else None
        (a found one counts as a memory hit in cache_stats())."""
        return self._cached_guest(digest) if isinstance(digest, str) else None

    def is_loaded(self, digest):
        """True if this Host holds the guest compiled (load() would not compile); counts nothing."""
        return digest in self._guests

    def _cached_guest(self, digest):
        guest = self._guests.get(digest)
        if guest is not None:
            with self._lock:
                self._cache_counts["memory_hits"] += 1
                self._guests.get_recent(digest)
        return guest

    @staticmethod
    def _read_source(source):
        if isinstance(source, (bytes, bytearray)):
            return bytes(source), "<bytes>"
        if isinstance(source, str) and ("\n" in source or source.lstrip().startswith(("(", ";;"))):
            return source.encode("utf-8"), "<text>"
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
            try:
                with open(name, "rb") as f:
                    return f.read(), name
            except OSError as e:
                raise ArgumentError(f"cannot read guest {name!r}: {e.strerror or e}") from None
        raise ArgumentError(f"invalid guest {source!r}: expected a path or bytes")

    def _build_guest(self, kind, source, digest, name):
        artifact, cache_key = self._compile_cached(kind, source, digest, name)
        signatures = None
        if kind == "module":
            try:
                binary = wasmtime.wat2wasm(source) if isinstance(source, str) else source
                signatures = core_signatures(binary)
            except (ValueError, IndexError, TypeError, wasmtime.WasmtimeError) as e:
                raise GuestError(f"cannot read the types of {name}: {e}") from None
        # Worker processes load guests from the cache; one that is not there travels as bytes.
        keep = None if cache_key else (source.encode("utf-8") if isinstance(source, str)
                                       else source)
        guest = self._new_guest(kind, artifact, digest, name, keep, signatures)
        guest.cache_key = cache_key
        return guest

    def _new_guest(self, kind, artifact, digest, name, source=None, signatures=None):
        if kind == "component":
            check_kv_imports(artifact.type, self.engine)
            if self.stub_imports:
                with self._lock:
                    self._component_linker_locked().define_unknown_imports_as_traps(artifact)
        guest = Guest(kind, artifact, digest, name)
        guest.engine = self.engine
        guest.signatures = signatures
        guest.may_block = _may_block(kind, artifact, self.engine, signatures)
        guest.needs_wasi = _needs_wasi(kind, artifact, self.engine, signatures)
        guest.links_needed = kind == "module" and any(module != "wasi_snapshot_preview1"
                                                      for module, _, _, _ in signatures[0])
        guest.source = source
        if kind == "module":
            guest.module_address = _C.address(artifact)
        if self._composition is not None and kind == "component":
            self._composition.check_consumer(guest)
        return guest

    def _register(self, guest):
        """Keep a compiled guest in memory, least recently used ones going first once they
        hold more than guest_cache_bytes of compiled code (its size in the compile cache, or
        serialized); the newest always stays, however big."""
        if guest.compiled_bytes is None:
            guest.compiled_bytes = guest.cache_key[1] if guest.cache_key else \
                len(guest.artifact.serialize())
        with self._lock:
            self._guests.put(guest.digest, guest)
        return guest

    def _from_cache(self, kind, digest, name, signatures=None, trusted=None):
        """The guest with this digest from memory or the compile cache alone (None if neither has
        it): a worker's parent compiled it, or a component is known by its hash (no need to read
        18 MB of source to find it compiled). trusted: see _read_cache."""
        with self._compiling.hold(digest):
            guest = self._cached_guest(digest)
            if guest is None and self.cache_dir:
                cls = wc.Component if kind == "component" else wasmtime.Module
                artifact, key = self._read_cache(cls, self._cache_path(kind, digest), trusted)
                if artifact is not None:
                    with self._lock:
                        self._cache_counts["disk_hits"] += 1
                    guest = self._new_guest(kind, artifact, digest, name, signatures=signatures)
                    guest.cache_key = key
                    guest = self._register(guest)
        return guest

    @staticmethod
    def _classify(data, name):
        if data.startswith(b"\0asm"):
            if len(data) < 8:
                raise GuestError(f"{name}: truncated WebAssembly header")
            return ("module" if data[6:8] == b"\0\0" else "component"), None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestError(f"{name}: neither WebAssembly binary nor WAT text") from None
        return ("component" if _COMPONENT_TEXT_RE.match(text) else "module"), text

    def _cache_path(self, kind, digest):
        """A cache entry is two files: KEY.KIND, exactly what wasmtime serialized (so that wasmtime
        can map it instead of reading it), and KEY.KIND.sum, CACHE_MAGIC + the SHA-256 of it."""
        settings = ENGINE_SETTINGS.format(fuel=int(self.fuel is not None),
                                          epoch=int(self.isolation != "one-shot"))
        parts = (CACHE_MAGIC.decode().strip(), kind, digest, _wasmtime_version(), settings,
                 sys.platform, os.uname().machine)
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()
        return os.path.join(self.cache_dir, f"{key}.{kind}")

    def _compile_cached(self, kind, source, digest, name):
        """(artifact, the stat key of its checked cache entry, or None when the cache lacks it)."""
        cls = wc.Component if kind == "component" else wasmtime.Module
        path = self._cache_path(kind, digest) if self.cache_dir else None
        if path is not None:
            artifact, key = self._read_cache(cls, path)
            if artifact is not None:
                with self._lock:
                    self._cache_counts["disk_hits"] += 1
                return artifact, key
        try:
            artifact = cls(self.engine, source)
        except wasmtime.WasmtimeError as e:
            raise GuestError(f"cannot compile {name}: {_trap_reason(e)}") from None
        with self._lock:
            self._cache_counts["compiles"] += 1
        if path is None:
            return artifact, None
        payload = bytes(artifact.serialize())
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            _write_replacing(path, payload)         # the artifact first: a reader that sees
            _write_replacing(path + ".sum", CACHE_MAGIC + hashlib.sha256(payload).digest())
            info = os.stat(path)
        except OSError:                             # a new one with an old .sum recompiles
            return artifact, None                   # a cache that cannot be written only costs time
        _prune_cache(self.cache_dir)
        return artifact, [info.st_ino, info.st_size, info.st_mtime_ns]

    def _read_cache(self, cls, path, trusted=None):
        """(deserialized entry, stat key of its file), or (None, None) if it is missing or fails
        its checksum (never trusted). trusted: the stat key under which another process of this
        Host (a worker's parent) checked the entry just now: the same file, unchanged, is not
        hashed again (40 MB for a componentize-py guest).

        The artifact is checked through a map of the open file, then handed to wasmtime through
        that same file (_open_file_path), which wasmtime maps: nothing is read into Python or
        copied, and nobody can swap the file between the check and the load. Without such a
        name the checked bytes are copied to wasmtime instead."""
        try:
            with open(path + ".sum", "rb") as f:
                expected = f.read(len(CACHE_MAGIC) + 33)
            if len(expected) != len(CACHE_MAGIC) + 32 or not expected.startswith(CACHE_MAGIC):
                return None, None
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                info = os.fstat(f.fileno())
                key = [info.st_ino, info.st_size, info.st_mtime_ns]
                if key != trusted and hashlib.sha256(view).digest() != expected[len(CACHE_MAGIC):]:
                    return None, None
                same_file = _open_file_path(f.fileno())
                if same_file is not None:
                    return cls.deserialize_file(self.engine, same_file), key
                return cls.deserialize(self.engine, view[:]), key
        except (OSError, ValueError, wasmtime.WasmtimeError):   # ValueError: mmap of an empty file
            return None, None

    # -- what a guest exports ----------------------------------------------------------------------

    def exports(self, guest):
        """The functions of a guest a JSON caller can call (see describe_exports)."""
        self._check_guest(guest)
        return describe_exports(guest, self.engine)

    def imports(self, guest):
        """What a guest imports (see describe_imports)."""
        self._check_guest(guest)
        return describe_imports(guest, self.engine)

    def describe(self, source, *, digest=None, name=None):
        """{"kind", "exports", "imports"} of a guest (describe_exports, describe_imports),
        never compiling it: a guest this Host holds, or whose compiled form the compile cache
        has, is described as loaded; any other is read through outline() and dropped (source,
        digest, name: as for load(); without digest a component file is hashed, as load()
        would, to find its compiled form)."""
        data = None
        if digest is None and _is_component_file(source):
            data, default_name = self._read_source(source)
            digest = hashlib.sha256(data).hexdigest()
        guest = self._guests.get(digest) if isinstance(digest, str) else None
        if guest is None and digest is not None and _is_component_file(source):
            label = os.fspath(source) if name is None else name
            guest = self._from_cache("component", digest, label)
        if guest is not None:
            return {"kind": guest.kind, "exports": self.exports(guest),
                    "imports": self.imports(guest)}
        if data is None:
            data, default_name = self._read_source(source)
        name = default_name if name is None else name
        kind, text = self._classify(data, name)
        if text is not None:
            try:
                data = bytes(wasmtime.wat2wasm(text))
            except wasmtime.WasmtimeError as e:
                raise GuestError(f"{name}: {' '.join(str(e).split())}") from None
        guest, engine = outline(kind, data, name)
        return {"kind": kind, "exports": describe_exports(guest, engine),
                "imports": describe_imports(guest, engine)}

    # -- linking core modules to other guests ------------------------------------------------------

    def link_plan(self, guest, resolve):
        """[(import module name, Guest)] that a core module's imports need, dependencies first.

        resolve(module name) -> a Guest of this Host, or None: it decides which import module
        names stand for other guests (a store resolves its paths). Missing guests or exports,
        type mismatches and cycles raise LinkError naming the import; with stub_imports, a
        module name nothing resolves is left to trap when one of its functions is called."""
        self._check_guest(guest)
        if guest.kind != "module" or not guest.links_needed:
            return []
        order, done = [], set()

        def visit(importer, chain):
            for module_name, items in _imports_by_module(importer).items():
                if module_name == "wasi_snapshot_preview1":
                    continue
                if module_name in chain:
                    cycle = chain[chain.index(module_name):] + [module_name]
                    raise LinkError("import cycle: " + " -> ".join(cycle))
                dependency = resolve(module_name) if resolve is not None else None
                if dependency is None:
                    if self.stub_imports:
                        continue                  # _Session._linker defines them as traps
                    raise LinkError(f"{importer.name} imports {module_name!r} {items[0][0]!r}, "
                                    "which "
                                    f"this host does not provide" + ("" if resolve is None else
                                                                     " (no such module to link)")
                                    + "; link a module that exports it (--link "
                                    + f"{module_name}=PATH), or let it trap when called "
                                      "(--stub-imports)")
                if dependency.kind != "module" or dependency.engine is not self.engine:
                    raise LinkError(f"{importer.name} imports {module_name!r}, which is not a "
                                    "core module "
                                    "(only core modules can be linked to core modules)")
                _check_link_types(importer, module_name, items, dependency)
                if module_name not in done:
                    visit(dependency, chain + [module_name])
                    done.add(module_name)
                    order.append((module_name, dependency))

        visit(guest, [guest.name])
        return order

    # -- stores ------------------------------------------------------------------------------------

    def _start_ticker(self):
        with self._lock:
            if self._ticker is not None or self.timeout is None or self.isolation == "one-shot":
                return
            engine, stop = self.engine, self._ticker_stop

            def tick():
                # One increment per EPOCH_TICK of wall time, caught up after a late wake-up
                # (a loaded machine), so that deadlines in ticks stay deadlines in seconds.
                last = time.monotonic()
                while not stop.wait(EPOCH_TICK):
                    ticks = int((time.monotonic() - last) / EPOCH_TICK)
                    for _ in range(min(ticks, 100)):
                        engine.increment_epoch()
                    last += ticks * EPOCH_TICK
            self._ticker = threading.Thread(target=tick, name="kvhost-epoch", daemon=True)
            self._ticker.start()

    def _wasi_config(self, argv, stdin_path, capture):
        config = wasmtime.WasiConfig()
        config.argv = list(argv)
        if self.env:
            config.env = sorted(self.env.items())
        for host_dir, guest_dir in self.dirs:
            config.preopen_dir(host_dir, guest_dir)
        if stdin_path is STDIN_INHERIT:
            config.inherit_stdin()
        elif stdin_path is not None:
            config.stdin_file = stdin_path
        if capture is not None:
            config.stdout_custom = capture[0].write
            config.stderr_custom = capture[1].write
            return config
        if self.stdout:
            config.stdout_file = self.stdout
        elif self.output == "inherit":
            config.inherit_stdout()
        if self.stderr:
            config.stderr_file = self.stderr
        elif self.output == "inherit":
            config.inherit_stderr()
        return config                    # "discard": WASI's default streams drop what is written

    def _new_store(self, argv=("guest",), stdin=None, capture=None, wasi=True, bare=False):
        """A fresh Store with the sandbox limits, and WASI set unless the guests it runs import
        none (a WASI call in a Store without WASI aborts the process: `wasi` must say so truly).
        bare: a C store alone, for a core module without imports or an HTTP handler (no
        wasmtime.Store)."""
        self._start_ticker()
        deadline = 1 << 62 if self.timeout is None else math.ceil(self.timeout / EPOCH_TICK) + 1
        store = _GuestStore(self.engine, self._engine_address, self.fuel, deadline, self._limits,
                            wrapped=wasi or not bare)
        if not wasi:
            return store
        if stdin is None or stdin is STDIN_INHERIT:
            store.wrapper.set_wasi(self._wasi_config(argv, stdin, capture))
            return store
        fd, stdin_path = tempfile.mkstemp(prefix="kvhost-stdin-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(stdin)
            # wasmtime opens the file here
            store.wrapper.set_wasi(self._wasi_config(argv, stdin_path, capture))
        finally:
            os.unlink(stdin_path)
        return store

    def _component_linker_locked(self):
        if self._component_linker is None:
            linker = wc.Linker(self.engine)
            linker.add_wasip2()
            if self._provider is None:
                add_keyvalue_to_linker(linker)
            else:
                add_forwarding_to_linker(linker)
            self._component_linker = linker
        return self._component_linker

    def _http_linker(self):
        """The linker of HTTP handlers: the proxy world's imports defined here (add_http_to_linker)
        and wasi:keyvalue, no wasmtime WASI."""
        with self._lock:
            if self._http_component_linker is None:
                linker = wc.Linker(self.engine)
                add_http_to_linker(linker)
                if self._provider is None:
                    add_keyvalue_to_linker(linker)
                else:
                    add_forwarding_to_linker(linker)
                self._http_component_linker = linker
            return self._http_component_linker

    def _linker_for(self, kind):
        with self._lock:
            if kind == "component":
                return self._component_linker_locked()
            if self._module_linker is None:
                linker = wasmtime.Linker(self.engine)
                linker.define_wasi()
                self._module_linker = linker
            return self._module_linker

    def _check_guest(self, guest):
        if not isinstance(guest, Guest):
            raise ArgumentError(f"invalid guest {guest!r}: expected a Guest from Host.load()")
        if guest.engine is not self.engine:
            raise ArgumentError(f"{guest.name} was loaded by another Host: load it with this one")

    # -- calling -----------------------------------------------------------------------------------

    def call(self, guest, function, args=(), *, namespace=None, resolve=None, stats=None):
        """Call an exported function with JSON-style arguments; returns its JSON-style result.

        Components: `function` is a world-level name or "pkg:ns/iface@v#name". Core modules:
        an export taking and returning i32/i64/f32/f64 (floats JSON cannot hold travel as the
        strings "NaN", "Infinity", "-Infinity"). namespace: the kv tenant of this call (default:
        the Host's); resolve: see link_plan; stats: a dict that receives {"fuel": units used}.
        Traps and limits raise TrapError."""
        self._check_guest(guest)
        if not isinstance(function, str) or not function:
            raise ArgumentError(f"invalid function name {function!r}")
        request = _Request("call", function=function, args=args, namespace=namespace)
        return self._execute(guest, request, resolve, stats).value

    def run(self, guest, argv=(), *, namespace=None, resolve=None, stdin=None, stats=None):
        """Run a wasi:cli/run component (or a core module's _start); returns the exit status.
        Output goes where the Host says (inherited by default); stdin: bytes (default: empty),
        or STDIN_INHERIT: this process's own stdin, read as the guest reads it (the command
        lines; only for a guest that runs in this process, see isolation)."""
        self._check_guest(guest)
        request = _Request("run", argv=[guest.name] + [str(a) for a in argv],
                           namespace=namespace, stdin=stdin)
        return self._execute(guest, request, resolve, stats).value

    def run_captured(self, guest, argv=(), *, namespace=None, resolve=None, stdin=b"",
                     limit=DEFAULT_CAPTURE_BYTES,
                     stats=None):
        """Like run(), but stdout and stderr are kept (up to `limit` bytes each) and returned in a
        RunResult with the exit status. A guest that exits non-zero is a result, not an error."""
        self._check_guest(guest)
        _check_limit("limit", limit, allow_none=False)
        request = _Request("run", argv=[guest.name] + [str(a) for a in argv], namespace=namespace,
                           stdin=stdin, capture=limit)
        return RunResult._of(self._execute(guest, request, resolve, stats))

    def call_captured(self, guest, function, args=(), *, namespace=None, resolve=None,
                      limit=DEFAULT_CAPTURE_BYTES, stats=None):
        """Like call(), but the guest's stdout and stderr are kept (up to `limit` bytes each; the
        rest is counted) and returned with the result in a CallResult: nothing the guest writes
        reaches this process's streams, and writing never blocks it."""
        self._check_guest(guest)
        if not isinstance(function, str) or not function:
            raise ArgumentError(f"invalid function name {function!r}")
        _check_limit("limit", limit, allow_none=False)
        request = _Request("call", function=function, args=args, namespace=namespace, capture=limit)
        return CallResult._of(self._execute(guest, request, resolve, stats))

    def handle_http(self, guest, request, sink, *, namespace=None):
        """Answer one HTTP request with a component exporting wasi:http/incoming-handler, in a
        fresh instance with this Host's limits; returns an HttpOutcome.

        request: an HttpRequest. sink: where the response goes, as the guest produces it:
        sink.start(status, [(name, value: bytes)]) once, when the guest sets its response;
        sink.write(data) for each piece of the body (it may block: the guest waits);
        sink.flush(), if the sink has it, before the guest waits (a poll, a read of a body that
        may block) after writing or finishing, so a sink that gathers writes sends them
        meanwhile;
        sink.finish(trailers) at the end (trailers: such a list, or None). namespace: the
        wasi:keyvalue tenant (default: the Host's).

        A guest that does not answer cleanly raises TrapError; .kind says why: "trap", "timeout",
        "fuel", "memory", "exit" (as for call), "no-response" (it returned without setting a
        response), "response-error" (it set an error-code instead), "response-twice",
        "body-size" (its body and its content-length disagree), "incomplete" (it dropped its
        body unfinished; a body it still holds when it returns ends there, as in wasmtime
        serve), "sink" (sink raised: the client is gone). .response_started says whether
        sink.start was called (then the server can only close the connection); .stderr holds
        what the guest wrote to stderr. NotHttpHandler: the component exports no handler;
        LinkError: it imports what this host does not provide."""
        self._check_guest(guest)
        if not isinstance(request, HttpRequest):
            raise ArgumentError(f"invalid request {request!r}: expected an HttpRequest")
        self._check_call_namespace(namespace)
        _http_handler_index(guest, self.engine)
        with _HttpSession(self, guest, request, sink, namespace) as session:
            return session.run()

    def check_http_handler(self, guest):
        """NotHttpHandler unless `guest` is a component exporting wasi:http/incoming-handler
        (a server checks its app when it starts, before any request)."""
        self._check_guest(guest)
        _http_handler_index(guest, self.engine)

    def _check_call_namespace(self, namespace):
        if namespace is not None and namespace not in self._valid_namespaces:
            _check_namespace(namespace)             # a tenant is checked once, not per call
            self._valid_namespaces.add(namespace)

    def _execute(self, guest, request, resolve, stats):
        self._check_call_namespace(request.namespace)
        request.links = self.link_plan(guest, resolve)
        request.record_events = bool(self._watchers)
        isolated = self.isolation == "process" or (self.isolation == "auto" and (
            guest.may_block or any(dependency.may_block for _, dependency in request.links)))
        if isolated and request.stdin is STDIN_INHERIT:
            raise ArgumentError(f"{guest.name} runs in a worker process, which cannot read this "
                                "process's stdin: pass the input as bytes")
        try:
            if isolated:
                outcome = self._pool.execute(guest, request)
            else:
                outcome = self._execute_here(guest, request)
        except KvError as e:
            if stats is not None:
                stats["fuel"] = getattr(e, "fuel", 0)
            raise
        if stats is not None:
            stats["fuel"] = outcome.fuel
        return outcome

    def _execute_here(self, guest, request):
        """Run one request in a fresh Store of this process."""
        with _Session(self, guest, request) as session:
            try:
                if request.op == "call":
                    value = session.call(request.function, request.args)
                else:
                    value = session.run()
            except KvError as e:
                e.fuel = session.fuel_used()          # a trap used fuel too (metrics count it)
                raise
            return session.outcome(value)

    def attach_watcher(self, guest, buckets):
        """After a guest of this host sets or deletes a key in one of `buckets`, call `guest`'s
        wasi:keyvalue/watcher on-set / on-delete (in order, after the writer's call returns)."""
        if not isinstance(guest, Guest) or guest.kind != "component":
            raise ArgumentError("a watcher must be a component from Host.load()")
        buckets = frozenset(buckets)
        for bucket in buckets:
            _check_bucket(bucket)
        exports = guest.artifact.type.exports(self.engine)
        for version in KV_VERSIONS:
            if f"wasi:keyvalue/watcher@{version}" in exports:
                with self._lock:
                    self._watchers.append((guest, version, buckets))
                return
        raise ArgumentError(f"{guest.name} does not export wasi:keyvalue/watcher")

    def _deliver(self, events):
        for op, bucket, key, value in events:
            for guest, version, buckets in list(self._watchers):
                if bucket not in buckets:
                    continue
                try:
                    request = _Request("notify", argv=("watcher",))
                    with _Session(self, guest, request) as session:
                        session.notify(version, op, bucket, key, value)
                except KvError as e:
                    self.watch_errors.append(f"{guest.name}: {op} {bucket}/{key}: {e}")
                    del self.watch_errors[:-100]


def _imports_by_module(guest):
    """{module name: [(name, kind, signature), ...]} of a core module's imports, in order."""
    grouped = {}
    for module, name, kind, signature in guest.signatures[0]:
        grouped.setdefault(module, []).append((name, kind, signature))
    return grouped


def _extern_text(kind, signature):
    if kind != "func":
        return kind
    params, results = signature
    return f"func({', '.join(params)})" + (f" -> {', '.join(results)}" if results else "")


def _check_link_types(importer, module_name, items, dependency):
    exports = dependency.signatures[1]
    for name, kind, signature in items:
        found = exports.get(name)
        if found is None:
            raise LinkError(f"{importer.name} imports {name!r} from {module_name!r}, which does "
                            "not "
                            f"export it (it exports: {', '.join(sorted(exports)) or 'nothing'})")
        if found != (kind, signature):
            raise LinkError(f"{importer.name} imports {module_name!r} {name!r} as "
                            f"{_extern_text(kind, signature)}, "
                            f"but it exports {_extern_text(*found)}")

class _Session:
    """One fresh Store + instance for one request; hands its kv events to the watchers when it
    ends."""

    def __init__(self, host, guest, request):
        self.host = host
        self.guest = guest
        self.request = request
        # kv state only for components: a core module cannot import wasi:keyvalue
        self.state = None
        if guest.kind == "component":
            self.state = _CallState(host, request.record_events, request.namespace)
        self.capture = None if request.capture is None else (_Capture(request.capture),
                                                             _Capture(request.capture))
        wasi = request.op == "run" or guest.needs_wasi \
            or any(d.needs_wasi for _, d in request.links)
        bare = guest.kind == "module" and not guest.signatures[0] and not request.links
        self.guest_store = host._new_store(request.argv, request.stdin, self.capture, wasi, bare)
        self.address = self.guest_store.address
        if host._composition is not None and self.state is not None:
            self.state.provider = host._composition.link(self.state, self.capture)
        self.instance = None

    @property
    def store(self):
        """The wasmtime.Store (linkers, components, WASI); core calls use the address alone."""
        return self.guest_store.wrapper

    def __enter__(self):
        if self.state is not None:
            _STATES[self.address] = self.state
        return self

    def __exit__(self, *exc):
        if self.state is not None:
            _STATES.pop(self.address, None)
            if self.state.provider is not None:
                self.state.provider.close()
        self.guest_store.close()
        events = None if self.state is None else self.state.events
        if events:
            (self.host._event_sink or self.host._deliver)(events)

    def fuel_used(self):
        """Fuel this request used (0 when the Host meters none)."""
        left = self.guest_store.fuel_left()
        return 0 if left is None else self.host.fuel - left

    def outcome(self, value):
        stdout, stderr = self.capture or (None, None)
        return _Outcome(value, stdout, stderr, self.fuel_used())

    def _trap(self, error):
        raise _trap_error(error, self.host) from None

    def _instantiate(self, linker, guest):
        try:
            if linker is None:                        # a core module without imports
                return _C.instantiate_module(self.address, guest.module_address)
            return linker.instantiate(self.store, guest.artifact)
        except wasmtime.WasmtimeError as e:
            reason = _link_reason(e)
            if _is_link_failure(reason):
                hint = "" if self.host.stub_imports or guest.kind != "component" else (
                    " (stub_imports / --stub-imports runs the rest of the guest, with such "
                    "imports trapping when called)")
                raise LinkError(f"cannot link {guest.name}: {reason}{hint}") from None
            self._trap(e)
        except wasmtime.Trap as e:     # a start function trapped
            self._trap(e)

    def _linker(self):
        """The Host's shared linker, or, for a core module linked to other guests (or with imports
        left to trap, stub_imports), a linker of this Store's own that holds their instances
        (dependencies first) and the traps."""
        stubbed = self.host.stub_imports and self.guest.kind == "module" and self.guest.links_needed
        if not self.request.links and not stubbed:
            if self.guest.kind == "module" and not self.guest.signatures[0]:
                return None
            return self.host._linker_for(self.guest.kind)
        linker = wasmtime.Linker(self.host.engine)
        linker.define_wasi()
        for module_name, dependency in self.request.links:
            if stubbed:
                linker.define_unknown_imports_as_traps(dependency.artifact)
            linker.define_instance(self.store, module_name, self._instantiate(linker, dependency))
        if stubbed:
            linker.define_unknown_imports_as_traps(self.guest.artifact)
        return linker

    def instantiate(self):
        self.instance = self._instantiate(self._linker(), self.guest)
        return self.instance

    def _component_func(self, function):
        """(Func, labels, param lowers, result lift) for an export; converters cached on the
        Guest."""
        guest = self.guest
        cached = guest._calls.get(function)
        if cached is None:
            engine = self.host.engine
            fty = dict(_component_functions(guest, engine)).get(function)
            if fty is None:
                available = [entry["name"] for entry in describe_exports(guest, engine)]
                raise NoSuchFunction(f"{guest.name} exports no function {function!r}"
                                     f" (it exports: {', '.join(available) or 'none'})", available)
            params, result = describe_functype(fty)
            for desc in list(params) + [result]:
                if not _json_callable(desc):
                    raise ArgumentError(f"{function} takes or returns {format_desc(desc)}, which "
                                        "JSON cannot carry")
            labels = [f"{pname}: {format_desc(desc)}"
                      for (pname, _), desc in zip(fty.params, params)]
            cached = (function.split("#", 1), labels,
                      [make_lower(p, json_mode=True) for p in params],
                      None if result is None else make_lift(result, json_mode=True))
            guest._calls[function] = cached
        path, labels, lowers, lift = cached
        instance = self.instance
        index = None
        for part in path:
            index = instance.get_export_index(self.store, part, index)
        return instance.get_func(self.store, index), labels, lowers, lift

    def call_component(self, function, args):
        self.instantiate()
        func, labels, lowers, lift = self._component_func(function)
        if len(args) != len(lowers):
            raise ArgumentError(f"{function} takes {len(lowers)} argument(s) "
                                f"({', '.join(labels)}), got {len(args)}")
        return self.invoke(func, lowers, lift, args, labels)

    def invoke(self, func, lowers, lift, args, labels=None):
        """Call component Func `func` with `args` lowered by `lowers`; its result lifted by
        `lift` (None: no result). labels name the parameters in argument errors."""
        # zeros: bool false, which owns nothing
        values = ctypes.create_string_buffer(max(len(args), 1) * _VAL_SIZE)
        base = ctypes.addressof(values)
        ctx = self.address
        done = 0
        try:
            for i, (lower, arg) in enumerate(zip(lowers, args)):
                try:
                    lower(ctx, arg, base + i * _VAL_SIZE)
                except ArgumentError as e:
                    if labels is None:
                        raise
                    raise ArgumentError(f"argument {i + 1} ({labels[i]}): {e}") from None
                done += 1
            result = ctypes.create_string_buffer(_VAL_SIZE)
            result_address = ctypes.addressof(result) if lift else None
            try:
                _C.call_component(ctx, _C.func_address(func), base, len(args), result_address,
                                  1 if lift else 0)
            except wasmtime.WasmtimeError as e:
                self._trap(e)
            if lift:
                try:
                    value = lift(ctx, result_address)
                finally:
                    _C.val_delete(result_address)     # lifting only reads
            else:
                value = None
            return value          # wasmtime (43 and later) runs the post-return inside the call
        finally:
            for i in range(done):
                _C.val_delete(base + i * _VAL_SIZE)

    def run(self):
        if self.guest.kind == "module":
            instance = self.instantiate()
            if self.guest.signatures[1].get("_start") != ("func", ((), ())):
                raise NoSuchFunction(f"{self.guest.name} has no _start export (it is not a WASI "
                                     "command)")
            try:
                _C.call_core(self.address, _C.instance_address(instance), "_start", (), (), ())
            except wasmtime.ExitTrap as e:
                return e.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
                self._trap(e)
            return 0
        exports = self.guest.artifact.type.exports(self.host.engine)
        run_iface = next((n for n in exports if n.startswith("wasi:cli/run@")), None)
        if run_iface is None:
            raise NoSuchFunction(f"{self.guest.name} does not export wasi:cli/run (it is not a "
                                 "command)")
        try:
            outcome = self.call_component(f"{run_iface}#run", [])
        except GuestExit as e:
            return e.status
        return 0 if "ok" in outcome else 1

    def call_module(self, function, args):
        instance = self.instantiate()
        export = self.guest.signatures[1].get(function)
        if export is None or export[0] != "func":
            available = [entry["name"] for entry in describe_exports(self.guest, self.host.engine)]
            raise NoSuchFunction(f"{self.guest.name} exports no function {function!r}"
                                 f" (it exports: {', '.join(available) or 'none'})", available)
        params, results = export[1]                 # never func.type(): see core_signatures
        for kind in params + results:
            if kind not in CORE_JSON_TYPES:
                raise ArgumentError(f"{function} takes or returns {kind}, which JSON cannot carry")
        if len(args) != len(params):
            raise ArgumentError(f"{function} takes {len(params)} argument(s) "
                                f"({', '.join(params)}), got {len(args)}")
        converted = [_core_argument(i, kind, arg)
                     for i, (kind, arg) in enumerate(zip(params, args))]
        try:
            values = _C.call_core(self.address, _C.instance_address(instance), function, params,
                                  results, converted)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self._trap(e)
        values = [json_float(v) if isinstance(v, float) else v for v in values]
        return None if not values else values[0] if len(values) == 1 else values

    def call(self, function, args):
        if self.guest.kind == "module":
            return self.call_module(function, args)
        return self.call_component(function, args)

    def notify(self, version, op, bucket, key, value):
        self.instantiate()
        rep = self.state.new_handle(self.state.buckets, bucket)
        name = "on-set" if op == "set" else "on-delete"
        params, _ = WATCHER_FUNCS[version][name]
        instance = self.instance
        index = instance.get_export_index(self.store, f"wasi:keyvalue/watcher@{version}")
        index = instance.get_export_index(self.store, name, index)
        func = instance.get_func(self.store, index)
        args = [rep, key, value] if op == "set" else [rep, key]
        self.invoke(func, [make_lower(p) for p in params], None, args)


def _core_argument(index, kind, arg):
    """A JSON argument as the i32/i64/f32/f64 wasmtime takes; ArgumentError names the parameter."""
    if kind in ("i32", "i64"):
        bits = 32 if kind == "i32" else 64
        if isinstance(arg, int) and not isinstance(arg, bool) \
                and -(1 << (bits - 1)) <= arg < (1 << bits):
            # an unsigned spelling of the same bits is the same value
            return arg - (1 << bits) if arg >= 1 << (bits - 1) else arg
    else:
        value = float_from_json(arg, kind)
        if value is not None:
            return value
    try:
        shown = json.dumps(arg)
    except (TypeError, ValueError):
        shown = repr(arg)
    expected = kind if kind in ("i32", "i64") else \
        f'{kind} (a number, "NaN", "Infinity" or "-Infinity")'
    raise ArgumentError(f"argument {index + 1} ({kind}): expected {expected}, got {shown[:80]}")


# ---------------------------------------------------------------------------
# composition: a provider component serves the consumer's wasi:keyvalue
# ---------------------------------------------------------------------------
#
# Host(kv="component:FILE") (or kv=Provider(...)): a guest's wasi:keyvalue imports are not the
# host's functions but forwards to the exports of a *provider* component, run at the same time
# in a Store of its own. The provider's own imports are the host's: WASIp2 (the same sandbox as
# any guest) and wasi:keyvalue on the Host's backend (provider_kv), so a provider can be a layer
# (prefixing, encrypting, caching) over real storage. wasmtime cannot link one component's
# exports into another's imports at run time; kvhost does it one call at a time.
#
# Lifetime and tenants: one provider instance per consumer call. It is made at the consumer's
# first wasi:keyvalue call (a call that uses none never starts one), serves only that call, in
# that call's namespace, and is dropped when the call ends. So state lives in the backend
# beneath the provider (it survives the call, the process and a restart) and no tenant's data is
# ever in an instance that serves another; a provider that keeps data in its linear memory loses
# it at the end of the call. The provider shares the call's deadline; its fuel and memory limits
# are its own (the Host's limits, per instance).
#
# Forwarding works on wasmtime's value records, never converting values to Python: the
# consumer's arguments are copied (32 bytes each) into the provider call, each resource handle
# replaced by the provider handle it stands for; the provider writes its result straight into
# the consumer's result slot, where a provider handle it carries is replaced by a new consumer
# handle. Each consumer handle (bucket, cas) stands for exactly one provider handle; the
# consumer's drop drops it in the provider (its destructor runs); errors pass through unchanged.
# A provider that traps gives the consumer error::other naming the provider and the reason, and
# a fresh instance serves the next open (older handles are gone); one that runs past the
# deadline or out of fuel stops the consumer's call too (TrapError "timeout" / "fuel").

PROVIDER_PREFIX = "component:"          # --kv component:FILE names a provider, not a backend

_RESOURCE_KIND = _KIND["resource"]


class Provider:
    """A wasi:keyvalue provider component for Host(kv=Provider(...)): `source` is a path (.wasm
    or .wat) or bytes; `name` is how messages call it (default: the path); `digest` is the
    SHA-256 of the source when the caller knows it (a store does). Host(kv="component:FILE")
    means Provider("FILE"). The backend beneath it is Host(provider_kv=...)."""

    trial = True        # instantiate once when the Host is made (a worker trusts its parent)

    def __init__(self, source, *, name=None, digest=None):
        if not isinstance(source, (str, bytes, bytearray, os.PathLike)) or not len(source):
            raise ArgumentError(f"invalid provider {source!r}: expected a path or bytes")
        self.source = source
        self.name = name
        self.digest = digest

    @classmethod
    def from_url(cls, url):
        """The Provider of "component:FILE"."""
        path = url[len(PROVIDER_PREFIX):]
        if not path:
            raise ArgumentError(f"invalid backend URL {url!r}: expected component:FILE (a "
                                "provider component)")
        return cls(path)

    def load(self, host):
        """The compiled provider, a Guest of `host`."""
        try:
            return host.load(self.source, digest=self.digest, name=self.name)
        except ArgumentError as e:
            raise ArgumentError(f"provider: {e}") from None

    def __repr__(self):
        shown = self.name or (self.source if isinstance(self.source, str) else "<bytes>")
        return f"<Provider {shown}>"


def provider_of(kv):
    """The Provider a Host's `kv` argument names (a Provider, or "component:FILE"), else None."""
    if isinstance(kv, Provider):
        return kv
    if isinstance(kv, str) and kv.startswith(PROVIDER_PREFIX):
        return Provider.from_url(kv)
    return None


def provider_exports(component_type, engine, name):
    """{interface: frozenset of function names}: the wasi:keyvalue interfaces a provider exports,
    each checked against the WIT (GuestError names a member that is off, or says there is none)."""
    provided = {}
    for export_name, item in component_type.exports(engine).items():
        if export_name in KV_INTERFACES:
            provided[export_name] = frozenset(check_kv_instance(f"provider {name}: export",
                                                                export_name, item.ty,
                                                                engine))
    if not provided:
        raise GuestError(f"{name} exports no wasi:keyvalue interface, so it cannot be a provider "
                         "(it must "
                         f"export one of {', '.join(sorted(KV_INTERFACES))})")
    return provided


def check_consumer(component_type, engine, provided, consumer, provider):
    """Refuse a consumer importing a wasi:keyvalue function that the provider does not export
    (LinkError names it), before anything runs."""
    for import_name, item in component_type.imports(engine).items():
        if not import_name.startswith("wasi:keyvalue/"):
            continue
        exported = provided.get(import_name, frozenset())
        for member, export in item.ty.exports(engine).items():
            if isinstance(export.ty, wc.FuncType) and member not in exported:
                have = ", ".join(f"{iface} ({', '.join(sorted(funcs))})"
                                 for iface, funcs in sorted(provided.items()))
                raise LinkError(f"cannot run {consumer} on provider {provider}: {consumer} imports "
                                f"{import_name}#{member}, which the provider does not export (it "
                                f"exports {have})")


# -- forwarding a consumer's calls -----------------------------------------------------------------

def _handle_in_result(result):
    """Where a result carries a new handle: ("ok", type id, None) for result<own<T>, E> (open,
    cas.new), ("err", type id, case) for result<_, variant{case(own<T>), ...}> (swap), or None."""
    _, ok, err = result
    if ok is not None and ok[0] == "own":
        return ("ok", ok[1], None)
    if err is not None and err[0] == "variant":
        for case, payload in err[1]:
            if payload is not None and payload[0] == "own":
                return ("err", payload[1], case)
    return None


class _Forward:
    """One wasi:keyvalue function as a consumer imports it when a provider serves it: where its
    handles are, and how to answer an error."""

    __slots__ = ("interface", "name", "label", "arity", "handles", "adopts", "lower", "wrap_error")

    def __init__(self, interface, name, params, result):
        self.interface = interface
        self.name = name
        self.label = f"{interface}#{name}"
        self.arity = len(params)
        # (argument index, consumed (own) or lent (borrow), lift giving the consumer's rep)
        self.handles = tuple((i, p[0] == "own", make_lift(p)) for i, p in enumerate(params)
                             if p[0] in ("own", "borrow"))
        self.adopts = _handle_in_result(result)
        self.lower = make_lower(result)
        self.wrap_error = ((lambda e: wc.Variant("store-error", e)) if name == "swap"
                           else (lambda e: e))

    def fail(self, ctx, message, results):
        """Answer the consumer with error::other(message) (swap:
        cas-error::store-error(other(...)))."""
        self.lower(ctx, Err(self.wrap_error(wc.Variant("other", message))), results)
        return 0


_FORWARDS = {}       # function id -> _Forward
_LOWER_HANDLE = {type_id: _make_lower_own(type_id)
                 for type_id in list(BUCKET_TYPE.values()) + [CAS_TYPE]}


@_FUNC_CALLBACK
def _forward(data, ctx, _ty, args, nargs, results, nresults):
    """Every wasi:keyvalue call of a consumer lands here when a provider serves it: the
    arguments go to the provider as they are, with each handle replaced by the provider's
    (see the section comment); the provider writes the result in place."""
    try:
        forward = _FORWARDS[data]
        link = _STATES[ctx].provider
        if nargs != forward.arity or nresults != 1:
            return _trap_pointer(f"kvhost: {forward.label} called with a signature that does not "
                                 "match the WIT")
        base = link.args_address
        size = nargs * _VAL_SIZE
        _span(base, size).raw = _span(args, size).raw    # borrowed as they are
        taken = None
        for index, own, lift in forward.handles:
            rep = lift(ctx,
                       args + index * _VAL_SIZE)            # ends the borrow / takes back the own
            handle = link.handles.pop(rep, None) if own else link.handles.get(rep)
            if handle is None:
                return forward.fail(ctx, link.missing(rep), results)
            _write_kind_pointer(base + index * _VAL_SIZE, _RESOURCE_KIND, handle)
            if own:
                taken = handle
        func = link.funcs.get(forward) or link.func(forward, ctx, results, taken)
        if func is None:                                 # the provider could not start; answered
            return 0
        error = _C.component_call(func, link.context, base, nargs, results, 1)
        if taken is not None:
            _C.any_delete(taken)                         # the provider consumed it (or trapped)
        if error:
            return link.trapped(forward, ctx, results, _trap_reason(_C.error(error)))
        if forward.adopts is not None:
            link.adopt(forward.adopts, ctx, results)
        return 0
    except BaseException as e:   # a bug, or a store without a provider: trap this consumer only
        return _trap_pointer(f"kvhost: forwarding a wasi:keyvalue call: {type(e).__name__}: {e}")


@_DTOR_CALLBACK
def _drop_forwarded(data, ctx, rep):
    """The consumer dropped a handle: drop the provider's (its destructor runs)."""
    try:
        state = _STATES.get(ctx)
        if state is not None:
            state.take_back(data, rep)
            if state.provider is not None:
                state.provider.drop(rep)
    except BaseException:       # never raise into wasmtime; a broken provider is reset by drop()
        pass
    return 0


@_FINALIZER
def _forget_forward(data):
    _FORWARDS.pop(data or 0, None)


def add_forwarding_to_linker(linker):
    """Define both wasi:keyvalue versions in a consumer's linker as forwards to its Store's
    provider."""
    with linker.root() as root:
        for import_name, (resources, functions) in KV_INTERFACES.items():
            with root.add_instance(import_name) as instance:
                for res_name, (type_id, _table) in resources.items():
                    _add_host_resource(instance, res_name, type_id, _drop_forwarded)
                for func_name, (params, result, _func) in functions.items():
                    func_id = _new_func_id()
                    _FORWARDS[func_id] = _Forward(import_name, func_name, params, result)
                    _C.define_func(instance, func_name, _forward, func_id, _forget_forward)


def _to_stderr(data):
    """Where a provider's output goes when the consumer's is not captured: never the consumer's
    stdout."""
    with contextlib.suppress(Exception):
        stream = sys.stderr
        if hasattr(stream, "buffer"):
            stream.buffer.write(data)
        else:
            stream.write(bytes(data).decode("utf-8", "replace"))
        stream.flush()


class _Composition:
    """A Host's provider: the compiled component, the wasi:keyvalue functions it exports, and the
    linker its instances are made with (WASIp2 and the host's wasi:keyvalue on the Host's
    backend)."""

    def __init__(self, host, guest, trial=True):
        if guest.kind != "component":
            raise GuestError(f"{guest.name} is a core module; a provider must be a component that "
                             "exports "
                             "wasi:keyvalue")
        self.host = host
        self.guest = guest
        self.provided = provider_exports(guest.artifact.type, host.engine, guest.name)
        self._linker = None
        self._indexes = {}          # _Forward -> export index of its function (any instance)
        if trial:
            self._trial()

    def _provider_linker(self):
        with self.host._lock:
            if self._linker is None:
                linker = wc.Linker(self.host.engine)
                linker.add_wasip2()
                add_keyvalue_to_linker(linker)
                if self.host.stub_imports:
                    linker.define_unknown_imports_as_traps(self.guest.artifact)
                self._linker = linker
            return self._linker

    def export_index(self, forward):
        """The provider's export index of `forward`'s function (None if it lacks it), found once."""
        if forward not in self._indexes:
            artifact = self.guest.artifact
            index = artifact.get_export_index(forward.interface)
            self._indexes[forward] = (None if index is None
                                      else artifact.get_export_index(forward.name, index))
        return self._indexes[forward]

    def instantiate(self, store):
        """A provider instance in `store`; LinkError if its imports cannot be met, TrapError if it
        traps."""
        try:
            return self._provider_linker().instantiate(store, self.guest.artifact)
        except wasmtime.WasmtimeError as e:
            reason = _link_reason(e)
            if _is_link_failure(reason):
                raise LinkError(f"cannot link provider {self.guest.name}: {reason}") from None
            raise _trap_error(e, self.host) from None
        except wasmtime.Trap as e:
            raise _trap_error(e, self.host) from None

    def _trial(self):
        """Make one instance, so that a provider that cannot link or start is refused before any
        guest runs."""
        link = _ProviderLink(self, _CallState(self.host), None)
        try:
            link.start()
        except TrapError as e:
            raise GuestError(f"provider {self.guest.name} cannot start: {e}") from None
        finally:
            link.close()

    def wasi_config(self, capture):
        """The provider's WASI: the Host's env and dirs; its output goes where the consumer's
        does (captured with it, else the Host's stderr unless the Host discards output)."""
        host = self.host
        config = wasmtime.WasiConfig()
        config.argv = [self.guest.name]
        if host.env:
            config.env = sorted(host.env.items())
        for host_dir, guest_dir in host.dirs:
            config.preopen_dir(host_dir, guest_dir)
        if capture is not None:
            config.stdout_custom = capture.write
            config.stderr_custom = capture.write
        elif host.output == "inherit":
            config.stdout_custom = _to_stderr
            config.stderr_custom = _to_stderr
        return config                    # "discard": WASI's default streams drop what is written

    def check_consumer(self, guest):
        """Refuse a consumer needing a function the provider lacks; a consumer of a provider that
        may block (a WASI poll) may block too (so isolation="auto" runs it in a worker
        process)."""
        check_consumer(guest.artifact.type, self.host.engine, self.provided,
                       guest.name, self.guest.name)
        guest.may_block = guest.may_block or self.guest.may_block

    def link(self, consumer, capture):
        """The _ProviderLink of one consumer call (its _CallState; its (stdout, stderr) captures or
        None)."""
        return _ProviderLink(self, consumer, None if capture is None else capture[1])


class _ProviderLink:
    """The provider instance serving one consumer call, and the consumer's handles into it."""

    def __init__(self, composition, consumer, capture):
        self.composition = composition
        self.consumer = consumer            # the consumer Store's _CallState
        self.capture = capture              # where the provider's output goes (None: stderr)
        self.started = time.monotonic()     # the provider keeps to the call's deadline
        self.store = None                   # made at the first forwarded call
        self.context = None                 # its wasmtime_context_t address
        self.instance = None
        self.funcs = {}                     # _Forward -> address of its wasmtime_component_func_t
        self.keep = []                      # the Func objects those addresses belong to
        self.handles = {}                   # consumer rep -> provider resource_any address
        self.lost = None                    # why earlier handles are gone (the provider trapped)
        self.args = ctypes.create_string_buffer(3 * _VAL_SIZE)   # kv functions take at most three
        self.args_address = ctypes.addressof(self.args)

    # -- the provider instance ---------------------------------------------------------------------

    def start(self):
        """Make the provider instance: a fresh Store with the Host's limits and the call's
        deadline."""
        composition = self.composition
        host, guest = composition.host, composition.guest
        store = host._new_store(wasi=False)
        context = store.address
        if host.timeout is not None:
            left = max(0.0, host.timeout - (time.monotonic() - self.started))
            _C.set_epoch_deadline(context, math.ceil(left / EPOCH_TICK) + 1)
        if guest.needs_wasi:
            store.wrapper.set_wasi(composition.wasi_config(self.capture))
        state = _CallState(host, False, self.consumer.namespace)
        state.events = self.consumer.events         # the provider's writes reach the watchers
        _STATES[context] = state
        self.store, self.context = store, context
        try:
            self.instance = composition.instantiate(store.wrapper)
        except BaseException:
            self.close()
            raise

    def close(self, why=None):
        """Drop the provider instance and every handle into it (at the end of the call, or after a
        trap)."""
        for handle in self.handles.values():
            _C.any_delete(handle)
        self.handles.clear()
        self.funcs.clear()
        del self.keep[:]
        if self.store is not None:
            _STATES.pop(self.context, None)
            self.store.close()
        self.store = self.context = self.instance = None
        if why is not None:
            self.lost = ("this handle was lost when the provider instance that held it stopped: "
                         f"{why}")

    def func(self, forward, ctx, results, taken):
        """The address of the provider's function for `forward`, looked up once per instance (which
        starts here, at the first call). None if the provider could not start or lacks it: the
        consumer is then answered error::other."""
        try:
            if self.instance is None:
                self.start()
            index = self.composition.export_index(forward)
            func = None if index is None else self.instance.get_func(self.store.wrapper, index)
            if func is None:
                raise LinkError(f"{forward.label} is not exported")
        except KvError as e:
            if taken is not None:
                _C.any_delete(taken)
            forward.fail(ctx, f"provider {self.composition.guest.name}: {e}", results)
            return None
        self.keep.append(func)
        address = self.funcs[forward] = _C.func_address(func)
        return address

    def missing(self, rep):
        """Why the consumer's handle `rep` stands for no provider handle."""
        if rep in self.consumer.buckets:       # made by the host for a watcher (Session.notify)
            return ("a bucket handed to a watcher names the backend's bucket, which the provider "
                    "does not "
                    "serve: open the bucket to use it")
        return self.lost or "unknown handle"

    def adopt(self, adopts, ctx, results):
        """Give the consumer its own handle for a provider handle in the result (open, cas.new,
        swap)."""
        where, type_id, case = adopts
        if (_kind_at(results + _VAL_PAYLOAD) != 0) != (where == "ok"):
            return
        box = _pointer_at(results + _VAL_PAYLOAD + 8)
        if where == "err":
            if _lift_string(ctx, box) != case:
                return
            box = _pointer_at(box + _VAL_PAYLOAD + 16)
        consumer = self.consumer        # its counter: reps the host made too (watchers) never clash
        rep = consumer.next_rep
        consumer.next_rep += 1
        self.handles[rep] = _pointer_at(box + _VAL_PAYLOAD)     # now this link's to free
        _LOWER_HANDLE[type_id](ctx, rep, box)

    def trapped(self, forward, ctx, results, reason):
        """The provider trapped in `forward`: drop the instance; answer error::other, or stop the
        consumer too if the call's deadline or fuel ran out."""
        message = f"provider {self.composition.guest.name} trapped in {forward.label}: {reason}"
        self.close(message)
        if "wasm trap: interrupt" in reason or "all fuel consumed" in reason:
            return _trap_pointer(message)
        return forward.fail(ctx, message, results)

    def drop(self, rep):
        """The consumer dropped `rep`: drop the provider's handle, running its destructor."""
        handle = self.handles.pop(rep, None)
        if handle is None:
            return
        error = _C.provider_drop(self.context, handle)
        _C.any_delete(handle)
        if error:
            self.close(f"provider {self.composition.guest.name} trapped dropping a handle: "
                       f"{_trap_reason(_C.error(error))}")


class _WiredProvider(Provider):
    """A worker process's provider, as its parent sent it (from the compile cache, or its bytes)."""

    trial = False

    def __init__(self, wire, blobs):
        super().__init__(wire.get("name") or "provider", name=wire.get("name"),
                         digest=wire.get("digest"))
        self.wire = wire
        self.blobs = blobs

    def load(self, host):
        return _worker_guest(host, self.wire, self.blobs)


# ---------------------------------------------------------------------------
# HTTP apps: the wasi:http proxy world
# ---------------------------------------------------------------------------
#
# Host.handle_http runs a component that exports wasi:http/incoming-handler (the wasi:http/proxy
# world: what `wasmtime serve`, jco's fetch handlers and componentize-py's proxy apps are). Its
# imports are all defined here, in Python, on a linker of their own: wasi:http/types and
# outgoing-handler, and the interfaces whose resources they share or that toolchains import
# beside them (wasi:io error/poll/streams, wasi:clocks, wasi:cli, wasi:random, wasi:filesystem
# with no preopens), plus wasi:keyvalue. wasmtime's own WASI cannot be used: its C API cannot
# make an incoming-request or a response-outparam, and its streams and pollables are not ours.
#
# Versions: wasmtime's component linker matches imports semver-compatibly, also through the C
# API (an import of wasi:io/poll@0.2.0 or @0.2.20 finds the one defined as @0.2.12), so every
# interface is defined once, at HTTP_WASI_VERSION, and any 0.2.x guest links.
#
# One request is one fresh Store and instance (the Host's timeout, memory, table and fuel
# limits). Its resources are Python objects in one table per request (_HttpState.objects); the
# guest holds their reps. The request body is read from the server's reader when the guest
# reads, and the response goes to the server's sink as the guest writes it: neither is ever
# whole in memory. Blocking calls wait in Python against the request's deadline, so a guest
# blocked in poll is stopped at the deadline, in this process, like one that computes forever.
# Reading a body is the one wait that is not ours: its bytes come from the server's reader (or
# an outgoing call's socket), which has no way to say "nothing yet"; so an input stream's
# pollable is always ready and read waits for the reader as blocking-read does (the reader's
# own timeout bounds it; the deadline is checked after each read).
#
# Outgoing requests (wasi:http/outgoing-handler) are refused (HTTP-request-denied) unless the
# destination is in Host(allow_outbound=[...]); an allowed one runs on a thread of its own with
# http.client (TLS verified), its request body buffered up to a bound, its response body read
# as the guest reads it, bounded too.

HTTP_WASI_VERSION = "0.2.12"                     # each interface is defined at this version
HTTP_HANDLER_PREFIX = "wasi:http/incoming-handler@0.2"
HTTP_READ_CHUNK = 1 << 16                        # bytes one stream read gives at most
HTTP_WRITE_PERMIT = 1 << 20                      # bytes check-write allows at once
HTTP_EARLY_BODY_LIMIT = 1 << 20                  # bytes written before the response is set
BLOCKING_WRITE_LIMIT = 4096                      # blocking-write-and-flush's limit (the WIT's)
HTTP_CAPTURE_BYTES = 64 << 10                    # guest stdout / stderr kept per request
OUTBOUND_BODY_LIMIT = 16 << 20                   # request body an outgoing call may carry
OUTBOUND_RESPONSE_LIMIT = 64 << 20               # response body an outgoing call may read
OUTBOUND_CALLS_LIMIT = 16                        # outgoing calls one request may make
OUTBOUND_CONNECT_TIMEOUT = 10.0                  # seconds, when request-options sets none
OUTBOUND_FIRST_BYTE_TIMEOUT = 30.0
OUTBOUND_BETWEEN_BYTES_TIMEOUT = 30.0
# Hop-by-hop and connection-level fields, taken out of what a guest receives (the list of
# wasmtime serve 49, so a guest sees the same request from both), and refused, with te too, when
# a guest sets them (header-error.forbidden).
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate",
                                "proxy-authorization", "proxy-connection", "transfer-encoding",
                                "upgrade", "host", "http2-settings"})
FORBIDDEN_HEADERS = HOP_BY_HOP_HEADERS | {"te"}
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")     # RFC 9110 token: names, methods
_FIELD_VALUE_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")   # no CR, LF, NUL or other controls
_PATH_RE = re.compile(r"[\x21-\x7e]*\Z")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\Z")
_TARGET_RE = re.compile(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?\Z")   # an authority: host, port
_AUTHORITY_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~%!$&'()*+,;=]*)(:[0-9]{0,5})?\Z")
_OUTBOUND_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)(?::([0-9]{1,5}))?\Z")
_METHODS = {"GET": "get", "HEAD": "head", "POST": "post", "PUT": "put", "DELETE": "delete",
            "CONNECT": "connect", "OPTIONS": "options", "TRACE": "trace", "PATCH": "patch"}
_METHOD_NAMES = {case: name for name, case in _METHODS.items()}

# host resource type ids ("ht" + a number)
IO_ERROR, POLLABLE, INPUT_STREAM, OUTPUT_STREAM = 0x68740001, 0x68740002, 0x68740003, 0x68740004
FIELDS, INCOMING_REQUEST, OUTGOING_REQUEST = 0x68740005, 0x68740006, 0x68740007
REQUEST_OPTIONS, RESPONSE_OUTPARAM, INCOMING_RESPONSE = 0x68740008, 0x68740009, 0x6874000A
INCOMING_BODY, FUTURE_TRAILERS, OUTGOING_RESPONSE = 0x6874000B, 0x6874000C, 0x6874000D
OUTGOING_BODY, FUTURE_INCOMING_RESPONSE = 0x6874000E, 0x6874000F
TERMINAL_INPUT, TERMINAL_OUTPUT = 0x68740010, 0x68740011
DESCRIPTOR, DIRECTORY_ENTRY_STREAM = 0x68740012, 0x68740013
NETWORK, UDP_SOCKET, DATAGRAM_IN, DATAGRAM_OUT = 0x68740014, 0x68740015, 0x68740016, 0x68740017
TCP_SOCKET, RESOLVE_STREAM = 0x68740018, 0x68740019


class HttpRequest:
    """One incoming HTTP request, as a server hands it to Host.handle_http.

    method: "GET", "POST", ... or an extension method (a token, case kept); scheme: "http",
    "https" or None; authority: "host[:port]" or None; path_with_query: "/a/b?c=d" or None;
    headers: [(name: str, value: bytes)] in order, repeated names kept (connection-level
    fields such as connection or transfer-encoding are not shown to the guest); body: an object
    whose read(n) returns up to n bytes and b"" at the end (it may block), or None for none."""

    __slots__ = ("method", "scheme", "authority", "path_with_query", "headers", "body")

    def __init__(self, method, scheme, authority, path_with_query, headers=(), body=None):
        if not isinstance(method, str) or not _TOKEN_RE.match(method):
            raise ArgumentError(f"invalid HTTP method {method!r}: expected a token")
        for label, value in (("scheme", scheme), ("authority", authority),
                             ("path", path_with_query)):
            if value is not None and not isinstance(value, str):
                raise ArgumentError(f"invalid {label} {value!r}: expected a string or None")
        if body is not None and not callable(getattr(body, "read", None)):
            raise ArgumentError(f"invalid body {body!r}: expected an object with read(n)")
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path_with_query = path_with_query
        self.headers = headers
        self.body = body

    def __repr__(self):
        return f"<HttpRequest {self.method} {self.path_with_query!r}>"


class HttpOutcome:
    """What Host.handle_http gives back once the guest answered: the status it set, the body bytes
    it wrote, its stdout and stderr (the first HTTP_CAPTURE_BYTES of each) and the fuel it used."""

    __slots__ = ("status", "body_bytes", "stdout", "stderr", "fuel")

    def __init__(self, status, body_bytes, stdout, stderr, fuel):
        self.status = status
        self.body_bytes = body_bytes
        self.stdout = stdout
        self.stderr = stderr
        self.fuel = fuel

    def __repr__(self):
        return f"<HttpOutcome status={self.status} body={self.body_bytes}B>"


# -- resources -------------------------------------------------------------------------------------

class _IoError:
    """wasi:io/error: what failed, and the error-code http-error-code gives for it (or None)."""

    __slots__ = ("message", "code")

    def __init__(self, message, code=None):
        self.message = message
        self.code = code


class _Fields:
    """wasi:http fields as wasmtime keeps them (an http::HeaderMap): names lowercased, each
    name's values together in order, names in the order of the map's entries, where removing a
    name moves the last entry into its place (so a guest sees the order `wasmtime serve` gives
    it); immutable once a request or response owns them."""

    __slots__ = ("names", "map", "immutable")

    def __init__(self, immutable=False):
        self.names = []                   # entry order
        self.map = {}                     # name -> [value, ...]
        self.immutable = immutable

    @classmethod
    def from_server(cls, headers):
        """The immutable fields of a message received from a peer, hop-by-hop fields removed."""
        fields = cls(immutable=True)
        for name, value in headers:
            fields.append(name.lower(), bytes(value))
        for name in [name for name in fields.names if name in HOP_BY_HOP_HEADERS]:
            fields.remove(name)
        return fields

    def append(self, name, value):
        values = self.map.get(name)
        if values is None:
            self.names.append(name)
            self.map[name] = [value]
        else:
            values.append(value)

    def replace(self, name, values):
        """What fields.set does in wasmtime: remove the name, then append each value."""
        self.remove(name)
        for value in values:
            self.append(name, value)

    def remove(self, name):
        if self.map.pop(name, None) is None:
            return
        index = self.names.index(name)
        last = self.names.pop()
        if index < len(self.names):
            self.names[index] = last

    def items(self):
        return [(name, value) for name in self.names for value in self.map[name]]

    def copy(self):
        fields = _Fields()
        fields.names = list(self.names)
        fields.map = {name: list(values) for name, values in self.map.items()}
        return fields

    def content_length(self):
        """The content-length these fields declare, or None (also when it is not one number)."""
        values = self.map.get("content-length")
        if not values or len(set(values)) != 1:
            return None
        try:
            return parse_number(values[0], "content-length")
        except ArgumentError:
            return None


def _header_error(name, values=()):
    """The header-error for setting `name` to `values`, or None if they are fine."""
    if not _TOKEN_RE.match(name):
        return "invalid-syntax"
    if name.lower() in FORBIDDEN_HEADERS:
        return "forbidden"
    if not all(_FIELD_VALUE_RE.match(v) for v in values):
        return "invalid-syntax"
    return None


class _Pollable:
    """wasi:io/poll pollable: ready when `check()` says so; `at` is the monotonic time at which
    it becomes ready by itself (a timer), or None when only an event can make it ready."""

    __slots__ = ("check", "at")

    def __init__(self, check, at=None):
        self.check = check
        self.at = at

    def ready(self):
        return self.check()


def _always():
    return True


class _InputStream:
    """wasi:io/streams input-stream over a reader (read(n) -> bytes, b"" at the end; it may block):
    the request body, an outgoing call's response body, or stdin (no reader: at its end)."""

    __slots__ = ("reader", "done", "limit", "total", "error_code", "owner")

    def __init__(self, reader, limit=None, error_code=None, owner=None):
        self.reader = reader
        self.done = reader is None
        self.limit = limit                # bytes this stream may give; more is an error
        self.total = 0
        self.error_code = error_code      # the error-code a read past `limit` carries
        self.owner = owner                # the incoming-body it belongs to, if any

    def read(self, state, size):
        """ok(bytes) (b"" only when size is 0), or an Err(stream-error)."""
        if self.done:
            return Err(wc.Variant("closed"))
        if size == 0:
            return b""
        want = min(size, HTTP_READ_CHUNK)
        if self.limit is not None:
            want = min(want, self.limit - self.total) or 1     # at the limit: is there more?
        if state.unflushed:               # the read may wait for the peer
            state.flush_response()
        try:
            data = self.reader.read(want)
        except Exception as e:          # the client went away, a socket timed out
            self.done = True
            return state.stream_failed(f"reading the body failed: {e}",
                                       wc.Variant("HTTP-protocol-error"))
        if not data:
            self.done = True
            if self.owner is not None:
                self.owner.ended = True
            return Err(wc.Variant("closed"))
        if self.limit is not None and self.total + len(data) > self.limit:
            self.done = True
            return state.stream_failed(f"the body is larger than {self.limit} bytes",
                                       self.error_code)
        self.total += len(data)
        state.check_deadline()
        return bytes(data)


class _OutputStream:
    """wasi:io/streams output-stream writing into `target` (an _OutgoingBody, or a capture for
    stdout and stderr: anything with write(state, data) -> None or an Err, and permit())."""

    __slots__ = ("target", "closed")

    def __init__(self, target):
        self.target = target
        self.closed = False

    def permit(self):
        return 0 if self.closed else self.target.permit()

    def write(self, state, data):
        if self.closed:
            return Err(wc.Variant("closed"))
        if len(data) > self.target.permit():
            return state.stream_failed(f"write of {len(data)} bytes exceeds what check-write "
                                       "permitted")
        failed = self.target.write(state, data)
        if failed is not None:
            self.closed = True
        return failed


class _CaptureTarget:
    """Guest stdout or stderr: kept in a bounded capture, never written to the server's streams."""

    __slots__ = ("capture",)

    def __init__(self, capture):
        self.capture = capture

    def permit(self):
        return HTTP_WRITE_PERMIT

    def write(self, state, data):
        self.capture.write(data)
        return None


class _OutgoingBody:
    """outgoing-body of the guest's response (`response` set: written to the server's sink once
    the response is set, buffered up to HTTP_EARLY_BODY_LIMIT before) or of an outgoing request
    (buffered up to OUTBOUND_BODY_LIMIT until the call sends it)."""

    __slots__ = ("response", "declared", "written", "stream_taken", "finished", "trailers",
                 "chunks", "buffered", "failed", "dropped", "finished_event")

    def __init__(self, response, declared):
        self.response = response          # the _OutgoingResponse, or None for an outgoing request
        self.declared = declared          # content-length, or None
        self.written = 0
        self.stream_taken = False
        self.finished = False
        self.trailers = None
        self.chunks = []                  # bytes not yet handed on
        self.buffered = 0
        self.failed = None                # why the body is broken (a message), if it is
        self.dropped = False              # the guest dropped it without finish
        self.finished_event = None if response is not None else threading.Event()

    def limit(self):
        return HTTP_EARLY_BODY_LIMIT if self.response is not None else OUTBOUND_BODY_LIMIT

    def permit(self, state=None):
        if self.finished or self.failed:
            return 0
        if self.response is not None and self.response.started:
            return HTTP_WRITE_PERMIT
        return max(0, self.limit() - self.buffered)

    def write(self, state, data):
        size = len(data)
        if self.declared is not None and self.written + size > self.declared:
            self.failed = (f"the guest wrote more than the {self.declared} bytes its "
                           "content-length says")
            code = wc.Variant("HTTP-response-body-size" if self.response is not None
                              else "HTTP-request-body-size", self.written + size)
            return state.stream_failed(self.failed, code)
        self.written += size
        if self.response is not None and self.response.started:
            return state.send_body(data)
        self.chunks.append(bytes(data))
        self.buffered += size
        return None

    def length_error(self):
        """The message for a body that ended short of its content-length, or None."""
        if self.declared is not None and self.written != self.declared:
            return f"the guest wrote {self.written} bytes, its content-length says {self.declared}"
        return None


class _OutgoingResponse:
    """outgoing-response: status and headers (immutable once the response owns them), its body."""

    __slots__ = ("status", "fields", "body", "started")

    def __init__(self, fields):
        fields.immutable = True
        self.status = 200
        self.fields = fields
        self.body = None
        self.started = False


class _IncomingBody:
    """incoming-body of the request (or of an outgoing call's response): its one stream."""

    __slots__ = ("stream", "stream_taken", "ended")

    def __init__(self, stream):
        self.stream = stream
        stream.owner = self
        self.stream_taken = False
        self.ended = False


class _IncomingRequest:
    """incoming-request: the server's HttpRequest; its fields are made when the guest asks."""

    __slots__ = ("request", "_fields", "body_taken")

    def __init__(self, request):
        self.request = request
        self._fields = None
        self.body_taken = False

    @property
    def fields(self):
        if self._fields is None:
            self._fields = _Fields.from_server(self.request.headers)
        return self._fields


class _OutgoingRequest:
    """outgoing-request the guest builds for outgoing-handler.handle."""

    __slots__ = ("method", "scheme", "authority", "path", "fields", "body")

    def __init__(self, fields):
        fields.immutable = True
        self.method = wc.Variant("get")
        self.scheme = None
        self.authority = None
        self.path = None
        self.fields = fields
        self.body = None


class _RequestOptions:
    __slots__ = ("connect", "first_byte", "between_bytes")

    def __init__(self):
        self.connect = self.first_byte = self.between_bytes = None    # nanoseconds or None


class _Placeholder:
    """A resource the guest holds that has no state of its own (response-outparam, terminals)."""

    __slots__ = ()


# -- the state of one request ----------------------------------------------------------------------

class _HttpState(_CallState):
    """One request's Store: its resources, its response so far, its deadline and sink."""

    def __init__(self, host, namespace, sink, deadline, captures):
        super().__init__(host, bool(host._watchers), namespace)
        self.objects = {}                 # rep -> the Python object of any resource type
        self.sink = sink
        self.sink_flush = getattr(sink, "flush", None)     # optional: called before a wait
        self.unflushed = False            # body bytes went to the sink since its last flush
        self.deadline = deadline          # time.monotonic() by which the request must be answered
        self.captures = captures          # (stdout, stderr) _Capture
        self.failure = None               # the KvError that ends the request (set before a trap)
        self.response = None              # the _OutgoingResponse once set
        self.response_error = None        # the error-code the guest answered with instead
        self.outparam_used = False
        self.sink_error = None            # what the sink raised (the client is gone)
        self.calls = []                   # _OutboundCall started by this request
        self.wakeup = None                # an Event an outgoing call sets when it completes

    # -- handles -----------------------------------------------------------------------------------
    def add(self, obj):
        rep = self.next_rep
        self.next_rep += 1
        self.objects[rep] = obj
        return rep

    def get(self, rep):
        return self.objects[rep]

    def take(self, rep):
        """The object of an own handle the guest passed back (it no longer has it)."""
        return self.objects.pop(rep)

    # -- failures ----------------------------------------------------------------------------------
    def fail(self, error):
        """Remember why this request ends and return the exception a host function raises (the
        guest traps; handle_http raises `error`)."""
        if self.failure is None:
            self.failure = error
        return _GuestStopped(str(error))

    def check_deadline(self):
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.fail(TrapError(f"timeout: the guest ran longer than {self.host.timeout} s "
                                      "(stopped while it waited)", "timeout"))

    def stream_failed(self, message, code=None):
        """Err(stream-error.last-operation-failed) carrying a new wasi:io error."""
        return Err(wc.Variant("last-operation-failed", self.add(_IoError(message, code))))

    # -- waiting -----------------------------------------------------------------------------------
    def wait(self, pollables):
        """The indexes of the ready pollables, waiting (never past the deadline) until one is."""
        while True:
            ready = [i for i, p in enumerate(pollables) if p.ready()]
            if ready:
                return ready
            self.check_deadline()
            if self.unflushed:
                self.flush_response()
            times = [p.at for p in pollables if p.at is not None]
            if self.deadline is not None:
                times.append(self.deadline)
            pause = None if not times else max(0.0, min(times) - time.monotonic())
            if self.wakeup is not None:
                self.wakeup.wait(pause)
                self.wakeup.clear()
            elif pause is not None:
                time.sleep(pause)
            else:
                raise self.fail(TrapError("the guest waits for something that can never happen "
                                          "(no timer, no outgoing request, no deadline)", "trap"))

    # -- the response ------------------------------------------------------------------------------
    def send_body(self, data):
        """Hand response bytes to the sink; a failing sink closes the stream (the client left)."""
        if self.sink_error is not None:
            return Err(wc.Variant("closed"))
        try:
            self.sink.write(data)
        except Exception as e:
            self.sink_error = e
            return Err(wc.Variant("closed"))
        self.unflushed = True
        self.check_deadline()
        return None

    def flush_response(self):
        """Before the guest waits (a poll, a read that may block): the sink's flush, so that what
        it wrote reaches the client meanwhile (between waits, the sink may gather bytes)."""
        self.unflushed = False
        if self.sink_flush is None or self.sink_error is not None:
            return
        try:
            self.sink_flush()
        except Exception as e:
            self.sink_error = e

    def start_response(self, response):
        self.response = response
        response.started = True
        try:
            self.sink.start(response.status, response.fields.items())
        except Exception as e:
            self.sink_error = e
            return
        body = response.body
        if body is None:
            return
        chunks, body.chunks, body.buffered = body.chunks, [], 0
        for chunk in chunks:
            if self.send_body(chunk) is not None:
                return
        if body.finished:
            self.finish_body(body)

    def finish_body(self, body):
        if self.sink_error is not None:
            return
        try:
            self.sink.finish(None if body.trailers is None else body.trailers.items())
        except Exception as e:
            self.sink_error = e
        self.unflushed = True             # a sink may hold a finished response until a flush

    def close(self):
        for call in self.calls:
            call.cancel()


class _GuestStopped(Exception):
    """Raised by a host function to trap the guest; the request's failure says why."""


# -- wasi:io ---------------------------------------------------------------------------------------

_STREAM_ERROR = ("variant", (("last-operation-failed", ("own", IO_ERROR)), ("closed", None)))
_POLLABLE_OWN, _POLLABLE_BORROW = ("own", POLLABLE), ("borrow", POLLABLE)


def _stream_result(ok):
    return ("result", ok, _STREAM_ERROR)


def _error_to_debug_string(state, rep):
    return state.get(rep).message


def _pollable_ready(state, rep):
    return state.get(rep).ready()


def _pollable_block(state, rep):
    state.wait([state.get(rep)])


def _poll(state, reps):
    if not reps:
        raise state.fail(TrapError("poll was called with an empty list of pollables", "trap"))
    return state.wait([state.get(rep) for rep in reps])


def _input_read(state, rep, size):
    return state.get(rep).read(state, size)


def _input_skip(state, rep, size):
    result = state.get(rep).read(state, size)
    return result if isinstance(result, Err) else len(result)


def _ready_pollable(state, rep):
    return state.add(_Pollable(_always))


def _output_check_write(state, rep):
    stream = state.get(rep)
    return Err(wc.Variant("closed")) if stream.closed else stream.permit()


def _output_write(state, rep, data):
    return state.get(rep).write(state, data)


def _output_blocking_write(state, rep, data):
    if len(data) > BLOCKING_WRITE_LIMIT:
        raise state.fail(TrapError(f"blocking-write-and-flush of {len(data)} bytes: at most "
                                   f"{BLOCKING_WRITE_LIMIT} at once", "trap"))
    stream = state.get(rep)
    if len(data) > stream.permit() and not stream.closed:
        state.wait([_Pollable(lambda: len(data) <= stream.permit() or stream.closed)])
    return stream.write(state, data)


def _output_flush(state, rep):
    return Err(wc.Variant("closed")) if state.get(rep).closed else None


def _output_subscribe(state, rep):
    stream = state.get(rep)
    return state.add(_Pollable(lambda: stream.closed or stream.permit() > 0))


def _output_write_zeroes(state, rep, size):
    return state.get(rep).write(state, bytes(size)) if size <= HTTP_WRITE_PERMIT else \
        state.stream_failed(f"write of {size} bytes exceeds what check-write permitted")


def _output_blocking_write_zeroes(state, rep, size):
    return _output_blocking_write(state, rep, bytes(min(size, BLOCKING_WRITE_LIMIT + 1)))


def _output_splice(state, rep, source_rep, size):
    stream, source = state.get(rep), state.get(source_rep)
    size = min(size, stream.permit())
    if size == 0:
        return 0
    data = source.read(state, size)
    if isinstance(data, Err):
        return data
    failed = stream.write(state, data)
    return failed if failed is not None else len(data)


def _io_interfaces():
    error = ("borrow", IO_ERROR)
    inp, out = ("borrow", INPUT_STREAM), ("borrow", OUTPUT_STREAM)
    return {
        "wasi:io/error": ({"error": IO_ERROR}, {
            "[method]error.to-debug-string": ((error,), _STRING, _error_to_debug_string),
        }),
        "wasi:io/poll": ({"pollable": POLLABLE}, {
            "[method]pollable.ready": ((_POLLABLE_BORROW,), _BOOL, _pollable_ready),
            "[method]pollable.block": ((_POLLABLE_BORROW,), None, _pollable_block),
            "poll": ((("list", _POLLABLE_BORROW),), ("list", ("u32",)), _poll),
        }),
        "wasi:io/streams": ({"input-stream": INPUT_STREAM, "output-stream": OUTPUT_STREAM}, {
            "[method]input-stream.read": ((inp, _U64), _stream_result(_BYTES), _input_read),
            "[method]input-stream.blocking-read": ((inp, _U64), _stream_result(_BYTES),
                                                   _input_read),
            "[method]input-stream.skip": ((inp, _U64), _stream_result(_U64), _input_skip),
            "[method]input-stream.blocking-skip": ((inp, _U64), _stream_result(_U64), _input_skip),
            "[method]input-stream.subscribe": ((inp,), _POLLABLE_OWN, _ready_pollable),
            "[method]output-stream.check-write": ((out,), _stream_result(_U64),
                                                  _output_check_write),
            "[method]output-stream.write": ((out, _BYTES), _stream_result(None), _output_write),
            "[method]output-stream.blocking-write-and-flush": ((out, _BYTES), _stream_result(None),
                                                               _output_blocking_write),
            "[method]output-stream.flush": ((out,), _stream_result(None), _output_flush),
            "[method]output-stream.blocking-flush": ((out,), _stream_result(None), _output_flush),
            "[method]output-stream.subscribe": ((out,), _POLLABLE_OWN, _output_subscribe),
            "[method]output-stream.write-zeroes": ((out, _U64), _stream_result(None),
                                                   _output_write_zeroes),
            "[method]output-stream.blocking-write-zeroes-and-flush": (
                (out, _U64), _stream_result(None), _output_blocking_write_zeroes),
            "[method]output-stream.splice": ((out, inp, _U64), _stream_result(_U64),
                                             _output_splice),
            "[method]output-stream.blocking-splice": ((out, inp, _U64), _stream_result(_U64),
                                                      _output_splice),
        }),
    }


# -- wasi:clocks, wasi:random, wasi:cli, wasi:filesystem -------------------------------------------

_DATETIME = ("record", (("seconds", _U64), ("nanoseconds", ("u32",))))
_ADDRESS_FAMILY = ("enum", ("ipv4", "ipv6"))
_SOCKET_ERROR = ("enum", ("access-denied",))      # only this case is ever returned


def _socket_result(type_id):
    return ("result", ("own", type_id), _SOCKET_ERROR)


def _monotonic_now(state):
    return time.monotonic_ns()


def _monotonic_resolution(state):
    return max(1, int(time.get_clock_info("monotonic").resolution * 1e9))


def _timer(state, at_ns):
    at = at_ns / 1e9
    return state.add(_Pollable(lambda: time.monotonic() >= at, at))


def _subscribe_duration(state, duration_ns):
    return _timer(state, time.monotonic_ns() + duration_ns)


def _wall_now(state):
    now = time.time_ns()
    return {"seconds": now // 1_000_000_000, "nanoseconds": now % 1_000_000_000}


def _wall_resolution(state):
    return {"seconds": 0, "nanoseconds": max(1, int(time.get_clock_info("time").resolution * 1e9))}


def _random_bytes(state, size):
    if size > GUEST_VALUE_LIMIT:
        raise state.fail(TrapError(f"get-random-bytes({size}): at most {GUEST_VALUE_LIMIT} "
                                   "bytes at once", "trap"))
    return os.urandom(size)


def _random_u64(state):
    return int.from_bytes(os.urandom(8), "little")


def _insecure_seed(state):
    return (_random_u64(state), _random_u64(state))


def _environment(state):
    return sorted(state.host.env.items())


def _arguments(state):
    return []


def _initial_cwd(state):
    return None


def _exit(state, status):
    raise state.fail(GuestExit(1 if isinstance(status, Err) else 0))


def _exit_with_code(state, code):
    raise state.fail(GuestExit(code))


def _stdin(state):
    return state.add(_InputStream(None))


def _stdout(state):
    return state.add(_OutputStream(_CaptureTarget(state.captures[0])))


def _stderr(state):
    return state.add(_OutputStream(_CaptureTarget(state.captures[1])))


def _no_terminal(state):
    return None


def _no_preopens(state):
    return []


def _no_filesystem_error(state, rep):
    return None


def _instance_network(state):
    return state.add(_Placeholder())


def _no_socket(state, family):
    return Err("access-denied")


def _no_name_lookup(state, network_rep, name):
    return Err("access-denied")


def _methods(resource, names):
    return tuple(f"[method]{resource}.{name}" for name in names.split())


# Functions a guest can never reach: they need a handle of a resource it can never get (there
# are no preopens, and no socket can be made), so they are defined as traps, because
# toolchains import whole interfaces. {interface: (why, names)}.
_NO_FILES = "no file system is available to HTTP handlers"
_NO_SOCKETS = "HTTP handlers cannot make sockets"
UNREACHABLE_FUNCTIONS = {
    "wasi:filesystem/types": (_NO_FILES, _methods("descriptor", """
        read-via-stream write-via-stream append-via-stream advise sync-data get-flags get-type
        set-size set-times read write read-directory sync create-directory-at stat stat-at
        set-times-at link-at open-at readlink-at remove-directory-at rename-at symlink-at
        unlink-file-at is-same-object metadata-hash metadata-hash-at""")
        + _methods("directory-entry-stream", "read-directory-entry")),
    "wasi:sockets/udp": (_NO_SOCKETS, _methods("udp-socket", """
        start-bind finish-bind stream local-address remote-address address-family
        unicast-hop-limit set-unicast-hop-limit receive-buffer-size set-receive-buffer-size
        send-buffer-size set-send-buffer-size subscribe""")
        + _methods("incoming-datagram-stream", "receive subscribe")
        + _methods("outgoing-datagram-stream", "check-send send subscribe")),
    "wasi:sockets/tcp": (_NO_SOCKETS, _methods("tcp-socket", """
        start-bind finish-bind start-connect finish-connect start-listen finish-listen accept
        local-address remote-address is-listening address-family set-listen-backlog-size
        keep-alive-enabled set-keep-alive-enabled keep-alive-idle-time set-keep-alive-idle-time
        keep-alive-interval set-keep-alive-interval keep-alive-count set-keep-alive-count
        hop-limit set-hop-limit receive-buffer-size set-receive-buffer-size send-buffer-size
        set-send-buffer-size subscribe shutdown""")),
    "wasi:sockets/ip-name-lookup": (_NO_SOCKETS, _methods("resolve-address-stream",
                                                          "resolve-next-address subscribe")),
}


def _wasi_interfaces():
    out_own = ("own", OUTPUT_STREAM)
    return {
        "wasi:clocks/monotonic-clock": ({}, {
            "now": ((), _U64, _monotonic_now),
            "resolution": ((), _U64, _monotonic_resolution),
            "subscribe-instant": ((_U64,), _POLLABLE_OWN, _timer),
            "subscribe-duration": ((_U64,), _POLLABLE_OWN, _subscribe_duration),
        }),
        "wasi:clocks/wall-clock": ({}, {
            "now": ((), _DATETIME, _wall_now),
            "resolution": ((), _DATETIME, _wall_resolution),
        }),
        "wasi:random/random": ({}, {
            "get-random-bytes": ((_U64,), _BYTES, _random_bytes),
            "get-random-u64": ((), _U64, _random_u64),
        }),
        "wasi:random/insecure": ({}, {
            "get-insecure-random-bytes": ((_U64,), _BYTES, _random_bytes),
            "get-insecure-random-u64": ((), _U64, _random_u64),
        }),
        "wasi:random/insecure-seed": ({}, {
            "insecure-seed": ((), ("tuple", (_U64, _U64)), _insecure_seed),
        }),
        "wasi:cli/environment": ({}, {
            "get-environment": ((), ("list", ("tuple", (_STRING, _STRING))), _environment),
            "get-arguments": ((), ("list", _STRING), _arguments),
            "initial-cwd": ((), ("option", _STRING), _initial_cwd),
        }),
        "wasi:cli/exit": ({}, {
            "exit": ((("result", None, None),), None, _exit),
            "exit-with-code": ((("u8",),), None, _exit_with_code),
        }),
        "wasi:cli/stdin": ({}, {"get-stdin": ((), ("own", INPUT_STREAM), _stdin)}),
        "wasi:cli/stdout": ({}, {"get-stdout": ((), out_own, _stdout)}),
        "wasi:cli/stderr": ({}, {"get-stderr": ((), out_own, _stderr)}),
        "wasi:cli/terminal-input": ({"terminal-input": TERMINAL_INPUT}, {}),
        "wasi:cli/terminal-output": ({"terminal-output": TERMINAL_OUTPUT}, {}),
        "wasi:cli/terminal-stdin": ({}, {
            "get-terminal-stdin": ((), ("option", ("own", TERMINAL_INPUT)), _no_terminal)}),
        "wasi:cli/terminal-stdout": ({}, {
            "get-terminal-stdout": ((), ("option", ("own", TERMINAL_OUTPUT)), _no_terminal)}),
        "wasi:cli/terminal-stderr": ({}, {
            "get-terminal-stderr": ((), ("option", ("own", TERMINAL_OUTPUT)), _no_terminal)}),
        "wasi:filesystem/types": ({"descriptor": DESCRIPTOR,
                                   "directory-entry-stream": DIRECTORY_ENTRY_STREAM}, {
            # option<error-code>: only none is ever returned, so the enum's cases do not matter
            "filesystem-error-code": ((("borrow", IO_ERROR),), ("option", ("enum", ("access",))),
                                      _no_filesystem_error),
        }),
        "wasi:filesystem/preopens": ({}, {
            "get-directories": ((), ("list", ("tuple", (("own", DESCRIPTOR), _STRING))),
                                _no_preopens),
        }),
        # wasi:sockets (componentize-py's runtime imports it): every socket is refused
        "wasi:sockets/network": ({"network": NETWORK}, {}),
        "wasi:sockets/instance-network": ({}, {
            "instance-network": ((), ("own", NETWORK), _instance_network)}),
        "wasi:sockets/udp": ({"udp-socket": UDP_SOCKET, "incoming-datagram-stream": DATAGRAM_IN,
                              "outgoing-datagram-stream": DATAGRAM_OUT}, {}),
        "wasi:sockets/udp-create-socket": ({}, {
            "create-udp-socket": ((_ADDRESS_FAMILY,), _socket_result(UDP_SOCKET), _no_socket)}),
        "wasi:sockets/tcp": ({"tcp-socket": TCP_SOCKET}, {}),
        "wasi:sockets/tcp-create-socket": ({}, {
            "create-tcp-socket": ((_ADDRESS_FAMILY,), _socket_result(TCP_SOCKET), _no_socket)}),
        "wasi:sockets/ip-name-lookup": ({"resolve-address-stream": RESOLVE_STREAM}, {
            "resolve-addresses": ((("borrow", NETWORK), _STRING), _socket_result(RESOLVE_STREAM),
                                  _no_name_lookup)}),
    }


# -- wasi:http/types -------------------------------------------------------------------------------

_FIELD_SIZE = ("record", (("field-name", ("option", _STRING)),
                          ("field-size", ("option", ("u32",)))))
_ERROR_CODE = ("variant", (
    ("DNS-timeout", None),
    ("DNS-error", ("record", (("rcode", ("option", _STRING)),
                              ("info-code", ("option", ("u16",)))))),
    ("destination-not-found", None), ("destination-unavailable", None),
    ("destination-IP-prohibited", None), ("destination-IP-unroutable", None),
    ("connection-refused", None), ("connection-terminated", None),
    ("connection-timeout", None), ("connection-read-timeout", None),
    ("connection-write-timeout", None), ("connection-limit-reached", None),
    ("TLS-protocol-error", None), ("TLS-certificate-error", None),
    ("TLS-alert-received", ("record", (("alert-id", ("option", ("u8",))),
                                       ("alert-message", ("option", _STRING))))),
    ("HTTP-request-denied", None), ("HTTP-request-length-required", None),
    ("HTTP-request-body-size", ("option", _U64)), ("HTTP-request-method-invalid", None),
    ("HTTP-request-URI-invalid", None), ("HTTP-request-URI-too-long", None),
    ("HTTP-request-header-section-size", ("option", ("u32",))),
    ("HTTP-request-header-size", ("option", _FIELD_SIZE)),
    ("HTTP-request-trailer-section-size", ("option", ("u32",))),
    ("HTTP-request-trailer-size", _FIELD_SIZE), ("HTTP-response-incomplete", None),
    ("HTTP-response-header-section-size", ("option", ("u32",))),
    ("HTTP-response-header-size", _FIELD_SIZE), ("HTTP-response-body-size", ("option", _U64)),
    ("HTTP-response-trailer-section-size", ("option", ("u32",))),
    ("HTTP-response-trailer-size", _FIELD_SIZE),
    ("HTTP-response-transfer-coding", ("option", _STRING)),
    ("HTTP-response-content-coding", ("option", _STRING)),
    ("HTTP-response-timeout", None), ("HTTP-upgrade-failed", None), ("HTTP-protocol-error", None),
    ("loop-detected", None), ("configuration-error", None),
    ("internal-error", ("option", _STRING))))
_HEADER_ERROR = ("variant", (("invalid-syntax", None), ("forbidden", None), ("immutable", None)))
_METHOD = ("variant", tuple((name, None) for name in _METHODS.values()) + (("other", _STRING),))
_SCHEME = ("variant", (("HTTP", None), ("HTTPS", None), ("other", _STRING)))
_ENTRY = ("tuple", (_STRING, _BYTES))
_FIELDS_OWN, _FIELDS_BORROW = ("own", FIELDS), ("borrow", FIELDS)
_TAKEN = object()       # a future whose value the guest already took


def _header_result(error):
    return None if error is None else Err(wc.Variant(error))


def _fields_new(state):
    return state.add(_Fields())


def _fields_from_list(state, entries):
    fields = _Fields()
    for name, value in entries:
        error = _header_error(name, (value,))
        if error is not None:
            return Err(wc.Variant(error))
        fields.append(name.lower(), value)
    return state.add(fields)


def _fields_get(state, rep, name):
    return list(state.get(rep).map.get(name.lower(), ()))


def _fields_has(state, rep, name):
    return name.lower() in state.get(rep).map


def _fields_change(state, rep, name, values, append):
    fields = state.get(rep)
    if fields.immutable:
        return Err(wc.Variant("immutable"))
    error = _header_error(name, values)
    if error is not None:
        return Err(wc.Variant(error))
    key = name.lower()
    if append:
        fields.append(key, values[0])
    else:
        fields.replace(key, values)
    return None


def _fields_set(state, rep, name, values):
    return _fields_change(state, rep, name, values, False)


def _fields_delete(state, rep, name):
    return _fields_change(state, rep, name, (), False)


def _fields_append(state, rep, name, value):
    return _fields_change(state, rep, name, (value,), True)


def _fields_entries(state, rep):
    return state.get(rep).items()


def _fields_clone(state, rep):
    return state.add(state.get(rep).copy())


def _method_of(name):
    case = _METHODS.get(name)
    return wc.Variant(case) if case is not None else wc.Variant("other", name)


def _scheme_of(scheme):
    if scheme is None:
        return None
    lowered = scheme.lower()
    if lowered == "http":
        return wc.Variant("HTTP")
    if lowered == "https":
        return wc.Variant("HTTPS")
    return wc.Variant("other", scheme)


def _request_method(state, rep):
    return _method_of(state.get(rep).request.method)


def _request_path(state, rep):
    return state.get(rep).request.path_with_query


def _request_scheme(state, rep):
    return _scheme_of(state.get(rep).request.scheme)


def _request_authority(state, rep):
    return state.get(rep).request.authority


def _headers_of(state, rep):
    """A new handle to the (immutable) fields of a request or response."""
    return state.add(state.get(rep).fields)


def _request_consume(state, rep):
    incoming = state.get(rep)
    if incoming.body_taken:
        return Err(None)
    incoming.body_taken = True
    return state.add(_IncomingBody(_InputStream(incoming.request.body)))


def _body_stream(state, rep):
    body = state.get(rep)
    if body.stream_taken:
        return Err(None)
    body.stream_taken = True
    return state.add(body.stream)


def _body_finish(state, rep):
    state.take(rep)
    return state.add(_FutureTrailers())       # request trailers are never passed on: none


class _FutureTrailers:
    __slots__ = ("taken",)

    def __init__(self):
        self.taken = False


def _future_trailers_subscribe(state, rep):
    return state.add(_Pollable(_always))


def _future_trailers_get(state, rep):
    future = state.get(rep)
    if future.taken:
        return _TAKEN
    future.taken = True
    return (None,)                            # ready: ok(ok(none))


def _response_new(state, fields_rep):
    return state.add(_OutgoingResponse(state.take(fields_rep)))


def _response_status(state, rep):
    return state.get(rep).status


def _response_set_status(state, rep, status):
    if not 100 <= status <= 999:
        return Err(None)
    state.get(rep).status = status
    return None


def _response_body(state, rep):
    response = state.get(rep)
    if response.body is not None:
        return Err(None)
    response.body = _OutgoingBody(response, response.fields.content_length())
    return state.add(response.body)


def _outgoing_body_write(state, rep):
    body = state.get(rep)
    if body.stream_taken:
        return Err(None)
    body.stream_taken = True
    return state.add(_OutputStream(body))


def _outgoing_body_finish(state, rep, trailers_rep):
    body = state.take(rep)
    if trailers_rep is not None:
        trailers = state.take(trailers_rep)
        trailers.immutable = True
        body.trailers = trailers
    mismatch = body.length_error()
    if body.failed or mismatch:
        body.failed = body.failed or mismatch
        kind = "HTTP-response-body-size" if body.response is not None else "HTTP-request-body-size"
        return Err(wc.Variant(kind, body.written))
    body.finished = True
    if body.response is None:
        body.finished_event.set()
    elif body.response.started:
        state.finish_body(body)
    return None


def _outparam_set(state, rep, response):
    state.take(rep)
    state.outparam_used = True
    if isinstance(response, Err):
        state.response_error = response.value
        return None
    state.start_response(state.take(response))
    return None


def _http_error_code(state, rep):
    return state.get(rep).code


def _drop_http_object(state, type_id, obj):
    """The guest dropped a handle: an outgoing-body dropped before finish is a broken body."""
    if type_id == OUTGOING_BODY and not obj.finished:
        obj.dropped = True
        obj.failed = obj.failed or "the guest dropped the body without finishing it"
        if obj.finished_event is not None:
            obj.finished_event.set()


def _http_types_interface():
    """wasi:http/types: (resources {name: type id}, functions {name: (params, result, func)})."""
    def borrow(type_id):
        return ("borrow", type_id)

    def maybe(type_id):                       # result<T>: the handle, or an error without payload
        return ("result", ("own", type_id), None)
    fields, req, out_req = _FIELDS_BORROW, borrow(INCOMING_REQUEST), borrow(OUTGOING_REQUEST)
    opts, resp = borrow(REQUEST_OPTIONS), borrow(OUTGOING_RESPONSE)
    in_resp, in_body = borrow(INCOMING_RESPONSE), borrow(INCOMING_BODY)
    duration, text, unit = ("option", _U64), ("option", _STRING), ("result", None, None)
    header_result = ("result", None, _HEADER_ERROR)
    resources = {"fields": FIELDS, "incoming-request": INCOMING_REQUEST,
                 "outgoing-request": OUTGOING_REQUEST, "request-options": REQUEST_OPTIONS,
                 "response-outparam": RESPONSE_OUTPARAM, "incoming-response": INCOMING_RESPONSE,
                 "incoming-body": INCOMING_BODY, "future-trailers": FUTURE_TRAILERS,
                 "outgoing-response": OUTGOING_RESPONSE, "outgoing-body": OUTGOING_BODY,
                 "future-incoming-response": FUTURE_INCOMING_RESPONSE}
    functions = {
        "http-error-code": ((borrow(IO_ERROR),), ("option", _ERROR_CODE), _http_error_code),
        "[constructor]fields": ((), _FIELDS_OWN, _fields_new),
        "[static]fields.from-list": ((("list", _ENTRY),), ("result", _FIELDS_OWN, _HEADER_ERROR),
                                     _fields_from_list),
        "[method]fields.get": ((fields, _STRING), ("list", _BYTES), _fields_get),
        "[method]fields.has": ((fields, _STRING), _BOOL, _fields_has),
        "[method]fields.set": ((fields, _STRING, ("list", _BYTES)), header_result, _fields_set),
        "[method]fields.delete": ((fields, _STRING), header_result, _fields_delete),
        "[method]fields.append": ((fields, _STRING, _BYTES), header_result, _fields_append),
        "[method]fields.entries": ((fields,), ("list", _ENTRY), _fields_entries),
        "[method]fields.clone": ((fields,), _FIELDS_OWN, _fields_clone),
        "[method]incoming-request.method": ((req,), _METHOD, _request_method),
        "[method]incoming-request.path-with-query": ((req,), text, _request_path),
        "[method]incoming-request.scheme": ((req,), ("option", _SCHEME), _request_scheme),
        "[method]incoming-request.authority": ((req,), text, _request_authority),
        "[method]incoming-request.headers": ((req,), _FIELDS_OWN, _headers_of),
        "[method]incoming-request.consume": ((req,), maybe(INCOMING_BODY), _request_consume),
        "[constructor]outgoing-request": ((_FIELDS_OWN,), ("own", OUTGOING_REQUEST),
                                          _outgoing_request_new),
        "[method]outgoing-request.body": ((out_req,), maybe(OUTGOING_BODY), _outgoing_request_body),
        "[method]outgoing-request.method": ((out_req,), _METHOD, _outgoing_request_method),
        "[method]outgoing-request.set-method": ((out_req, _METHOD), unit,
                                                _outgoing_request_set_method),
        "[method]outgoing-request.path-with-query": ((out_req,), text, _outgoing_request_path),
        "[method]outgoing-request.set-path-with-query": ((out_req, text), unit,
                                                         _outgoing_request_set_path),
        "[method]outgoing-request.scheme": ((out_req,), ("option", _SCHEME),
                                            _outgoing_request_scheme),
        "[method]outgoing-request.set-scheme": ((out_req, ("option", _SCHEME)), unit,
                                                _outgoing_request_set_scheme),
        "[method]outgoing-request.authority": ((out_req,), text, _outgoing_request_authority),
        "[method]outgoing-request.set-authority": ((out_req, text), unit,
                                                   _outgoing_request_set_authority),
        "[method]outgoing-request.headers": ((out_req,), _FIELDS_OWN, _headers_of),
        "[constructor]request-options": ((), ("own", REQUEST_OPTIONS), _options_new),
        "[static]response-outparam.set": ((("own", RESPONSE_OUTPARAM),
                                           ("result", ("own", OUTGOING_RESPONSE), _ERROR_CODE)),
                                          None, _outparam_set),
        "[method]incoming-response.status": ((in_resp,), ("u16",), _incoming_response_status),
        "[method]incoming-response.headers": ((in_resp,), _FIELDS_OWN, _headers_of),
        "[method]incoming-response.consume": ((in_resp,), maybe(INCOMING_BODY),
                                              _incoming_response_consume),
        "[method]incoming-body.stream": ((in_body,), maybe(INPUT_STREAM), _body_stream),
        "[static]incoming-body.finish": ((("own", INCOMING_BODY),), ("own", FUTURE_TRAILERS),
                                         _body_finish),
        "[method]future-trailers.subscribe": ((borrow(FUTURE_TRAILERS),), _POLLABLE_OWN,
                                              _future_trailers_subscribe),
        "[method]future-trailers.get": ((borrow(FUTURE_TRAILERS),), _FUTURE_TRAILERS_GET,
                                        _future_trailers_get),
        "[constructor]outgoing-response": ((_FIELDS_OWN,), ("own", OUTGOING_RESPONSE),
                                           _response_new),
        "[method]outgoing-response.status-code": ((resp,), ("u16",), _response_status),
        "[method]outgoing-response.set-status-code": ((resp, ("u16",)), unit, _response_set_status),
        "[method]outgoing-response.headers": ((resp,), _FIELDS_OWN, _headers_of),
        "[method]outgoing-response.body": ((resp,), maybe(OUTGOING_BODY), _response_body),
        "[method]outgoing-body.write": ((borrow(OUTGOING_BODY),), maybe(OUTPUT_STREAM),
                                        _outgoing_body_write),
        "[static]outgoing-body.finish": ((("own", OUTGOING_BODY), ("option", _FIELDS_OWN)),
                                         ("result", None, _ERROR_CODE), _outgoing_body_finish),
        "[method]future-incoming-response.subscribe": ((borrow(FUTURE_INCOMING_RESPONSE),),
                                                       _POLLABLE_OWN, _future_response_subscribe),
        "[method]future-incoming-response.get": ((borrow(FUTURE_INCOMING_RESPONSE),),
                                                 _FUTURE_RESPONSE_GET, _future_response_get),
    }
    for name, attribute in (("connect-timeout", "connect"), ("first-byte-timeout", "first_byte"),
                            ("between-bytes-timeout", "between_bytes")):
        functions[f"[method]request-options.{name}"] = ((opts,), duration,
                                                        _options_getter(attribute))
        functions[f"[method]request-options.set-{name}"] = ((opts, duration), unit,
                                                            _options_setter(attribute))
    return resources, functions


# -- wasi:http outgoing requests -------------------------------------------------------------------

def _outgoing_request_new(state, fields_rep):
    return state.add(_OutgoingRequest(state.take(fields_rep)))


def _outgoing_request_body(state, rep):
    request = state.get(rep)
    if request.body is not None:
        return Err(None)
    request.body = _OutgoingBody(None, request.fields.content_length())
    return state.add(request.body)


def _outgoing_request_method(state, rep):
    return state.get(rep).method


def _outgoing_request_set_method(state, rep, method):
    if method.tag == "other" and not _TOKEN_RE.match(method.payload):
        return Err(None)
    state.get(rep).method = method
    return None


def _outgoing_request_path(state, rep):
    return state.get(rep).path


def _outgoing_request_set_path(state, rep, path):
    if path is not None and not _PATH_RE.match(path):
        return Err(None)
    state.get(rep).path = path
    return None


def _outgoing_request_scheme(state, rep):
    return state.get(rep).scheme


def _outgoing_request_set_scheme(state, rep, scheme):
    if scheme is not None and scheme.tag == "other" and not _SCHEME_RE.match(scheme.payload):
        return Err(None)
    state.get(rep).scheme = scheme
    return None


def _outgoing_request_authority(state, rep):
    return state.get(rep).authority


def _outgoing_request_set_authority(state, rep, authority):
    if authority is not None and not _AUTHORITY_RE.match(authority):
        return Err(None)
    state.get(rep).authority = authority
    return None


def _options_new(state):
    return state.add(_RequestOptions())


def _options_getter(attribute):
    def get(state, rep):
        return getattr(state.get(rep), attribute)
    get.__name__ = f"_options_{attribute}"
    return get


def _options_setter(attribute):
    def set_(state, rep, duration):
        setattr(state.get(rep), attribute, duration)
        return None
    set_.__name__ = f"_options_set_{attribute}"
    return set_


def parse_outbound(entries):
    """The destinations an allow_outbound list names: {(host, port or None)}. HOST alone allows
    the scheme's default port (80 for http, 443 for https); HOST:PORT that port only."""
    allowed = set()
    for entry in entries or ():
        match = _OUTBOUND_RE.match(entry) if isinstance(entry, str) else None
        port = None if match is None or match.group(2) is None else int(match.group(2))
        if match is None or (port is not None and not 0 < port < 65536):
            raise ArgumentError(f"invalid outbound destination {entry!r}: expected HOST or "
                                "HOST:PORT")
        allowed.add((match.group(1).strip("[]").lower(), port))
    return frozenset(allowed)


def _outbound_target(host, request):
    """(use TLS, host, port) of an outgoing request, or the Err(error-code) that refuses it."""
    scheme = request.scheme.tag if request.scheme is not None else "HTTPS"
    if scheme not in ("HTTP", "HTTPS"):
        return Err(wc.Variant("HTTP-protocol-error"))
    if not request.authority:
        return Err(wc.Variant("HTTP-request-URI-invalid"))
    match = _TARGET_RE.match(request.authority)
    default = 443 if scheme == "HTTPS" else 80
    port = None if match is None else default if match.group(2) is None else int(match.group(2))
    if match is None or not match.group(1) or not 0 < port < 65536:
        return Err(wc.Variant("HTTP-request-URI-invalid"))
    name = match.group(1).strip("[]").lower()
    allowed = host.allow_outbound
    if (name, port) not in allowed and not (port == default and (name, None) in allowed):
        return Err(wc.Variant("HTTP-request-denied"))
    return scheme == "HTTPS", name, port


def _outbound_error(error):
    """The wasi:http error-code for an exception of http.client, ssl or socket."""
    import http.client, ssl                 # imported by HTTP apps only: ~70 ms of start-up
    if isinstance(error, socket.gaierror):
        return wc.Variant("DNS-error", {"rcode": str(error.strerror or error), "info-code": None})
    if isinstance(error, ssl.SSLCertVerificationError):
        return wc.Variant("TLS-certificate-error")
    if isinstance(error, ssl.SSLError):
        return wc.Variant("TLS-protocol-error")
    if isinstance(error, ConnectionRefusedError):
        return wc.Variant("connection-refused")
    if isinstance(error, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return wc.Variant("connection-terminated")
    if isinstance(error, http.client.HTTPException):
        return wc.Variant("HTTP-protocol-error")
    return wc.Variant("internal-error", f"{type(error).__name__}: {error}")


class _OutboundCall:
    """One outgoing request, sent by a thread of its own (http.client; TLS verified), and the
    future-incoming-response the guest polls. Its request body is sent once the guest finished
    it; its response body is read as the guest reads it, up to OUTBOUND_RESPONSE_LIMIT."""

    def __init__(self, state, request, options, use_tls, host, port):
        self.state = state
        self.request = request
        self.use_tls = use_tls
        self.host = host
        self.port = port
        seconds = lambda ns, default: default if ns is None else ns / 1e9
        self.connect_timeout = seconds(options.connect, OUTBOUND_CONNECT_TIMEOUT)
        self.first_byte_timeout = seconds(options.first_byte, OUTBOUND_FIRST_BYTE_TIMEOUT)
        self.between_bytes_timeout = seconds(options.between_bytes, OUTBOUND_BETWEEN_BYTES_TIMEOUT)
        self.complete = False
        self.outcome = None         # (status, [(name, value)], HTTPResponse) or Err(error-code)
        self.taken = False
        self.connection = None
        self.cancelled = False

    def start(self):
        threading.Thread(target=self._run, name="kvhost-outbound", daemon=True).start()

    def _timeout(self, wanted):
        deadline = self.state.deadline
        return wanted if deadline is None else max(0.001, min(wanted, deadline - time.monotonic()))

    def _run(self):
        try:
            self.outcome = self._send()
        except (socket.timeout, TimeoutError):
            connected = self.connection is not None
            self.outcome = Err(wc.Variant("connection-read-timeout" if connected else
                                          "connection-timeout"))
        except Exception as e:
            self.outcome = Err(_outbound_error(e))
        self.complete = True
        self.state.wakeup.set()

    def _send(self):
        request, body = self.request, self.request.body
        if body is not None:
            body.finished_event.wait(None if self.state.deadline is None else
                                     max(0.0, self.state.deadline - time.monotonic()))
            if body.failed or not body.finished:
                return Err(wc.Variant("HTTP-request-body-size", body.written))
        data = b"" if body is None else b"".join(body.chunks)
        timeout = self._timeout(self.connect_timeout)
        import http.client, ssl                 # imported by HTTP apps only: ~70 ms of start-up
        if self.use_tls:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        connection.connect()
        self.connection = connection
        if self.cancelled:
            connection.close()
            return Err(wc.Variant("connection-terminated"))
        method = request.method
        name = method.payload if method.tag == "other" else _METHOD_NAMES[method.tag]
        connection.putrequest(name, request.path or "/", skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", request.authority)
        for name, value in request.fields.items():
            connection.putheader(name, value)
        if body is not None and request.fields.content_length() is None:
            connection.putheader("Content-Length", str(len(data)))
        sock = connection.sock          # getresponse() drops it when the server will close
        sock.settimeout(self._timeout(self.first_byte_timeout))
        connection.endheaders(data or None)
        response = connection.getresponse()
        sock.settimeout(self._timeout(self.between_bytes_timeout))
        headers = [(name, value.encode("latin-1", "replace"))
                   for name, value in response.getheaders()]
        return response.status, headers, response

    def cancel(self):
        """End the call when its request ends (a thread still connecting finds it cancelled)."""
        self.cancelled = True
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                connection.close()


class _IncomingResponse:
    """incoming-response of an outgoing call: status, fields, and its body read as it arrives
    (http.client's read1: the bytes there are, where read(n) would wait for n of them)."""

    __slots__ = ("status", "fields", "read", "body_taken")

    def __init__(self, status, headers, response):
        self.status = status
        self.fields = _Fields.from_server(headers)
        self.read = response.read1
        self.body_taken = False


def _outgoing_handle(state, request_rep, options_rep):
    request = state.take(request_rep)
    options = _RequestOptions() if options_rep is None else state.take(options_rep)
    target = _outbound_target(state.host, request)
    if isinstance(target, Err):
        return target
    if len(state.calls) >= OUTBOUND_CALLS_LIMIT:
        return Err(wc.Variant("connection-limit-reached"))
    call = _OutboundCall(state, request, options, *target)
    if state.wakeup is None:
        state.wakeup = threading.Event()
    state.calls.append(call)
    call.start()
    return state.add(call)


def _future_response_subscribe(state, rep):
    call = state.get(rep)
    return state.add(_Pollable(lambda: call.complete))


def _future_response_get(state, rep):
    call = state.get(rep)
    if not call.complete:
        return None
    if call.taken:
        return _TAKEN
    call.taken = True
    if isinstance(call.outcome, Err):
        return (call.outcome,)
    status, headers, reader = call.outcome
    return (state.add(_IncomingResponse(status, headers, reader)),)


def _incoming_response_status(state, rep):
    return state.get(rep).status


def _incoming_response_consume(state, rep):
    response = state.get(rep)
    if response.body_taken:
        return Err(None)
    response.body_taken = True
    stream = _InputStream(response, OUTBOUND_RESPONSE_LIMIT,
                          wc.Variant("HTTP-response-body-size", None))
    return state.add(_IncomingBody(stream))


# future-incoming-response.get and future-trailers.get answer option<result<result<T, error-code>>>:
# None (not ready), _TAKEN (asked again: some(err)) or (value,) with value T or Err(error-code).
_FUTURE_RESPONSE_GET = ("future", ("own", INCOMING_RESPONSE))
_FUTURE_TRAILERS_GET = ("future", ("option", _FIELDS_OWN))


def _future_desc(desc):
    """The WIT shape of a ("future", T) result descriptor."""
    if desc is not None and desc[0] == "future":
        return ("option", ("result", ("result", desc[1], _ERROR_CODE), None))
    return desc


def _make_lower_future(ok_desc):
    inner = make_lower(("result", ok_desc, _ERROR_CODE))
    option_code, result_code = _KIND["option"], _KIND["result"]

    def lower_ready(ctx, value, addr):
        if value is _TAKEN:
            _write_result(addr, result_code, False, 0)
        else:
            _write_result(addr, result_code, True, _boxed(inner, ctx, value[0]))

    def lower_future(ctx, value, addr):
        box = 0 if value is None else _boxed(lower_ready, ctx, value)
        _write_kind_pointer(addr, option_code, box)
    return lower_future


# -- the interfaces, registered on a linker of their own -------------------------------------------

def _http_interfaces():
    """{interface without version: (resources {name: type id},
    functions {name: (params, result, func)})}."""
    interfaces = _io_interfaces()
    interfaces.update(_wasi_interfaces())
    interfaces["wasi:http/types"] = _http_types_interface()
    interfaces["wasi:http/outgoing-handler"] = ({}, {
        "handle": ((("own", OUTGOING_REQUEST), ("option", ("own", REQUEST_OPTIONS))),
                   ("result", ("own", FUTURE_INCOMING_RESPONSE), _ERROR_CODE), _outgoing_handle),
    })
    return interfaces


HTTP_INTERFACES = _http_interfaces()


@_DTOR_CALLBACK
def _drop_http_resource(data, ctx, rep):
    """The guest dropped an own handle of an HTTP-world resource; `data` is its type id."""
    try:
        state = _STATES.get(ctx)
        if state is not None:
            state.take_back(data, rep)
            obj = state.objects.pop(rep, None)
            if obj is not None:
                _drop_http_object(state, data, obj)
    except Exception:        # a destructor must not raise into wasmtime
        pass
    return 0


_UNREACHABLE = {}           # function id -> message of a function no guest can reach


@_FUNC_CALLBACK
def _unreachable(data, ctx, _ty, args, nargs, results, nresults):
    return _trap_pointer(_UNREACHABLE.get(data or 0, "kvhost: function not available"))


def add_http_to_linker(linker):
    """Define the wasi:http proxy world's imports (and what toolchains import beside them) in a
    component linker, each interface at HTTP_WASI_VERSION."""
    with linker.root() as root:
        for interface, (resources, functions) in HTTP_INTERFACES.items():
            with root.add_instance(f"{interface}@{HTTP_WASI_VERSION}") as instance:
                for name, type_id in resources.items():
                    _add_host_resource(instance, name, type_id, _drop_http_resource)
                for name, (params, result, func) in functions.items():
                    future = result is not None and result[0] == "future"
                    lower = _make_lower_future(result[1]) if future else None
                    _add_host_func(instance, name, params, result, func, guarded=False, lower=lower)
                why, names = UNREACHABLE_FUNCTIONS.get(interface, (None, ()))
                for name in names:
                    func_id = _new_func_id()
                    _UNREACHABLE[func_id] = f"kvhost: {name}: {why}"
                    _C.define_func(instance, name, _unreachable, func_id, _forget_nothing)


def _http_handler_index(guest, engine):
    """The export index of a component's wasi:http/incoming-handler#handle (found once), or
    NotHttpHandler."""
    if guest.http_handler is None:
        if guest.kind != "component":
            raise NotHttpHandler(f"{guest.name} is a core module, not a component exporting "
                                 "wasi:http/incoming-handler")
        names = [name for name in guest.artifact.type.exports(engine)
                 if name.startswith(HTTP_HANDLER_PREFIX)]
        if not names:
            raise NotHttpHandler(f"{guest.name} does not export wasi:http/incoming-handler (it is "
                                 "not an HTTP handler: build it for the wasi:http/proxy world)")
        interface = guest.artifact.get_export_index(names[0])
        guest.http_handler = guest.artifact.get_export_index("handle", interface)
    return guest.http_handler


# -- one request -----------------------------------------------------------------------------------

_LOWER_REQUEST = make_lower(("own", INCOMING_REQUEST))
_LOWER_OUTPARAM = make_lower(("own", RESPONSE_OUTPARAM))


class _HttpSession:
    """One request: a fresh Store and instance, the guest's handle() called with the request and
    a response-outparam, and what it answered checked."""

    def __init__(self, host, guest, request, sink, namespace):
        self.host = host
        self.guest = guest
        self.request = request
        deadline = None if host.timeout is None else time.monotonic() + host.timeout
        self.captures = (_Capture(HTTP_CAPTURE_BYTES), _Capture(HTTP_CAPTURE_BYTES))
        self.state = _HttpState(host, namespace, sink, deadline, self.captures)
        self.guest_store = host._new_store(wasi=False, bare=True)
        self.address = self.guest_store.address
        if host._composition is not None:
            self.state.provider = host._composition.link(self.state, self.captures)

    def __enter__(self):
        _STATES[self.address] = self.state
        return self

    def __exit__(self, *exc):
        state = self.state
        _STATES.pop(self.address, None)
        state.close()
        if state.provider is not None:
            state.provider.close()
        self.guest_store.close()
        if state.events:
            (self.host._event_sink or self.host._deliver)(state.events)

    def fuel_used(self):
        left = self.guest_store.fuel_left()        # None: the Host meters no fuel
        return 0 if left is None else self.host.fuel - left

    def _instantiate(self):
        linker = _C.address(self.host._http_linker())
        try:
            return _C.instantiate_component(self.address, linker, _C.address(self.guest.artifact))
        except wasmtime.WasmtimeError as e:     # a link failure, or a start function trapped
            reason = _link_reason(e)
            if _is_link_failure(reason):
                raise LinkError(f"cannot link {self.guest.name} as an HTTP handler: "
                                f"{reason}") from None
            raise self._error(e) from None

    def run(self):
        """Call handle(request, response-outparam); the HttpOutcome, or the TrapError."""
        index = _http_handler_index(self.guest, self.host.engine)
        instance = self._instantiate()
        func = _C.component_func(self.address, instance, _C.address(index))
        if func is None:
            raise NotHttpHandler(f"{self.guest.name}: wasi:http/incoming-handler#handle is not a "
                                 "function")
        state = self.state
        args = ctypes.create_string_buffer(2 * _VAL_SIZE)     # zeros: bool false, owns nothing
        base = ctypes.addressof(args)
        _LOWER_REQUEST(self.address, state.add(_IncomingRequest(self.request)), base)
        _LOWER_OUTPARAM(self.address, state.add(_Placeholder()), base + _VAL_SIZE)
        try:
            _C.call_component(self.address, ctypes.addressof(func), base, 2, None, 0)
        except wasmtime.WasmtimeError as e:
            raise self._error(e) from None
        finally:
            _C.val_delete(base)
            _C.val_delete(base + _VAL_SIZE)
        if state.failure is not None:
            raise self._mark(state.failure)
        return self._answer()

    def _mark(self, error):
        """`error` with what the caller needs: whether the response started, the guest's stderr."""
        error.response_started = self.state.response is not None
        error.stderr = self.captures[1].value()
        error.fuel = self.fuel_used()
        return error

    def _error(self, wasmtime_error):
        """The TrapError for a guest that trapped: the reason a host function gave first (a
        deadline, an exit, a client gone), else what the trap says."""
        state = self.state
        failure = state.failure
        if failure is None and state.sink_error is not None:
            failure = TrapError(f"the response could not be sent ({state.sink_error}); then the "
                                "guest trapped", "sink")
        if failure is None:
            failure = _trap_error(wasmtime_error, self.host)
            if state.outparam_used and "unknown handle index" in str(wasmtime_error):
                failure = TrapError("the guest set its response twice", "response-twice")
        return self._mark(failure)

    def _fail(self, message, kind):
        return self._mark(TrapError(message, kind))

    def _answer(self):
        """The HttpOutcome of a guest that returned, or the TrapError saying what is wrong."""
        state = self.state
        response = state.response
        if response is None:
            code = state.response_error
            if code is not None:
                detail = "" if code.payload is None else f" ({code.payload})"
                raise self._fail(f"the guest answered with error {code.tag}{detail}",
                                 "response-error")
            raise self._fail("the guest returned without setting a response", "no-response")
        body = response.body
        if body is None:
            declared = response.fields.content_length()
            if declared:
                raise self._fail(f"the guest wrote no body, its content-length says {declared}",
                                 "body-size")
            state.finish_body(_OutgoingBody(response, None))
        elif body.failed:
            raise self._fail(body.failed, "incomplete" if body.dropped else "body-size")
        elif not body.finished:
            # It still holds the body: the body ends here, as in wasmtime serve (a body it
            # dropped unfinished is broken, above).
            mismatch = body.length_error()
            if mismatch:
                raise self._fail(mismatch, "body-size")
            state.finish_body(body)
        if state.sink_error is not None:
            raise self._fail(f"the response could not be sent: {state.sink_error}", "sink")
        stdout, stderr = self.captures
        return HttpOutcome(response.status, 0 if body is None else body.written, stdout.value(),
                           stderr.value(), self.fuel_used())


# ---------------------------------------------------------------------------
# sandbox: worker processes for guests that can block in a host call
# ---------------------------------------------------------------------------

class _ChannelError(Exception):
    """The other end of a worker channel closed, stalled past its deadline or broke the protocol."""


class _Channel:
    """Frames over a pair of pipes: a JSON header plus binary blobs (bytes inside the header are
    {"$b": index}: JSON cannot hold them). Reads are bounded, so a broken peer cannot make the
    reader allocate without limit."""

    FRAME = struct.Struct("<II")          # header length, number of blobs
    BLOB = struct.Struct("<Q")
    MAX_HEADER = 64 << 20
    MAX_BLOB = 1 << 30

    def __init__(self, read_fd, write_fd):
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(self, header, blobs=()):
        data = json.dumps(header, separators=(",", ":")).encode("utf-8")
        parts = [self.FRAME.pack(len(data), len(blobs)), data]
        for blob in blobs:
            parts += [self.BLOB.pack(len(blob)), blob]
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(self.write_fd, view):]

    def recv(self, deadline=None):
        size, count = self.FRAME.unpack(self._read(self.FRAME.size, deadline))
        if size > self.MAX_HEADER or count > 1 << 20:
            raise _ChannelError("oversized frame")
        try:
            header = json.loads(self._read(size, deadline))
        except (ValueError, RecursionError):
            raise _ChannelError("malformed frame") from None
        blobs = []
        for _ in range(count):
            (length,) = self.BLOB.unpack(self._read(self.BLOB.size, deadline))
            if length > self.MAX_BLOB:
                raise _ChannelError("oversized blob")
            blobs.append(self._read(length, deadline))
        return header, blobs

    def _read(self, size, deadline):
        chunks, left = [], size
        while left:
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([self.read_fd], [], [], wait)[0]:
                    raise TimeoutError("deadline passed")
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise _ChannelError("the other end closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self):
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _pack(value, blobs):
    """value for a JSON header: bytes become {"$b": index into blobs}; a dict that could be
    mistaken for a marker is wrapped as {"$d": dict}."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(bytes(value))
        return {"$b": len(blobs) - 1}
    if isinstance(value, (list, tuple)):
        return [_pack(item, blobs) for item in value]
    if isinstance(value, dict):
        packed = {key: _pack(item, blobs) for key, item in value.items()}
        return {"$d": packed} if set(value) in ({"$b"}, {"$d"}) else packed
    return value


def _unpack(value, blobs):
    if isinstance(value, list):
        return [_unpack(item, blobs) for item in value]
    if isinstance(value, dict):
        if set(value) == {"$b"}:
            return blobs[value["$b"]]
        if set(value) == {"$d"}:
            value = value["$d"]
        return {key: _unpack(item, blobs) for key, item in value.items()}
    return value


# Exceptions that cross the channel, by name; anything else arrives as a plain KvError.
_WIRE_ERRORS = {cls.__name__: cls for cls in (KvError, ArgumentError, OperationError, BackendError,
                                              AccessDeniedError,
                                              NoSuchStoreError, GuestError, LinkError)}
# The Backend methods a worker may ask its parent to run.
_REMOTE_METHODS = ("get", "set", "delete", "exists", "list_page", "list_page_at", "increment",
                   "compare_and_swap", "get_many", "set_many", "delete_many")


def _error_to_wire(error):
    wire = {"class": type(error).__name__, "message": str(error), "fuel": getattr(error, "fuel", 0)}
    if isinstance(error, TrapError):
        wire["kind"] = error.kind
        wire["status"] = getattr(error, "status", None)
    if isinstance(error, NoSuchFunction):
        wire["available"] = error.available
    return wire


def _error_from_wire(wire):
    name, message = wire.get("class"), str(wire.get("message"))
    if name == "GuestExit":
        error = GuestExit(wire.get("status"))
    elif name == "TrapError":
        error = TrapError(message, str(wire.get("kind") or "trap"))
    elif name == "NoSuchFunction":
        error = NoSuchFunction(message, wire.get("available") or ())
    else:
        error = _WIRE_ERRORS.get(name, KvError)(message)
    error.fuel = wire.get("fuel") if isinstance(wire.get("fuel"), int) else 0
    return error


class _RemoteBackend(Backend):
    """A worker's backend: every operation runs in the parent, on the Host's real backend, so a
    memory: backend is shared by every worker and nothing changes for the guest."""

    url = "remote:"

    def __init__(self, channel):
        super().__init__()
        self.channel = channel

    def _remote(self, method, args, kwargs):
        blobs = []
        self.channel.send({"op": "kv", "method": method, "args": _pack(list(args), blobs),
                           "kwargs": _pack(kwargs, blobs)}, blobs)
        reply, blobs = self.channel.recv()
        if "error" in reply:
            raise _error_from_wire(reply["error"])
        return _unpack(reply["value"], blobs)


def _remote_method(method):
    return lambda self, *args, **kwargs: self._remote(method, args, kwargs)


for _method in _REMOTE_METHODS:
    setattr(_RemoteBackend, _method, _remote_method(_method))
del _method


def _guest_to_wire(guest, blobs):
    wire = {"digest": guest.digest, "kind": guest.kind, "name": guest.name, "source": None,
            "signatures": guest.signatures, "cache_key": guest.cache_key}
    if guest.source is not None:
        wire["source"] = _pack(guest.source, blobs)
    return wire


class _Worker:
    """One worker process and its channel. Runs one request at a time; usable is False once it
    was killed, died or broke the protocol (the pool then replaces it)."""

    CODE = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('kvhost', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules['kvhost'] = module\n"
            "spec.loader.exec_module(module)\n"
            "sys.exit(module._worker_main(sys.argv[2:]))\n")

    def __init__(self, settings, blobs=()):
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", self.CODE, os.path.abspath(__file__),
                 str(to_child_read), str(from_child_write)],
                stdin=subprocess.DEVNULL,
                pass_fds=(to_child_read, from_child_write), start_new_session=True,
                stdout=subprocess.DEVNULL if settings.get("output") == "discard" else None)
        finally:
            os.close(to_child_read)
            os.close(from_child_write)
        self.channel = _Channel(from_child_read, to_child_write)
        self.usable = True
        self.channel.send({"op": "init", "settings": settings}, blobs)

    def execute(self, host, guest, request):
        blobs = []
        header = {"op": request.op, "guest": _guest_to_wire(guest, blobs),
                  "links": [[name, _guest_to_wire(dependency, blobs)]
                            for name, dependency in request.links],
                  "function": request.function, "args": _pack(request.args, blobs),
                  "argv": request.argv,
                  "namespace": request.namespace, "stdin": _pack(request.stdin, blobs),
                  "capture": request.capture,
                  "record_events": request.record_events}
        # The deadline counts from the worker's "started" (a new or loaded worker may take a
        # while to get there); until then it has WORKER_START_SECONDS more.
        limit = None if host.timeout is None else host.timeout + WORKER_GRACE
        deadline = None if limit is None else time.monotonic() + WORKER_START_SECONDS + limit
        try:
            self.channel.send(header, blobs)
            while True:
                reply, blobs = self.channel.recv(deadline)
                if reply.get("op") == "started":
                    deadline = None if limit is None else time.monotonic() + limit
                    continue
                if reply.get("op") != "kv":
                    break
                self._serve_kv(host.backend, reply, blobs)
        except TimeoutError:
            self.kill()
            raise TrapError(f"timeout: the guest ran longer than {host.timeout} s (its worker "
                            "process "
                            "was stopped)", "timeout") from None
        except (_ChannelError, OSError, ValueError, KeyError, TypeError):
            self.kill()
            raise TrapError(f"crash: the guest's worker process died ({self.exit_reason()})",
                            "crash") from None
        events = [tuple(event) for event in _unpack(reply.get("events") or [], blobs)]
        if events:
            host._deliver(events)
        if reply.get("op") == "failed":
            raise _error_from_wire(reply.get("error") or {})
        stdout = stderr = None
        if request.capture is not None:
            stdout, stderr = _Capture(request.capture), _Capture(request.capture)
            for capture, key in ((stdout, "stdout"), (stderr, "stderr")):
                capture.chunks = [_unpack(reply[key], blobs)]
                capture.kept, capture.total = len(capture.chunks[0]), reply[key + "_total"]
        return _Outcome(_unpack(reply.get("value"), blobs), stdout, stderr, reply.get("fuel", 0))

    def _serve_kv(self, backend, request, blobs):
        method = request.get("method")
        try:
            if method not in _REMOTE_METHODS:
                raise ArgumentError(f"unknown backend method {method!r}")
            value = getattr(backend, method)(*_unpack(request.get("args") or [], blobs),
                                             **_unpack(request.get("kwargs") or {}, blobs))
            blobs = []
            self.channel.send({"op": "kv-reply", "value": _pack(value, blobs)}, blobs)
        except KvError as e:
            self.channel.send({"op": "kv-reply", "error": _error_to_wire(e)})
        except Exception as e:      # a bug or an unexpected backend failure: the guest gets `other`
            self.channel.send({"op": "kv-reply", "error": {"class": "BackendError",
                                                           "message": "internal error: "
                                                                      f"{type(e).__name__}: {e}"}})

    def alive(self):
        """True while the process runs and its pipe is quiet: an idle worker that died (or wrote
        when nobody asked) must not be handed a request."""
        try:
            return (self.process.poll() is None
                    and not select.select([self.channel.read_fd], [], [], 0)[0])
        except (OSError, ValueError):   # the channel is closed
            return False

    def exit_reason(self):
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "no answer"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def kill(self):
        self.usable = False
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.channel.close()

    def close(self):
        """Ask the worker to end (closing its request pipe ends its loop), then make sure it did."""
        self.usable = False
        self.channel.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


class _WorkerPool:
    """Worker processes for guests whose host calls can block (a WASI sleep, a poll): epoch
    interruption only stops running wasm code, so such a guest runs in a process of its own that
    is killed when its deadline passes. At most `size` run at once; callers beyond that wait.
    Each worker keeps its compiled guests (mapped from the compile cache) between requests."""

    def __init__(self, host, size):
        self.host = host
        self.size = size
        self._idle = []
        self._started = 0
        self._cond = threading.Condition()
        self._closed = False

    def _settings(self):
        """(settings, blobs) of a new worker: the Host's options, and its provider if it has one."""
        host = self.host
        settings = {"namespace": host.namespace, "timeout": host.timeout, "fuel": host.fuel,
                    "max_memory": host.max_memory, "max_table_elements": host.max_table_elements,
                    "env": host.env, "dirs": host.dirs, "cache_dir": host.cache_dir,
                    "stdout": host.stdout,
                    "stderr": host.stderr, "stub_imports": host.stub_imports,
                    "output": host.output,
                    "allow_buckets": (None if host.allow_buckets is None
                                      else sorted(host.allow_buckets)),
                    "deny_buckets": sorted(host.deny_buckets)}
        blobs = []
        if host.provider is not None:
            settings["provider"] = _guest_to_wire(host.provider, blobs)
        return settings, blobs

    def prestart(self, count):
        with self._cond:
            count = min(count, self.size - self._started)
            self._started += max(count, 0)

        def start():
            for _ in range(count):
                try:
                    worker = _Worker(*self._settings())
                except OSError:
                    with self._cond:
                        self._started -= 1
                    continue
                self._release(worker)
        if count > 0:
            threading.Thread(target=start, name="kvhost-workers", daemon=True).start()

    def _acquire(self):
        dead = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise KvError("the host is closed")
                    while self._idle:
                        worker = self._idle.pop()
                        if worker.alive():
                            return worker
                        dead.append(worker)       # died while idle (killed, out of memory)
                        self._started -= 1
                    if self._started < self.size:
                        self._started += 1
                        break
                    self._cond.wait()
        finally:
            for worker in dead:
                worker.kill()
        try:
            return _Worker(*self._settings())
        except OSError as e:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise KvError(f"cannot start a worker process: {e}") from None

    def _release(self, worker):
        with self._cond:
            if worker.usable and not self._closed:
                self._idle.append(worker)
            else:
                self._started -= 1
                worker = worker if worker.usable else None
            self._cond.notify()
        if worker is not None and self._closed:
            worker.close()

    def execute(self, guest, request):
        worker = self._acquire()
        try:
            return worker.execute(self.host, guest, request)
        finally:
            self._release(worker)

    def close(self):
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.close()


def _worker_guest(host, wire, blobs):
    digest, kind, name = wire["digest"], wire["kind"], wire["name"]
    if wire.get("source") is not None:
        return host.load(_unpack(wire["source"], blobs), digest=digest, name=name)
    signatures = wire.get("signatures")
    if signatures is not None:       # JSON lists back to the tuples core_signatures() gives
        imports, exports = signatures
        signatures = ([(m, n, k, None if sig is None else (tuple(sig[0]), tuple(sig[1])))
                       for m, n, k, sig in imports],
                      {name: (k, None if sig is None else (tuple(sig[0]), tuple(sig[1])))
                       for name, (k, sig) in exports.items()})
    guest = host._from_cache(kind, digest, name, signatures, wire.get("cache_key"))
    if guest is None:
        raise GuestError(f"{name}: its compiled form is not in the compile cache")
    return guest


def _worker_main(argv):
    """The loop of a worker process (see _WorkerPool): requests from the parent, one at a time,
    until the parent closes the pipe. Guest output goes where the parent's Host says (captured,
    to files, inherited or dropped)."""
    channel = _Channel(int(argv[0]), int(argv[1]))
    try:
        header, blobs = channel.recv()
    except _ChannelError:
        return 0
    events = []
    settings = header["settings"]
    provider = settings.pop("provider", None)
    backend = _RemoteBackend(channel)       # the provider's wasi:keyvalue goes to the parent too
    if provider is None:
        kv = {"kv": backend}
    else:
        kv = {"kv": _WiredProvider(provider, blobs), "provider_kv": backend}
    try:
        host = Host(isolation="thread", **kv, **settings)
    except KvError:     # the parent loaded the same provider: only a broken cache gets here
        return 1
    host._event_sink = events.extend
    while True:
        try:
            header, blobs = channel.recv()
        except _ChannelError:
            return 0
        del events[:]
        reply = {"op": "done"}
        try:
            guest = _worker_guest(host, header["guest"], blobs)
            links = [(name, _worker_guest(host, wire, blobs)) for name, wire in header["links"]]
            request = _Request(header["op"], function=header["function"],
                               args=_unpack(header["args"], blobs),
                               argv=header["argv"], namespace=header["namespace"],
                               stdin=_unpack(header["stdin"], blobs), capture=header["capture"],
                               links=links, record_events=header["record_events"])
            channel.send({"op": "started"})          # the parent's deadline counts from here
            outcome = host._execute_here(guest, request)
            out = []
            reply["value"] = _pack(outcome.value, out)
            reply["fuel"] = outcome.fuel
            for key, capture in (("stdout", outcome.stdout), ("stderr", outcome.stderr)):
                if capture is not None:
                    reply[key], reply[key + "_total"] = _pack(capture.value(), out), capture.total
        except KvError as e:
            reply, out = {"op": "failed", "error": _error_to_wire(e)}, []
        except Exception as e:       # a bug: report it as a trap of this guest, keep serving
            reply, out = {"op": "failed", "error": {"class": "TrapError", "kind": "trap",
                                                    "message": "internal error: "
                                                               f"{type(e).__name__}: {e}"}}, []
        reply["events"] = _pack(events, out)
        channel.send(reply, out)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (ArgumentError) instead of exiting."""

    def error(self, message):
        raise ArgumentError(message)


def parse_size(text, what="size"):
    """A byte count from outside: ASCII digits, optionally followed by K, M or G (powers of
    1024; "KiB", "MB" and a final "B" are read alike), e.g. 268435456 or 256M; ArgumentError
    otherwise."""
    match = _SIZE_TEXT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ArgumentError(f"invalid {what} {str(text)[:40]!r}: expected a number of bytes, "
                            "suffix K, M or G allowed (e.g. 268435456 or 256M)")
    scale = _SIZE_UNITS[(match.group(2) or "b")[0].lower()]
    return parse_number(match.group(1), what) * scale


_SIZE_TEXT = re.compile(r"\s*([0-9]+)\s*([kmgKMG](?:i?[bB])?|[bB])?\s*")
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _option_type(parse):
    """An argparse type from one of the parsers below (its ArgumentError as argparse's)."""
    def convert(text):
        try:
            return parse(text)
        except ArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.lstrip("_")
    return convert


def _seconds(text):
    value = parse_number(text, "number of seconds", minimum=0, maximum=1e9, fraction=True)
    if not 0 < value < 1e9:
        raise ArgumentError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive(text):
    return parse_number(text, "positive integer", minimum=1)


def _env_pair(text):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ArgumentError(f"invalid --env {text!r}: expected NAME=VALUE")
    return name, value


def _dir_pair(text):
    host_dir, sep, guest_dir = text.partition("::")
    if not sep or not host_dir or not guest_dir:
        raise ArgumentError(f"invalid --dir {text!r}: expected HOST::GUEST")
    return host_dir, guest_dir


class SandboxOption(collections.namedtuple("SandboxOption",
                                           "flag dest parse metavar default many shown help")):
    """One option of a guest's sandbox: its flag, the Host argument it sets (dest), the parser
    of its text (None: a switch), its default, whether it may be repeated (many), and its help
    (`shown`: the default as the help names it)."""

    __slots__ = ()


# The sandbox options, defined once: kvhost's call and run, wasmstore.py's call, run and serve
# and http_server.py all add them with add_sandbox_options and parse them with these parsers.
SANDBOX_OPTIONS = {option.dest: option for option in (
    SandboxOption("--timeout", "timeout", _seconds, "S", DEFAULT_TIMEOUT, False,
                  f"{DEFAULT_TIMEOUT:g}",
                  "stop the guest after S seconds, even when it waits in a host call"),
    SandboxOption("--fuel", "fuel", _positive, "N", None, False, "no limit",
                  "stop the guest after N units of fuel; only a host given a limit meters fuel, "
                  "which makes compute-bound code several times slower"),
    SandboxOption("--max-memory", "max_memory", parse_size, "BYTES", DEFAULT_MAX_MEMORY, False,
                  f"{DEFAULT_MAX_MEMORY >> 20}M",
                  "largest linear memory, suffix K/M/G allowed, e.g. 512M"),
    SandboxOption("--max-table-elements", "max_table_elements", _positive, "N",
                  DEFAULT_MAX_TABLE_ELEMENTS, False, f"{DEFAULT_MAX_TABLE_ELEMENTS:,}",
                  "largest table"),
    SandboxOption("--allow-bucket", "allow_buckets", str, "B", None, True, "any",
                  "bucket the guest may open"),
    SandboxOption("--env", "env", _env_pair, "K=V", [], True, "none",
                  "environment variable the guest sees"),
    SandboxOption("--dir", "dirs", _dir_pair, "HOST::GUEST", [], True, "none",
                  "directory the guest may use"),
    SandboxOption("--link", "links", str, "NAME=PATH", [], True, None,
                  "link a core module's imports from module NAME to the exports of the core "
                  "module at PATH, {link_target}, e.g. --link env=random.wasm"),
    SandboxOption("--stub-imports", "stub_imports", None, None, False, False, None,
                  "define imports this host does not provide (e.g. wasi:http) as functions "
                  "that trap when called, so the rest of the guest runs"),
    SandboxOption("--allow-outbound", "allow_outbound", str, "HOST[:PORT]", [], True,
                  "none, requests are refused",
                  "destination an HTTP handler may send requests to; HOST alone allows its "
                  "default port, 80 or 443"),
    SandboxOption("--cache-dir", "cache_dir", str, "DIR", None, False,
                  "~/.cache/wasmstore/kvhost", "compile cache directory"),
)}


def add_sandbox_options(parser, link_target="a file", *, flags=None, env=None, only=None):
    """Add the sandbox options (SANDBOX_OPTIONS) to an argparse parser or group;
    host_from_args() turns them into Host arguments. link_target: what --link NAME=PATH names
    (a file for kvhost, a stored path for wasmstore). flags: {dest: flag} for a program whose
    own options take a flag (a server's --timeout is its connections': --run-timeout); the
    parsed value is then the attribute that flag names. env: {dest: environment variable}: a
    program that reads these from its environment (fill_sandbox_from_env) gets None for every
    option not given, and the help names the variable. only: the dests to add (default all;
    e.g. ("cache_dir",) for a command that compiles but runs nothing)."""
    flags, env = flags or {}, env or {}
    for option in SANDBOX_OPTIONS.values():
        if only is not None and option.dest not in only:
            continue
        flag = flags.get(option.dest, option.flag)
        notes = (["repeatable"] if option.many else []) \
            + ([f"env {env[option.dest]}"] if option.dest in env else []) \
            + ([f"default: {option.shown}"] if option.shown is not None else [])
        text = option.help.format(link_target=link_target)
        text += f" ({'; '.join(notes)})" if notes else ""
        if option.parse is None:
            parser.add_argument(flag, dest=_attribute(flag), action="store_true", help=text)
        else:
            parser.add_argument(flag, dest=_attribute(flag), type=_option_type(option.parse),
                                action="append" if option.many else None,
                                default=None if env else option.default,
                                metavar=option.metavar, help=text)


def sandbox_argv(args, flags=None):
    """The command-line words that give another program the sandbox options parsed into
    `args` (by add_sandbox_options without flags): each option with a value, in that program's
    flags ({dest: flag}, as its add_sandbox_options was given). wasmstore.py's serve hands its
    options to the server this way."""
    words = []
    for option in SANDBOX_OPTIONS.values():
        value, flag = getattr(args, option.dest), (flags or {}).get(option.dest, option.flag)
        if option.parse is None:
            words += [flag] if value else []
            continue
        for item in (value or ()) if option.many else (() if value is None else (value,)):
            text = _PAIR_SEPARATOR[option.dest].join(item) if isinstance(item, tuple) else item
            words += [flag, str(text)]
    return words


_PAIR_SEPARATOR = {"env": "=", "dirs": "::"}      # how _env_pair and _dir_pair split their text


def _attribute(flag):
    """The argparse attribute of a sandbox flag: its dest in SANDBOX_OPTIONS, or for a renamed
    flag the flag's own name (--run-timeout: run_timeout)."""
    for option in SANDBOX_OPTIONS.values():
        if option.flag == flag:
            return option.dest
    return flag.lstrip("-").replace("-", "_")


def fill_sandbox_from_env(args, env, flags=None, environ=None):
    """Set each sandbox option of `args` not given on the command line from its environment
    variable (env: {dest: variable}), parsed as on the command line; ArgumentError naming the
    variable if its value does not parse."""
    environ = os.environ if environ is None else environ
    for dest, variable in env.items():
        attribute = _attribute((flags or {}).get(dest, SANDBOX_OPTIONS[dest].flag))
        if getattr(args, attribute) is None and environ.get(variable):
            try:
                setattr(args, attribute, SANDBOX_OPTIONS[dest].parse(environ[variable]))
            except ArgumentError as exc:
                raise ArgumentError(f"{variable}: {exc}") from None


def add_store_options(parser, kv_default=DEFAULT_KV_URL, kv_default_text=None, provider="FILE"):
    """--kv, --provider-kv and --namespace (kvhost's and wasmstore.py's commands share them).
    provider: what follows "component:" in --kv (None: no provider option, e.g. `kvhost kv`)."""
    default = kv_default_text or kv_default
    parser.add_argument("--kv", default=kv_default, metavar="URL",
                        help="key-value backend: sqlite:PATH, memory: or redis://HOST:PORT/DB"
                             + ("" if provider is None else
                                f", or component:{provider}, a provider component whose "
                                "wasi:keyvalue exports serve the guest's imports")
                             + f" (default {default})")
    if provider is not None:
        parser.add_argument("--provider-kv", metavar="URL",
                            help=f"the backend beneath a --kv component:{provider} provider: "
                                 f"what its own wasi:keyvalue imports use (default {default})")
    parser.add_argument("--namespace", help="tenant whose data the guest sees (default: default)")


def link_table(entries, target=None, expected="NAME=FILE"):
    """{import module name: target} from --link NAME=TARGET texts or (name, target) pairs: the
    one parser of links, for kvhost's command line (a target is a file) and wasmstore.py's
    (target: a function that checks a stored path and returns its printed form; expected:
    what the error message asks for). ArgumentError for a malformed entry or a name linked
    twice to different targets."""
    table = {}
    for entry in entries or ():
        if isinstance(entry, tuple):
            name, sep, value = entry[0], "=", entry[1]
        else:
            name, sep, value = str(entry).partition("=")
        if not sep or not name or not value or "\0" in name or len(name) > MAX_LINK_NAME:
            shown = repr(entry) if len(repr(entry)) <= 80 else repr(entry)[:80] + "..."
            raise ArgumentError(f"invalid --link {shown}: expected {expected}")
        value = value if target is None else target(value)
        if table.setdefault(name, value) != value:
            raise ArgumentError(f"--link {name[:80]!r}= is given twice ({table[name]} and "
                                f"{value})")
    return table


MAX_LINK_NAME = 1024                 # an import's module name; longer is a mistake, not a link


def host_from_args(args, **overrides):
    """A Host for one-shot commands (isolation="one-shot": run_with_deadline ends the process
    at the deadline)."""
    options = dict(kv=args.kv, allow_buckets=args.allow_buckets, timeout=args.timeout,
                   fuel=args.fuel,
                   max_memory=args.max_memory, max_table_elements=args.max_table_elements,
                   env=dict(args.env),
                   dirs=args.dirs, cache_dir=args.cache_dir,
                   stub_imports=args.stub_imports, isolation="one-shot",
                   allow_outbound=getattr(args, "allow_outbound", None))
    if args.namespace is not None:
        options["namespace"] = args.namespace
    if getattr(args, "provider_kv", None) is not None:
        options["provider_kv"] = args.provider_kv
    options.update(overrides)
    if provider_of(options["kv"]) is not None:
        options.setdefault("provider_kv", DEFAULT_KV_URL)
    return Host(**options)


def parse_json_args(texts):
    """JSON arguments of a call, one per command-line word."""
    shown = (lambda text: repr(text) if len(text) <= 60 else repr(text[:57] + "..."))
    values = []
    for text in texts:
        try:
            values.append(parse_json(text, f"JSON argument {shown(text)}"))
        except ArgumentError:
            hint = _quoting_hint(text)
            if not hint:
                raise
            raise ArgumentError(f"invalid JSON argument {shown(text)} ({hint})") from None
    return values


def _quoting_hint(text):
    """For a word that JSON does not take: how to pass it as a JSON string through a shell."""
    if not text or text[:1] in '"[{' or len(text) > 200:
        return ""
    quoted = json.dumps(text, ensure_ascii=False)
    shell = "'" + quoted.replace("'", "'\\''") + "'"
    return f"arguments are JSON: a string is written {quoted}, in a shell {shell}"



class DeadlineExceeded(TrapError):
    """A one-shot program's guest is still blocked after its deadline; the process must end now."""

    def __init__(self, timeout):
        super().__init__(f"timeout: the guest ran longer than {timeout} s (it was still running "
                         "at the deadline; the process ends it)", "timeout")


def run_with_deadline(function, timeout):
    """function() in a daemon thread, for one-shot programs (isolation "one-shot" or "thread"):
    if it has not returned WORKER_GRACE seconds after `timeout` (a guest of a one-shot Host
    still running, or a guest blocked in a WASI sleep, which epoch interruption cannot stop),
    raise DeadlineExceeded; the caller must then end the process (os._exit), since the thread
    cannot be stopped."""
    if timeout is None:
        return function()
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as e:     # re-raised in the caller's thread
            result["error"] = e
    thread = threading.Thread(target=target, name="kvhost-guest", daemon=True)
    thread.start()
    thread.join(timeout + WORKER_GRACE)
    if thread.is_alive():
        _ABANDONED.append(thread)
        raise DeadlineExceeded(timeout)
    if "error" in result:
        raise result["error"]
    return result["value"]


def print_json(value, out):
    """One line of JSON for a call's result (non-finite floats were already made strings)."""
    out.write(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n")




_ABANDONED = []   # guest threads run_with_deadline gave up on: the process must end without waiting


def end_process(status):
    """The exit status for sys.exit(), or, if a guest thread is still blocked (DeadlineExceeded),
    flush and end the process at once: the blocked thread cannot be stopped or joined."""
    if _ABANDONED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    return status


def _build_parser():
    parser = _Parser(prog="kvhost", description="Run WebAssembly components against wasi:keyvalue.")
    parser.add_argument("--version", action="version", version=f"kvhost {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run a wasi:cli/run component or a WASI command module")
    add_store_options(run)
    add_sandbox_options(run)
    run.add_argument("guest")
    run.add_argument("args", nargs=argparse.REMAINDER)
    call = commands.add_parser("call", help="call an exported function, print its result as JSON")
    add_store_options(call)
    add_sandbox_options(call)
    call.add_argument("guest")
    call.add_argument("function")
    call.add_argument("json_args", nargs="*", metavar="JSON_ARG")
    exports = commands.add_parser("exports",
                                  help="list the functions a guest exports, with their types")
    exports.add_argument("--json", action="store_true",
                         help="one JSON document instead of one line per function")
    add_sandbox_options(exports, only=("cache_dir",))
    exports.add_argument("guest")
    kv = commands.add_parser("kv", help="inspect and edit stored data")
    add_store_options(kv, provider=None)
    kv.add_argument("action", choices=["get", "set", "delete", "list", "incr"],
                    help="list without BUCKET (and without --namespace) prints the namespaces "
                         "that hold data")
    kv.add_argument("bucket", nargs="?")
    kv.add_argument("key", nargs="?")
    kv.add_argument("value", nargs="?")
    return parser


def print_exports(described, out, as_json=False):
    """exports for people (one line per function) or programs (--json)."""
    if as_json:
        out.write(json.dumps(described, separators=(",", ":")) + "\n")
        return
    for entry in described:
        out.write(format_export(entry) + "\n")


def _kv_command(args, out, err):
    needs = {"get": 1, "set": 2, "delete": 1, "list": 0, "incr": 1}[args.action]
    given = sum(x is not None for x in (args.key, args.value))
    listing_namespaces = args.action == "list" and args.bucket is None and args.namespace is None
    if (args.bucket is None and not listing_namespaces) or given < needs or \
            (args.action != "incr" and given > needs) or given > 2:
        raise ArgumentError(f"kv {args.action} expects BUCKET" + (" KEY" if needs >= 1 else "")
                            + (" VALUE" if needs == 2 else "")
                            + (" [DELTA]" if args.action == "incr" else ""))
    backend = open_backend(args.kv)
    try:
        if listing_namespaces:
            for namespace in backend.namespaces():
                out.write(namespace + "\n")
            return 0
        _check_bucket(args.bucket)
        ns, bucket = args.namespace or "default", args.bucket
        if args.action == "get":
            value = backend.get(ns, bucket, args.key)
            if value is None:
                raise OperationError(f"no key {args.key!r} in bucket {bucket!r}")
            if hasattr(out, "buffer"):
                out.flush()
                out.buffer.write(value + b"\n")
                out.buffer.flush()
            else:   # a text stream (e.g. redirected in-process)
                out.write(value.decode("utf-8", "replace") + "\n")
        elif args.action == "set":
            backend.set(ns, bucket, args.key, args.value.encode("utf-8"))
        elif args.action == "delete":
            backend.delete(ns, bucket, args.key)
        elif args.action == "list":
            cursor, listed = None, 0
            while True:
                keys, cursor = backend.list_page(ns, bucket, cursor)
                listed += len(keys)
                for key in keys:
                    out.write(key + "\n")
                if cursor is None:
                    break
            if not listed and args.namespace is None:
                _say_where_data_is(backend, bucket, err)
        else:
            delta = 1 if args.value is None else parse_number(args.value, "delta",
                                                              minimum=S64[0], maximum=U64[1])
            out.write(f"{backend.increment(ns, bucket, args.key, delta)}\n")
    finally:
        backend.close()
    return 0


def _say_where_data_is(backend, bucket, err):
    """An empty listing of the default namespace: name the namespaces that do hold data (a
    stored module's data is under its path, not under "default")."""
    namespaces = [ns for ns in backend.namespaces(limit=21) if ns != "default"]
    if not namespaces:
        return
    shown = ", ".join(namespaces[:20]) + (", ..." if len(namespaces) > 20 else "")
    err.write(f"kvhost: bucket {bucket!r} of namespace 'default' is empty; namespaces with data: "
              f"{shown} (choose one with --namespace; `kv list` lists them all)\n")


def report(error, err, prog):
    """Print a kvhost error as one line; returns its exit status from ERROR_STATUS: 2 for bad
    arguments or a guest refused before it runs, 1 for a trap, a limit or a failed operation."""
    word = "trap" if isinstance(error, TrapError) else "error"
    err.write(f"{prog}: {word}: {error}\n")
    return error_meaning(error).exit_status


def main(argv=None):
    """The kvhost command line; returns the exit status: 2 for bad arguments or a guest refused
    before it runs (not WebAssembly, imports that cannot be satisfied), 1 for a trap or a failed
    operation, else the guest's own status (run) or 0."""
    out, err = sys.stdout, sys.stderr
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "kv":
            return _kv_command(args, out, err)
        if args.command == "exports":               # never compiles (see Host.describe)
            with Host(cache_dir=args.cache_dir, isolation="thread") as host:
                print_exports(host.describe(args.guest)["exports"], out, args.json)
            return 0
        json_args = parse_json_args(getattr(args, "json_args", []))
        links = link_table(args.links)
        with host_from_args(args) as host:
            guest = host.load(args.guest)
            linked = {name: host.load(target) for name, target in links.items()}
            resolve = linked.get if linked else None
            if args.command == "run":
                out.flush()
                return run_with_deadline(lambda: host.run(guest, args.args, stdin=STDIN_INHERIT,
                                                          resolve=resolve), host.timeout)
            result = run_with_deadline(
                lambda: host.call(guest, args.function, json_args, resolve=resolve), host.timeout)
            print_json(result, out)
            return 0
    except KvError as e:
        return report(e, err, "kvhost")
    except BrokenPipeError:                 # stdout closed early (| head): a normal end
        _discard_stdout()
        return 0
    except KeyboardInterrupt:
        err.write("kvhost: interrupted\n")
        return 130


def _discard_stdout():
    """Point stdout at /dev/null, so that flushing it again at exit cannot fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def console_main():
    """The `kvhost` command (python kvhost.py, or the script pip installs); a stdout closed
    early (| head) ends it quietly."""
    status = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
    sys.exit(end_process(status))


if __name__ == "__main__":
    console_main()
