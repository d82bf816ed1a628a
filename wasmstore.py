# SPDX-License-Identifier: Apache-2.0
# wasmstore.py: a versioned, content-addressed store for WebAssembly modules (single file).
"""wasmstore: a versioned, content-addressed store for WebAssembly modules and components.

Modules live under paths ("/math/add.wasm") in a git-like history: every change to a branch
is one commit, and any earlier state can be listed, restored or rolled back to.

Use as a library::

    from wasmstore import Store
    store = Store("~/.wasmstore")
    digest = store.add("/math/add.wasm", wasm_bytes)     # validates, stores, commits
    store.find("/math/add.wasm") == wasm_bytes
    store.versions("/math/add.wasm")                      # [(module hash, commit), ...]

Use as a command (``python wasmstore.py --help`` lists every command)::

    python wasmstore.py add add.wasm /math/add.wasm
    python wasmstore.py list

Layout under the root (an object is named by the SHA-256 of its bytes; module objects are
the raw module bytes, trees and commits canonical JSON):

- ``objects/pack/<16 hex>.pack``: where new objects go. A pack is a sequence of records,
  each a 52-byte header (magic ``WSO1``, kind ``m``/``t``/``c``/``r``, 3 zero bytes, payload
  length u64, SHA-256 of the payload 32 bytes, CRC-32 of those 48 bytes; big-endian) and
  the payload. Kind ``r`` is no object but a ref record, the journal of a branch's move:
  ``<branch> <sequence 16 hex> <head | none>`` (ASCII), written after the objects the move
  needs. The highest-numbered pack is appended to; at 8 MiB it is synced, the ref slots are
  brought up to its ref records and synced, and it is sealed by
  ``<16 hex>.idx`` (magic ``WSI1``, 4 zero bytes, bytes of the pack covered u64, count u64,
  then per object record SHA-256, payload offset u64, kind code << 56 | length u64, sorted
  by hash, then a CRC-32 of it all) and the next pack begun. Readers bisect an index and
  scan what follows it; a damaged or missing index just means a scan. Records after the
  first header that is not whole and intact (a killed writer's torn tail) are ignored, and
  the next writer truncates them; a ref record whose payload fails its hash is skipped.
- ``objects/<2 hex>/<62 hex>``: a module written out from its pack the first time it is
  served as a file (``module_filename``: zero-copy downloads, the CLI's ``filename``). A
  loose and a packed copy are the same object; gc keeps only the loose one.
- ``refs/heads/<branch>``: 256 bytes, two 128-byte slots ``ref <sequence 16 hex> <head
  | none> <crc32 8 hex>`` (the CRC-32 of the text before it) padded with spaces and a
  newline. A change overwrites the slot with the lower sequence; readers take the intact
  slot with the higher one, or a ref record of the branch with a higher sequence still (a
  slot write lost to a crash). A new ref file's sequence starts at the time in
  nanoseconds (or past the newest record of that name, if the clock stepped back), above
  the records a deleted branch of that name may have left.
- ``refs/generation``: an 8-byte counter bumped (through a shared map, unsynced) by every
  change of a ref or HEAD: ``Store.generation()``, what caches of ref-derived answers key on.
- ``HEAD``: the default branch's name and a newline.
- ``cache/history``: derived per-commit change lines for versions()/audit() (not synced).
- ``tmp/``: files being written, named ``<pid>-...``; a dead writer's are removed by the
  next change (and by gc).

Durability: a commit costs one sync, two at most. Its new objects (modules first, then
trees bottom-up, then the commit) and then the ref record of the branch's move are
appended to the active pack in one write and made durable by one fdatasync (starting a new
pack adds an fsync of ``objects/pack``; every sync goes through ``_sync``: F_FULLFSYNC on
macOS, which has no fdatasync); then the ref's older slot is overwritten in place, not
synced. No file is created per commit. The ref record is the commit point: a crash or kill
before the slot write reaches the disk leaves the record, and the first ref read of a
Store (and every writer, under the lock) takes up the records newer than their slots, once
the pack is synced and the object records since the ref record before them hash-check (a
crash during the sync may keep the record and lose an earlier page: then it is not
applied, the write was never acknowledged) and writes their slots (the first read: if no
writer holds the lock, which would), so Stores that read before see them too; a record
whose writer's sync failed is cut off by it, and dropped. A writer that finds records it
cannot know synced (a killed writer's) syncs them before it appends, so nothing older
needs checking. Slots are synced, catching up with the records, before a pack is sealed
and before gc rewrites packs (dropping their records; a slot that cannot be written stops
them), so only records past an index are ever read. A crash at any point leaves every
ref at a commit whose objects are all durable. A ref changes only under an exclusive
``flock`` of ``refs/heads``, by compare-and-swap against the head the change was computed
from, so writers in many threads and processes never lose an update; packs are appended
only under that lock, and only the highest-numbered one (gc, when it writes a pack,
rewrites the active one too). Readers take no lock (but a Store's first read tries it):
they re-read a ref's slots (one pread of an open file; an in-place write is invisible to
stat) and rescan the packs when an object is not where they looked.
gc rewrites packs that hold garbage into a new sealed pack, durable before the old ones are
deleted; readers holding an old pack open keep reading it. Why this design: on ext4
creating a file is what a commit cost (each new file needs an open, an fsync, a rename and
a directory fsync; an append needs one fdatasync), and a ref that moves by rename cannot be
read fresh without a syscall anyway, so a commit creates no file and a ref is rewritten in
place; its move rides in the pack's one sync.

Map of this file: constants; exceptions and ERROR_STATUS (the one table of what each error
means: HTTP status, exit status, metric label; http_server.py reads it); input from outside
(parse_number, parse_size, parse_json, parse_url: ASCII digits, bounded JSON, ports in range; used
by http_server.py too); names (paths, branches, hashes); validation (wasmtime's validator, and
kvhost.py's wasm reader for components, both imported lazily); primitives (the one durable
whole-file write ``_write_whole``, temp files and their sweep ``_remove_debris``,
``_format_date``, the hash check, ``Cache`` (the one cache type, also http_server.py's),
``SharedFd``); the object store (_Segment: one pack as a reader sees it; _ObjectStore: packs and
module files, ref records, batches, fsck and gc passes); refs (_Refs: slot files,
compare-and-swap, HEAD, the generation counter, pending ref records); the Store facade (layout,
objects, refs and their recovery from ref records, trees, changes, operations, history,
branches, watch, gc, export and backup, fsck; FsckReport); the history cache
(_HistoryCache); object helpers; backup loading (load_backup, bounded); running stored modules
(``Runner``, ``Target``: resolution, kv namespaces, linking; kvhost.py is imported by
``_kvhost``, for these, validation and ``wasm_interface``); OCI registries (``OciReference``;
the CNCF Wasm OCI artifact layout: ``wasm_interface``, ``WasmArtifact``, ``module_artifact``;
``Credentials``; the ``RegistryClient`` on http.client, imported lazily; ``push``, ``push_all``,
``pull``, ``pull_many``); the command line (``main``; ``server`` runs http_server.py, the file
next to this one, as a program, and ``serve`` runs it in its one-app mode;
``call``/``run``/``exports``/``serve`` take kvhost's options).

Running (needs kvhost.py next to this file)::

    from wasmstore import Store, Runner
    Runner(Store("~/.wasmstore")).call("/math/add.wasm", "add", [2, 3])

OCI::

    wasmstore.push(store, "/apps/hello.wasm", "oci://localhost:5000/hello:v1")
    wasmstore.pull(store, "oci://localhost:5000/hello:v1", "/copy/hello.wasm")
    python wasmstore.py push --all oci://localhost:5000/mirror
"""

__version__ = "0.1.0"
__all__ = [
    "Store", "FsckReport", "Cache", "SharedFd", "load_backup", "main", "console_main",
    "StoreError", "InvalidInput", "InvalidModule", "TooLarge", "NotFound", "Conflict",
    "MergeConflict", "CorruptObject", "RegistryError", "ERROR_STATUS", "ErrorMeaning",
    "error_meaning", "parse_number", "parse_size", "parse_json", "json_depth", "parse_url", "Url",
    "MAX_JSON_DEPTH", "validate_path", "format_path", "validate_branch", "validate_hash",
    "validate_module", "validate_module_file", "wasm_from_text", "Runner", "Target",
    "default_kv_url", "kv_options", "parse_namespace_map", "parse_links", "OciReference",
    "WasmArtifact", "Credentials", "RegistryClient", "TransferReport", "wasm_interface",
    "module_artifact", "registry_credentials", "docker_config_file", "is_branch_tag", "push",
    "push_all", "pull", "pull_many",
]

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zlib

# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

DEFAULT_ROOT = "~/.wasmstore"
DEFAULT_BRANCH = "main"
DEFAULT_AUTHOR = "wasmstore"
MAX_SEGMENT_BYTES = 255               # the common filesystem name limit, so export works
MAX_SEGMENTS = 64                     # keeps trees shallow and commits O(depth)
MAX_AUTHOR_CHARS = 256                # authors come from HTTP headers: keep commits small
BRANCH_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
HASH_TEXT = re.compile(r"[0-9a-fA-F]{64}\Z")
WASM_MAGIC = b"\0asm"
COMPONENT_HEADER = WASM_MAGIC + b"\x0d\x00\x01\x00"   # component-model binary, layer 1
CORE_HEADER = WASM_MAGIC + b"\x01\x00\x00\x00"        # core module, version 1
SMALL_MODULE_BYTES = 64 << 10         # added again, a module this small is validated again
IN_MEMORY_INGEST_BYTES = 1 << 20      # add_file reads a module up to this size into memory
CHUNK_SIZE = 1 << 20                  # streaming reads: bounded memory for any module size
OBJECT_CACHE_WEIGHT = 400_000         # parsed trees/commits kept, counted in tree entries
MODULE_CACHE_BYTES = 64 << 20         # small module bytes kept for warm finds
MODULE_CACHE_ITEM_BYTES = 1 << 20     # bigger modules are always read from disk
INDEX_CACHE_TREES = 4                 # hash -> paths indexes kept (latest root trees)
STALE_TMP_SECONDS = 24 * 3600         # a temp file this old is debris even if its pid lives
WATCH_WALK_LIMIT = 10_000             # commits walked to split a ref jump into events
SEGMENT_BYTES = 8 << 20               # a pack this big is sealed (indexed) and a new one begun
MAX_PACKS = 16                        # gc merges more packs than this (each is a lookup)
MAX_PARSED_OBJECT_BYTES = 1 << 30     # fsck parses trees and commits up to this size
MAX_BACKUP_MEMBERS = 100_000          # a backup of this layout has HEAD, refs and one pack
MAX_BACKUP_EXPANSION = 200            # wasm and JSON compress far less; a gzip bomb far more
OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
WASM_CONFIG_TYPE = "application/vnd.wasm.config.v0+json"   # the CNCF Wasm OCI artifact layout
WASM_LAYER_TYPE = "application/wasm"
OCI_TITLE = "org.opencontainers.image.title"   # `oras pull` names the file after it
OCI_MAX_MANIFEST_BYTES = 4 << 20      # the distribution spec asks registries to take 4 MB
OCI_MAX_SMALL_BODY = 64 << 10         # error bodies, token answers, Docker config.json
OCI_MAX_MODULE_BYTES = 1 << 30        # a pulled layer over this is refused before download
TEXT_SUFFIXES = (".wat", ".wast")      # WebAssembly text: `add` stores its binary
MAX_TEXT_BYTES = 64 << 20              # wat2wasm parses text whole, in memory
OCI_TIMEOUT = 60.0                    # seconds per registry socket operation
OCI_DEADLINE = 900.0                  # seconds a whole pull or push may take (a trickling peer
                                      # resets a socket timeout with every byte); --deadline
OCI_REDIRECTS = 5                     # redirects followed per request
PULL_MESSAGE_SOURCES = 20            # sources a pull of several modules names in its one commit
OCI_MIRROR_WORKERS = 4                # repositories push --all sends at once (a connection each)
OCI_PROGRESS_BYTES = 4 << 20          # transfers this big are announced on the progress line
OCI_REGISTRY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
                          r"(?::([0-9]{1,5}))?\Z")
OCI_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
                            r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*\Z")   # the spec's grammar
OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
OCI_VERSION_TAG = re.compile(r"v(0|[1-9][0-9]{0,8})\Z")   # v0, v1, ...: a path's versions
MAX_JSON_DEPTH = 64                   # JSON from outside nests at most this deep
MAX_NAMESPACE_CHARS = 1024            # kvhost's longest namespace (a path may be 16 KiB)
NAMESPACE_MAP_HELP = ("modules under PREFIX share kv namespace NS on every branch (repeatable; "
                      "default: each path is its own namespace, a hash is sha256:<hash>, and "
                      "a branch other than the default prefixes BRANCH:)")
MAX_NUMBER_CHARS = 40                 # a longer number from outside is refused unread


# ---------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------

class StoreError(Exception):
    """Root of every error this module raises; str() is a one-line message for users."""


class InvalidInput(StoreError):
    """Bad path, branch name, hash, index or argument."""


class InvalidModule(InvalidInput):
    """The bytes are not a valid WebAssembly module or component."""


class TooLarge(InvalidInput):
    """A module is over the size limit the caller set."""


class NotFound(StoreError):
    """No such module, path, branch, commit or object."""


class Conflict(StoreError):
    """The operation conflicts with the store's state (branch exists, nothing to roll back...)."""


class MergeConflict(Conflict):
    """A merge changed the same paths differently on both sides; nothing was written."""

    def __init__(self, source, paths):
        self.source = source
        self.paths = list(paths)
        super().__init__(f"merge of {source!r} conflicts at {', '.join(self.paths)}")


class CorruptObject(StoreError):
    """An object or ref failed its integrity check: it is never returned as data."""


class RegistryError(StoreError):
    """A registry could not be reached, refused a request, or sent something unusable.
    str() is one line and never contains a credential or a token."""


class ErrorMeaning(collections.namedtuple("ErrorMeaning", "http_status exit_status label")):
    """What an error means to a caller: the HTTP status a server answers with, the exit
    status of the command line, and the label metrics and access logs count it under (one
    of a small, fixed set)."""

    __slots__ = ()

# The one table of what each error of this module means, read by main() (exit status) and by
# http_server.py (HTTP status, metric label). A subclass without its own row uses its nearest
# parent's (see error_meaning): InvalidModule is an InvalidInput, MergeConflict a Conflict.
ERROR_STATUS = {
    TooLarge: ErrorMeaning(413, 1, "too-large"),      # over the caller's limit (--max-body)
    InvalidInput: ErrorMeaning(400, 1, "arguments"),  # bad path, branch, hash; invalid module
    NotFound: ErrorMeaning(404, 1, "not-found"),
    Conflict: ErrorMeaning(409, 1, "conflict"),       # branch exists, nothing to roll back...
    CorruptObject: ErrorMeaning(500, 1, "corrupt"),   # never served as data; fsck says more
    RegistryError: ErrorMeaning(502, 1, "registry"),  # an OCI registry failed us
    StoreError: ErrorMeaning(500, 1, "error"),
}


def error_meaning(exc):
    """The ErrorMeaning of an exception of this module (its class's row, or its nearest
    parent's), None for any other exception."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return None


class _RefMoved(Conflict):
    """A ref changed between read and swap under the lock: something wrote it without
    taking the lock. Nothing was written; retrying is safe."""

    def __init__(self, branch):
        super().__init__(f"branch {branch!r} changed while this change was being written "
                         "(a writer without the lock?); nothing was written, retry")


# ---------------------------------------------------------------------------
# input from outside: numbers, JSON, URLs
# ---------------------------------------------------------------------------
# Every number, JSON text and URL this module takes from a user, a file or a peer (a registry,
# a backup) goes through one of these three: only ASCII digits are digits (str.isdigit() takes
# "²", int() takes "٣" and "1_0"), JSON nests at most MAX_JSON_DEPTH levels (the decoder
# recurses: 1,000 levels in 2 KB raise RecursionError), a URL's port is a number in range.
# http_server.py uses these; kvhost.py has the same three for its own input (each file works
# copied alone).

_INTEGER_TEXT = re.compile(r"-?[0-9]+\Z")
_FRACTION_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_USERINFO = re.compile(r"//[^/@]*@")
_NOT_IN_URL = re.compile(r"[^\x21-\x7e]")     # spaces, control and non-ASCII characters (RFC 3986)


def parse_number(text, what, *, minimum=0, maximum=None, fraction=False):
    """The number `text` (str or bytes) spells in ASCII digits: an int, or with fraction=True a
    finite float (a decimal point and an exponent allowed). A leading "-" is the only sign; no
    space, "_", "+", nan or inf. InvalidInput naming `what` when the text is not such a number
    or the number is outside [minimum, maximum] (None: unbounded)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    pattern = _FRACTION_TEXT if fraction else _INTEGER_TEXT
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS or not pattern.match(text):
        kind = "a number" if fraction else "an integer"
        raise InvalidInput(f"invalid {what} {_short(text, 40)}: expected {kind} in ASCII digits")
    value = float(text) if fraction else int(text)
    if not math.isfinite(value):
        raise InvalidInput(f"invalid {what} {text!r}: expected a finite number")
    if (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise InvalidInput(f"invalid {what} {text!r}: expected {bounds}")
    return value


def parse_size(text, what="size"):
    """A byte count from outside: ASCII digits, optionally followed by K, M or G (powers of
    1024; "KiB", "MB" and a final "B" are read alike), e.g. 134217728 or 128M; InvalidInput
    otherwise. The same rule as kvhost.parse_size (the sandbox's --max-memory)."""
    match = _SIZE_TEXT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(f"invalid {what} {_short(text, 40)}: expected a number of bytes, "
                           "suffix K, M or G allowed (e.g. 134217728 or 128M)")
    return parse_number(match.group(1), what) * _SIZE_UNITS[(match.group(2) or "b")[0].lower()]


_SIZE_TEXT = re.compile(r"\s*([0-9]+)\s*([kmgKMG](?:i?[bB])?|[bB])?\s*")
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON "
                     "(write \"NaN\", \"Infinity\" or \"-Infinity\" as strings)")


_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def json_depth(text):
    """How deep the arrays and objects of JSON text nest (brackets inside strings do not count;
    for text that is not JSON, how deep a decoder would get before it finds out)."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(data, what="JSON", *, max_depth=MAX_JSON_DEPTH):
    """The value of strict JSON (no NaN or Infinity) given as str or bytes (UTF-8, or the
    UTF-16/32 that json detects), nested at most max_depth levels: deeper input is refused
    before the decoder sees it. InvalidInput naming `what` otherwise."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        try:
            data = data.decode(json.detect_encoding(data))
        except UnicodeDecodeError:
            raise InvalidInput(f"invalid {what}: not UTF-8 text") from None
    if not isinstance(data, str):
        raise InvalidInput(f"invalid {what}: expected JSON text, not {type(data).__name__}")
    if data.count("[") + data.count("{") > max_depth and json_depth(data) > max_depth:
        raise InvalidInput(f"invalid {what}: nested deeper than {max_depth} levels")
    try:
        return _STRICT_JSON.decode(data)
    except ValueError as exc:              # json.JSONDecodeError, and numbers over 4,300 digits
        raise InvalidInput(f"invalid {what}: {exc}") from None


class Url(collections.namedtuple("Url", "scheme username password host port path query")):
    """A URL parse_url() checked; netloc is "host[:port]" (IPv6 hosts in brackets)."""

    __slots__ = ()

    @property
    def netloc(self):
        """"host[:port]", an IPv6 host in brackets: what an HTTP Host header carries."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_url(text, what, schemes=("http", "https")):
    """A URL from outside as a Url (host lowercased, IPv6 without brackets, port None when not
    given); InvalidInput naming `what` unless its scheme is one of `schemes`, it names a host
    (printable ASCII only: no space) and its port, if any, is 0-65535 in ASCII digits."""
    import urllib.parse
    shown = _short(_USERINFO.sub("//", str(text)), 200)           # never a password in a message
    if not isinstance(text, str) or _NOT_IN_URL.search(text):
        raise InvalidInput(f"invalid {what} {shown}: not a URL")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:              # "Invalid IPv6 URL", a port out of range or not a number
        raise InvalidInput(f"invalid {what} {shown}: {exc}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise InvalidInput(f"invalid {what} {shown}: expected {' or '.join(schemes)}://HOST")
    return Url(parts.scheme, parts.username, parts.password, parts.hostname, port, parts.path,
               parts.query)


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------

def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_path(path):
    """Return the segments of a store path, or raise InvalidInput.

    One leading "/" is allowed (the printed form). "" and "/" are the root (no segments).
    """
    segments = _valid_paths.get(path) if isinstance(path, str) else None
    if segments is None:
        segments = _parse_path(path)
        _valid_paths.put(path, segments)
    return segments


def _parse_path(path):
    """validate_path's work (its answers are cached: valid paths repeat, every find parses
    one)."""
    if not isinstance(path, str):
        raise InvalidInput(f"invalid path {_short(path)}: expected a string")
    if len(path) > MAX_SEGMENTS * (MAX_SEGMENT_BYTES + 1) + 1:
        raise InvalidInput(f"invalid path {_short(path)}: longer than any valid path")
    body = path[1:] if path.startswith("/") else path
    if not body:
        return ()
    segments = tuple(body.split("/"))
    if len(segments) > MAX_SEGMENTS:
        raise InvalidInput(f"invalid path {_short(path)}: more than {MAX_SEGMENTS} segments")
    for segment in segments:
        problem = _segment_problem(segment)
        if problem:
            raise InvalidInput(f"invalid path {_short(path)}: {problem}")
    return segments


def _segment_problem(segment):
    """Why a path segment is invalid, or None."""
    if not segment:
        return "empty segment"
    if segment in (".", ".."):
        return f"segment {segment!r} is not allowed"
    if CONTROL_CHARS.search(segment):
        return "NUL or control character in a segment"
    try:
        size = len(segment.encode("utf-8"))
    except UnicodeEncodeError:
        return "segment is not valid UTF-8"
    if size > MAX_SEGMENT_BYTES:
        return f"segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def format_path(segments):
    """The printed form of a path: a leading "/" and "/" between segments."""
    return "/" + "/".join(segments)


def _is_branch_name(name):
    """The branch-name rule: 1-128 of [A-Za-z0-9._-], not starting with "."."""
    return isinstance(name, str) and BRANCH_NAME.match(name) is not None and \
        not name.startswith(".")


def validate_branch(name):
    """Return name if it is a valid branch name, else raise InvalidInput."""
    if not _is_branch_name(name):
        raise InvalidInput(
            f"invalid branch name {_short(name)}: expected 1-128 of [A-Za-z0-9._-], "
            "not starting with '.'")
    return name


def _is_hash(text):
    return HASH_TEXT.match(text) is not None


def validate_hash(text, what="hash"):
    """Return text lowercased if it is 64 hex digits, else raise InvalidInput."""
    if not isinstance(text, str) or not _is_hash(text):
        raise InvalidInput(f"invalid {what} {_short(text)}: expected 64 hex digits")
    return text.lower()


def _target(path_or_hash):
    """Apply the hash-or-path rule: ("hash", h) or ("path", segments)."""
    segments = validate_path(path_or_hash)
    if len(segments) == 1 and _is_hash(segments[0]):
        return "hash", segments[0].lower()
    return "path", segments


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
#
# Core modules are checked by wasmtime's validator (wasmtime.Module.validate: function bodies
# included, at a small fraction of the cost of a compile) and for the one encoding that the
# validator accepts and wasmtime's compiler refuses (compact imports). wasmtime has no
# validator for components, so a component's core modules are validated, then the component
# is compiled without optimisation with every function body replaced by ``unreachable``
# padded with ``nop`` to its original size (offsets in messages stay the original's): an
# 18 MB componentize-py guest in about 0.6 s, against 7-12 s for a full compile. The binary
# format is read by kvhost.py's wasm reader, imported lazily as the run commands import
# kvhost; without kvhost.py core modules get wasmtime's validator alone, and components are
# refused with a one-line error saying so.

_engine_lock = threading.Lock()
_engines = {}   # purpose -> a lazily created wasmtime.Engine shared by every Store


def _wasmtime_engine(purpose="validate"):
    """The engine for the core validator ("validate": wasmtime's defaults, as kvhost runs
    them), or for checks by compiling ("check-compile": the same features, no
    optimisation)."""
    with _engine_lock:
        engine = _engines.get(purpose)
        if engine is None:
            wasmtime = _wasmtime()
            config = wasmtime.Config()
            if purpose == "check-compile":
                config.cranelift_opt_level = "none"
            else:   # handing bodies to worker threads: 25 us for 10 functions, 10 without
                config.parallel_compilation = False
            if not _engines:     # dropped before interpreter teardown, while wasmtime works
                atexit.register(_engines.clear)
            engine = _engines[purpose] = wasmtime.Engine(config)
        return engine


def _wasmtime():
    try:
        import wasmtime
        import wasmtime.component       # noqa: F401  (Component, for components)
    except ImportError:
        raise StoreError("validating modules needs the wasmtime package "
                         "(pip install -r requirements.txt)") from None
    return wasmtime


def _wasm_reader():
    """kvhost.py, where the project's wasm reader lives, or None if it is not next to this
    file."""
    try:
        return _kvhost()
    except StoreError:
        return None


def wasm_from_text(text, name="<text>"):
    """The binary of a module or component written in the WebAssembly text format (wasmtime's
    wat2wasm); InvalidModule naming `name` and the parser's message if it does not parse."""
    wasmtime = _wasmtime()                          # the clear error when wasmtime is missing
    try:
        return bytes(wasmtime.wat2wasm(text.decode("utf-8") if isinstance(text, bytes) else text))
    except UnicodeDecodeError as exc:
        raise InvalidModule(f"{name}: WebAssembly text must be UTF-8 ({exc.reason} at byte "
                            f"{exc.start})") from None
    except wasmtime.WasmtimeError as exc:
        lines = str(exc).strip().splitlines() or ["cannot be parsed"]
        where = re.search(r"--> .*:(\d+):(\d+)\s*$", str(exc), re.M)
        place = f" (line {where.group(1)}, column {where.group(2)})" if where else ""
        raise InvalidModule(f"{name}: invalid WebAssembly text: {lines[0].strip()[:300]}"
                            f"{place}") from None


def validate_module(data):
    """Raise InvalidModule unless wasmtime would compile data (bytes, bytearray or mmap): a
    core module or component that kvhost.py can run. The message is wasmtime's."""
    _validate_module(data, owned=False)


def _validate_module(data, owned):
    """validate_module; owned: data is a private, writable buffer (a copy-on-write map of
    a temp file) that may be stubbed in place instead of copied."""
    if not len(data):
        raise InvalidModule("invalid module: empty input: unexpected end-of-file (at offset 0x0)")
    if bytes(data[:8]) == COMPONENT_HEADER:
        _validate_component(data, owned)
    else:
        _validate_core(data)                # anything else gets the validator's message


def _validate_core(data, start=0, end=None):
    """Validate the core module at start..end of data with wasmtime's validator, then refuse
    what its compiler would (kvhost.check_core_imports)."""
    wasmtime = _wasmtime()
    end = len(data) if end is None else end
    whole = data if isinstance(data, bytes) and (start, end) == (0, len(data)) \
        else bytes(memoryview(data)[start:end])
    try:
        wasmtime.Module.validate(_wasmtime_engine(), whole)
    except wasmtime.WasmtimeError as exc:
        raise _invalid(exc) from None
    reader = _wasm_reader()
    if reader is not None:
        try:
            reader.check_core_imports(data, start, end)
        except reader.WasmFormatError as exc:
            raise InvalidModule(f"invalid module: {exc}") from None


def _validate_component(data, owned):
    reader = _wasm_reader()
    if reader is None:
        raise StoreError("validating a component needs kvhost.py next to wasmstore.py "
                         "(core modules need only wasmtime)")
    try:
        spans = reader.module_spans(data)
    except reader.WasmFormatError:
        spans = None                        # wasmtime's parser says what is wrong
    stub = data
    if spans:
        for start, end in spans:            # function bodies, before they are stubbed
            _validate_core(data, start, end)
        stub = data if owned else bytearray(data)
        for start, end in spans:
            reader.stub_function_bodies(stub, start, end)
    wasmtime = _wasmtime()
    try:
        wasmtime.component.Component(_wasmtime_engine("check-compile"), bytes(stub))
    except wasmtime.WasmtimeError as exc:
        error = _invalid(exc)
        if not reader.sections_fit(data):   # the spec's words for a truncated binary
            error = InvalidModule(str(error).replace(
                "invalid module: ", "invalid module: unexpected end-of-file: ", 1))
        raise error from None


def _invalid(exc):
    return InvalidModule("invalid module: " + " ".join(str(exc).split()))


def validate_module_file(filename):
    """validate_module for a file. A component is checked through a private map of it (it is
    stubbed in place, without a copy); anything else is read whole, as wasmtime's validator
    takes bytes only (and copies them): a map of it would be a third copy in memory."""
    with open(filename, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if not size:
            validate_module(b"")
        if os.pread(handle.fileno(), len(COMPONENT_HEADER), 0) != COMPONENT_HEADER:
            _validate_module(_read_exactly(handle.fileno(), size, 0), owned=False)
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            _validate_module(mapped, owned=True)


# ---------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------

def _sync(fd, data_only=False):
    """Make what was written to fd durable: every sync of the store goes through here.

    macOS: fcntl(F_FULLFSYNC), as SQLite does, since a plain fsync there stops at the drive's
    volatile cache; where a file system refuses it, fsync. Elsewhere fdatasync when only the
    data (and the size) must reach the disk, else fsync; Python has no os.fdatasync on macOS.
    Both are looked up per call (a syscall costs far more), so tests can take them away."""
    full_sync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_sync is not None:
        try:
            fcntl.fcntl(fd, full_sync)
            return
        except OSError:
            pass
    datasync = getattr(os, "fdatasync", None) if data_only else None
    if datasync is not None:
        datasync(fd)
    else:
        os.fsync(fd)


def _fsync_path(path, data_only=False):
    """Sync a file or a directory (a directory: the names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _sync(fd, data_only)
    finally:
        os.close(fd)


def _stat_key(path):
    """(inode, mtime, size) of a file, None if missing: tells a replaced file from a cached one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _read_exactly(fd, size, offset=None):
    """Read size bytes (fewer at end of file), at offset if given: one call for small reads."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = os.read(fd, remaining) if offset is None else os.pread(fd, remaining, offset)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
        if offset is not None:
            offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _write_all(fd, data, offset=None):
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _copy_range(source_fd, source_offset, target_fd, target_offset, count):
    """Copy count bytes between files in the kernel (copy_file_range), else by chunks."""
    while count > 0:
        try:
            copied = os.copy_file_range(source_fd, target_fd, min(count, 1 << 30),
                                        source_offset, target_offset)
        except (AttributeError, OSError):
            copied = None
        if not copied:
            chunk = os.pread(source_fd, min(count, CHUNK_SIZE), source_offset)
            if not chunk:
                raise StoreError("a file shrank while it was being copied")
            _write_all(target_fd, chunk, target_offset)
            copied = len(chunk)
        source_offset += copied
        target_offset += copied
        count -= copied


def _unlink_quietly(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_temp_names = itertools.count()


def _new_temp(directory, mode=0o600, prefix=""):
    """(path, fd) of a new file "<prefix><pid>-<n>-<random>.tmp" in directory: the pid lets a
    later writer tell a killed writer's debris (see _remove_debris)."""
    name = f"{prefix}{os.getpid()}-{next(_temp_names)}-{os.urandom(4).hex()}.tmp"
    path = os.path.join(directory, name)
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)


def _write_whole(path, data, tmp_dir, *, exclusive=False, mode=0o644, durable=True,
                 prefix=""):
    """The one way a file is put in place whole: write a temp file in tmp_dir (data: bytes,
    an iterable of chunks, or a function that writes into the binary file it is given),
    fsync it, rename it over path (exclusive: link it, False if path exists), fsync path's
    directory. durable=False skips both syncs (derived files, which are checked when read).
    tmp_dir must be on path's file system; prefix starts the temp file's name. True when
    path was written."""
    tmp, fd = _new_temp(tmp_dir, mode, prefix)
    try:
        try:
            if callable(data):
                with open(fd, "wb", closefd=False) as handle:
                    data(handle)
            else:
                for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
                    _write_all(fd, chunk)
            if durable:
                _sync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.rename(tmp, path)
        if durable:
            _fsync_path(os.path.dirname(path))
        return True
    finally:
        _unlink_quietly(tmp)


def _export_directory(path):
    """Make the directory export writes into; StoreError in a line of its own when a file
    (or anything else that is not a directory) stands there or the system refuses."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"cannot export into {path!r}: a file that is not a directory is in "
                         "the way") from None
    except OSError as exc:
        raise StoreError(f"cannot export into {path!r}: {exc.strerror}") from None


def _remove_debris(directory, prefix=""):
    """Delete the temp files _new_temp made in directory (with prefix) whose writer is dead
    (its pid is gone) or that are older than a day: what a killed writer leaves."""
    now = time.time()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        path = os.path.join(directory, name)
        pid = name[len(prefix):].split("-", 1)[0]
        try:
            age = now - os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        dead = pid.isascii() and pid.isdigit() and int(pid) != os.getpid() \
            and not _pid_alive(int(pid))
        if dead or age > STALE_TMP_SECONDS:
            _unlink_quietly(path)


def _format_date(seconds):
    """A commit date (Unix seconds) as RFC 3339 UTC text, "2026-12-07T03:00:00Z": the one
    form the CLI (log, audit) and OCI annotations print."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


_json_string = json.encoder.encode_basestring      # JSON string literal, non-ASCII kept


def _canonical_json(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _corrupt(digest):
    """The one wording of a failed hash check (reads and fsck alike)."""
    return CorruptObject(f"object {digest} is corrupt (its content does not match its hash); "
                         "run fsck")


def _verified(data, digest):
    """data, after checking that its SHA-256 is digest (else CorruptObject)."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise _corrupt(digest)
    return data


class Cache:
    """A thread-safe map bounded by the total weight of what it holds (each value weighs 1
    unless put() says otherwise); when it is full, the oldest insertions leave first. get()
    is a plain dict read, without a lock: it is on the path of every find. The one cache
    type of the store and of http_server.py. A cache of answers derived from the refs keys
    them by Store.generation(), so that an answer given before any ref changed is never
    returned after: stale keys are simply never asked for again and age out."""

    def __init__(self, max_weight):
        self.max_weight = max_weight
        self._values = collections.OrderedDict()   # oldest first; popped from the front
        self._weights = {}
        self._total = 0
        self._lock = threading.Lock()
        self.get = self._values.get                # get(key, default=None)

    def __len__(self):
        return len(self._values)

    def put(self, key, value, weight=1):
        """Keep value under key (replacing any older one); too heavy a value is not kept."""
        with self._lock:
            self._drop(key)
            if weight > self.max_weight:
                return
            self._values[key] = value
            self._weights[key] = weight
            self._total += weight
            while self._total > self.max_weight:
                self._drop(next(iter(self._values)))

    def discard(self, key):
        """Forget key, if it is held."""
        with self._lock:
            self._drop(key)

    def clear(self):
        """Forget everything."""
        with self._lock:
            self._values.clear()
            self._weights.clear()
            self._total = 0

    def _drop(self, key):
        weight = self._weights.pop(key, None)
        if weight is not None:
            self._total -= weight
            del self._values[key]


_valid_paths = Cache(8192)            # validate_path's answers: valid paths repeat


class SharedFd:
    """An open descriptor closed when the last user drops it: threads that read through a
    shared descriptor keep it alive, so replacing it (or evicting it from a Cache) never
    closes one in use. http_server.py shares open module files between replies with it."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def __del__(self, _close=os.close):       # bound now: module globals may be gone at exit
        try:
            _close(self.fd)
        except OSError:
            pass


class _Batch:
    """Objects one change writes, in write order (modules, then trees bottom-up, then the
    commit): new (hash -> bytes or temp file name) and the parsed trees/commits."""

    def __init__(self):
        self.blobs = {}        # hash -> bytes, or a temp file name holding the bytes
        self.kinds = {}        # hash -> "module" | "tree" | "commit"
        self.parsed = {}       # hash -> parsed tree/commit, cached once the batch lands

    def add(self, digest, kind, data, parsed=None):
        self.blobs[digest] = data
        self.kinds[digest] = kind
        if parsed is not None:
            self.parsed[digest] = parsed


# ---------------------------------------------------------------------------
# object store
# ---------------------------------------------------------------------------

PACK_MAGIC = b"WSO1"                         # a pack record: wasmstore object, format 1
_RECORD_FIELDS = struct.Struct(">4sc3xQ32s")  # magic, kind code, payload length, SHA-256
RECORD_HEADER_BYTES = _RECORD_FIELDS.size + 4   # the fields and their CRC-32
INDEX_MAGIC = b"WSI1"                        # a pack index, format 1
_INDEX_HEAD = struct.Struct(">4s4xQQ")       # magic, pack bytes covered, entry count
_INDEX_ENTRY = struct.Struct(">32sQQ")       # SHA-256, payload offset, kind code << 56 | length
_LENGTH_MASK = (1 << 56) - 1
_KIND_CODES = {"module": b"m", "tree": b"t", "commit": b"c", "ref": b"r"}   # "ref": no object
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
MAX_REF_RECORD_BYTES = 512            # "<branch> <sequence 16 hex> <head | none>" fits easily
_PACK_NAME = re.compile(r"[0-9a-f]{16}\.pack\Z")


def _pack_name(number):
    return f"{number:016x}.pack"


def _index_name(number):
    return f"{number:016x}.idx"


def _record_header(kind, digest, length):
    fields = _RECORD_FIELDS.pack(PACK_MAGIC, _KIND_CODES[kind], length, bytes.fromhex(digest))
    return fields + zlib.crc32(fields).to_bytes(4, "big")


def _parse_record_header(buffer, position=0):
    """(kind, payload length, hex digest) of the record header at position; None if the
    bytes there are not a whole, intact header (a torn tail, damage, or too few bytes)."""
    end = position + RECORD_HEADER_BYTES
    if len(buffer) < end:
        return None
    fields = bytes(buffer[position:end - 4])
    if int.from_bytes(buffer[end - 4:end], "big") != zlib.crc32(fields):
        return None
    magic, code, length, raw = _RECORD_FIELDS.unpack(fields)
    kind = _CODE_KINDS.get(code)
    if magic != PACK_MAGIC or kind is None:
        return None
    return kind, length, raw.hex()


def _ref_record(branch, sequence, head):
    """(hash, payload) of a ref record: a branch's move to head at sequence, journaled in the
    pack with the objects it needs (see _ObjectStore.write)."""
    payload = f"{branch} {sequence:016x} {head}".encode("ascii")
    return hashlib.sha256(payload).hexdigest(), payload


def _parse_ref_record(payload, digest):
    """(branch, sequence, head or "none") of an intact ref record's payload, else None."""
    if hashlib.sha256(payload).hexdigest() != digest:
        return None                            # torn or damaged: never applied
    parts = payload.decode("ascii", "replace").split(" ")
    if len(parts) != 3 or not _is_branch_name(parts[0]) or \
            not (parts[2] == _NO_COMMITS or _is_hash(parts[2])):
        return None
    try:
        return parts[0], int(parts[1], 16), parts[2]
    except ValueError:
        return None


def _index_bytes(entries, covered):
    """A pack index: the records sorted by hash (one per hash), then a CRC-32 of it all."""
    rows = sorted((bytes.fromhex(digest), offset, _KIND_CODES[kind][0] << 56 | length)
                  for digest, (offset, length, kind) in entries.items())
    body = b"".join([_INDEX_HEAD.pack(INDEX_MAGIC, covered, len(rows))] +
                    [_INDEX_ENTRY.pack(*row) for row in rows])
    return body + zlib.crc32(body).to_bytes(4, "big")


def _index_count(data):
    """The entry count of an intact index (mmap or bytes), None if it is damaged."""
    if len(data) < _INDEX_HEAD.size + 4:
        return None
    magic, _, count = _INDEX_HEAD.unpack_from(data)
    if magic != INDEX_MAGIC or len(data) != _INDEX_HEAD.size + count * _INDEX_ENTRY.size + 4:
        return None
    with memoryview(data) as view:
        if zlib.crc32(view[:-4]) != int.from_bytes(view[-4:], "big"):
            return None
    return count


class _RefRecord(collections.namedtuple(
        "_RefRecord", "sequence head segment verify_from offset end")):
    """A ref record found in a pack: a branch's move to head at sequence; its record spans
    offset..end of segment, and the object records from verify_from (the end of the ref
    record before it) to offset were written since the last sync known to have returned."""


class _Segment:
    """One pack file as a reader sees it: the prefix its index covers (objects/pack/<n>.idx,
    bisected in a map) and the records after it, found by scanning. Scanning stops at the
    first header that is not whole and intact: a killed writer's torn tail is never
    indexed (the next writer truncates it). Ref records past the index are not objects:
    the newest per branch is kept in refs (see Store._catch_up_refs)."""

    def __init__(self, directory, number):
        self.number = number
        self.path = os.path.join(directory, _pack_name(number))
        self.file = SharedFd(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))
        self.covered = 0             # bytes of the file indexed (index + scanned records)
        self.entries = {}            # hex digest -> (payload offset, length, kind) past the index
        self.refs = {}               # branch -> _RefRecord of its newest ref record past the index
        self.unchecked = set()       # branches whose ref record another writer appended
        self._index = None
        self._index_count = 0
        self._lock = threading.Lock()
        self._load_index(os.path.join(directory, _index_name(number)))
        self._indexed = self.covered  # bytes the index covers
        self.durable = self.covered  # bytes known synced (an index covers a synced prefix)
        self._ref_end = self.covered  # where the last intact ref record ends

    def _load_index(self, path):
        try:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, ValueError):        # ValueError: an empty (lost) index
            return
        count = _index_count(mapped)
        if count is None:                              # damaged: scan the whole pack instead
            mapped.close()
            return
        self._index, self._index_count = mapped, count
        self.covered = _INDEX_HEAD.unpack_from(mapped)[1]

    def find(self, digest):
        """(payload offset, length, kind) of a record, None if this pack has none."""
        entry = self.entries.get(digest)
        if entry is None and self._index_count:
            entry = self._bisect(bytes.fromhex(digest))
        return entry

    def _bisect(self, raw):
        index, low, high = self._index, 0, self._index_count
        while low < high:
            middle = (low + high) // 2
            start = _INDEX_HEAD.size + middle * _INDEX_ENTRY.size
            if index[start:start + 32] < raw:
                low = middle + 1
            else:
                high = middle
        if low == self._index_count:
            return None
        return self._entry(low, raw)

    def _entry(self, position, raw=None):
        key, offset, packed = _INDEX_ENTRY.unpack_from(
            self._index, _INDEX_HEAD.size + position * _INDEX_ENTRY.size)
        if raw is not None and key != raw:
            return None
        return offset, packed & _LENGTH_MASK, _CODE_KINDS[bytes([packed >> 56])]

    def items(self):
        """{hex digest: (payload offset, length, kind)} of every record indexed."""
        found = {}
        for position in range(self._index_count):
            start = _INDEX_HEAD.size + position * _INDEX_ENTRY.size
            found[self._index[start:start + 32].hex()] = self._entry(position)
        found.update(self.entries)
        return found

    def scan(self):
        """Index the records appended since the last scan; returns the file's size."""
        with self._lock:
            size = os.fstat(self.file.fd).st_size
            if size < self.covered:
                self._forget_tail(size)
            position, buffer, buffer_start = self.covered, b"", self.covered
            while position + RECORD_HEADER_BYTES <= size:
                relative = position - buffer_start
                if relative + RECORD_HEADER_BYTES > len(buffer):
                    buffer_start, relative = position, 0
                    buffer = os.pread(self.file.fd, min(CHUNK_SIZE, size - position), position)
                header = _parse_record_header(buffer, relative)
                if header is None:
                    break                       # a torn or damaged tail: ignored
                kind, length, digest = header
                end = position + RECORD_HEADER_BYTES + length
                if end > size:
                    break                       # still being written, or cut by a kill
                if kind != "ref":
                    self.entries[digest] = (position + RECORD_HEADER_BYTES, length, kind)
                elif length <= MAX_REF_RECORD_BYTES:
                    start = relative + RECORD_HEADER_BYTES
                    payload = buffer[start:start + length] if start + length <= len(buffer) \
                        else os.pread(self.file.fd, length, position + RECORD_HEADER_BYTES)
                    self._note_ref(_parse_ref_record(payload, digest), position, end, True)
                position = end
            self.covered = position
            return size

    def _forget_tail(self, size):
        """Forget every record scanned past the index: the file is now shorter than what was
        scanned (a writer whose append failed cut it off), and an append at the old end
        would leave a hole no later scan gets past. The tail is scanned again; its ref
        records are checked again (those applied already are no-ops). What is still there
        stays findable meanwhile (readers look without the lock)."""
        self.entries = {digest: entry for digest, entry in self.entries.items()
                        if entry[0] + entry[1] <= size}
        self.refs = {branch: record for branch, record in self.refs.items()
                     if record.end <= size}
        self.covered = self._ref_end = self._indexed
        self.durable = min(self.durable, size)

    def _note_ref(self, record, offset, end, foreign):
        if record is None:
            return                              # a damaged ref record is skipped, not applied
        branch, sequence, head = record
        known = self.refs.get(branch)
        if known is None or sequence >= known.sequence:    # on a tie the later one stands
            self.refs[branch] = _RefRecord(sequence, head, self, self._ref_end, offset, end)
            if foreign:
                self.unchecked.add(branch)
        self._ref_end = end

    def durable_to(self, offset):
        """Note that the bytes before offset are synced (a ref record there was applied, so
        its writer's sync returned; or this process synced)."""
        self.durable = max(self.durable, offset)

    def note(self, start, end, entries, ref=None):
        """Records this process appended at start..end (already durable); ref: (branch,
        sequence, head, record offset) of the ref record among them."""
        with self._lock:
            if self.covered == start:
                self.entries.update(entries)
                if ref is not None:
                    self._note_ref(ref[:3], ref[3], end, False)
                self.covered = end
            self.durable_to(end)

    def read(self, offset, length):
        return _read_exactly(self.file.fd, length, offset)


class _ObjectStore:
    """Every object, by SHA-256: packed records (objects/pack/) and loose files
    (objects/<2 hex>/<62 hex>: modules written out to be served as files).

    Reads are hash-checked. A change's new objects, then the ref record of the branch move
    they make, are appended to the active pack in one write (temp files copied in the
    kernel) and made durable by one fdatasync; starting a new pack adds one fsync of its
    directory. Callers append only under the ref lock, so there is one appender at a time
    across threads and processes, always to the highest-numbered pack. A module served as a
    file gets a loose copy written durably on first use (module_file); loose and packed
    copies of an object are the same object. before_seal (set by the Store) makes every
    ref slot durable before a pack's records are indexed or rewritten: ref records past an
    index are all that recovery reads.
    """

    def __init__(self, root, tmp_dir, before_seal=lambda: None):
        self.before_seal = before_seal
        self.directory = os.path.join(root, "objects")
        self.pack_dir = os.path.join(self.directory, "pack")
        self.tmp_dir = tmp_dir
        self._segments = ()                  # newest first; replaced whole, read lock-free
        self._refresh_lock = threading.Lock()
        self._writer = None                  # (SharedFd open for writing, segment number)
        self._unsynced_pack_dir = False      # a new pack's name not yet fsynced
        self._whole = Cache(200_000)           # hashes read back or written here
        self._checked_files = Cache(200_000)   # module hash -> stat key of its checked file
        self._known_dirs = set()

    def loose_path(self, digest):
        return os.path.join(self.directory, digest[:2], digest[2:])

    # -- finding -----------------------------------------------------------------------------------

    def refresh(self):
        """Re-read the pack directory: new packs opened, vanished ones dropped (descriptors
        stay open while a reader uses them), every pack's new records indexed."""
        with self._refresh_lock:
            try:
                names = os.listdir(self.pack_dir)
            except FileNotFoundError:
                names = []
            numbers = sorted((int(name[:16], 16) for name in names if _PACK_NAME.match(name)),
                             reverse=True)
            current = {segment.number: segment for segment in self._segments}
            segments = []
            for number in numbers:
                segment = current.get(number)
                if segment is None:
                    try:
                        segment = _Segment(self.pack_dir, number)
                    except FileNotFoundError:
                        continue                # deleted by gc meanwhile
                segment.scan()
                segments.append(segment)
            self._segments = tuple(segments)

    def _packed(self, digest):
        for segment in self._segments:
            entry = segment.find(digest)
            if entry is not None:
                return (segment,) + entry
        return None

    def _locations(self, digest):
        """Where an object may be, most likely first: a packed record (segment, offset,
        length, kind), the loose file (None); a miss rescans the packs once."""
        packed = self._packed(digest)
        if packed is not None:
            yield packed
        yield None
        if packed is None:
            self.refresh()
            packed = self._packed(digest)
            if packed is not None:
                yield packed

    def _read_at(self, location, digest):
        if location is None:
            fd = os.open(self.loose_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = _read_exactly(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        else:
            segment, offset, length, _ = location
            data = segment.read(offset, length)
        return _verified(data, digest)

    def read(self, digest):
        """The bytes of an object, hash-checked; NotFound or CorruptObject."""
        problem = None
        for location in self._locations(digest):
            try:
                data = self._read_at(location, digest)
            except FileNotFoundError:
                continue
            except CorruptObject as exc:
                problem = exc                    # another copy may be whole
                continue
            self._whole.put(digest, True)
            return data
        raise problem or NotFound(f"no such object {digest}")

    def head(self, digest, count):
        """(size, first `count` bytes) of a stored object, without reading (or checking) the
        rest: what a listing shows of each module. NotFound when it is not stored."""
        for location in self._locations(digest):
            if location is not None:
                segment, offset, length, _ = location
                return length, segment.read(offset, min(count, length))
            try:
                fd = os.open(self.loose_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                return os.fstat(fd).st_size, os.pread(fd, count, 0)
            finally:
                os.close(fd)
        raise NotFound(f"no such object {digest}")

    def is_module(self, digest):
        """True if a module object with this hash is stored (packed or loose)."""
        for location in self._locations(digest):
            if location is not None:
                return location[3] == "module"
            try:
                with open(self.loose_path(digest), "rb") as handle:
                    return handle.read(4) == WASM_MAGIC
            except FileNotFoundError:
                continue
        return False

    def is_commit(self, digest):
        """True if a packed commit with this hash is stored (commits are never loose)."""
        packed = self._packed(digest)
        return packed is not None and packed[3] == "commit"

    def chunks(self, digest):
        """Yield an object's bytes in chunks; CorruptObject after the last chunk when they
        do not match the hash (callers discard what they wrote)."""
        for location in self._locations(digest):
            try:
                if location is None:
                    source = SharedFd(os.open(self.loose_path(digest), os.O_RDONLY | os.O_CLOEXEC))
                    offset, length = 0, os.fstat(source.fd).st_size
                else:
                    source, offset, length = location[0].file, location[1], location[2]
            except FileNotFoundError:
                continue
            yield from _checked_chunks(source, offset, length, digest)
            return
        raise NotFound(f"no such object {digest}")

    def module_file(self, digest):
        """A loose file holding exactly a module's bytes (written durably from its pack the
        first time), hash-checked once per file version. NotFound for other objects."""
        path = self.loose_path(digest)
        key = _stat_key(path)
        if key is None:
            location = next((loc for loc in self._locations(digest) if loc is not None), None)
            if location is None or location[3] != "module":
                raise NotFound(f"no such module {digest}")
            self._materialise(location, digest, path)
            key = _stat_key(path)
        if self._checked_files.get(digest) != key:
            head = b""
            for chunk in _checked_chunks(SharedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)), 0,
                                         key[2], digest):
                head = head or chunk[:4]
            if head != WASM_MAGIC:
                raise NotFound(f"no such module {digest}")
            self._checked_files.put(digest, key)
        return path

    def _materialise(self, location, digest, path):
        segment, offset, length, _ = location
        created = self._ensure_dir(os.path.dirname(path))
        _write_whole(path, _checked_chunks(segment.file, offset, length, digest),
                     self.tmp_dir, exclusive=True, mode=0o444)
        if created:
            _fsync_path(self.directory)

    def _ensure_dir(self, directory):
        """Create a fan-out directory if needed; True if this call created it."""
        if directory in self._known_dirs:
            return False
        try:
            os.mkdir(directory)
            created = True
        except FileExistsError:
            created = False
        self._known_dirs.add(directory)
        return created

    # -- writing -----------------------------------------------------------------------------------

    def _has_whole(self, digest, kind):
        """True if an intact copy is stored. A packed copy this process has not written or
        read back is read and checked first: a killed writer's torn record must never stand
        in for the object a new change needs. One known whole is still looked up in the
        packs as they are now (callers hold the ref lock and rescanned): gc in another
        process, or a failed append cut off, may have dropped it since."""
        packed = self._packed(digest)
        if packed is None:
            # Loose files are modules, and land whole (linked into place).
            return kind == "module" and os.path.exists(self.loose_path(digest))
        if self._whole.get(digest):
            return True
        try:
            self._read_at(packed, digest)
            self._whole.put(digest, True)
            return True
        except (CorruptObject, OSError):
            return False

    def write(self, batch, ref=None):
        """Make a batch's new objects durable, and with them ref, a (branch, sequence, head)
        move journaled as a ref record after them: one write, one fdatasync (callers hold
        the ref lock). The record comes last, so a kill that leaves it intact left the
        whole write (after a crash, Store._catch_up_refs checks the objects too)."""
        records = [(digest, batch.kinds[digest], data) for digest, data in batch.blobs.items()
                   if not self._has_whole(digest, batch.kinds[digest])]
        if not records and ref is None:
            return
        writer, segment = self._writable()
        start = position = segment.covered
        if segment.durable < start:      # a killed writer's records, which this may reuse
            _sync(writer.fd, data_only=True)
            segment.durable_to(start)
        entries, noted = {}, None
        try:
            pending = bytearray()
            for digest, kind, data in records:
                if isinstance(data, (bytes, bytearray)):
                    pending += _record_header(kind, digest, len(data))
                    entries[digest] = (position + len(pending), len(data), kind)
                    pending += data
                    continue
                source = os.open(data, os.O_RDONLY | os.O_CLOEXEC)   # an ingested temp file
                try:
                    size = os.fstat(source).st_size
                    pending += _record_header(kind, digest, size)
                    _write_all(writer.fd, pending, position)
                    position += len(pending)
                    pending = bytearray()
                    entries[digest] = (position, size, kind)
                    _copy_range(source, 0, writer.fd, position, size)
                    position += size
                finally:
                    os.close(source)
            if ref is not None:
                noted = ref + (position + len(pending),)
                digest, payload = _ref_record(*ref)
                pending += _record_header("ref", digest, len(payload)) + payload
            _write_all(writer.fd, pending, position)
            position += len(pending)
            _sync(writer.fd, data_only=True)
            if self._unsynced_pack_dir:
                _fsync_path(self.pack_dir)
                self._unsynced_pack_dir = False
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(writer.fd, start)          # nothing half-written stays behind
            raise
        segment.note(start, position, entries, noted)
        for digest in entries:
            self._whole.put(digest, True)

    def _writable(self):
        """(SharedFd open for writing, its _Segment) of the pack to append to; a full pack is
        sealed with its index and a new one started."""
        while True:
            if self._writer is None:
                self.refresh()
                if not self._segments:
                    self._create_pack(1)
                    continue
                number = self._segments[0].number
                path = os.path.join(self.pack_dir, _pack_name(number))
                try:
                    self._writer = (SharedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC)), number)
                except FileNotFoundError:
                    continue
            writer, number = self._writer
            segment = next((s for s in self._segments if s.number == number), None)
            if segment is None or os.fstat(writer.fd).st_nlink == 0:   # gc replaced it
                self._writer = None
                continue
            if segment.scan() > segment.covered:
                os.ftruncate(writer.fd, segment.covered)     # a killed writer's torn tail
            if segment.covered < SEGMENT_BYTES:
                return writer, segment
            _sync(writer.fd, data_only=True)   # a sealed pack is durable whole, a killed
            self.before_seal()                 # writer's last records too; then the refs
            self._seal(segment)
            self._writer = None
            self._create_pack(number + 1)

    def scan_newest(self):
        """Index what other writers appended to the pack appended to (under the ref lock:
        everything they appended); a replaced or full one means the directory is read
        again, for the pack that follows it."""
        segment = self._segments[0] if self._segments else None
        if segment is None or os.fstat(segment.file.fd).st_nlink == 0 or \
                segment.scan() >= SEGMENT_BYTES:
            self.refresh()

    def unchecked_refs(self):
        """{branch: _RefRecord}: the newest ref record of each branch that scans found since
        the last call and this process did not write."""
        found = {}
        for segment in reversed(self._segments):          # oldest first: newer ones win
            while segment.unchecked:
                branch = segment.unchecked.pop()
                record = segment.refs.get(branch)       # None: cut off meanwhile
                if record is None:
                    continue
                if branch not in found or record.sequence >= found[branch].sequence:
                    found[branch] = record
        return found

    def newest_ref_sequence(self, branch):
        """The highest sequence of the ref records of branch found past the indexes (0 if
        none): a branch made again must start above them."""
        return max((segment.refs[branch].sequence for segment in self._segments
                    if branch in segment.refs), default=0)

    def make_durable(self, record):
        """Sync the pack of a ref record not yet applied, then check the object records
        written with it (from the ref record before it): True when all are intact, so it
        may be applied. After a crash, what its sync had not yet covered may be torn or
        missing; a writer syncs what others left unsynced before it appends (write), so
        nothing older needs checking. OSError when the sync or a read fails: whether the
        record stands is then unknown (it may hold an acknowledged change), not False."""
        segment = record.segment
        scanned = segment.covered
        _sync(segment.file.fd, data_only=True)
        segment.durable_to(scanned)
        try:
            for digest, (offset, length, _) in list(segment.entries.items()):
                if record.verify_from <= offset < record.offset:
                    for _ in _checked_chunks(segment.file, offset, length, digest):
                        pass
        except CorruptObject:
            return False
        return True

    def _create_pack(self, number):
        try:
            fd = os.open(os.path.join(self.pack_dir, _pack_name(number)),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return                               # another writer started it
        os.close(fd)
        self._unsynced_pack_dir = True
        self.refresh()

    def _seal(self, segment):
        """Write a pack's index. Not fsynced: it is derived data, checked when loaded and
        replaced by a scan of the pack when lost or damaged."""
        path = os.path.join(self.pack_dir, _index_name(segment.number))
        try:
            with open(path, "rb") as handle:
                existing = handle.read(_INDEX_HEAD.size)
            if len(existing) == _INDEX_HEAD.size and \
                    _INDEX_HEAD.unpack(existing)[1] >= segment.covered:
                return
        except FileNotFoundError:
            pass
        _write_whole(path, _index_bytes(segment.items(), segment.covered), self.tmp_dir,
                     mode=0o444, durable=False)

    # -- whole-store passes ------------------------------------------------------------------------

    def loose_digests(self, problems=None):
        """Yield (hash, file name) of every loose object; other files are reported."""
        for fanout in sorted(os.listdir(self.directory)):
            directory = os.path.join(self.directory, fanout)
            if fanout == "pack":
                continue
            if len(fanout) != 2 or not os.path.isdir(directory):
                if problems is not None:
                    problems.append(f"unexpected file objects/{fanout}")
                continue
            for name in sorted(os.listdir(directory)):
                digest = fanout + name
                if not _is_hash(digest) or digest != digest.lower():
                    if problems is not None:
                        problems.append(f"unexpected file objects/{fanout}/{name}")
                    continue
                yield digest, os.path.join(directory, name)

    def check(self, problems):
        """fsck of the objects: every loose file and packed record hash-checked and parsed
        (streamed: memory stays flat). Returns {hash: kind or None when damaged}."""
        kinds = {}
        self.refresh()
        for segment in reversed(self._segments):
            for digest, (offset, length, kind) in sorted(segment.items().items(),
                                                         key=lambda item: item[1][0]):
                header = _parse_record_header(
                    segment.read(offset - RECORD_HEADER_BYTES, RECORD_HEADER_BYTES))
                if header != (kind, length, digest):
                    problems.append(f"pack {_pack_name(segment.number)}: the record header "
                                    f"of object {digest} at offset {offset} is damaged")
                    kinds.setdefault(digest, None)
                    continue
                found = _check_object(segment.file, offset, length, digest, problems)
                if found is not None and found != kind:
                    problems.append(f"object {digest} is a {found} stored as a {kind}")
                    found = None
                if kinds.get(digest) is None:
                    kinds[digest] = found
        for digest, path in self.loose_digests(problems):
            try:
                source = SharedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                found = _check_object(source, 0, os.fstat(source.fd).st_size, digest,
                                      problems)
            except OSError as exc:
                problems.append(f"object {digest} cannot be read: {exc.strerror}")
                found = None
            if kinds.get(digest) is None:
                kinds[digest] = found
        return kinds

    def compact(self, reachable):
        """gc's sweep: drop every object not in reachable. Unreachable loose files are
        deleted; packs holding anything to drop (unreachable records, duplicates, packed
        copies of loose modules) are rewritten into one new pack, made durable and sealed
        before they are deleted, so a kill at any point loses nothing reachable. Readers that
        hold a deleted pack open keep reading it; others find the objects in the new one.
        Returns (objects dropped, their bytes)."""
        self.refresh()
        loose = {digest: path for digest, path in self.loose_digests()}
        keep, dirty, dropped = {}, [], {}
        for segment in self._segments:
            garbage = segment.scan() > segment.covered           # a torn tail
            for digest, (offset, length, kind) in segment.items().items():
                if digest not in reachable:
                    dropped[digest] = length
                    garbage = True
                elif digest in keep:                             # a second copy
                    garbage = True
                else:
                    keep[digest] = (segment, offset, length, kind)
            if garbage or len(self._segments) > MAX_PACKS:
                dirty.append(segment)             # many packs: merged into one
        if dirty and self._segments[0] not in dirty:
            dirty.append(self._segments[0])       # writers append only to the newest pack
        if dirty:
            self.before_seal()                    # the ref records in them are applied
            # A module written out as a file needs no packed copy, if the file is whole.
            moving = {digest: location for digest, location in keep.items()
                      if location[0] in dirty and not (
                          location[3] == "module" and digest in loose and
                          self._loose_is_whole(digest, loose[digest]))}
            if moving:
                self._write_pack(moving)
            for segment in dirty:
                _unlink_quietly(os.path.join(self.pack_dir, _index_name(segment.number)))
                _unlink_quietly(segment.path)
            self._writer = None
            self.refresh()
        for digest, path in loose.items():
            if digest not in reachable:
                key = _stat_key(path)
                _unlink_quietly(path)
                self._checked_files.discard(digest)
                dropped.setdefault(digest, key[2] if key else 0)
        for digest in dropped:
            self._whole.discard(digest)
        return len(dropped), sum(dropped.values())

    def _loose_is_whole(self, digest, path):
        key = _stat_key(path)
        if key is None:
            return False
        if self._checked_files.get(digest) == key:
            return True
        try:
            for _ in _checked_chunks(SharedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)), 0,
                                     key[2], digest):
                pass
        except (CorruptObject, OSError):
            return False
        self._checked_files.put(digest, key)
        return True

    def _write_pack(self, moving):
        """A new, sealed pack holding the given records, copied in the kernel; durable
        (data and name) before this returns."""
        self.refresh()
        number = (self._segments[0].number if self._segments else 0) + 1
        path = os.path.join(self.pack_dir, _pack_name(number))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        entries = {}
        try:
            position = 0
            for digest, (segment, offset, length, kind) in moving.items():
                _write_all(fd, _record_header(kind, digest, length), position)
                position += RECORD_HEADER_BYTES
                _copy_range(segment.file.fd, offset, fd, position, length)
                entries[digest] = (position, length, kind)
                position += length
            _sync(fd, data_only=True)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        _fsync_path(self.pack_dir)
        self.refresh()
        segment = next(s for s in self._segments if s.number == number)
        self._seal(segment)

    def pack_stream(self, digests):
        """(size, file object) of a pack holding the given objects (for backups), each
        hash-checked as it streams."""
        locations = []
        size = 0
        for digest in digests:
            location = self._packed(digest)
            loose = None if location else _stat_key(self.loose_path(digest))
            if location is None and loose is None:
                self.refresh()
                location = self._packed(digest)
                if location is None:
                    raise NotFound(f"no such object {digest}")
            if location is None:
                kind, length = "module", loose[2]          # loose objects are modules
            else:
                kind, length = location[3], location[2]
            locations.append((digest, kind, length))
            size += RECORD_HEADER_BYTES + length
        return size, io.BufferedReader(_PackReader(self, locations), CHUNK_SIZE)


def _checked_chunks(source, offset, length, digest):
    """Yield length bytes of source (an SharedFd) from offset in chunks, hashing them;
    CorruptObject after the last one when they do not make digest."""
    hasher = hashlib.sha256()
    for chunk in _pread_chunks(source.fd, offset, length):
        hasher.update(chunk)
        yield chunk
    if hasher.hexdigest() != digest:
        raise _corrupt(digest)


def _pread_chunks(fd, offset, length):
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(CHUNK_SIZE, end - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _check_object(source, offset, length, digest, problems):
    """fsck of one object streamed from source (an SharedFd): its kind, or None with the
    problem reported (a failed hash check, or bytes that are no module, tree or commit)."""
    head, small = None, []
    try:
        for chunk in _checked_chunks(source, offset, length, digest):
            head = chunk[:4] if head is None else head
            if head[:1] == b"{" and length <= MAX_PARSED_OBJECT_BYTES:
                small.append(chunk)
        if head == WASM_MAGIC:
            return "module"
        if head and head[:1] == b"{" and length <= MAX_PARSED_OBJECT_BYTES:
            return _parse_object(b"".join(small), digest)[0]
        raise _not_an_object(digest)
    except CorruptObject as exc:
        problems.append(str(exc))
        return None


class _PackReader(io.RawIOBase):
    """A pack's bytes produced record by record from stored objects (a backup member)."""

    def __init__(self, objects, locations):
        super().__init__()
        self._parts = self._generate(objects, locations)
        self._buffer = b""

    @staticmethod
    def _generate(objects, locations):
        for digest, kind, length in locations:
            yield _record_header(kind, digest, length)
            produced = 0
            for chunk in objects.chunks(digest):
                produced += len(chunk)
                yield chunk
            if produced != length:
                raise _corrupt(digest)

    def readable(self):
        return True

    def readinto(self, target):
        while not self._buffer:
            self._buffer = next(self._parts, b"")
            if not self._buffer:
                return 0
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count


# ---------------------------------------------------------------------------
# refs
# ---------------------------------------------------------------------------

REF_SLOT_BYTES = 128                  # one slot: "ref <sequence> <head> <crc32>", padded
REF_FILE_BYTES = 2 * REF_SLOT_BYTES   # two slots: a torn write spoils at most the older one
GENERATION_BYTES = 8                  # refs/generation: a counter every ref or HEAD change bumps
_NO_COMMITS = "none"
_DELETED = "deleted"                  # written into a deleted ref's (nameless) file for readers


def _ref_slot(sequence, value):
    body = f"ref {sequence:016x} {value}"
    line = f"{body} {zlib.crc32(body.encode('ascii')):08x}"
    return line.ljust(REF_SLOT_BYTES - 1).encode("ascii") + b"\n"


def _ref_file(value, floor=0):
    """A new ref file. Its sequence starts at the time in nanoseconds, above any ref record a
    deleted branch of the same name left in the packs (see Store._catch_up_refs), and at
    floor at least (past the records seen, should the clock have stepped back)."""
    sequence = max(time.time_ns(), floor)
    return _ref_slot(sequence + 1, value) + _ref_slot(sequence, value)


def _parse_ref_slot(data):
    """(sequence, value) of an intact slot, None for a torn or damaged one."""
    body, _, crc = data.decode("ascii", "replace").rstrip().rpartition(" ")
    parts = body.split(" ")
    if len(parts) != 3 or parts[0] != "ref" or \
            crc != f"{zlib.crc32(body.encode('ascii', 'replace')):08x}":
        return None
    value = parts[2]
    if value not in (_NO_COMMITS, _DELETED) and not _is_hash(value):
        return None
    try:
        return int(parts[1], 16), value.lower()
    except ValueError:
        return None


def _ref_state(data, branch):
    """(sequence, value, slot to overwrite next) of a ref file's bytes."""
    if len(data) == REF_FILE_BYTES:
        slots = [_parse_ref_slot(data[start:start + REF_SLOT_BYTES])
                 for start in (0, REF_SLOT_BYTES)]
        valid = [(slot[0], index, slot[1]) for index, slot in enumerate(slots) if slot]
        if valid:
            sequence, index, value = max(valid)
            return sequence, value, 1 - index
    text = data[:70].decode("ascii", "replace")
    raise CorruptObject(f"ref of branch {branch!r} is corrupt: {text!r}; run fsck")


class _Refs:
    """Branch heads and the default branch (HEAD).

    A head lives in refs/heads/<branch>: two checksummed 128-byte slots, each a sequence
    number and a head. A move is made durable by its ref record in the pack (the journal
    set_if_equals is given), then the older slot is overwritten in place, not synced (no file
    is created); readers take the intact slot with the higher sequence, so a torn write
    leaves the previous head. A ref record newer than the slot (the slot write was lost to a
    crash or a kill) is held in `pending` until its slot is written under lock() (by the next
    writer, or by the Store's first read when the lock is free): read() answers with it.
    Readers keep the file open and re-read it (one pread) on every read: an in-place write
    does not change what a stat shows. Refs change only under lock(), by compare-and-swap
    (set_if_equals, add_if_new, remove), in the manner of dulwich's refs.
    """

    def __init__(self, root, tmp_dir):
        self.heads_dir = os.path.join(root, "refs", "heads")
        self.head_file = os.path.join(root, "HEAD")
        self.tmp_dir = tmp_dir
        self._open_refs = Cache(1024)        # branch -> (SharedFd, bytes last read or written,
                                             #   their (sequence, value), slot to write next)
        self.pending = {}                    # branch -> (sequence, head) of a record ahead
        self._thread_lock = threading.Lock()
        self._default = (None, None)         # (generation, default branch) when last read
        self.generation_file = os.path.join(root, "refs", "generation")
        self._generation_map = None          # the counter's bytes, mapped (see generation())

    def path(self, branch):
        """The slot file of a branch (InvalidInput for an invalid name)."""
        return os.path.join(self.heads_dir, validate_branch(branch))

    @contextlib.contextmanager
    def lock(self, wait=True):
        """Exclusive across threads (a mutex) and processes (flock on refs/heads); yields
        True. wait=False: yields False at once, without it, when another holds it."""
        if not self._thread_lock.acquire(blocking=wait):
            yield False
            return
        try:
            fd = os.open(self.heads_dir, os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    locked = False
                else:
                    locked = True
                yield locked
            finally:
                os.close(fd)   # closing releases the flock, also when a process dies
        finally:
            self._thread_lock.release()

    def read(self, branch):
        """Head commit of a branch (None while it has no commits); NotFound if missing."""
        value = self.state(branch)[1]
        return None if value == _NO_COMMITS else value

    def state(self, branch):
        """(sequence, head or "none") of a branch: its newest slot, or a pending record
        ahead of it; NotFound if missing."""
        for _ in range(3):
            known = self._open_refs.get(branch)
            if known is None:
                try:
                    handle = SharedFd(os.open(self.path(branch), os.O_RDONLY | os.O_CLOEXEC))
                except FileNotFoundError:
                    raise NotFound(f"no such branch {branch!r}") from None
            else:
                handle = known[0]
            data = os.pread(handle.fd, REF_FILE_BYTES + 1, 0)
            if known is not None and known[1] == data:
                state = known[2]                   # unchanged: no parse, no checksums
            else:
                sequence, value, slot = _ref_state(data, branch)
                state = (sequence, value)
                self._open_refs.put(branch, (handle, data, state, slot))
            if state[1] == _DELETED:
                self._open_refs.discard(branch)
                continue                           # deleted: look the name up again
            if self.pending:
                ahead = self.pending.get(branch)
                if ahead is not None:
                    if ahead[0] > state[0]:
                        return ahead
                    self.pending.pop(branch, None)     # applied meanwhile
            return state
        raise NotFound(f"no such branch {branch!r}")

    def set_if_equals(self, branch, old, new, journal):
        """Move branch from old to new (None: no commits); _RefMoved if it is not at old.
        journal(branch, sequence, head) makes the move durable (a ref record synced with
        the objects it needs); then the older slot is overwritten, without a sync. The
        caller holds lock()."""
        sequence, value = self.state(branch)
        if (None if value == _NO_COMMITS else value) != old:
            raise _RefMoved(branch)
        head = new or _NO_COMMITS
        journal(branch, sequence + 1, head)
        try:
            self.write_slot(branch, sequence + 1, head)
        except OSError:                  # the move is durable: the next writer applies it
            self.pending[branch] = (sequence + 1, head)
        self.bump()

    def write_slot(self, branch, sequence, head):
        """Overwrite a ref file's older slot with (sequence, head), not synced: the move is
        durable in the ref record (or a pack sync) already. Under lock()."""
        fd = os.open(self.path(branch), os.O_RDWR | os.O_CLOEXEC)
        try:
            data = os.pread(fd, REF_FILE_BYTES + 1, 0)
            known = self._open_refs.get(branch)
            if known is not None and known[1] == data:
                (current, _), slot = known[2], known[3]
            else:
                current, _, slot = _ref_state(data, branch)
            if current < sequence:
                line = _ref_slot(sequence, head)
                _write_all(fd, line, slot * REF_SLOT_BYTES)
                if known is not None:          # what the next read finds: no parse then
                    start = slot * REF_SLOT_BYTES
                    written = data[:start] + line + data[start + REF_SLOT_BYTES:]
                    self._open_refs.put(branch, (known[0], written, (sequence, head), 1 - slot))
        finally:
            os.close(fd)
        self.pending.pop(branch, None)

    def sync_all(self):
        """Make every ref file's slots durable (before the ref records are dropped)."""
        for name in self.names():
            with contextlib.suppress(FileNotFoundError):
                _fsync_path(os.path.join(self.heads_dir, name), data_only=True)

    def add_if_new(self, branch, head, floor=0):
        """Create branch at head (None: no commits), its sequence floor at least; False if
        it exists. Under lock()."""
        created = _write_whole(self.path(branch), _ref_file(head or _NO_COMMITS, floor),
                               self.tmp_dir, exclusive=True)
        if created:
            self.bump()
        return created

    def generation(self):
        """Bytes that change whenever a ref or HEAD changes, in any process sharing the root
        (None if the counter file cannot be opened). They are read from a shared map of
        refs/generation, so asking costs no system call: a reader may keep what it derived
        from the refs (a resolved path, say) for as long as the generation stays the same."""
        mapping = self._generation_map
        if mapping is None:
            mapping = self._map_generation()
            if mapping is None:
                return None
        return mapping[:GENERATION_BYTES]

    def _map_generation(self):
        try:
            fd = os.open(self.generation_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None                       # e.g. a read-only store: readers just re-read refs
        try:
            if os.fstat(fd).st_size < GENERATION_BYTES:
                os.ftruncate(fd, GENERATION_BYTES)   # concurrent openers all make it 8 bytes
            self._generation_map = mmap.mmap(fd, GENERATION_BYTES, access=mmap.ACCESS_WRITE)
        except OSError:
            return None
        finally:
            os.close(fd)
        return self._generation_map

    def bump(self):
        """Tell readers that a ref or HEAD changed (under lock(), after the change is durable;
        the counter is a hint for caches, not data: it needs no sync). It is written through
        the same shared map readers read: no system call either."""
        current = self.generation()
        if current is not None:
            value = (struct.unpack("<Q", current)[0] + 1) % (1 << 64)
            bumped = struct.pack("<Q", value)
            self._generation_map[:GENERATION_BYTES] = bumped
            if self._default[0] == current:   # HEAD is as read (it changes only under lock(),
                self._default = (bumped, self._default[1])     # with a bump): no re-read

    def remove(self, branch):
        """Delete a branch durably; readers holding its file open see it deleted. Under
        lock(), after the caller checked that it may be deleted."""
        path = self.path(branch)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such branch {branch!r}") from None
        try:
            os.unlink(path)
            _fsync_path(self.heads_dir)
            _write_all(fd, _ref_slot(1 << 60, _DELETED) * 2, 0)
        finally:
            os.close(fd)
        self._open_refs.discard(branch)
        self.pending.pop(branch, None)
        self.bump()

    def names(self):
        """Sorted names of every branch."""
        return sorted(filter(_is_branch_name, os.listdir(self.heads_dir)))

    def default_branch(self, fresh=False):
        """The branch used when none is named (HEAD), read again only when the generation
        moved. fresh: read it anyway (callers deciding under lock())."""
        generation = self.generation()
        if not fresh and generation is not None and self._default[0] == generation:
            return self._default[1]
        try:
            with open(self.head_file, encoding="utf-8", errors="replace") as handle:
                name = handle.read(256).strip()
        except FileNotFoundError:
            raise CorruptObject(f"{self.head_file} is missing; run fsck") from None
        try:
            validate_branch(name)
        except InvalidInput:
            raise CorruptObject(f"HEAD is corrupt: {name[:70]!r}") from None
        self._default = (generation, name)
        return name

    def set_default_branch(self, name):
        """Make an existing branch the default (under lock())."""
        self.read(name)
        _write_whole(self.head_file, (name + "\n").encode("ascii"), self.tmp_dir)
        self._default = (None, None)
        self.bump()

    def close(self):
        """Drop the open ref files and the generation map (reopened on demand)."""
        self._open_refs.clear()
        mapping, self._generation_map = self._generation_map, None
        if mapping is not None:
            mapping.close()


# ---------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------

class Store:
    """A wasmstore root directory: the facade over the object store (_ObjectStore), the
    refs (_Refs) and the history cache (_HistoryCache). Thread-safe; many processes may
    share one root."""

    def __init__(self, root=DEFAULT_ROOT):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self._tmp_dir = os.path.join(self.root, "tmp")
        self._init_layout()
        self._objects = _ObjectStore(self.root, self._tmp_dir, self._checkpoint_refs)
        self._refs = _Refs(self.root, self._tmp_dir)
        self._recovered = False                     # ref records ahead of slots looked for
        self._catch_up_lock = threading.Lock()      # one thread takes up a record at a time
        self._history = _HistoryCache(os.path.join(self.root, "cache", "history"),
                                      self._tmp_dir)
        self._parsed = Cache(OBJECT_CACHE_WEIGHT)   # hash -> parsed tree/commit
        self._modules = Cache(MODULE_CACHE_BYTES)   # hash -> small module bytes
        self._indexes = Cache(INDEX_CACHE_TREES)    # root tree -> {module: paths}
        self._commit_counts = Cache(200_000)        # commit -> first-parent length
        self._debris_checked = False
        self._empty_tree = self._encode_tree({})

    def __repr__(self):
        return f"Store({self.root!r})"

    def close(self):
        """Release cached descriptors (reopened on demand)."""
        self._refs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- layout ------------------------------------------------------------------------------------

    def _init_layout(self):
        """Create a new store's directories, HEAD and empty main branch, durably."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store root {self.root!r} exists and is not a directory")
        heads = os.path.join(self.root, "refs", "heads")
        pack = os.path.join(self.root, "objects", "pack")
        if all(map(os.path.isdir, (heads, pack, self._tmp_dir))) and \
                os.path.exists(os.path.join(self.root, "HEAD")):
            return
        for directory in (pack, heads, self._tmp_dir):
            os.makedirs(directory, exist_ok=True)
        head = os.path.join(self.root, "HEAD")
        if _write_whole(head, (DEFAULT_BRANCH + "\n").encode(), self._tmp_dir, exclusive=True):
            _write_whole(os.path.join(heads, DEFAULT_BRANCH), _ref_file(_NO_COMMITS),
                         self._tmp_dir, exclusive=True)
        for directory in (os.path.dirname(pack), os.path.dirname(heads), self.root):
            _fsync_path(directory)

    # -- objects -----------------------------------------------------------------------------------

    def _load(self, digest, kind):
        """A parsed tree (dict name -> (kind, hash)) or commit (dict), cached."""
        cached = self._parsed.get(digest)
        if cached is None:
            data = self._objects.read(digest)
            cached = _parse_object(data, digest)
            self._parsed.put(digest, cached, _weight(cached))
        if cached[0] != kind:
            raise NotFound(f"no such {kind} {digest}")
        return cached[1]

    def _tree(self, digest):
        return self._load(digest, "tree") if digest else {}

    def _commit(self, digest):
        return self._load(digest, "commit")

    def _encode_tree(self, entries):
        """(hash, canonical JSON) of a tree: what json.dumps(sort_keys=True, compact,
        ensure_ascii=False) gives, built directly because commits re-encode big trees."""
        parts = [f'{_json_string(name)}:["{kind}","{digest}"]'
                 for name, (kind, digest) in sorted(entries.items())]
        data = ('{"entries":{' + ",".join(parts) + '},"type":"tree"}').encode("utf-8")
        return hashlib.sha256(data).hexdigest(), data

    def _put_tree(self, entries, batch):
        digest, data = self._encode_tree(entries)
        batch.add(digest, "tree", data, ("tree", entries))
        return digest

    def _put_commit(self, tree, parents, author, message, batch):
        document = {"author": author, "date": int(time.time()), "message": message,
                    "parents": list(parents), "tree": tree, "type": "commit"}
        data = _canonical_json(document)
        digest = hashlib.sha256(data).hexdigest()
        batch.add(digest, "commit", data, ("commit", document))
        return digest

    def _land(self, batch, ref_update):
        """Make a batch of objects and a ref's move, ref_update = (branch, old head, new
        head), durable together (one pack append of the objects and the ref record, one
        fdatasync), then write the ref's slot (not synced). The caller holds the ref lock
        (_locked). A crash at any point leaves a ref that points at durable objects."""
        self._refs.set_if_equals(*ref_update, lambda *ref: self._objects.write(batch, ref))
        for digest, parsed in batch.parsed.items():
            self._parsed.put(digest, parsed, _weight(parsed))

    # -- refs --------------------------------------------------------------------------------------

    def _branch(self, branch):
        return validate_branch(branch) if branch is not None else self.default_branch

    def _read_ref(self, branch):
        """Head commit of a branch (None while it has no commits); NotFound if missing."""
        if not self._recovered:
            self._recover()
        return self._refs.read(branch)

    def _recover(self):
        """A Store's first ref read: take up the ref records ahead of their slots. Stores that
        have read already read only the slots: write them now if no writer holds the lock (one
        that does writes them when it takes it). A record that cannot be decided (a sync
        failed) leaves the slots answered, and the next read tries again: unlike a writer, a
        reader may answer the older, durable head."""
        self._objects.refresh()
        try:
            self._catch_up_refs()
            if self._refs.pending:
                with self._locked(wait=False):
                    pass
        except OSError:
            return
        self._recovered = True

    @contextlib.contextmanager
    def _locked(self, wait=True):
        """The ref lock, with the ref records other writers appended taken up first: a
        change computes from the true head (a killed writer's record may be ahead).
        wait=False: yields False at once, doing nothing, when another holds it."""
        with self._refs.lock(wait) as locked:
            if locked:
                self._objects.scan_newest()
                self._apply_pending_refs()
            yield locked

    def _catch_up_refs(self):
        """Take up the ref records found since the last call: one newer than its branch's
        slot (its writer was killed, or a crash lost the unsynced slot write, or it is being
        written now) becomes pending, what reads answer, once its pack is synced and the
        object records written with it are intact (a crash may persist the record and not
        all that the sync of its write would have). A record of a deleted branch, or of one
        since made again (a new ref file's sequence starts above it), is obsolete. When a
        record cannot be decided (OSError: a sync or read failed), it and those not yet taken
        up are looked at again by the next call, and the error is raised: a writer must not
        compute a change from a slot an undecided record may be ahead of."""
        with self._catch_up_lock:
            found = list(self._objects.unchecked_refs().items())
            for done, (branch, record) in enumerate(found):
                try:
                    self._take_up(branch, record)
                except OSError:
                    for again, left in found[done:]:
                        left.segment.unchecked.add(again)
                    raise

    def _take_up(self, branch, record):
        """_catch_up_refs for one branch's newest record."""
        try:
            state = self._refs.state(branch)
        except (NotFound, CorruptObject):
            return
        if record.sequence <= state[0]:
            if (record.sequence, record.head) == state:
                record.segment.durable_to(record.end)        # applied: its sync returned
            return
        if (record.head == _NO_COMMITS or self._objects.is_commit(record.head)) and \
                self._objects.make_durable(record):
            self._refs.pending[branch] = (record.sequence, record.head)

    def _apply_pending_refs(self, strict=False):
        """Under the ref lock: write the slots of the pending ref records (not synced: the
        records are durable), so that every process reads them there; readers are told. A
        slot that cannot be written stays pending (reads answer it), unless strict: then
        the OSError is raised, as the records are about to be dropped."""
        self._catch_up_refs()
        if not self._refs.pending:
            return
        try:
            for branch, (sequence, head) in list(self._refs.pending.items()):
                if head != _NO_COMMITS and not self._objects.is_commit(head):
                    # Taken up while its writer was in its sync, which then failed: the
                    # writer cut the write off (the rescan under the lock found it gone).
                    self._refs.pending.pop(branch, None)
                    continue
                try:
                    self._refs.write_slot(branch, sequence, head)
                except OSError:
                    if strict:
                        raise
        finally:
            self._refs.bump()

    def _checkpoint_refs(self):
        """Bring every slot up to its ref records and make it durable: before a pack is
        sealed (its ref records past the index are no longer read) or rewritten by gc.
        Under the ref lock; the packs are synced already. OSError if a slot cannot be
        written: then nothing is sealed or rewritten (only the records hold that move)."""
        self._apply_pending_refs(strict=True)
        self._refs.sync_all()

    def generation(self):
        """A token that changes whenever any branch head or the default branch changes, in any
        process sharing this root; None if unavailable. Costs no system call (see _Refs)."""
        return self._refs.generation()

    def head(self, *, branch=None):
        """Head commit of a branch, or None while it has no commits."""
        return self._read_ref(self._branch(branch))

    def _head_tree(self, branch):
        """(head, root tree hash or None) of a branch, robust against a concurrent gc."""
        for _ in range(3):
            head = self._read_ref(branch)
            if head is None:
                return None, None
            try:
                return head, self._commit(head)["tree"]
            except NotFound:
                continue   # gc replaced the head after we read it: read it again
        raise NotFound(f"head of branch {branch!r} cannot be read")

    # -- trees -------------------------------------------------------------------------------------

    def _entry_at(self, tree, segments):
        """The (kind, hash) entry at segments under tree, None if absent; root: its tree."""
        if not segments:
            return ("tree", tree) if tree else None
        for segment in segments[:-1]:
            entry = self._tree(tree).get(segment)
            if entry is None or entry[0] != "tree":
                return None
            tree = entry[1]
        return self._tree(tree).get(segments[-1])

    def _edit_root(self, tree, edits, batch, strict=False):
        """Apply edits {segments: entry or None} to a root tree; returns the new root hash."""
        new = self._edit_tree(tree, edits, batch, (), strict)
        if new is None:
            new = self._put_tree({}, batch)
        return new

    def _edit_tree(self, tree, edits, batch, prefix, strict):
        original = self._tree(tree)
        entries = dict(original)
        nested = {}
        for segments, entry in edits.items():
            name = segments[0]
            if len(segments) > 1:
                nested.setdefault(name, {})[segments[1:]] = entry
                continue
            current = entries.get(name)
            if entry is None:
                entries.pop(name, None)
            elif strict and current and current[0] == "tree" and entry[0] == "module":
                raise InvalidInput(f"{format_path(prefix + (name,))} is a directory")
            else:
                entries[name] = entry
        for name, sub_edits in nested.items():
            current = entries.get(name)
            only_removals = all(entry is None for entry in sub_edits.values())
            if current is None or current[0] != "tree":
                if only_removals:
                    continue
                if current is not None and strict:
                    raise InvalidInput(f"{format_path(prefix + (name,))} is a module, "
                                       "not a directory")
            sub_tree = current[1] if current and current[0] == "tree" else None
            new_sub = self._edit_tree(sub_tree, sub_edits, batch, prefix + (name,), strict)
            if new_sub is None:
                entries.pop(name, None)
            else:
                entries[name] = ("tree", new_sub)
        if not entries:
            return None
        if entries == original:
            return tree
        return self._put_tree(entries, batch)

    def _walk_modules(self, tree, prefix=()):
        """Yield (segments, module hash) for every module under tree."""
        for name, (kind, digest) in sorted(self._tree(tree).items()):
            if kind == "module":
                yield prefix + (name,), digest
            else:
                yield from self._walk_modules(digest, prefix + (name,))

    def _index(self, tree):
        """{module hash: [segments, ...]} of a root tree (cached for recent trees)."""
        key = tree or ""
        index = self._indexes.get(key)
        if index is None:
            index = {}
            for segments, digest in self._walk_modules(tree):
                index.setdefault(digest, []).append(segments)
            self._indexes.put(key, index)
        return index

    # -- changes -----------------------------------------------------------------------------------

    def _change(self, branch, author, message, edit):
        """Run edit(head, tree, batch) -> new root tree under the ref lock; commit if changed.

        Returns the new head (or the old one when nothing changed).
        """
        branch = self._branch(branch)
        author = _author(author)
        with self._locked():
            if not self._debris_checked:
                _remove_debris(self._tmp_dir)        # temp files of killed writers
                self._debris_checked = True
            head = self._read_ref(branch)
            tree = self._commit(head)["tree"] if head else None
            batch = _Batch()
            new_tree = edit(head, tree, batch)
            if new_tree == tree or (tree is None and new_tree == self._empty_tree[0]
                                    and head is None):
                return head
            parents = [head] if head else []
            commit = self._put_commit(new_tree, parents, author, message, batch)
            self._land(batch, (branch, head, commit))
            self._history.record(commit, head, self.changes(head, commit))
            return commit

    def _ingest(self, source, size_limit=None, in_memory=0):
        """Read a file name or binary file object: (bytes, hash, size) when it holds at most
        in_memory bytes (no temp file to create), else streamed in chunks into a temp file:
        (temp file name, hash, size)."""
        handle = open(source, "rb") if isinstance(source, (str, bytes, os.PathLike)) \
            else contextlib.nullcontext(source)
        with handle as reader:
            head = _read_up_to(reader, in_memory + 1, size_limit) if in_memory else b""
            if in_memory and len(head) <= in_memory:
                return head, hashlib.sha256(head).hexdigest(), len(head)
            return self._stream_to_temp(reader, head, size_limit)

    def _stream_to_temp(self, reader, head, size_limit):
        tmp, fd = _new_temp(self._tmp_dir)
        digest = hashlib.sha256(head)
        size = len(head)
        try:
            _write_all(fd, head)
            while True:
                chunk = reader.read(CHUNK_SIZE)
                if not chunk:
                    break
                size += len(chunk)
                _check_size(size, size_limit)
                digest.update(chunk)
                _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, digest.hexdigest(), size

    def _already_validated(self, digest, size):
        """True for a big module already stored (it was validated then): adding it again
        skips a check that costs a stub compile."""
        return size > SMALL_MODULE_BYTES and self._objects.is_module(digest)

    def _validate_file(self, path, size, digest):
        if not self._already_validated(digest, size):
            validate_module_file(path)

    def _set_module(self, segments, digest, branch, author, message, source=None):
        """Point segments at module digest; source = bytes or a temp file to store."""
        if not segments:
            raise InvalidInput("a module needs a path, not the root")

        def edit(head, tree, batch):
            if source is not None:
                batch.add(digest, "module", source)
            elif not self._objects.is_module(digest):
                raise NotFound(f"no such module {digest}")
            return self._edit_root(tree, {segments: ("module", digest)}, batch, strict=True)

        self._change(branch, author, message, edit)
        return digest

    # -- operations --------------------------------------------------------------------------------

    def add(self, path, data, *, branch=None, author=None):
        """Validate data, store it and point path at it. Returns the module hash."""
        segments = validate_path(path)
        if not segments:
            raise InvalidInput("a module needs a path, not the root")
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInput("module data must be bytes")
        self._read_ref(self._branch(branch))
        digest = hashlib.sha256(data).hexdigest()
        if not self._already_validated(digest, len(data)):
            validate_module(data)
        return self._set_module(segments, digest, branch, author,
                                f"Import {format_path(segments)}", bytes(data))

    def add_file(self, path, source, *, branch=None, author=None, size_limit=None,
                 message=None):
        """Like add, reading a file name or binary file object in chunks (any size).
        message replaces the commit message "Import <path>" (a pull names its source)."""
        segments = validate_path(path)
        if not segments:
            raise InvalidInput("a module needs a path, not the root")
        self._read_ref(self._branch(branch))
        content, digest, size = self._ingest(source, size_limit, IN_MEMORY_INGEST_BYTES)
        try:
            if isinstance(content, bytes):
                if not self._already_validated(digest, size):
                    validate_module(content)
            else:
                self._validate_file(content, size, digest)
            return self._set_module(segments, digest, branch, author,
                                    message or f"Import {format_path(segments)}", content)
        finally:
            if not isinstance(content, bytes):
                _unlink_quietly(content)

    def import_tree(self, directory, prefix="", *, branch=None, author=None):
        """Store every *.wasm file under directory (validated) in one commit.

        Returns {printed path: hash}. Any invalid file: nothing is stored.
        """
        base = validate_path(prefix)
        files = _wasm_files(directory)
        if not files:
            raise InvalidInput(f"no *.wasm files under {directory!r}")
        items = [(format_path(base + validate_path(relative)), filename)
                 for relative, filename in files]
        return self.add_files(items, branch=branch, author=author,
                              message=f"Import {format_path(base)} ({len(items)} modules)")

    def add_files(self, items, *, branch=None, author=None, message=None):
        """Store several modules in one commit: items [(path, file name or binary file)], each
        validated (any invalid one: nothing is stored). Returns {printed path: hash}."""
        self._read_ref(self._branch(branch))
        edits, temps, stored = {}, {}, {}
        try:
            for path, source in items:
                segments = validate_path(path)
                if not segments:
                    raise InvalidInput("a module needs a path, not the root")
                tmp, digest, size = self._ingest(source)
                if digest in temps:
                    os.unlink(tmp)          # the same module twice: one object
                else:
                    temps[digest] = tmp
                try:
                    self._validate_file(temps[digest], size, digest)
                except InvalidModule as exc:
                    shown = source if isinstance(source, str) else path
                    raise InvalidModule(f"{shown}: {exc}") from None
                edits[segments] = ("module", digest)
                stored[format_path(segments)] = digest

            def edit(head, tree, batch):
                for digest, tmp in temps.items():
                    batch.add(digest, "module", tmp)
                return self._edit_root(tree, edits, batch, strict=True)

            self._change(branch, author, message or f"Import {len(edits)} modules", edit)
            return dict(sorted(stored.items()))
        finally:
            for tmp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def find(self, path_or_hash, *, branch=None):
        """The bytes of the module at a path (or with a hash) on a branch."""
        return self._read_module(self._module_hash(path_or_hash, self._branch(branch)))

    def locate(self, path_or_hash, *, branch=None):
        """(hash, object file name) of a module, for zero-copy serving; hash-checked."""
        digest = self._module_hash(path_or_hash, self._branch(branch))
        return digest, self.module_filename(digest)

    def contains(self, path_or_hash, *, branch=None):
        """True if the path (or hash) names a module on the branch."""
        branch = self._branch(branch)
        self._read_ref(branch)              # a missing branch is an error, not "false"
        try:
            self._module_hash(path_or_hash, branch)
        except NotFound:
            return False
        return True

    def _module_hash(self, path_or_hash, branch):
        _, tree = self._head_tree(branch)
        return self._module_in_tree(tree, path_or_hash, f"on branch {branch!r}")

    def _module_in_tree(self, tree, path_or_hash, where):
        kind, value = _target(path_or_hash)
        if kind == "hash":
            if value in self._index(tree):
                return value
            raise NotFound(f"no module with hash {value} {where}")
        entry = self._entry_at(tree, value)
        if entry is None or entry[0] != "module":
            raise NotFound(f"no module at {format_path(value)} {where}")
        return entry[1]

    def module_at(self, path_or_hash, *, branch=None, commit=None):
        """(module hash, commit) of a module at the head of a branch, or in an older `commit`
        (the hash-or-path rule then applies to that commit's tree)."""
        if commit is None:
            branch = self._branch(branch)
            head, tree = self._head_tree(branch)
            return self._module_in_tree(tree, path_or_hash, f"on branch {branch!r}"), head
        commit = validate_hash(commit, "commit")
        tree = self._commit(commit)["tree"]
        return self._module_in_tree(tree, path_or_hash, f"in commit {commit}"), commit

    def read_module(self, digest):
        """The bytes of any stored module object, hash-checked."""
        return self._read_module(validate_hash(digest))

    def _read_module(self, digest):
        data = self._modules.get(digest)
        if data is not None:
            return data
        data = self._objects.read(digest)
        if data[:4] != WASM_MAGIC:
            raise NotFound(f"no such module {digest}")
        if len(data) <= MODULE_CACHE_ITEM_BYTES:
            self._modules.put(digest, data, len(data))
        return data

    def module_filename(self, digest):
        """A file holding exactly a module's bytes (for zero-copy serving; written from its
        pack on first use), after checking its content (result cached)."""
        return self._objects.module_file(validate_hash(digest))

    def hash(self, path, *, branch=None):
        """The module hash at a path (a directory: its tree hash)."""
        segments = validate_path(path)
        branch = self._branch(branch)
        _, tree = self._head_tree(branch)
        entry = self._entry_at(tree, segments)
        if entry is None:
            if not segments:
                return self._empty_tree[0]
            raise NotFound(f"no module or directory at {format_path(segments)} "
                           f"on branch {branch!r}")
        return entry[1]

    def set(self, path, digest, *, branch=None, author=None):
        """Point path at an existing module object."""
        segments = validate_path(path)
        digest = validate_hash(digest)
        self._set_module(segments, digest, branch, author,
                         f"Set {format_path(segments)} {digest}")

    def remove(self, path_or_hash, *, branch=None, author=None):
        """Remove a path (a directory: its subtree), or every path holding a hash."""
        kind, value = _target(path_or_hash)
        if kind == "path" and not value:
            raise InvalidInput("refusing to remove the empty path (it would empty the store)")
        def edit(head, tree, batch):
            if kind == "hash":
                paths = self._index(tree).get(value)
                if not paths:
                    raise NotFound(f"no module with hash {value} on the branch")
            else:
                if self._entry_at(tree, value) is None:
                    raise NotFound(f"nothing at {format_path(value)} on the branch")
                paths = [value]
            return self._edit_root(tree, {p: None for p in paths}, batch)

        branch = self._branch(branch)
        label = format_path(value) if kind == "path" else value
        self._change(branch, author, f"Remove {label}", edit)

    def list(self, prefix="", *, branch=None):
        """{printed path: hash} of every module under prefix, sorted by path."""
        segments = validate_path(prefix)
        _, tree = self._head_tree(self._branch(branch))
        entry = self._entry_at(tree, segments)
        if entry is None:
            return {}
        if entry[0] == "module":
            return {format_path(segments): entry[1]}
        return dict(sorted((format_path(segments + rest), digest)
                           for rest, digest in self._walk_modules(entry[1])))

    def list_details(self, prefix="", *, branch=None):
        """{printed path: {"hash", "size", "kind", "changed"}} of every module under prefix,
        sorted by path: kind "module" or "component", changed the last commit that changed the
        path. One walk of the history cache, stopping once every path is found."""
        listing = self.list(prefix, branch=branch)
        head = self._read_ref(self._branch(branch))
        changed, missing = {}, set(listing)
        for digest, changes in self._changed_modules(head):
            for path in missing.intersection(changes):
                changed[path] = digest
            missing.difference_update(changed)
            if not missing:
                break
        details = {}
        for path, digest in listing.items():
            size, header = self._objects.head(digest, len(COMPONENT_HEADER))
            details[path] = {"hash": digest, "size": size, "changed": changed.get(path),
                             "kind": "component" if header == COMPONENT_HEADER else "module"}
        return details

    # -- history -----------------------------------------------------------------------------------

    def _first_parents(self, head):
        """Yield (commit hash, commit) along first parents; stops at a vanished commit."""
        while head:
            try:
                commit = self._commit(head)
            except NotFound:
                return
            yield head, commit
            head = commit["parents"][0] if commit["parents"] else None

    def _path_changes(self, head, segments):
        """[(commit, new entry, old entry)] where the path changed, newest first."""
        changes = []
        chain = self._first_parents(head)
        previous = None
        for digest, commit in chain:
            entry = self._entry_at(commit["tree"], segments)
            if previous is not None and previous[1] != entry:
                changes.append((previous[0], previous[1], entry))
            previous = (digest, entry)
        if previous is not None and previous[1] is not None:
            changes.append((previous[0], previous[1], None))
        return changes

    def versions(self, path, *, branch=None):
        """[(module hash, commit)] oldest first, de-duplicated by hash (first kept)."""
        segments = validate_path(path)
        if not segments:
            raise InvalidInput("versions needs a module path")
        head = self._read_ref(self._branch(branch))
        seen, result = set(), []
        for commit, digest in reversed(self._module_history(head, format_path(segments))):
            if digest and digest not in seen:
                seen.add(digest)
                result.append((digest, commit))
        return result

    def _module_history(self, head, printed):
        """[(commit, module hash or None)] where the module path changed, newest first."""
        return [(digest, changes[printed]) for digest, changes in self._changed_modules(head)
                if printed in changes]

    def _changed_modules(self, head):
        """(commit, {printed module path: new hash or None}) along first parents, newest first.

        Walks through the history cache (one file read, no object reads); a commit the
        cache does not know is diffed against its parent instead."""
        known = self._history.load()
        digest = head
        while digest:
            entry = known.get(digest)
            if entry is None:
                try:
                    parents = self._commit(digest)["parents"]
                except NotFound:
                    return                      # history squashed away by a concurrent gc
                parent = parents[0] if parents else None
                entry = (parent, _module_changes(self.changes(parent, digest)))
            parent, changes = entry
            yield digest, changes
            digest = parent

    def version(self, index, path, *, branch=None):
        """The index-th entry of versions(path) (0 = oldest)."""
        if not isinstance(index, int) or isinstance(index, bool):
            index = parse_number(index, "version index")
        found = self.versions(path, branch=branch)
        if not 0 <= index < len(found):
            raise NotFound(f"no version {index} of {format_path(validate_path(path))} "
                           f"({len(found)} versions)")
        return found[index]

    def audit(self, path, *, branch=None):
        """Commit infos of every commit that changed path (a module, or anything below a
        directory), newest first. Reads the history cache, like versions()."""
        printed = format_path(validate_path(path))
        below = printed if printed.endswith("/") else printed + "/"
        head = self._read_ref(self._branch(branch))
        return [self.commit_info(digest) for digest, changes in self._changed_modules(head)
                if printed in changes or any(changed.startswith(below) for changed in changes)]

    def log(self, limit=None, *, branch=None, start=None):
        """Commit infos along first parents from the head (or from commit `start`, for the
        next page of a long log), newest first."""
        head = self._read_ref(self._branch(branch))
        if start is not None:
            head = self.commit_info(start)["hash"]        # NotFound for an unknown commit
        chain = self._first_parents(head)
        if limit is not None:
            chain = itertools.islice(chain, max(0, limit if isinstance(limit, int) else
                                                parse_number(limit, "number of commits")))
        return [_commit_info(digest, commit) for digest, commit in chain]

    def snapshot(self, *, branch=None):
        """The head commit of a branch."""
        branch = self._branch(branch)
        head = self._read_ref(branch)
        if head is None:
            raise NotFound(f"branch {branch!r} has no commits")
        return head

    def commit_info(self, digest):
        """{"hash","parents","author","date","message"} ("parents" omitted when empty)."""
        digest = validate_hash(digest, "commit")
        try:
            return _commit_info(digest, self._commit(digest))
        except NotFound:
            raise NotFound(f"no such commit {digest}") from None

    def rollback(self, path=None, *, branch=None, author=None):
        """Revert path to its value before its latest change (no path: the whole tree
        to the head's first parent's tree). Conflict when there is nothing to roll back."""
        segments = validate_path(path) if path is not None else ()

        def edit(head, tree, batch):
            if head is None:
                raise Conflict("nothing to roll back: the branch has no commits")
            if not segments:
                parents = self._commit(head)["parents"]
                return self._commit(parents[0])["tree"] if parents else \
                    self._put_tree({}, batch)
            changes = self._path_changes(head, segments)
            if not changes:
                raise Conflict(f"nothing to roll back at {format_path(segments)}")
            return self._edit_root(tree, {segments: changes[0][2]}, batch)

        message = f"Rollback {format_path(segments)}" if segments else "Rollback"
        self._change(branch, author, message, edit)

    def restore(self, commit, path=None, *, branch=None, author=None):
        """A new commit whose tree is commit's tree (or the current tree with only path
        taken from commit). History is kept."""
        info = self.commit_info(commit)
        source_tree = self._commit(info["hash"])["tree"]
        segments = validate_path(path) if path is not None else ()

        def edit(head, tree, batch):
            if not segments:
                return source_tree
            entry = self._entry_at(source_tree, segments)
            return self._edit_root(tree, {segments: entry}, batch)

        message = f"Restore {format_path(segments)}" if segments else "Restore"
        self._change(branch, author, message, edit)

    # -- branches ----------------------------------------------------------------------------------

    @property
    def default_branch(self):
        """The branch used when none is named (persisted in HEAD)."""
        return self._refs.default_branch()

    def set_default_branch(self, name):
        """Make an existing branch the default."""
        validate_branch(name)
        with self._locked():
            self._refs.set_default_branch(name)

    def branches(self):
        """Sorted names of every branch."""
        return self._refs.names()

    def create_branch(self, name, *, branch=None):
        """Create branch name at the head of branch (default: the default branch)."""
        validate_branch(name)
        source = self._branch(branch)
        with self._locked():
            floor = self._objects.newest_ref_sequence(name) + 1   # a deleted one's records
            if not self._refs.add_if_new(name, self._read_ref(source), floor):
                raise Conflict(f"branch {name!r} already exists")

    def delete_branch(self, name):
        """Delete a branch (not the default one)."""
        validate_branch(name)
        with self._locked():
            # Checked under the lock that guards HEAD too: a concurrent switch of the default
            # branch to `name` must not leave HEAD naming a deleted branch.
            if name == self._refs.default_branch(fresh=True):
                raise Conflict(f"refusing to delete the default branch {name!r}")
            self._refs.remove(name)

    def merge(self, source, *, branch=None, author=None):
        """Merge branch source into branch: fast-forward, or a three-way merge per path."""
        validate_branch(source)
        target = self._branch(branch)
        author = _author(author)
        with self._locked():
            theirs = self._read_ref(source)
            ours = self._read_ref(target)
            if theirs is None or theirs == ours or self._is_ancestor(theirs, ours):
                return
            if ours is None or self._is_ancestor(ours, theirs):
                self._land(_Batch(), (target, ours, theirs))     # a ref record alone
                return
            base = self._merge_base(ours, theirs)
            base_tree = self._commit(base)["tree"] if base else None
            batch = _Batch()
            conflicts = []
            merged = self._merge_entries(
                ("tree", base_tree) if base_tree else None,
                ("tree", self._commit(ours)["tree"]),
                ("tree", self._commit(theirs)["tree"]), (), conflicts, batch)
            if conflicts:
                raise MergeConflict(source, conflicts)
            tree = merged[1] if merged else self._put_tree({}, batch)
            commit = self._put_commit(tree, [ours, theirs], author, f"Merge {source}", batch)
            self._land(batch, (target, ours, commit))
            self._history.record(commit, ours, self.changes(ours, commit))

    def _ancestors(self, head):
        seen, stack = set(), [head] if head else []
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            stack.extend(self._commit(digest)["parents"])
        return seen

    def _is_ancestor(self, maybe_ancestor, head):
        return bool(head) and maybe_ancestor in self._ancestors(head)

    def _merge_base(self, ours, theirs):
        """The nearest common ancestor (breadth-first from ours), or None."""
        theirs_ancestors = self._ancestors(theirs)
        queue, seen = collections.deque([ours]), set()
        while queue:
            digest = queue.popleft()
            if digest in theirs_ancestors:
                return digest
            if digest not in seen:
                seen.add(digest)
                queue.extend(self._commit(digest)["parents"])
        return None

    def _merge_entries(self, base, ours, theirs, prefix, conflicts, batch):
        if ours == theirs or base == theirs:
            return ours
        if base == ours:
            return theirs
        if ours and theirs and ours[0] == "tree" and theirs[0] == "tree":
            base_entries = self._tree(base[1]) if base and base[0] == "tree" else {}
            our_entries, their_entries = self._tree(ours[1]), self._tree(theirs[1])
            merged = {}
            for name in sorted(set(our_entries) | set(their_entries) | set(base_entries)):
                entry = self._merge_entries(base_entries.get(name), our_entries.get(name),
                                            their_entries.get(name), prefix + (name,),
                                            conflicts, batch)
                if entry is not None:
                    merged[name] = entry
            return ("tree", self._put_tree(merged, batch)) if merged else None
        conflicts.append(format_path(prefix))
        return ours

    # -- watch -------------------------------------------------------------------------------------

    def changes(self, old_commit, new_commit):
        """What changed between two commits, in the watch event format."""
        old_tree = self._commit(old_commit)["tree"] if old_commit else None
        new_tree = self._commit(new_commit)["tree"] if new_commit else None
        out = {}
        self._diff_trees(old_tree, new_tree, (), out)
        return dict(sorted(out.items()))

    def _diff_trees(self, old, new, prefix, out):
        if old == new:
            return
        old_entries, new_entries = self._tree(old), self._tree(new)
        for name in set(old_entries) | set(new_entries):
            before, after = old_entries.get(name), new_entries.get(name)
            if before == after:
                continue
            path = prefix + (name,)
            old_sub = before[1] if before and before[0] == "tree" else None
            new_sub = after[1] if after and after[0] == "tree" else None
            if old_sub or new_sub:
                self._diff_trees(old_sub, new_sub, path, out)
            old_module = before[1] if before and before[0] == "module" else None
            new_module = after[1] if after and after[0] == "module" else None
            printed = format_path(path)
            if old_module and new_module:
                out[printed] = {"action": "updated",
                                "hash": {"old": old_module, "new": new_module}}
            elif new_module:
                out[printed] = {"action": "added", "hash": new_module}
            elif old_module:
                out[printed] = {"action": "removed", "hash": old_module}

    def watch(self, *, branch=None, poll_interval=0.05, stop_event=None):
        """Iterate (commit, changes) for every new commit on a branch, also from other
        processes. The start head is read now (not at the first next()), so no commit
        made after this call is missed. Ends when stop_event (threading.Event) is set."""
        branch = self._branch(branch)
        start = self._read_ref(branch)
        return self._watch(branch, start, poll_interval, stop_event or threading.Event())

    def _watch(self, branch, last, poll_interval, stop_event):
        while not stop_event.is_set():
            current = self._read_ref(branch)
            if current != last:
                yield from self.events(last, current)
                last = current
            stop_event.wait(poll_interval)

    def events(self, old, new):
        """[(commit, changes)]: one per first-parent commit from old to new head, oldest
        first, commits that changed no module left out (the watch event stream).

        When old is not on new's first-parent chain (gc, rollback of a merge...), the
        whole jump is one event."""
        if new is None:
            changes = self.changes(old, None)
            return [(None, changes)] if changes else []
        chain, found = [], old is None
        for digest, commit in itertools.islice(self._first_parents(new), WATCH_WALK_LIMIT):
            if digest == old:
                found = True
                break
            chain.append((digest, commit))
        if not found or len(chain) >= WATCH_WALK_LIMIT:
            try:
                changes = self.changes(old, new)
            except NotFound:
                return []       # old head squashed away by gc (which keeps the tree)
            return [(new, changes)] if changes else []
        events = []
        for digest, commit in reversed(chain):
            parent = commit["parents"][0] if commit["parents"] else None
            changes = self.changes(parent, digest)
            if changes:
                events.append((digest, changes))
        return events

    def module_count(self, *, branch=None):
        """Number of modules on a branch (cached per tree)."""
        _, tree = self._head_tree(self._branch(branch))
        return sum(len(paths) for paths in self._index(tree).values())

    def commit_count(self, *, branch=None):
        """Length of the branch's first-parent history (cached per commit)."""
        head = self._read_ref(self._branch(branch))
        chain = []
        count = 0
        for digest, _ in self._first_parents(head):
            cached = self._commit_counts.get(digest)
            if cached is not None:
                count = cached
                break
            chain.append(digest)
        for digest in reversed(chain):
            count += 1
            self._commit_counts.put(digest, count)
        return count

    # -- gc ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _objects_lock(self, shared):
        """gc deletes objects under LOCK_EX; backup copies them under LOCK_SH."""
        fd = os.open(self._objects.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def gc(self, *, branch=None, author=None, stats=None):
        """Squash the branch's history into one "GC" commit, then delete every object
        not reachable from any branch. Returns the number of objects deleted; stats (a dict)
        also receives {"objects": that number, "bytes": their size, "commits_squashed":
        commits of the branch's history replaced by the GC commit}."""
        branch = self._branch(branch)
        author = _author(author)
        with self._locked(), self._objects_lock(shared=False):
            head, squashed_count = self._read_ref(branch), 0
            if head and self._commit(head)["parents"]:
                squashed_count = self._count_commits(head) if stats is not None else 0
                batch = _Batch()
                tree = self._commit(head)["tree"]
                squashed = self._put_commit(tree, [], author, "GC", batch)
                self._land(batch, (branch, head, squashed))
                self._history.record(squashed, None, self.changes(None, squashed))
            heads = [self._read_ref(name) for name in self.branches()]
            reachable = self._reachable(heads)
            deleted, deleted_bytes = self._objects.compact(reachable)
            self._history.compact(reachable)
            _remove_debris(self._tmp_dir)
            if stats is not None:
                stats.update(objects=deleted, bytes=deleted_bytes, commits_squashed=squashed_count)
        return deleted

    def _count_commits(self, head):
        """How many commits head's history holds (every ancestor, merges' second parents too)."""
        seen, stack = set(), [head]
        while stack:
            digest = stack.pop()
            if digest not in seen:
                seen.add(digest)
                stack.extend(self._commit(digest)["parents"])
        return len(seen)

    def _reachable(self, heads):
        """Hashes of every commit, tree and module reachable from heads."""
        reachable = set()
        commits = [head for head in heads if head]
        while commits:
            digest = commits.pop()
            if digest in reachable:
                continue
            reachable.add(digest)
            commit = self._commit(digest)
            commits.extend(commit["parents"])
            self._mark_tree(commit["tree"], reachable)
        return reachable

    def _mark_tree(self, tree, reachable):
        stack = [tree]
        while stack:
            digest = stack.pop()
            if digest in reachable:
                continue
            reachable.add(digest)
            for kind, child in self._tree(digest).values():
                if kind == "tree":
                    stack.append(child)
                else:
                    reachable.add(child)

    # -- export, backup ----------------------------------------------------------------------------

    def export(self, directory, commit=None, *, branch=None):
        """Write every module of the branch (or commit) under directory as plain files.
        Returns the number of files written. Never writes outside directory."""
        if commit is not None:
            tree = self._commit(self.commit_info(commit)["hash"])["tree"]
        else:
            _, tree = self._head_tree(self._branch(branch))
        base = os.path.realpath(directory)
        _export_directory(base)
        count = 0
        for segments, digest in self._walk_modules(tree):
            parent = os.path.join(base, *segments[:-1])
            _export_directory(parent)
            if os.path.realpath(parent) != parent:
                raise StoreError(f"refusing to export through a symbolic link at {parent!r}")
            self._copy_module_to(digest, os.path.join(parent, segments[-1]))
            count += 1
        return count

    def _copy_module_to(self, digest, target):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write {target!r}: {exc.strerror}") from None
        try:
            for chunk in self._objects.chunks(digest):
                _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            _unlink_quietly(target)
            raise
        os.close(fd)

    def backup(self, filename):
        """Write a consistent .tar.gz of the store: HEAD, refs/heads/* and one pack holding
        every reachable object, each hash-checked as it is written. Returns the number of
        objects in it. Temp files of killed backups next to filename are removed first."""
        filename = os.path.abspath(filename)
        if filename == self.root or filename.startswith(self.root + os.sep):
            raise InvalidInput("the backup file must be outside the store root")
        directory, temp_prefix = os.path.dirname(filename), os.path.basename(filename) + "."
        _remove_debris(directory, temp_prefix)
        with contextlib.ExitStack() as locks:
            with self._locked():
                locks.enter_context(self._objects_lock(shared=True))
                refs = {name: self._read_ref(name) for name in self.branches()}
                default = self._refs.default_branch(fresh=True)
            objects = sorted(self._reachable(refs.values()))
            size, stream = self._objects.pack_stream(objects)

            def write(handle):
                with tarfile.open(fileobj=handle, mode="w:gz") as archive:
                    _add_bytes(archive, "HEAD", (default + "\n").encode())
                    for name, head in sorted(refs.items()):
                        _add_bytes(archive, f"refs/heads/{name}", _ref_file(head or _NO_COMMITS))
                    _add_stream(archive, f"objects/pack/{_pack_name(1)}", size, stream)
            _write_whole(filename, write, directory, prefix=temp_prefix)
        return len(objects)

    @classmethod
    def load_backup(cls, filename, root):
        """Extract a backup into root (missing or empty) safely and check it: a Store."""
        return load_backup(filename, root)

    # -- fsck --------------------------------------------------------------------------------------

    def fsck(self):
        """Check every object's hash (loose files and pack records), every reference
        reachable from a branch, the refs and HEAD: an FsckReport, the list of problems
        found (empty = clean). Objects no branch reaches (a killed writer's, say) are
        dangling, not problems."""
        problems = FsckReport()
        kinds = self._objects.check(problems)      # hash -> kind, None if damaged
        try:
            default = self._refs.default_branch(fresh=True)
            if default not in self.branches():
                problems.append(f"HEAD names a missing branch {default!r}")
        except StoreError as exc:
            problems.append(str(exc))
        heads = []
        for name in self.branches():
            try:
                head = self._read_ref(name)
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if head and kinds.get(head) != "commit":
                if kinds.get(head, "commit") is not None:
                    problems.append(f"branch {name!r} points at a missing commit {head}")
            elif head:
                heads.append(head)
        reached = self._check_references(heads, kinds, problems)
        problems.checked, problems.dangling = len(kinds), len(set(kinds) - reached)
        return problems

    def _check_references(self, heads, kinds, problems):
        """Walk everything reachable from heads; report missing or mistyped objects.
        Returns the hashes reached."""
        reached = set()
        stack = [(head, "commit") for head in heads]
        while stack:
            digest, kind = stack.pop()
            if digest in reached:
                continue
            reached.add(digest)
            if kind == "module" or kinds.get(digest) is None:
                continue                       # a module, or damage reported already
            try:
                parsed = self._load(digest, kind)
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if kind == "tree":
                wanted = [(child, child_kind) for child_kind, child in parsed.values()]
            else:
                wanted = [(parsed["tree"], "tree")] + [(p, "commit") for p in parsed["parents"]]
            for child, child_kind in wanted:
                found = kinds.get(child, "missing")
                if found is None:
                    reached.add(child)         # a bad object: reported once, where it was read
                elif found != child_kind:
                    problems.append(f"{kind} {digest} refers to a missing {child_kind} {child}")
                else:
                    stack.append((child, child_kind))
        return reached


class FsckReport(list):
    """What Store.fsck found: a list of one-line problems (empty = clean), with the number
    of objects checked and of dangling ones (no branch reaches them; gc deletes them)."""

    checked = dangling = 0


# ---------------------------------------------------------------------------
# history cache
# ---------------------------------------------------------------------------

def _module_changes(changes):
    """{printed path: new module hash or None} from changes() output."""
    return {path: (None if change["action"] == "removed" else
                   change["hash"]["new"] if change["action"] == "updated" else change["hash"])
            for path, change in changes.items()}


class _HistoryCache:
    """A derived, append-only file: one line per commit with its first parent and the
    module paths it changed, so versions() reads one file instead of two objects per
    commit. Lines carry a CRC; a bad, missing or lost line only costs speed (the caller
    diffs that commit's objects instead). It is not fsynced, not backed up, and gc
    rewrites it keeping the lines of reachable commits."""

    def __init__(self, path, tmp_dir):
        self.path = path
        self.tmp_dir = tmp_dir
        self._lock = threading.Lock()
        self._key = None               # (inode, bytes parsed)
        self._known = {}               # commit -> (first parent or None, {path: hash|None})

    def record(self, commit, parent, changes):
        """Append commit's line (callers hold the ref lock, which orders appends)."""
        fields = [commit, parent or "-"]
        for path, digest in _module_changes(changes).items():
            fields += [path, digest or "-"]
        line = _history_line(fields)
        with contextlib.suppress(OSError):      # a cache: losing a line costs speed only
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(self.path, flags, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line        # a crash cut the last line: start afresh
                _write_all(fd, line)
            finally:
                os.close(fd)

    def load(self):
        """{commit: (parent, changes)} of every valid line, reading only what is new."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._key, self._known = None, {}
                return self._known
            try:
                info = os.fstat(fd)
                inode, parsed = self._key or (None, 0)
                if inode != info.st_ino or parsed > info.st_size:
                    parsed, self._known = 0, {}
                os.lseek(fd, parsed, os.SEEK_SET)
                data = _read_exactly(fd, info.st_size - parsed)
            finally:
                os.close(fd)
            complete = data[:data.rfind(b"\n") + 1]     # a line being appended waits
            self._parse(complete.decode("utf-8", "replace"))
            self._key = (info.st_ino, parsed + len(complete))
            return self._known

    def _parse(self, text):
        for line in text.split("\n"):
            body, _, crc = line.rpartition("\t")
            if not body or crc != f"{zlib.crc32(body.encode('utf-8')):08x}":
                continue
            fields = body.split("\t")
            parent = None if fields[1] == "-" else fields[1]
            changes = {path: (None if digest == "-" else digest)
                       for path, digest in zip(fields[2::2], fields[3::2])}
            self._known[fields[0]] = (parent, changes)

    def compact(self, reachable):
        """Rewrite the file with the lines of reachable commits (under the ref lock)."""
        known = dict(self.load())
        lines = []
        for commit, (parent, changes) in known.items():
            if commit in reachable:
                fields = [commit, parent or "-"]
                for path, digest in changes.items():
                    fields += [path, digest or "-"]
                lines.append(_history_line(fields))
        with contextlib.suppress(OSError):     # a cache: not fsynced
            _write_whole(self.path, b"".join(lines), self.tmp_dir, durable=False)


def _history_line(fields):
    body = "\t".join(fields)
    return f"{body}\t{zlib.crc32(body.encode('utf-8')):08x}\n".encode("utf-8")


# ---------------------------------------------------------------------------
# object helpers
# ---------------------------------------------------------------------------

def _author(author):
    if author is None or author == "":
        return DEFAULT_AUTHOR
    if not isinstance(author, str) or len(author) > MAX_AUTHOR_CHARS or \
            CONTROL_CHARS.search(author):
        raise InvalidInput(f"invalid author {_short(author)}: at most {MAX_AUTHOR_CHARS} "
                           "characters, no control characters")
    return author


def _weight(parsed):
    return 1 + len(parsed[1]) if parsed[0] == "tree" else 1


def _parse_object(data, digest):
    """("tree", {name: (kind, hash)}) or ("commit", dict); modules: ("module", None)."""
    if data[:4] == WASM_MAGIC:
        return ("module", None)
    try:
        document = json.loads(data)
        kind = document["type"]
        if kind == "tree":
            entries = {}
            for name, (entry_kind, child) in document["entries"].items():
                if _segment_problem(name) or entry_kind not in ("module", "tree") \
                        or not _is_hash(child):
                    raise ValueError(name)
                entries[name] = (entry_kind, child)
            return ("tree", entries)
        if kind == "commit":
            if not _is_hash(document["tree"]) or not all(map(_is_hash, document["parents"])):
                raise ValueError("bad hash")
            if not isinstance(document["date"], int) or not isinstance(document["message"], str):
                raise ValueError("bad field")
            return ("commit", document)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        pass      # RecursionError: JSON nested deeper than any tree or commit (a damaged or
                  # crafted object, from a backup say)
    raise _not_an_object(digest)


def _not_an_object(digest):
    return CorruptObject(f"object {digest} is not a module, tree or commit")


def _commit_info(digest, commit):
    info = {"hash": digest}
    if commit["parents"]:
        info["parents"] = list(commit["parents"])
    info.update(author=commit["author"], date=commit["date"], message=commit["message"])
    return info


def _read_up_to(reader, limit, size_limit):
    """Up to limit bytes from a binary reader (fewer only at its end)."""
    chunks, size = [], 0
    while size < limit:
        chunk = reader.read(min(CHUNK_SIZE, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        _check_size(size, size_limit)
    return b"".join(chunks)


def _check_size(size, size_limit):
    if size_limit is not None and size > size_limit:
        raise TooLarge(f"module is larger than the limit of {size_limit} bytes")


def _wasm_files(directory):
    """[(relative path with "/", file name)] of every *.wasm file under directory."""
    if not os.path.isdir(directory):
        raise NotFound(f"no such directory {directory!r}")
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".wasm"):
                filename = os.path.join(parent, name)
                relative = os.path.relpath(filename, directory).replace(os.sep, "/")
                found.append((relative, filename))
    return found


def _add_bytes(archive, name, data):
    _add_stream(archive, name, len(data), io.BytesIO(data))


def _add_stream(archive, name, size, stream):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    archive.addfile(info, stream)


# ---------------------------------------------------------------------------
# backup loading
# ---------------------------------------------------------------------------

_BACKUP_MEMBER = re.compile(          # what Store.backup writes, and its directories
    r"(HEAD|refs|refs/heads|refs/heads/(?P<branch>[^/]+)|objects|objects/pack"
    r"|objects/pack/[0-9a-f]{16}\.pack)\Z")
_BACKUP_DIRECTORIES = {"refs", "refs/heads", "objects", "objects/pack"}   # the rest are files
_SMALL_MEMBER_BYTES = 4096             # HEAD is a line, a ref 256 bytes
_BACKUP_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError,
                       UnicodeError, struct.error)


def load_backup(filename, root):
    """Extract a backup made by Store.backup into root (missing or empty), check it with
    fsck, and return the Store.

    A first pass reads only the member headers and refuses, before anything is written:
    members that are not part of a store or could escape root, more than
    MAX_BACKUP_MEMBERS members, a HEAD or ref over 4 KiB, and more bytes in all than
    MAX_BACKUP_EXPANSION times the archive's size or than the free space under root. Any
    damage (truncation, flipped bits) is a one-line InvalidInput; on any problem the partly
    extracted root is removed again."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise InvalidInput(f"cannot load a backup into {root!r}: it is not an empty directory")
    try:
        archive_bytes = os.path.getsize(filename)
    except FileNotFoundError:
        raise NotFound(f"no such backup file {filename!r}") from None
    created = not os.path.exists(root)
    try:
        with _open_backup(filename) as archive:
            _check_members(archive, archive_bytes, root)
        with _open_backup(filename) as archive:
            os.makedirs(root, exist_ok=True)
            _extract_members(archive, root, filename)
        store = Store(root)
        problems = store.fsck()
        if problems:
            raise CorruptObject(f"backup {filename!r} fails fsck: {problems[0]} "
                                f"({len(problems)} problems)")
        return store
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        elif os.path.isdir(root):
            for name in os.listdir(root):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        raise


@contextlib.contextmanager
def _open_backup(filename):
    try:
        archive = tarfile.open(filename, "r:*")
    except _BACKUP_READ_ERRORS as exc:
        raise _unreadable(filename, exc) from None
    with archive:
        try:
            yield archive
        except _BACKUP_READ_ERRORS as exc:
            if isinstance(exc, OSError) and exc.filename:
                raise                          # writing root failed: not the archive's fault
            raise _unreadable(filename, exc) from None


def _unreadable(filename, exc):
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return InvalidInput(f"{filename!r} is not a readable backup (damaged or truncated?): "
                        f"{reason}")


def _member_name(member):
    name = member.name[2:] if member.name.startswith("./") else member.name
    return name.rstrip("/")


def _is_store_member(name, member):
    match = _BACKUP_MEMBER.match(name)
    return match is not None and (member.isfile() or member.isdir()) and \
        (match.group("branch") is None or _is_branch_name(match.group("branch")))


def _check_members(archive, archive_bytes, root):
    """The first pass: names, kinds, count and sizes of every member, nothing written."""
    budget = MAX_BACKUP_EXPANSION * archive_bytes + (1 << 20)
    free = _free_bytes(root)
    total = count = 0
    files = set()
    for member in archive:
        count += 1
        if count > MAX_BACKUP_MEMBERS:
            raise InvalidInput(f"the backup has more than {MAX_BACKUP_MEMBERS:,} members; "
                               "refusing to extract it")
        name = _member_name(member)
        if name in ("", "."):
            continue
        if not _is_store_member(name, member):
            raise InvalidInput(f"backup member {member.name!r} is not part of a store; "
                               "refusing to extract it")
        _check_member_shape(name, member, files)
        if member.isfile() and not name.startswith("objects/") and \
                member.size > _SMALL_MEMBER_BYTES:
            raise InvalidInput(f"backup member {name!r} holds {member.size:,} bytes; "
                               f"expected at most {_SMALL_MEMBER_BYTES:,}")
        total += member.size if member.isfile() else 0
        if total > budget:
            raise InvalidInput(f"the backup expands to more than {budget:,} bytes "
                               f"({MAX_BACKUP_EXPANSION} times its size); refusing to "
                               "extract it")
        if free is not None and total > free:
            raise InvalidInput(f"the backup needs more than the {free:,} bytes free "
                               f"under {root!r}")
    if "HEAD" not in files:
        raise InvalidInput("the archive has no HEAD: it is not a wasmstore backup")


def _check_member_shape(name, member, files):
    """A store's directories are directories and its files files, each file once (files:
    the names seen so far, extended)."""
    if member.isdir() != (name in _BACKUP_DIRECTORIES):
        found, expected = ("a directory", "file") if member.isdir() else ("a file", "directory")
        raise InvalidInput(f"backup member {name!r} is {found} where a store has a "
                           f"{expected}; refusing to extract it")
    if member.isfile():
        if name in files:
            raise InvalidInput(f"backup member {name!r} appears twice (a store has one); "
                               "refusing to extract it")
        files.add(name)


def _free_bytes(root):
    """Bytes free to an unprivileged writer on root's file system (root may not exist)."""
    directory = root
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    try:
        info = os.statvfs(directory)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def _extract_members(archive, root, filename):
    for member in archive:
        name = _member_name(member)
        if name in ("", "."):
            continue
        if not _is_store_member(name, member):
            raise InvalidInput(f"backup member {member.name!r} changed between reads")
        target = os.path.join(root, *name.split("/"))
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = archive.extractfile(member)
        with open(target, "xb") as out:
            shutil.copyfileobj(source, out, CHUNK_SIZE)
            if out.tell() != member.size:
                raise _unreadable(filename, f"member {name!r} is truncated")


# ---------------------------------------------------------------------------
# running stored modules
# ---------------------------------------------------------------------------

KV_FILE = "kv.sqlite3"                 # the default kv backend lives with the store
RESOLVED_CACHE_SIZE = 4096             # resolved (branch, path) pairs a Runner keeps


def default_kv_url(root):
    """sqlite:<root>/kv.sqlite3: stored modules keep their state next to the store."""
    return "sqlite:" + os.path.join(os.path.abspath(os.path.expanduser(os.fspath(root))), KV_FILE)


def _kvhost():
    """kvhost.py, the runtime and the wasm reader: a sibling file, needed to run modules and to
    read components."""
    try:
        import kvhost
    except ModuleNotFoundError as exc:
        # Only "kvhost.py or wasmtime is not installed" (as http_server.py decides): an import
        # that fails inside them is a bug, and must say so.
        if exc.name != "kvhost" and (exc.name or "").partition(".")[0] != "wasmtime":
            raise
        raise StoreError("running modules needs kvhost.py next to wasmstore.py and the wasmtime "
                         "package (pip install wasmtime)") from None
    return kvhost


PROVIDER_PREFIX = "component:"         # --kv component:PATH: a provider component stored at PATH


def kv_options(store, kv=None, provider_kv=None):
    """kvhost.Host's kv options for modules of `store`. kv: a backend URL (default: sqlite under
    the store root) or "component:PATH", a wasi:keyvalue provider component stored at PATH (as
    the default branch holds it now), which then serves the guests' wasi:keyvalue over
    provider_kv (default: sqlite under the store root)."""
    kv = kv or default_kv_url(store.root)
    if not (isinstance(kv, str) and kv.startswith(PROVIDER_PREFIX)):
        if provider_kv is not None:
            raise InvalidInput(f"--provider-kv {_short(provider_kv)} is the backend beneath a "
                               "provider: it needs --kv component:PATH")
        return {"kv": kv}
    path = kv[len(PROVIDER_PREFIX):]
    if not path:
        raise InvalidInput(f"invalid --kv {_short(kv)}: expected component:PATH, a provider "
                           "stored at PATH")
    digest, _ = store.module_at(path)
    provider = _kvhost().Provider(store.module_filename(digest), digest=digest,
                                  name=format_path(validate_path(path)))
    return {"kv": provider, "provider_kv": provider_kv or default_kv_url(store.root)}


def parse_namespace_map(entries):
    """[(prefix segments, namespace)] from "PREFIX=NAMESPACE" texts, longest prefix first."""
    parsed = []
    for entry in entries or ():
        prefix, sep, namespace = str(entry).partition("=")
        if not sep or not namespace or "\0" in namespace or len(namespace) > MAX_NAMESPACE_CHARS:
            raise InvalidInput(f"invalid namespace mapping {_short(entry)}: "
                               "expected PREFIX=NAMESPACE")
        parsed.append((tuple(validate_path(prefix)), namespace))
    return sorted(parsed, key=lambda item: -len(item[0]))


def parse_links(entries):
    """{import module name: printed store path} from "NAME=PATH" texts (--link) or (name, path)
    pairs, for Runner: kvhost's one link parser (kvhost.link_table), with stored paths as the
    targets; InvalidInput for a mistake."""
    if not entries:
        return {}
    kvhost = _kvhost()
    try:
        return kvhost.link_table(entries, lambda path: format_path(validate_path(path)),
                                 expected="NAME=PATH, a stored path")
    except kvhost.ArgumentError as exc:
        raise InvalidInput(str(exc)) from None


class Target:
    """A stored module picked for running: the hash of its bytes, the commit whose tree it was
    found in (its imports of other stored modules resolve in that tree too), the printed path
    (None when it was named by hash) and its kv namespace."""

    __slots__ = ("digest", "commit", "path", "namespace")

    def __init__(self, digest, commit, path, namespace):
        self.digest = digest
        self.commit = commit
        self.path = path
        self.namespace = namespace

    def __repr__(self):
        return f"Target({self.path or self.digest!r}, commit={self.commit!r})"


class Runner:
    """Runs modules and components stored in a Store, on kvhost (imported when first needed).

    A path, a hash, an older version (index into versions()) or a commit picks the module;
    the bytes go to kvhost with their hash, so a module is compiled once (kvhost's compile cache
    survives restarts) and never re-hashed per call. State: a module's wasi:keyvalue namespace
    is its path ("/apps/counter.wasm"), kept across runs and new versions; a module called by
    hash uses "sha256:<hash>"; on a branch other than the store's default, "<branch>:" comes
    first ("dev:/apps/counter.wasm"), so a branch never reads or writes the default branch's
    data (merging moves no data either); a name over 1,024 characters is cut and ends in its
    SHA-256. `namespaces` ([(prefix segments, namespace)], see parse_namespace_map) lets an
    operator give every module under a prefix one namespace, shared by every branch. Core
    modules whose imports name a store path (or a hash) are linked to those modules in the same
    commit; `links` ({import module name: store path}, the CLI's and the server's --link
    NAME=PATH) links imports from any other module name ("env") to the module at that path, in
    the same commit too. `host` is a kvhost.Host (default: one made from host_options, whose kv
    and provider_kv go through kv_options: sqlite under the store root, or "component:PATH", a
    provider stored at PATH)."""

    def __init__(self, store, host=None, *, namespaces=(), links=None, **host_options):
        kvhost = _kvhost()
        self.store = store
        self.namespaces = list(namespaces)
        self.links = parse_links((links or {}).items())
        self._resolved = Cache(RESOLVED_CACHE_SIZE)   # (generation, how it was named) -> Target
        self._owns_host = host is None
        if host is None:
            host_options.update(kv_options(store, host_options.pop("kv", None),
                                           host_options.pop("provider_kv", None)))
            host = kvhost.Host(**host_options)
        self.host = host

    def close(self):
        """Close the kvhost.Host if this Runner made it (a Host passed in stays open)."""
        if self._owns_host:
            self.host.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- resolution --------------------------------------------------------------------------------

    def resolve(self, path_or_hash, *, branch=None, version=None, commit=None):
        """The Target for a path or hash on a branch, at an older version index, or in a commit.

        Answers are kept while the store's generation stays the same (any ref change, in any
        process, changes it: a new version is what the next call runs)."""
        return self._target(path_or_hash, branch, version, commit)

    def _target(self, path_or_hash, branch, version, commit):
        generation = self.store.generation()    # read first: a change meanwhile shows next time
        key = (generation, branch, path_or_hash, version, commit)
        target = self._resolved.get(key)
        if target is None:
            target = self._resolve(path_or_hash, branch, version, commit)
            if generation is not None:
                self._resolved.put(key, target)
        return target

    def _resolve(self, path_or_hash, branch, version, commit):
        if version is not None and commit is not None:
            raise InvalidInput("give a version or a commit, not both")
        kind, value = _target(path_or_hash)
        if version is not None:
            if kind == "hash":
                raise InvalidInput("versions belong to a path; a hash names one module already")
            digest, commit = self.store.version(version, path_or_hash, branch=branch)
        else:
            digest, commit = self.store.module_at(path_or_hash, branch=branch, commit=commit)
        if kind == "hash":
            return Target(digest, commit, None, self._on_branch(f"sha256:{digest}", branch))
        return Target(digest, commit, format_path(value), self._namespace_of(value, branch))

    def resolve_prefix(self, segments, *, branch=None, version=None, commit=None):
        """(Target, n) for the shortest leading part of `segments` (the store path at the
        start of a URL path, the app's own path after it) that names a module, n being how
        many segments it took. A path names either a module or a directory, so the answer is
        unambiguous; a 64-hex first segment is a hash, as everywhere."""
        segments = list(segments)[:MAX_SEGMENTS]
        if not segments:
            raise NotFound("no store path given")
        for count in range(1, len(segments) + 1):
            try:
                return self._target(format_path(segments[:count]), branch, version, commit), count
            except NotFound:
                if count == 1 and _is_hash(segments[0]):
                    raise
        raise NotFound(f"no module at {format_path(segments)} or at a path above it")

    def _namespace_of(self, segments, branch):
        for prefix, namespace in self.namespaces:
            if segments[:len(prefix)] == prefix:
                return namespace             # an operator's choice: shared by every branch
        return self._on_branch(format_path(segments), branch)

    def _on_branch(self, name, branch):
        """The namespace of a module named `name` (its path, or sha256:<hash>) on `branch`: the
        name itself on the store's default branch, "<branch>:<name>" on any other, so that
        trying a version on a branch never touches the data the default branch serves (branch
        names hold no ":" or "/", so no path's namespace looks like another branch's). A
        namespace longer than kvhost takes ends in the SHA-256 of the whole name instead."""
        if branch is not None and branch != self.store.default_branch:
            name = f"{branch}:{name}"
        if len(name) <= MAX_NAMESPACE_CHARS:
            return name
        tail = "...sha256:" + hashlib.sha256(name.encode("utf-8")).hexdigest()
        return name[:MAX_NAMESPACE_CHARS - len(tail)] + tail

    def load(self, target):
        """The kvhost Guest for a target (compiled once per module hash)."""
        guest = self.host.loaded(target.digest)
        if guest is None:
            guest = self.host.load(self.store.module_filename(target.digest), digest=target.digest,
                                   name=target.path or target.digest)
        return guest

    def _linker_for(self, target, guest, reach=None):
        """resolve(import module name) for kvhost: store paths and hashes in the target's commit
        (None for a guest with no imports to link). reach(module name) -> bool, when given,
        leaves the names it refuses unlinked, exactly as if nothing were stored there (a
        server's key limited to some paths links only what it may reach; the links an operator
        gave, self.links, are followed whatever the key)."""
        if not guest.links_needed:
            return None

        def resolve(module_name):
            linked = self.links.get(module_name)
            if linked is not None:
                try:
                    digest, _ = self.store.module_at(linked, commit=target.commit)
                except NotFound:
                    raise _kvhost().LinkError(
                        f"{target.path or target.digest} imports {module_name!r}, linked to "
                        f"{linked}, but there is no module at {linked} in commit "
                        f"{target.commit[:12]}") from None
                return self.load(Target(digest, target.commit, linked, None))
            if not module_name.startswith("/") and not _is_hash(module_name):
                return None
            if reach is not None and not reach(module_name):
                return None
            try:
                digest, _ = self.store.module_at(module_name, commit=target.commit)
            except (InvalidInput, NotFound):
                return None
            return self.load(Target(digest, target.commit, module_name, None))
        return resolve

    def _prepare(self, path_or_hash, branch, version, commit):
        """(Target, Guest): path_or_hash may be a Target resolve() gave already."""
        target = path_or_hash if type(path_or_hash) is Target else \
            self._target(path_or_hash, branch, version, commit)
        return target, self.load(target)

    # -- running -----------------------------------------------------------------------------------

    def call(self, path_or_hash, function, args=(), *, branch=None, version=None, commit=None,
             namespace=None, stats=None, reach=None):
        """Call an exported function with JSON-style arguments (kvhost.Host.call's mapping).
        path_or_hash may also be a Target from resolve() (then branch/version/commit are unused);
        reach: which stored modules its imports may link to (see _linker_for)."""
        # the hot path of every call: _prepare inlined
        target = path_or_hash if type(path_or_hash) is Target else \
            self._target(path_or_hash, branch, version, commit)
        guest = self.host.loaded(target.digest) or self.load(target)
        return self.host.call(guest, function, args, namespace=namespace or target.namespace,
                              resolve=self._linker_for(target, guest, reach)
                              if guest.links_needed else None, stats=stats)

    def call_captured(self, path_or_hash, function, args=(), *, branch=None, version=None,
                      commit=None, namespace=None, limit=None, stats=None, reach=None):
        """Like call(), with the guest's stdout and stderr kept, never written to this process's
        streams (kvhost.CallResult: .value, .stdout, .stderr and their totals)."""
        target = path_or_hash if type(path_or_hash) is Target else \
            self._target(path_or_hash, branch, version, commit)
        guest = self.host.loaded(target.digest) or self.load(target)
        options = {} if limit is None else {"limit": limit}
        return self.host.call_captured(guest, function, args,
                                       namespace=namespace or target.namespace,
                                       resolve=self._linker_for(target, guest, reach)
                                       if guest.links_needed else None, stats=stats, **options)

    def run(self, path_or_hash, argv=(), *, branch=None, version=None, commit=None, namespace=None,
            stdin=None, stats=None, reach=None):
        """Run a wasi:cli/run component or a WASI command module; returns its exit status."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        return self.host.run(guest, argv, namespace=namespace or target.namespace,
                             resolve=self._linker_for(target, guest, reach), stdin=stdin,
                             stats=stats)

    def run_captured(self, path_or_hash, argv=(), *, branch=None, version=None, commit=None,
                     namespace=None, stdin=b"", limit=None, stats=None, reach=None):
        """Like run(), with stdout and stderr kept (kvhost.RunResult)."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        options = {} if limit is None else {"limit": limit}
        return self.host.run_captured(guest, argv, namespace=namespace or target.namespace,
                                      resolve=self._linker_for(target, guest, reach),
                                      stdin=stdin, stats=stats, **options)

    def handle_http(self, path_or_hash, request, sink, *, branch=None, version=None,
                    commit=None, namespace=None, stats=None):
        """Answer one HTTP request with a stored wasi:http handler (kvhost.Host.handle_http):
        request a kvhost.HttpRequest, sink where the response goes (start, write, flush,
        finish). path_or_hash may be a Target from resolve() or resolve_prefix()."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        return self.host.handle_http(guest, request, sink,
                                     namespace=namespace or target.namespace)

    def describe(self, path_or_hash, *, branch=None, version=None, commit=None):
        """{"kind", "exports", "imports"} of a stored module, never compiling it
        (kvhost.Host.describe); path_or_hash may be a Target from resolve()."""
        target = path_or_hash if type(path_or_hash) is Target else \
            self._target(path_or_hash, branch, version, commit)
        return self.host.describe(self.store.module_filename(target.digest), digest=target.digest,
                                  name=target.path or target.digest)

    def exports(self, path_or_hash, *, branch=None, version=None, commit=None):
        """The callable exports of a stored module (kvhost.describe_exports), never compiling
        it."""
        return self.describe(path_or_hash, branch=branch, version=version,
                             commit=commit)["exports"]


# ---------------------------------------------------------------------------
# OCI registries
# ---------------------------------------------------------------------------

def _http_modules():
    """http.client and ssl, imported on first use: they add ~20 ms to the start-up of every
    other command."""
    import http.client
    import ssl
    return http.client, ssl


def _is_loopback(host):
    """True for localhost names and loopback addresses: plain HTTP is allowed there."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _clean_text(text, limit=200):
    """Text from a peer made safe for a one-line message: no control characters, bounded."""
    line = " ".join(CONTROL_CHARS.sub(" ", str(text)).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _size_text(size):
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


class OciReference:
    """``oci://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]``, parsed and checked against the
    distribution spec's grammar (repository: lowercase components joined by "/"; tag:
    ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``; digest: ``sha256:<64 hex>``)."""

    __slots__ = ("registry", "repository", "tag", "digest")

    def __init__(self, registry, repository, tag=None, digest=None):
        self.registry = registry          # "host[:port]" as written ("[::1]:5000" for IPv6)
        self.repository = repository      # "" only for a push --all prefix naming the root
        self.tag = tag
        self.digest = digest

    @classmethod
    def parse(cls, text, *, prefix=False):
        """Parse and validate; prefix=True allows an empty repository (push --all)."""
        usage = "expected oci://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]"
        if not isinstance(text, str) or not text.startswith("oci://"):
            raise InvalidInput(f"invalid OCI reference {_short(text)}: {usage}")
        registry, _, remainder = text[len("oci://"):].partition("/")
        match = OCI_REGISTRY.match(registry)
        if not match or (match.group(2) and not 0 < int(match.group(2)) < 65536):
            raise InvalidInput(f"invalid registry {_short(registry)} in OCI reference "
                               f"{_short(text)}: expected HOST or HOST:PORT")
        name, _, digest = remainder.partition("@")
        repository, tag = name, None
        if ":" in name:
            repository, _, tag = name.rpartition(":")
        if digest and not OCI_DIGEST.match(digest):
            raise InvalidInput(f"invalid digest {_short(digest)} in OCI reference: "
                               "expected sha256: and 64 lowercase hex digits")
        if tag is not None and not OCI_TAG.match(tag):
            raise InvalidInput(f"invalid tag {_short(tag)} in OCI reference: expected 1-128 "
                               "of [A-Za-z0-9._-], not starting with '.' or '-'")
        if repository or not prefix:
            _check_repository(repository, registry)
        if prefix and (tag is not None or digest):
            raise InvalidInput(f"{_short(text)}: push --all takes a repository prefix, "
                               "without :TAG or @DIGEST")
        return cls(registry, repository, tag, digest or None)

    @property
    def host(self):
        """The registry's host name or address (an IPv6 address without brackets)."""
        return OCI_REGISTRY.match(self.registry).group(1).strip("[]")

    @property
    def port(self):
        """The registry's port, None when the reference names none."""
        port = OCI_REGISTRY.match(self.registry).group(2)
        return int(port) if port else None

    @property
    def target(self):
        """What goes after /manifests/: the digest if given, else the tag ("latest")."""
        return self.digest or self.tag or "latest"

    def child(self, segments):
        """The reference of a store path under this prefix (push --all)."""
        name = "/".join(segments)
        repository = f"{self.repository}/{name}" if self.repository else name
        _check_repository(repository, self.registry)
        return OciReference(self.registry, repository)

    def __str__(self):
        text = f"oci://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def __repr__(self):
        return f"OciReference({str(self)!r})"


def is_branch_tag(branch):
    """True if a branch is offered as an OCI tag of its own name: valid tag syntax, and not
    "latest" or vN (those name the default branch's head and versions)."""
    return bool(OCI_TAG.match(branch)) and branch != "latest" and \
        not OCI_VERSION_TAG.match(branch)


def _check_repository(name, registry):
    if not OCI_REPOSITORY.match(name):
        raise InvalidInput(f"invalid repository name {_short(name)}: expected lowercase "
                           "[a-z0-9] components joined by '.', '_', '__' or '-', "
                           "separated by '/'")
    if len(registry) + 1 + len(name) > 255:
        raise InvalidInput(f"repository name {_short(name)} is too long: registry, '/' and "
                           "name must fit in 255 characters")


# -- the Wasm OCI artifact layout ------------------------------------------------------------------

def wasm_interface(source):
    """(kind, imports, exports) of a module file name or bytes: kind is "component" or
    "module"; for a component, the names of its top-level imports and exports (interface
    names such as "wasi:cli/run@0.2.0", or plain names), in order. Read by kvhost.py's wasm
    reader (kvhost.component_interface), from a map of a file."""
    if not isinstance(source, (str, os.PathLike)):
        return _interface_of(bytes(source))
    with open(source, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < len(COMPONENT_HEADER):
            return "module", [], []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _interface_of(mapped)


def _interface_of(data):
    if bytes(data[:8]) != COMPONENT_HEADER:
        return "module", [], []
    try:
        reader = _kvhost()
    except StoreError:
        raise StoreError("listing a component's interfaces needs kvhost.py next to "
                         "wasmstore.py") from None
    try:
        return reader.component_interface(data)
    except reader.WasmFormatError as exc:
        raise InvalidModule(f"invalid module: {exc}") from None


def _compact_json(document):
    """JSON with the keys in the order written: manifests and configs are hashed, so the
    same module always gives the same bytes."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WasmArtifact:
    """One stored module as a CNCF Wasm OCI artifact: its config and manifest bytes and
    their digests. Built only from the module and the commit that introduced it, so a
    store pushes and serves the same digests every time."""

    __slots__ = ("module_digest", "module_size", "filename", "config", "config_digest",
                 "manifest", "manifest_digest")

    def __init__(self, filename, module_hash, title, created, author):
        kind, imports, exports = wasm_interface(filename)
        self.filename = filename
        self.module_digest = "sha256:" + module_hash
        self.module_size = os.path.getsize(filename)
        config = {"created": created, "author": author, "architecture": "wasm",
                  "os": "wasip2" if kind == "component" else "wasip1",
                  "layerDigests": [self.module_digest]}
        if kind == "component":
            config["component"] = {"exports": exports, "imports": imports}
        self.config = _compact_json(config)
        self.config_digest = "sha256:" + hashlib.sha256(self.config).hexdigest()
        self.manifest = _compact_json({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_TYPE,
            "config": {"mediaType": WASM_CONFIG_TYPE, "digest": self.config_digest,
                       "size": len(self.config)},
            "layers": [{"mediaType": WASM_LAYER_TYPE, "digest": self.module_digest,
                        "size": self.module_size, "annotations": {OCI_TITLE: title}}],
        })
        self.manifest_digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def __repr__(self):
        return f"WasmArtifact({self.manifest_digest!r}, module={self.module_digest!r})"


def module_artifact(store, path, *, branch=None, digest=None, history=None):
    """The WasmArtifact of the module at path on branch (digest: of that version of it).

    created and author come from the commit that introduced that version; history, the
    path's store.versions() when the caller has it, saves reading it again."""
    segments = validate_path(path)
    if not segments:
        raise InvalidInput("a module needs a path, not the root")
    printed = format_path(segments)
    if digest is None:
        digest, filename = store.locate(printed, branch=branch)
    else:
        digest = validate_hash(digest)
        filename = store.module_filename(digest)
    if history is None:
        history = store.versions(printed, branch=branch)
    commit = next((commit for module, commit in history if module == digest), None)
    info = store.commit_info(commit) if commit else {"date": 0, "author": DEFAULT_AUTHOR}
    return WasmArtifact(filename, digest, segments[-1], _format_date(info["date"]), info["author"])


def _wasm_layer(data, content_type):
    """(digest, size) of the one application/wasm layer of a manifest, after checking the
    manifest's and its config's media types."""
    if content_type and content_type != OCI_MANIFEST_TYPE:
        raise RegistryError(f"the manifest has media type {_clean_text(content_type)!r}, "
                            f"expected {OCI_MANIFEST_TYPE}")
    try:
        manifest = parse_json(data, "manifest")
    except InvalidInput as exc:
        raise RegistryError(f"the registry sent an {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise RegistryError("the manifest is not an OCI image manifest (schemaVersion 2)")
    media_type = manifest.get("mediaType", OCI_MANIFEST_TYPE)
    if media_type != OCI_MANIFEST_TYPE:
        raise RegistryError(f"the manifest has media type {_clean_text(media_type)!r}, "
                            f"expected {OCI_MANIFEST_TYPE}")
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if config_type != WASM_CONFIG_TYPE:
        raise RegistryError(f"the manifest's config has media type "
                            f"{_clean_text(config_type)!r}, expected {WASM_CONFIG_TYPE}: "
                            "it is not a Wasm OCI artifact")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise RegistryError("a Wasm OCI artifact has exactly one layer; this manifest has "
                            f"{len(layers) if isinstance(layers, list) else 'no'} layers")
    layer = layers[0]
    if layer.get("mediaType") != WASM_LAYER_TYPE:
        raise RegistryError(f"the layer has media type {_clean_text(layer.get('mediaType'))!r}"
                            f", expected {WASM_LAYER_TYPE}")
    digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(digest, str) or not OCI_DIGEST.match(digest):
        raise RegistryError(f"the layer's digest {_clean_text(digest)!r} is not a sha256 "
                            "digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size:
        raise RegistryError(f"the layer's size {_clean_text(size)!r} is not a byte count")
    if size > OCI_MAX_MODULE_BYTES:
        raise RegistryError(f"the layer is {size} bytes, over the limit of "
                            f"{OCI_MAX_MODULE_BYTES} bytes")
    return digest, size


# -- credentials -----------------------------------------------------------------------------------

class Credentials:
    """A user name and password (or token) for one registry, and where they came from.
    repr() and str() never show the password."""

    __slots__ = ("username", "password", "source")

    def __init__(self, username, password, source):
        for value, what in ((username, "user name"), (password, "password")):
            if not isinstance(value, str) or not value or CONTROL_CHARS.search(value):
                raise InvalidInput(f"the registry {what} from {source} is empty or has a "
                                   "control character")
        if ":" in username:
            raise InvalidInput(f"the registry user name from {source} contains ':'")
        self.username = username
        self.password = password
        self.source = source

    def basic(self):
        """The value of an Authorization header for Basic auth."""
        import base64
        token = base64.b64encode(f"{self.username}:{self.password}".encode("utf-8"))
        return "Basic " + token.decode("ascii")

    def __repr__(self):
        return f"Credentials(username={self.username!r}, source={self.source!r})"

    __str__ = __repr__


def docker_config_file(environ=None):
    """The Docker client's config.json ($DOCKER_CONFIG/config.json or ~/.docker/config.json)."""
    environ = os.environ if environ is None else environ
    directory = environ.get("DOCKER_CONFIG") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def registry_credentials(registry, *, username=None, password=None, environ=None):
    """Credentials for registry ("host[:port]"), from the first source that has them:
    username/password, env WASMSTORE_OCI_USERNAME/WASMSTORE_OCI_PASSWORD, the "auths" of
    Docker's config.json (what `docker login` and `oras login` write). None: anonymous."""
    environ = os.environ if environ is None else environ
    if username is not None or password is not None:
        if not username or not password:
            raise InvalidInput("registry credentials need both a user name and a password")
        return Credentials(username, password, "the command line")
    username = environ.get("WASMSTORE_OCI_USERNAME")
    password = environ.get("WASMSTORE_OCI_PASSWORD")
    if username or password:
        if not username or not password:
            raise InvalidInput("set both WASMSTORE_OCI_USERNAME and WASMSTORE_OCI_PASSWORD")
        return Credentials(username, password, "WASMSTORE_OCI_USERNAME/PASSWORD")
    return _docker_credentials(registry, docker_config_file(environ))


def _docker_credentials(registry, filename):
    try:
        with open(filename, "rb") as handle:
            document = parse_json(handle.read(OCI_MAX_SMALL_BODY + 1), "JSON")
    except FileNotFoundError:
        return None
    except (OSError, InvalidInput) as exc:
        raise InvalidInput(f"cannot read Docker config {filename!r}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    for key, entry in (auths or {}).items():
        host = key.split("://", 1)[-1].split("/", 1)[0]
        if host != registry or not isinstance(entry, dict):
            continue
        source = f"{filename} (auths {key!r})"
        if entry.get("auth"):
            import base64
            import binascii
            try:
                pair = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, TypeError):
                raise InvalidInput(f"the auth entry of {source} is not base64 of "
                                   "user:password") from None
            user, sep, secret = pair.partition(":")
            if not sep:
                raise InvalidInput(f"the auth entry of {source} is not base64 of user:password")
            return Credentials(user, secret, source)
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"], source)
    return None


# -- the registry client ---------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


def _parse_challenge(header):
    """(scheme, {param: value}) of a WWW-Authenticate header (one challenge)."""
    scheme, _, rest = (header or "").strip().partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def _registry_detail(body):
    """": CODE: message" from an OCI error body, or "" (peer text, cleaned and bounded)."""
    try:
        errors = parse_json(body, "error body").get("errors")
        first = errors[0]
        return ": " + _clean_text(f"{first.get('code', '')}: {first.get('message', '')}")
    except Exception:            # any other body: the status line says enough
        return ""


class _Response:
    """A registry response on a pooled connection: bounded reads; once the body is read
    to its end the connection goes back to the pool, otherwise it is closed."""

    def __init__(self, client, connection, response, pooled=True):
        self.client = client
        self.connection = connection
        self.response = response
        self.pooled = pooled              # False: a connection to another host (a CDN)
        self.status = response.status
        self.reason = _clean_text(response.reason, 60)

    def header(self, name):
        return self.response.getheader(name)

    def length(self, what):
        """The Content-Length the registry announced (None without one); RegistryError when it
        is not a byte count in ASCII digits."""
        text = self.header("Content-Length")
        if text is None:
            return None
        try:
            return parse_number(text.strip(), "Content-Length")
        except InvalidInput as exc:
            self.close()
            raise RegistryError(f"{self.client.registry} sent {what} with an {exc}") from None

    def read(self, limit, what):
        """The whole body, or RegistryError when it is longer than limit."""
        length = self.length(what)
        if length is not None and length > limit:
            self.close()
            raise RegistryError(f"{what} from {self.client.registry} is {length} bytes, "
                                f"over the limit of {limit} bytes")
        try:
            data = self.response.read(limit + 1)
        except (OSError, self.client.http.HTTPException) as exc:
            self.close()
            raise RegistryError(f"reading {what} from {self.client.registry} failed: "
                                f"{_clean_text(exc)}") from None
        if len(data) > limit:
            self.close()
            raise RegistryError(f"{what} from {self.client.registry} is over the limit of "
                                f"{limit} bytes")
        self.finish()
        return data

    def chunk(self, size):
        try:
            return self.response.read(size)
        except (OSError, self.client.http.HTTPException) as exc:
            self.close()
            raise RegistryError(f"download from {self.client.registry} failed: "
                                f"{_clean_text(exc)}") from None

    def discard(self):
        """Read and drop a small body so the connection can be reused."""
        try:
            data = self.response.read(OCI_MAX_SMALL_BODY + 1)
        except (OSError, self.client.http.HTTPException):
            data = None
        if data is None or len(data) > OCI_MAX_SMALL_BODY:
            self.close()
        else:
            self.finish()
        return data or b""

    def finish(self):
        if self.connection is not None:
            if self.pooled and self.response.isclosed() and not self.response.will_close:
                self.client._checkin(self.connection)
            else:
                self.connection.close()
            self.connection = None

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class _VerifiedBlob:
    """A blob download read in chunks. At its end its size and SHA-256 must match the
    descriptor, or read() raises: a store reading it (add_file) then stores nothing."""

    def __init__(self, response, digest, size, what):
        self.response = response
        self.digest = digest
        self.size = size
        self.what = what
        self.received = 0
        self.hasher = hashlib.sha256()

    def read(self, size=CHUNK_SIZE):
        data = self.response.chunk(min(size, self.size - self.received + 1) or 1)
        if not data:
            if self.received != self.size:
                raise RegistryError(f"{self.what} ended after {self.received} of "
                                    f"{self.size} bytes; nothing was stored")
            actual = "sha256:" + self.hasher.hexdigest()
            if actual != self.digest:
                raise RegistryError(f"digest mismatch: {self.what} hashes to {actual}, "
                                    f"not {self.digest}; nothing was stored")
            self.response.finish()
            return b""
        self.received += len(data)
        if self.received > self.size:
            raise RegistryError(f"{self.what} is longer than its {self.size} bytes; "
                                "nothing was stored")
        self.hasher.update(data)
        return data

    def close(self):
        self.response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _Deadline:
    """The deadline of one registry operation: a watchdog thread that, once it has passed,
    shuts down every watched connection's socket (and keeps doing so for connections opened
    later), which ends any blocked send or receive at once."""

    def __init__(self, seconds):
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._connections = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wasmstore-deadline",
                                        daemon=True)
        self._thread.start()

    def socket_timeout(self, timeout):
        """timeout, or less when the deadline comes sooner."""
        if self.expired:
            raise RegistryError("the deadline has passed")
        return max(0.001, min(timeout, self.ends - time.monotonic()))

    def watch(self, connection):
        with self._lock:
            self._connections.append(connection)

    def stop(self):
        """End the watchdog; True if the deadline had passed."""
        self._done.set()
        self._thread.join()
        return self.expired

    def _watch(self):
        import socket
        if self._done.wait(max(0.0, self.ends - time.monotonic())):
            return
        self.expired = True
        while True:                       # a connection opened meanwhile is shut down too
            with self._lock:
                sockets = [connection.sock for connection in self._connections]
            for sock in sockets:
                if sock is not None:
                    try:          # the plain socket's shutdown: an SSL one would drop its state
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
            if self._done.wait(0.05):
                return


class RegistryClient:
    """An HTTP(S) client for one registry: pooled keep-alive connections (thread-safe),
    anonymous, Basic and Bearer-token auth answering the registry's WWW-Authenticate
    challenges, bounded reads, redirects kept on the registry's own host, and a deadline
    for each whole operation (bounded(): a pull or push, every request it makes).

    TLS is verified (ca_file adds trusted CAs). Plain HTTP is used with plain_http=True,
    and for a loopback registry whose port does not speak TLS (Docker's rule).
    """

    def __init__(self, registry, *, credentials=None, plain_http=False, ca_file=None,
                 timeout=OCI_TIMEOUT, deadline=OCI_DEADLINE):
        self.http, self.ssl = _http_modules()
        match = OCI_REGISTRY.match(registry) if isinstance(registry, str) else None
        if not match:
            raise InvalidInput(f"invalid registry {_short(registry)}: expected HOST[:PORT]")
        self.registry = registry
        self.host = match.group(1).strip("[]")
        self.port = int(match.group(2)) if match.group(2) else None
        self.credentials = credentials
        self.plain_http = bool(plain_http)
        self.timeout = timeout
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) \
                or not 0 < deadline < math.inf:
            raise InvalidInput(f"invalid deadline {_short(deadline)}: expected seconds > 0")
        self.deadline = deadline
        self._bound = None                # the _Deadline of the operation under way
        self.scheme = "http" if plain_http else "https"
        self._http_fallback = not plain_http and _is_loopback(self.host)
        try:
            self._context = self.ssl.create_default_context(cafile=ca_file)
        except (OSError, self.ssl.SSLError) as exc:
            raise InvalidInput(f"cannot load CA file {ca_file!r}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        self._idle = []
        self._lock = threading.Lock()
        self._tokens = {}                 # repository -> bearer token
        self._basic = False               # the registry asked for Basic auth

    @classmethod
    def for_reference(cls, reference, *, username=None, password=None, plain_http=False,
                      ca_file=None, environ=None, deadline=OCI_DEADLINE):
        """A client for the reference's registry, with credentials from the usual sources."""
        credentials = registry_credentials(reference.registry, username=username,
                                           password=password, environ=environ)
        return cls(reference.registry, credentials=credentials, plain_http=plain_http,
                   ca_file=ca_file, deadline=deadline)

    def __repr__(self):
        return f"RegistryClient({self.registry!r})"

    def close(self):
        """Close the pooled idle connections (a later request opens a new one)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @contextlib.contextmanager
    def bounded(self, what):
        """Run one whole operation (what: "pull of oci://...") within self.deadline seconds:
        past it, every connection of this client is shut down and the operation ends with
        RegistryError, however slowly the registry keeps sending. An operation inside
        another one runs within the outer deadline; a client bounds one operation at a time
        (the threads of that operation share it)."""
        if self._bound is not None:
            yield
            return
        self._bound = _Deadline(self.deadline)
        try:
            yield
        except Exception:
            if not self._bound.expired:
                raise
            raise RegistryError(f"{what} did not finish within its deadline of "
                                f"{self.deadline:g} s (--deadline SECONDS)") from None
        finally:
            bound, self._bound = self._bound, None
            if bound.stop():
                self.close()              # pooled connections were shut down too

    # -- connections -------------------------------------------------------------------------------

    def _connection(self, scheme, host, port):
        """A new connection (not connected yet) within the operation's deadline."""
        timeout = self.timeout
        if self._bound is not None:
            timeout = self._bound.socket_timeout(timeout)
        if scheme == "https":
            connection = self.http.HTTPSConnection(host, port, timeout=timeout,
                                                   context=self._context, blocksize=CHUNK_SIZE)
        else:
            connection = self.http.HTTPConnection(host, port, timeout=timeout,
                                                  blocksize=CHUNK_SIZE)
        if self._bound is not None:
            self._bound.watch(connection)
        return connection

    def _connect(self):
        scheme = self.scheme
        connection = self._connection(scheme, self.host, self.port)
        try:
            connection.connect()
        except self.ssl.SSLCertVerificationError as exc:
            connection.close()
            raise RegistryError(f"the TLS certificate of {self.registry} cannot be verified "
                                f"({_clean_text(exc.verify_message)}); --ca-file FILE "
                                "trusts a private CA") from None
        except (self.ssl.SSLError, ConnectionResetError) as exc:
            connection.close()
            if scheme == "https" and self._http_fallback:
                self.scheme = "http"      # a loopback registry without TLS
                return self._connect()
            raise RegistryError(f"TLS with {self.registry} failed: {_clean_text(exc)}"
                                ) from None
        except OSError as exc:
            connection.close()
            raise RegistryError(f"cannot reach registry {self.registry}: "
                                f"{_clean_text(exc.strerror or exc)}") from None
        import socket
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _checkout(self):
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _checkin(self, connection):
        with self._lock:
            if len(self._idle) < 2 * OCI_MIRROR_WORKERS:
                self._idle.append(connection)
                return
        connection.close()

    def _exchange(self, method, target, headers, body):
        """Send one request on a pooled connection; a keep-alive connection the registry
        closed meanwhile is replaced once."""
        for attempt in (0, 1):
            connection, reused = self._checkout()
            try:
                if hasattr(body, "seek"):
                    body.seek(0)
                connection.request(method, target, body=body, headers=headers)
                return _Response(self, connection, connection.getresponse())
            except (self.http.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                connection.close()
                if reused and attempt == 0:
                    self.close()          # the registry closed its idle connections: all stale
                    continue
                error = exc
            except (OSError, self.http.HTTPException) as exc:
                connection.close()
                error = exc
            message = getattr(error, "strerror", None) or error
            raise RegistryError(f"request to {self.registry} failed: {_clean_text(message)}")

    # -- requests ----------------------------------------------------------------------------------

    def _authorization(self, repository):
        token = self._tokens.get(repository)
        if token:
            return "Bearer " + token
        if self._basic and self.credentials is not None:
            return self.credentials.basic()
        return None

    def call(self, method, target, *, repository, what, ok=(200,), headers=None, body=None,
             foreign_redirects=False):
        """One request to the registry, answering its auth challenges and following its
        redirects (GET/HEAD); returns a _Response with a status in ok, else raises."""
        headers = dict(headers or {})
        headers["User-Agent"] = f"wasmstore/{__version__}"
        for _ in range(OCI_REDIRECTS + 1):
            for attempt in range(3):
                authorization = self._authorization(repository)
                if authorization:
                    headers["Authorization"] = authorization
                response = self._exchange(method, target, headers, body)
                try:
                    if response.status != 401 or attempt == 2 or \
                            not self._answer(response, repository, authorization):
                        break
                except BaseException:     # no token: the 401's connection is not reused
                    response.close()
                    raise
                response.discard()
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.header("Location") or ""
                response.discard()
                same, target = self._redirect_target(location, what)
                if not same:
                    if not foreign_redirects:
                        raise RegistryError(f"{self.registry} redirected {what} to another "
                                            f"host ({_clean_text(target.netloc)}); refusing")
                    return self._foreign_get(target, what)
                continue
            break
        else:
            response.discard()
            raise RegistryError(f"{self.registry} redirected {what} too many times")
        if response.status in ok:
            return response
        raise self._failure(response, what)

    def _redirect_target(self, location, what):
        """(True, path) for a redirect on this registry, (False, split URL) elsewhere."""
        import urllib.parse
        base = f"{self.scheme}://{self.registry}/"
        try:
            url = parse_url(urllib.parse.urljoin(base, location), "location")
        except (InvalidInput, ValueError) as exc:      # urljoin too refuses a broken IPv6 host
            raise RegistryError(f"{self.registry} redirected {what} to an unusable location "
                                f"({_clean_text(exc)})") from None
        own_port = self.port or (443 if self.scheme == "https" else 80)
        port = url.port or (443 if url.scheme == "https" else 80)
        if url.scheme == self.scheme and url.host == self.host.lower() and port == own_port:
            return True, (url.path or "/") + (f"?{url.query}" if url.query else "")
        return False, url

    def _foreign_get(self, url, what):
        """A blob download redirected to another host (registries hand blobs to CDNs): over
        verified TLS only, without our credentials; the caller checks the digest."""
        if url.scheme != "https":
            raise RegistryError(f"{self.registry} redirected {what} to plain HTTP on another "
                                f"host ({_clean_text(url.netloc)}); refusing")
        connection = self._connection("https", url.host, url.port)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            connection.request("GET", target, headers={"User-Agent": f"wasmstore/{__version__}"})
            response = _Response(self, connection, connection.getresponse(), pooled=False)
        except self.ssl.SSLCertVerificationError as exc:
            connection.close()
            raise RegistryError(f"the TLS certificate of {_clean_text(url.host)} cannot "
                                f"be verified ({_clean_text(exc.verify_message)})") from None
        except (OSError, self.http.HTTPException) as exc:
            connection.close()
            raise RegistryError(f"downloading {what} from {_clean_text(url.host)} failed: "
                                f"{_clean_text(getattr(exc, 'strerror', None) or exc)}"
                                ) from None
        if response.status != 200:
            response.close()
            raise RegistryError(f"{_clean_text(url.host)} answered {response.status} "
                                f"{response.reason} to the redirected download of {what}")
        return response

    def _failure(self, response, what):
        detail = _registry_detail(response.discard())
        status = response.status
        if status == 401:
            who = (f"the credentials from {self.credentials.source}" if self.credentials
                   else "anonymous access")
            return RegistryError(f"{self.registry} refused {who} for {what} "
                                 f"(401 unauthorized{detail})")
        if status == 403:
            return RegistryError(f"{self.registry} denied access to {what} (403 forbidden"
                                 f"{detail})")
        if status == 404:
            return NotFound(f"{what} not found in {self.registry} (404{detail})")
        return RegistryError(f"{self.registry} answered {status} {response.reason} to "
                             f"{what}{detail}")

    # -- auth --------------------------------------------------------------------------------------

    def _answer(self, response, repository, sent):
        """Act on a 401's challenge to a request sent with Authorization `sent`; True if the
        request is worth sending again (another thread may have answered it meanwhile)."""
        if self._authorization(repository) != sent:
            return True
        scheme, params = _parse_challenge(response.header("WWW-Authenticate"))
        if scheme == "basic":
            if self.credentials is None or self._basic:
                return False
            self._basic = True
            return True
        if scheme == "bearer" and params.get("realm"):
            self._tokens[repository] = self._fetch_token(params)
            return True
        return False

    def _fetch_token(self, params):
        """A bearer token from the challenge's realm (the registry token auth flow)."""
        import urllib.parse
        try:
            realm = parse_url(params["realm"], "token service")
        except InvalidInput as exc:
            raise RegistryError(f"{self.registry} announced an unusable token service "
                                f"({_clean_text(exc)})") from None
        service, port = _clean_text(realm.host), realm.port
        if realm.scheme == "http" and not (self.plain_http or _is_loopback(realm.host)):
            raise RegistryError(f"the token service of {self.registry} ({service}) is plain "
                                "HTTP; refusing to send credentials there (--plain-http "
                                "allows it)")
        query = urllib.parse.urlencode({key: params[key] for key in ("service", "scope")
                                        if params.get(key)})
        target = (realm.path or "/") + "?" + "&".join(
            part for part in (realm.query, query) if part)
        headers = {"User-Agent": f"wasmstore/{__version__}", "Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        connection = self._connection(realm.scheme, realm.host, port)
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            status = response.status
            body = response.read(OCI_MAX_SMALL_BODY + 1)
        except (OSError, self.http.HTTPException) as exc:
            raise RegistryError(f"cannot get a token from {service} for {self.registry}: "
                                f"{_clean_text(getattr(exc, 'strerror', None) or exc)}"
                                ) from None
        finally:
            connection.close()
        if status in (401, 403):
            who = (f"the credentials from {self.credentials.source}" if self.credentials
                   else "anonymous access")
            raise RegistryError(f"the token service {service} of {self.registry} refused "
                                f"{who} ({status}{_registry_detail(body)})")
        if status != 200 or len(body) > OCI_MAX_SMALL_BODY:
            raise RegistryError(f"the token service {service} of {self.registry} answered "
                                f"{status} with no usable token")
        try:
            document = parse_json(body, "token answer")
            token = document.get("token") or document.get("access_token")
        except (InvalidInput, AttributeError):
            token = None
        if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
            raise RegistryError(f"the token service {service} of {self.registry} sent no "
                                "usable token")
        return token

    # -- the distribution API ----------------------------------------------------------------------

    def blob_exists(self, repository, digest):
        """True if the registry holds the blob (a HEAD request: nothing is downloaded)."""
        response = self.call("HEAD", f"/v2/{repository}/blobs/{digest}", repository=repository,
                             what=f"blob {digest} of {repository}", ok=(200, 404))
        response.discard()
        return response.status == 200

    def upload_blob(self, repository, digest, size, source, *, mount_from=None):
        """Upload a blob (bytes, or a file name streamed) to repository; with mount_from,
        first ask the registry to mount that repository's copy. True if it was mounted."""
        import urllib.parse
        what = f"the upload of blob {digest} to {repository}"
        query = ""
        if mount_from:
            query = "?" + urllib.parse.urlencode({"mount": digest, "from": mount_from})
        response = self.call("POST", f"/v2/{repository}/blobs/uploads/{query}",
                             repository=repository, what=what, ok=(201, 202))
        location = response.header("Location") or ""
        response.discard()
        if response.status == 201:
            return True
        same, target = self._redirect_target(location, what)
        if not same:
            raise RegistryError(f"{self.registry} sent {what} to another host "
                                f"({_clean_text(target.netloc)}); refusing")
        target += ("&" if "?" in target else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with contextlib.ExitStack() as stack:
            body = source if isinstance(source, (bytes, bytearray)) else \
                stack.enter_context(open(source, "rb"))
            self.call("PUT", target, repository=repository, what=what, ok=(201,),
                      headers=headers, body=body).discard()
        return False

    def manifest_digest(self, repository, reference):
        """The digest a tag (or digest) names, or None when the registry has no such
        manifest. Reads no body."""
        response = self.call("HEAD", f"/v2/{repository}/manifests/{reference}",
                             repository=repository, ok=(200, 404),
                             what=f"manifest {reference} of {repository}",
                             headers={"Accept": OCI_MANIFEST_TYPE})
        response.discard()
        return response.header("Docker-Content-Digest") if response.status == 200 else None

    def get_manifest(self, repository, reference):
        """(bytes, digest, content type) of a manifest, checked against the digest asked
        for and the one the registry announced."""
        what = f"manifest {reference!r} of {repository}"
        response = self.call("GET", f"/v2/{repository}/manifests/{reference}",
                             repository=repository, what=what,
                             headers={"Accept": OCI_MANIFEST_TYPE})
        content_type = (response.header("Content-Type") or "").split(";")[0].strip()
        announced = response.header("Docker-Content-Digest")
        data = response.read(OCI_MAX_MANIFEST_BYTES, what)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        for expected in (reference if OCI_DIGEST.match(reference) else None, announced):
            if expected and expected.startswith("sha256:") and expected != digest:
                raise RegistryError(f"digest mismatch: {what} hashes to {digest}, not "
                                    f"{_clean_text(expected)}; nothing was stored")
        return data, digest, content_type

    def put_manifest(self, repository, reference, data):
        """Store manifest bytes under reference (a tag or a digest) in repository."""
        response = self.call("PUT", f"/v2/{repository}/manifests/{reference}",
                             repository=repository, ok=(200, 201),
                             what=f"the manifest {reference} of {repository}",
                             headers={"Content-Type": OCI_MANIFEST_TYPE}, body=bytes(data))
        response.discard()

    def open_blob(self, repository, digest, size):
        """A _VerifiedBlob streaming a blob; redirects to a CDN are followed over TLS."""
        what = f"blob {digest} of {repository}"
        response = self.call("GET", f"/v2/{repository}/blobs/{digest}", repository=repository,
                             what=what, foreign_redirects=True)
        length = response.length(what)
        if length is not None and length != size:
            response.close()
            raise RegistryError(f"{what} is {length} bytes, but the manifest says {size}; "
                                "nothing was stored")
        return _VerifiedBlob(response, digest, size, what)


# -- push, push --all, pull ------------------------------------------------------------------------

class TransferReport:
    """What a push or push_all did: tags written, what was uploaded, what was already
    there, what was skipped and why. Thread-safe counters."""

    def __init__(self, target):
        self.target = target
        self.manifest_digest = None
        self.tags_pushed = []             # "repository:tag" written
        self.tags_current = 0             # tags that already named the right manifest
        self.blobs_uploaded = 0
        self.blobs_mounted = 0
        self.blobs_present = 0
        self.bytes_uploaded = 0
        self.skipped = []                 # (printed store path, reason)
        self._lock = threading.Lock()

    def add(self, **deltas):
        """Add to counters (numbers) and extend lists (tags_pushed, skipped) by name."""
        with self._lock:
            for name, delta in deltas.items():
                if isinstance(delta, list):
                    getattr(self, name).extend(delta)
                else:
                    setattr(self, name, getattr(self, name) + delta)

    def transferred(self):
        """True if anything was written to the registry."""
        return bool(self.tags_pushed or self.blobs_uploaded or self.blobs_mounted)

    def summary(self):
        """Lines for a person: what was pushed, what was up to date, what was skipped."""
        lines = [f"{self.target}: pushed {_count(len(self.tags_pushed), 'tag')}, uploaded "
                 f"{_count(self.blobs_uploaded, 'blob')} ({_size_text(self.bytes_uploaded)}), "
                 f"mounted {self.blobs_mounted}, {self.blobs_present} already there; "
                 f"{_count(self.tags_current, 'tag')} up to date"]
        lines += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return lines


class _Pusher:
    """Puts artifacts into one registry: each blob is checked with HEAD and uploaded only
    when missing (mounted from another repository of the same push when possible). A
    manifest's two blobs travel at once on two connections: a registry's per-request
    latency, not the bytes, is most of the time."""

    def __init__(self, client, report, progress):
        self.client = client
        self.report = report
        self.progress = progress or (lambda text: None)
        self.placed = {}                  # blob digest -> a repository known to hold it
        self.lock = threading.Lock()
        self.helpers = concurrent.futures.ThreadPoolExecutor(
            OCI_MIRROR_WORKERS, thread_name_prefix="wasmstore-push")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.helpers.shutdown(wait=True)

    def ensure_blob(self, repository, digest, size, source):
        if self.client.blob_exists(repository, digest):
            self.report.add(blobs_present=1)
        else:
            with self.lock:
                mount_from = self.placed.get(digest)
            if size >= OCI_PROGRESS_BYTES:
                self.progress(f"uploading {digest[:19]} ({_size_text(size)}) to {repository}")
            if self.client.upload_blob(repository, digest, size, source, mount_from=mount_from):
                self.report.add(blobs_mounted=1)
            else:
                self.report.add(blobs_uploaded=1, bytes_uploaded=size)
        with self.lock:
            self.placed[digest] = repository

    def sync(self, repository, plan):
        """Make each tag of plan ({tag: artifact}) name its artifact; a tag that already does
        costs one HEAD. Returns the number of tags written."""
        pending = {}                      # manifest digest -> (artifact, [tag, ...])
        for tag, artifact in plan.items():
            if self.client.manifest_digest(repository, tag) == artifact.manifest_digest:
                self.report.add(tags_current=1)
            else:
                pending.setdefault(artifact.manifest_digest, (artifact, []))[1].append(tag)
        for artifact, tags in pending.values():
            self.push(repository, artifact, tags)
        return sum(len(tags) for _, tags in pending.values())

    def push(self, repository, artifact, tags):
        """The artifact's blobs (config in a helper thread), then its manifest under tags."""
        config = self.helpers.submit(self.ensure_blob, repository, artifact.config_digest,
                                     len(artifact.config), artifact.config)
        try:
            self.ensure_blob(repository, artifact.module_digest, artifact.module_size,
                             artifact.filename)
        except BaseException:
            concurrent.futures.wait([config])
            raise
        config.result()
        for tag in tags:
            self.client.put_manifest(repository, tag, artifact.manifest)
            self.report.add(tags_pushed=[f"{repository}:{tag}"])


@contextlib.contextmanager
def _client_for(reference, client, operation):
    """The caller's client (for the reference's registry), or one of our own, closed after,
    bounding the whole operation ("pull", "push") by the client's deadline."""
    if client is None:
        with RegistryClient.for_reference(reference) as own, \
                own.bounded(f"{operation} of {reference}"):
            yield own
        return
    if client.registry != reference.registry:
        raise InvalidInput(f"the client is for registry {client.registry!r}, the reference "
                           f"names {reference.registry!r}")
    with client.bounded(f"{operation} of {reference}"):
        yield client


def push(store, path, reference, *, branch=None, client=None, progress=None):
    """Push the module at path (on branch) to reference ("oci://HOST/REPO[:TAG|@DIGEST]";
    default tag "latest") as a Wasm OCI artifact. Blobs the registry has are not sent
    again. Returns a TransferReport (manifest_digest: what the tag now names)."""
    reference = OciReference.parse(reference)
    artifact = module_artifact(store, path, branch=branch)
    if reference.digest and reference.digest != artifact.manifest_digest:
        raise InvalidInput(f"{reference} names digest {reference.digest}, but the artifact "
                           f"of {format_path(validate_path(path))} is "
                           f"{artifact.manifest_digest}")
    report = TransferReport(str(reference))
    with _client_for(reference, client, "push") as client, \
            _Pusher(client, report, progress) as pusher:
        pusher.push(reference.repository, artifact, [reference.tag or reference.digest or "latest"])
    report.manifest_digest = artifact.manifest_digest
    return report


def push_all(store, prefix, *, branch=None, client=None, progress=None,
             workers=OCI_MIRROR_WORKERS):
    """Mirror every module of a branch under prefix ("oci://HOST[/PREFIX]"): one repository
    per store path, tagged with the branch name; on the default branch also "latest" and
    v0, v1, ... per version (the tags the server's /v2/ gives). Tags that already name the
    right manifest are left alone and missing blobs only are sent, so a second run transfers
    nothing. Store paths that are not valid repository names are skipped and reported.
    Returns a TransferReport."""
    base = OciReference.parse(prefix, prefix=True)
    default = store.default_branch
    name = validate_branch(branch) if branch is not None else default
    modules = store.list("", branch=name)
    report = TransferReport(str(base))
    head_tags = ["latest"] if name == default else []
    if is_branch_tag(name):
        head_tags.append(name)
    else:
        report.add(skipped=[(f"branch {name}", "not usable as a tag (tags 'latest' and "
                                               "'vN' name the default branch's versions)")])
    jobs = []
    for printed, digest in modules.items():
        try:
            jobs.append((printed, digest, base.child(validate_path(printed))))
        except InvalidInput as exc:
            report.add(skipped=[(printed, str(exc))])
    versions = name == default

    def mirror(job):
        printed, head, target = job
        plan = _mirror_plan(store, printed, head, name, head_tags, versions)
        pushed = pusher.sync(target.repository, plan)
        if pushed:
            pusher.progress(f"{target.repository}: pushed {pushed} of {len(plan)} tags")

    with _client_for(base, client, "push --all") as client, \
            _Pusher(client, report, progress) as pusher:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in pool.map(mirror, jobs):
                pass
    return report


def _mirror_plan(store, printed, head, branch, head_tags, versions):
    """{tag: WasmArtifact} of one path for push_all: head_tags name the head; with versions,
    v0, v1, ... name each version."""
    history = store.versions(printed, branch=branch)
    plan = {}
    for index, (digest, _) in enumerate(history if versions else ()):
        plan[f"v{index}"] = module_artifact(store, printed, branch=branch, digest=digest,
                                            history=history)
    current = next((artifact for artifact in plan.values()
                    if artifact.module_digest == "sha256:" + head), None) or \
        module_artifact(store, printed, branch=branch, history=history)
    plan.update((tag, current) for tag in head_tags)
    return plan


def pull(store, reference, path, *, branch=None, author=None, client=None, progress=None):
    """Fetch the Wasm OCI artifact at reference and store its module at path on branch, as
    one commit whose message names the source. The layer's bytes are checked against
    their digest and validated before anything is stored. Returns the module hash."""
    reference = OciReference.parse(reference)
    segments = _module_segments(path)
    store.head(branch=branch)             # a missing branch fails before any network traffic
    with _client_for(reference, client, "pull") as client:
        blob, message = _open_layer(client, reference, segments, progress)
        with blob:
            return store.add_file(format_path(segments), blob, branch=branch, author=author,
                                  size_limit=blob.size, message=message)


def pull_many(store, pairs, *, branch=None, author=None, client=None, progress=None,
              workers=OCI_MIRROR_WORKERS):
    """Pull several artifacts of one registry, [(reference, path), ...], in ONE commit that
    names every source: downloads run at once (a connection each, into temporary files,
    digest-checked), then every module is validated and stored together. Any failure stores
    nothing. Returns the module hashes, in order."""
    jobs = [(OciReference.parse(reference), _module_segments(path)) for reference, path in pairs]
    if len({segments for _, segments in jobs}) != len(jobs):
        raise InvalidInput("two references pull into the same path")
    if len({reference.registry for reference, _ in jobs}) > 1:
        raise InvalidInput("one pull takes references of one registry")
    if not jobs:
        return []
    store.head(branch=branch)
    with _client_for(jobs[0][0], client, "pull") as client, \
            tempfile.TemporaryDirectory(prefix="wasmstore-pull-") as scratch, \
            concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

        def fetch(number, reference, segments):
            filename = os.path.join(scratch, str(number))
            blob, message = _open_layer(client, reference, segments, progress)
            with blob, open(filename, "wb") as out:
                for chunk in iter(blob.read, b""):
                    out.write(chunk)
            return filename, message

        downloads = [pool.submit(fetch, number, *job) for number, job in enumerate(jobs)]
        try:
            fetched = [download.result() for download in downloads]
        finally:
            for download in downloads:
                download.cancel()
        paths = [format_path(segments) for _, segments in jobs]
        messages = [message for _, message in fetched]
        if len(messages) > 1:
            shown = "; ".join(message[len("Pull "):]
                              for message in messages[:PULL_MESSAGE_SOURCES])
            more = len(messages) - PULL_MESSAGE_SOURCES
            messages = [f"Pull {len(messages)} modules: {shown}"
                        + (f"; and {more} more" if more > 0 else "")]
        stored = store.add_files(list(zip(paths, (filename for filename, _ in fetched))),
                                 branch=branch, author=author, message=messages[0])
        return [stored[path] for path in paths]


def _module_segments(path):
    segments = validate_path(path)
    if not segments:
        raise InvalidInput("a module needs a path, not the root")
    return segments


def _open_layer(client, reference, segments, progress):
    """(_VerifiedBlob of the artifact's module, commit message naming the source)."""
    data, manifest_digest, content_type = client.get_manifest(reference.repository,
                                                              reference.target)
    digest, size = _wasm_layer(data, content_type)
    if progress and size >= OCI_PROGRESS_BYTES:
        progress(f"downloading {digest[:19]} ({_size_text(size)}) from {reference}")
    source = OciReference(reference.registry, reference.repository,
                          reference.tag or (None if reference.digest else "latest"))
    message = f"Pull {format_path(segments)} from {source}@{manifest_digest}"
    return client.open_blob(reference.repository, digest, size), message


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _cli_count(text, what="number", *, minimum=0, maximum=None):
    """argparse type of a count or index option: ASCII digits only (parse_number's bounds)."""
    try:
        return parse_number(text, what, minimum=minimum, maximum=maximum)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cli_seconds(text):
    """argparse type of a duration in seconds: a number > 0 in ASCII digits."""
    try:
        seconds = parse_number(text, "seconds", fraction=True)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: expected more than 0")
    return seconds


def _print_line(text):
    sys.stdout.write(text + "\n")


def _cmd_add(store, args):
    if args.file == "-":
        if not args.path:
            raise InvalidInput("reading a module from stdin needs a PATH argument")
        source = _binary_or_text(sys.stdin.buffer, "stdin")
        digest = store.add_file(args.path, source, branch=args.branch, author=args.author)
    else:
        if not os.path.isfile(args.file):
            raise NotFound(f"no such file {args.file!r}")
        path = args.path if args.path is not None else _stored_name(args.file)
        source = args.file
        if args.file.endswith(TEXT_SUFFIXES):
            with open(args.file, "rb") as text:
                source = io.BytesIO(wasm_from_text(_read_text(text, args.file), args.file))
        digest = store.add_file(path, source, branch=args.branch, author=args.author)
    _print_line(digest)


def _stored_name(filename):
    """The default PATH of `add FILE`: its base name, .wasm for WebAssembly text."""
    base = os.path.basename(filename)
    stem, suffix = os.path.splitext(base)
    return stem + ".wasm" if suffix in TEXT_SUFFIXES else base


def _read_text(reader, name, head=b""):
    """All of a WebAssembly text source, bounded (wat2wasm needs it whole)."""
    data = head + reader.read(MAX_TEXT_BYTES + 1 - len(head))
    if len(data) > MAX_TEXT_BYTES:
        raise TooLarge(f"{name}: WebAssembly text over {MAX_TEXT_BYTES >> 20} MiB; store its "
                       "binary instead")
    return data


def _binary_or_text(reader, name):
    """stdin for `add -`: a binary module as a stream, or the binary of WebAssembly text (what
    is not binary and begins like text: '(' or a ';;' comment)."""
    head = b""
    while len(head) < len(WASM_MAGIC):
        chunk = reader.read(len(WASM_MAGIC) - len(head))
        if not chunk:
            break
        head += chunk
    if head == WASM_MAGIC or not head.lstrip()[:1] in (b"(", b";"):
        return _Prefixed(head, reader)
    return io.BytesIO(wasm_from_text(_read_text(reader, name, head), name))


class _Prefixed:
    """A binary reader that gives `head` first, then the rest of `reader`."""

    def __init__(self, head, reader):
        self.head, self.reader = head, reader

    def read(self, size=-1):
        """Up to size bytes (all that is left for a negative size)."""
        if not self.head:
            return self.reader.read(size)
        if size is not None and 0 <= size <= len(self.head):
            data, self.head = self.head[:size], self.head[size:]
            return data
        data, self.head = self.head, b""
        rest = self.reader.read(-1 if size is None or size < 0 else size - len(data))
        return data + (rest or b"")


def _cmd_import(store, args):
    stored = store.import_tree(args.directory, args.prefix or "", branch=args.branch,
                               author=args.author)
    _print_line(f"imported {len(stored)} modules")


def _cmd_find(store, args):
    sys.stdout.buffer.write(store.find(args.path, branch=args.branch))
    sys.stdout.buffer.flush()


def _cmd_filename(store, args):
    _print_line(store.locate(args.path, branch=args.branch)[1])


def _cmd_hash(store, args):
    _print_line(store.hash(args.path, branch=args.branch))


def _cmd_set(store, args):
    store.set(args.path, args.hash, branch=args.branch, author=args.author)


def _cmd_remove(store, args):
    store.remove(args.path, branch=args.branch, author=args.author)


def _cmd_contains(store, args):
    _print_line("true" if store.contains(args.path, branch=args.branch) else "false")


def _cmd_list(store, args):
    for path, digest in store.list(args.path or "", branch=args.branch).items():
        _print_line(f"{digest}\t{path}")


def _cmd_versions(store, args):
    for digest, commit in store.versions(args.path, branch=args.branch):
        _print_line(f"{digest}\tcommit: {commit}")


def _cmd_version(store, args):
    digest, commit = store.version(args.index, args.path, branch=args.branch)
    _print_line(f"{digest}\tcommit: {commit}")


def _cmd_rollback(store, args):
    store.rollback(args.path, branch=args.branch, author=args.author)


def _cmd_restore(store, args):
    store.restore(args.commit, args.path, branch=args.branch, author=args.author)


def _cmd_snapshot(store, args):
    _print_line(store.snapshot(branch=args.branch))


def _cmd_commit(store, args):
    _print_line(json.dumps(store.commit_info(args.hash), indent=2))


def _cmd_audit(store, args):
    for info in store.audit(args.path, branch=args.branch):
        _print_line(f"{_format_date(info['date'])}\t{info['author']}\t{info['hash']}")


def _cmd_log(store, args):
    for info in store.log(args.n, branch=args.branch):
        _print_line(f"commit {info['hash']}\nAuthor: {info['author']}\n"
                    f"Date:   {_format_date(info['date'])}\n\n    {info['message']}\n")


def _cmd_branch(store, args):
    if args.switch:
        store.set_default_branch(args.switch)
    elif args.delete:
        if not args.name:
            raise InvalidInput("branch --delete needs the NAME of the branch to delete")
        store.delete_branch(args.name)
    elif args.name:
        store.create_branch(args.name, branch=args.branch)
    else:                                     # no NAME: list the branches
        default = store.default_branch
        for name in store.branches():
            _print_line(("* " if name == default else "  ") + name if args.verbose else name)


def _cmd_merge(store, args):
    store.merge(args.source, branch=args.branch, author=args.author)


def _cmd_gc(store, args):
    stats = {}
    store.gc(branch=args.branch, author=args.author, stats=stats)
    branch = args.branch or store.default_branch
    squashed = stats["commits_squashed"]
    _print_line(f"gc: removed {_count(stats['objects'], 'object')} ({_size_text(stats['bytes'])}); "
                + (f"squashed {_count(squashed, 'commit')} of {branch} into one" if squashed else
                   f"{branch}'s history was one commit already"))
    if squashed:
        sys.stderr.write(f"wasmstore: warning: gc squashed the history of {branch}: its earlier "
                         "versions, log and audit are gone (other branches keep theirs)\n")


def _cmd_export(store, args):
    count = store.export(args.output, args.commit, branch=args.branch)
    _print_line(f"exported {count} modules to {os.path.abspath(args.output)}")


def _cmd_backup(store, args):
    count = store.backup(args.file)
    _print_line(f"backup of {count} objects written to {os.path.abspath(args.file)}")


def _cmd_fsck(store, args):
    problems = store.fsck()
    for problem in problems:
        _print_line(problem)
    _print_line(f"fsck: {problems.checked} objects checked, {len(problems)} problems, "
                f"{problems.dangling} dangling (unreachable from every branch; gc deletes "
                "them)")
    return 1 if problems else 0


def _cmd_watch(store, args):
    try:
        for commit, changes in store.watch(branch=args.branch):
            _print_line(json.dumps(changes))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0


RUN_COMMANDS = ("call", "run", "exports", "serve")    # options from kvhost (imported for them)


def _runner(store, args):
    kvhost = _kvhost()
    host = kvhost.host_from_args(args, **kv_options(store, args.kv, args.provider_kv))
    return Runner(store, host, namespaces=parse_namespace_map(args.namespace_map),
                  links=parse_links(args.links))


def _run_guest(store, args, work):
    """Run work(runner) within the sandbox's deadline; kvhost errors become kvhost's CLI
    statuses."""
    kvhost = _kvhost()
    try:
        runner = _runner(store, args)
        try:
            return kvhost.run_with_deadline(lambda: work(runner), runner.host.timeout)
        finally:
            runner.host.close()
    except kvhost.KvError as exc:
        return kvhost.report(exc, sys.stderr, "wasmstore")


def _selector(args):
    return {"branch": args.branch, "version": args.version_index, "commit": args.commit}


def _cmd_call(store, args):
    kvhost = _kvhost()
    try:
        json_args = kvhost.parse_json_args(args.json_args)     # before anything is opened
    except kvhost.KvError as exc:
        return kvhost.report(exc, sys.stderr, "wasmstore")

    def call(runner):
        result = runner.call(args.target, args.function, json_args, namespace=args.namespace,
                             **_selector(args))
        kvhost.print_json(result, sys.stdout)
        return 0
    return _run_guest(store, args, call)


def _cmd_run(store, args):
    kvhost = _kvhost()

    def run(runner):
        sys.stdout.flush()
        return runner.run(args.target, args.args, namespace=args.namespace,
                          stdin=kvhost.STDIN_INHERIT, **_selector(args))
    return _run_guest(store, args, run)


def _cmd_exports(store, args):
    kvhost = _kvhost()
    try:
        with kvhost.Host(cache_dir=args.cache_dir, isolation="thread") as host:
            described = Runner(store, host).exports(args.target, **_selector(args))
    except kvhost.KvError as exc:
        return kvhost.report(exc, sys.stderr, "wasmstore")
    kvhost.print_exports(described, sys.stdout, args.json)
    return 0


def _add_selector_options(sub):
    sub.add_argument("--version", dest="version_index", type=_cli_count, metavar="INDEX",
                     help="run version INDEX of the path (0 = oldest; see 'versions')")
    sub.add_argument("--commit", metavar="COMMIT", help="run the module as it was in COMMIT")


def _add_run_options(sub, name):
    """The options of call/run/exports/serve; the sandbox and kv ones are kvhost's own."""
    _add_selector_options(sub)
    kvhost = _kvhost()
    if name == "serve":
        _add_serve_options(sub)
    if name == "exports":
        sub.add_argument("--json", action="store_true",
                         help="one JSON document instead of one line each")
        kvhost.add_sandbox_options(sub, only=("cache_dir",))
        return
    kvhost.add_store_options(sub, kv_default=None, kv_default_text="sqlite under the store root",
                             provider="PATH")
    sub.add_argument("--namespace-map", action="append", default=[], metavar="PREFIX=NS",
                     help=NAMESPACE_MAP_HELP)
    kvhost.add_sandbox_options(sub, link_target="a path in the store, in the same commit as the "
                                                "module run")


DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8080              # `wasmtime serve`'s


def _add_serve_options(sub):
    """serve's own options (beside call/run's sandbox and kv options)."""
    sub.add_argument("--host", default=DEFAULT_SERVE_HOST,
                     help=f"address to listen on (default {DEFAULT_SERVE_HOST})")
    sub.add_argument("--port", type=_port_number, default=DEFAULT_SERVE_PORT,
                     help=f"TCP port, 0 = any free port (default {DEFAULT_SERVE_PORT})")
    sub.add_argument("--metrics-port", type=_port_number, metavar="P",
                     help="serve GET /metrics on port P of --host (the app owns every path of "
                          "its own port)")
    sub.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="also answer to this Host name (repeatable; bound to a loopback "
                          "address, only loopback names are answered otherwise)")
    sub.add_argument("--max-body", metavar="N",
                     help="largest request body in bytes, suffix K/M/G allowed (default 128M)")
    sub.add_argument("--max-guests", type=_at_least(1), metavar="N",
                     help="requests running at once (default: two per CPU, at least 2)")
    sub.add_argument("--run-queue", type=_at_least(0), metavar="N",
                     help="requests waiting for a slot; more get 503 with Retry-After "
                          "(default 64)")
    sub.add_argument("--workers", type=_at_least(1), metavar="N",
                     help="server processes sharing the port (env WASMSTORE_WORKERS; default: "
                          "two per CPU)")
    sub.add_argument("--quiet", action="store_true", help="no access log on stderr")


def _port_number(text):
    """argparse type of a TCP port (0: any free one)."""
    return _cli_count(text, "port", maximum=65535)


def _at_least(least):
    """An argparse type: a whole number >= least, in ASCII digits."""
    return lambda text: _cli_count(text, minimum=least)


def _serve_ref(args):
    """The app-ref (see http_server.parse_app_ref) of serve's --branch/--version/--commit."""
    if args.version_index is not None and args.commit is not None:
        raise InvalidInput("give --version or --commit, not both")
    if args.commit is not None:
        return validate_hash(args.commit, "commit")
    if args.version_index is not None:
        if args.version_index < 0:
            raise InvalidInput(f"invalid --version {args.version_index}: expected an index >= 0")
        suffix = f"v{args.version_index}"
        return suffix if args.branch is None else f"{validate_branch(args.branch)}:{suffix}"
    return None if args.branch is None else validate_branch(args.branch)


def _serve_argv(args, root):
    """http_server.py's arguments for `serve`: its one-app mode (--serve) with the same sandbox
    and kv options call and run take (--timeout is a guest's time, as there)."""
    validate_path(args.target)
    argv = ["--root", root, "--serve", args.target, "--host", args.host, "--port", str(args.port)]
    ref = _serve_ref(args)
    options = [("--serve-ref", ref), ("--metrics-port", args.metrics_port),
               ("--max-body", args.max_body), ("--max-guests", args.max_guests),
               ("--run-queue", args.run_queue), ("--workers", args.workers), ("--kv", args.kv),
               ("--provider-kv", args.provider_kv)]
    for flag, value in options:
        if value is not None:
            argv += [flag, str(value)]
    namespaces = args.namespace_map + ([f"/={args.namespace}"] if args.namespace is not None
                                       else [])
    for flag, values in (("--allowed-host", args.allowed_host), ("--namespace-map", namespaces)):
        for value in values:
            argv += [flag, value]
    argv += ["--quiet"] if args.quiet else []
    # the sandbox options as call and run take them; the server's --timeout is its connections'
    return argv + _kvhost().sandbox_argv(args, flags={"timeout": "--run-timeout"})
    return argv


def _progress_writer(args):
    """Progress lines for long operations go to stderr (never a credential); --quiet: none."""
    if args.quiet:
        return None

    def progress(text):
        sys.stderr.write(f"wasmstore: {text}\n")
        sys.stderr.flush()
    return progress


def _registry_client(args, reference):
    """A RegistryClient from --username/--password-stdin, env or Docker's config.json."""
    username, password = args.username, None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InvalidInput("--password-stdin read an empty password")
        username = username or os.environ.get("WASMSTORE_OCI_USERNAME")
        if not username:
            raise InvalidInput("--password-stdin needs --username (or WASMSTORE_OCI_USERNAME)")
    elif username:
        password = os.environ.get("WASMSTORE_OCI_PASSWORD")
        if not password:
            raise InvalidInput("--username needs --password-stdin or WASMSTORE_OCI_PASSWORD "
                               "(a password is never taken from the command line)")
    credentials = registry_credentials(reference.registry, username=username,
                                       password=password)
    deadline = args.deadline
    if deadline is None:
        try:
            deadline = _cli_seconds(os.environ.get("WASMSTORE_OCI_DEADLINE", str(OCI_DEADLINE)))
        except argparse.ArgumentTypeError as exc:
            raise InvalidInput(f"WASMSTORE_OCI_DEADLINE: {exc}") from None
    return RegistryClient(reference.registry, credentials=credentials,
                          plain_http=args.plain_http, ca_file=args.ca_file, deadline=deadline)


def _cmd_push(store, args):
    progress = _progress_writer(args)
    if args.all:
        if args.path is not None:
            raise InvalidInput("push --all takes only a REFERENCE prefix, not a PATH")
        reference = OciReference.parse(args.reference, prefix=True)
        with _registry_client(args, reference) as client:
            report = push_all(store, args.reference, branch=args.branch, client=client,
                              progress=progress)
        for line in report.summary():
            _print_line(line)
        return 0
    if args.path is None:
        raise InvalidInput("push needs PATH and REFERENCE (or --all REFERENCE)")
    reference = OciReference.parse(args.reference)
    with _registry_client(args, reference) as client:
        report = push(store, args.path, args.reference, branch=args.branch, client=client,
                      progress=progress)
    if progress:
        progress(report.summary()[0])
    _print_line(report.manifest_digest)


def _cmd_pull(store, args):
    if len(args.pairs) % 2:
        raise InvalidInput("pull takes REFERENCE PATH pairs (a PATH is missing)")
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    options = {"branch": args.branch, "author": args.author, "progress": _progress_writer(args)}
    with _registry_client(args, OciReference.parse(pairs[0][0])) as client:
        if len(pairs) == 1:
            digests = [pull(store, *pairs[0], client=client, **options)]
        else:
            digests = pull_many(store, pairs, client=client, **options)
    for digest in digests:
        _print_line(digest)


REGISTRY_OPTIONS = [
    ("--username", {"metavar": "USER",
                    "help": "registry user name (env WASMSTORE_OCI_USERNAME)"}),
    ("--password-stdin", {"action": "store_true",
                          "help": "read the password or token from the first line of stdin "
                                  "(env WASMSTORE_OCI_PASSWORD; default: Docker's "
                                  "config.json, else anonymous)"}),
    ("--plain-http", {"action": "store_true",
                      "help": "plain HTTP instead of TLS (a loopback registry without TLS "
                              "needs no flag)"}),
    ("--ca-file", {"metavar": "FILE", "help": "also trust the CA certificates in FILE"}),
    ("--deadline", {"metavar": "SECONDS", "type": _cli_seconds,
                    "help": "end the whole pull or push with an error after SECONDS, however "
                            f"slowly the registry answers (env WASMSTORE_OCI_DEADLINE; default "
                            f"{OCI_DEADLINE:g})"}),
    ("--quiet", {"action": "store_true", "help": "no progress lines on stderr"}),
]


COMMANDS = {
    # name: (handler, help, [(argument, options)])
    "add": (_cmd_add, "validate and store a module (FILE '-' reads stdin; WebAssembly text, "
                      ".wat or .wast, is stored as its binary); prints its hash",
            [("file", {"metavar": "FILE"}),
             ("path", {"metavar": "PATH", "nargs": "?",
                       "help": "where to store it (default: the file's base name, .wasm for "
                               "text)"})]),
    "import": (_cmd_import, "store every *.wasm file under DIR in one commit",
               [("directory", {"metavar": "DIR"}),
                ("prefix", {"metavar": "PREFIX", "nargs": "?",
                            "help": "path to store them under"})]),
    "find": (_cmd_find, "write a module's bytes to stdout (PATH or 64-hex HASH)",
             [("path", {"metavar": "PATH"})]),
    "filename": (_cmd_filename, "print the object file holding a module",
                 [("path", {"metavar": "PATH"})]),
    "hash": (_cmd_hash, "print the hash of the module (or directory) at PATH",
             [("path", {"metavar": "PATH"})]),
    "set": (_cmd_set, "point PATH at the existing module HASH",
            [("hash", {"metavar": "HASH"}), ("path", {"metavar": "PATH"})]),
    "remove": (_cmd_remove, "remove PATH (a directory: all of it) or every path holding HASH",
               [("path", {"metavar": "PATH"})]),
    "contains": (_cmd_contains, "print true if PATH (or HASH) names a module",
                 [("path", {"metavar": "PATH"})]),
    "list": (_cmd_list, "print '<hash>\\t/<path>' for every module under PATH",
             [("path", {"metavar": "PATH", "nargs": "?"})]),
    "versions": (_cmd_versions, "print every version of PATH, oldest first",
                 [("path", {"metavar": "PATH"})]),
    "version": (_cmd_version, "print version INDEX (0 = oldest) of PATH",
                [("index", {"metavar": "INDEX"}), ("path", {"metavar": "PATH"})]),
    "rollback": (_cmd_rollback, "undo the latest change of PATH (no PATH: of the branch)",
                 [("path", {"metavar": "PATH", "nargs": "?"})]),
    "restore": (_cmd_restore, "new commit restoring COMMIT's tree (or only PATH from it)",
                [("commit", {"metavar": "COMMIT"}), ("path", {"metavar": "PATH", "nargs": "?"})]),
    "snapshot": (_cmd_snapshot, "print the branch's head commit", []),
    "commit": (_cmd_commit, "print a commit's info as JSON", [("hash", {"metavar": "HASH"})]),
    "audit": (_cmd_audit, "print '<date>\\t<author>\\t<commit>' for each change of PATH",
              [("path", {"metavar": "PATH"})]),
    "log": (_cmd_log, "print the branch's history, newest first",
            [("-n", {"type": _cli_count, "metavar": "N", "help": "at most N commits"})]),
    "branch": (_cmd_branch, "create, delete or switch branches; with no NAME, list them",
               [("name", {"metavar": "NAME", "nargs": "?", "help": "branch to create or delete"}),
                ("--delete", {"action": "store_true", "help": "delete NAME"}),
                ("--verbose", {"action": "store_true", "help": "mark the default branch"}),
                ("--switch", {"metavar": "NAME", "help": "make NAME the default branch"})]),
    "merge": (_cmd_merge, "merge BRANCH into the selected branch",
              [("source", {"metavar": "BRANCH"})]),
    "gc": (_cmd_gc, "squash the branch's history into one commit (its earlier versions, log and "
                    "audit are gone) and delete unreachable objects; prints what it removed", []),
    "export": (_cmd_export, "write every module as plain files under a directory",
               [("-o", {"dest": "output", "metavar": "DIR", "default": ".",
                        "help": "target directory (default: current directory)"}),
                ("--commit", {"metavar": "COMMIT", "help": "export this commit instead"})]),
    "backup": (_cmd_backup, "write a .tar.gz backup of the store",
               [("file", {"metavar": "FILE"})]),
    "load-backup": (None, "extract a backup into --root (missing or empty) and check it",
                    [("file", {"metavar": "FILE"})]),
    "fsck": (_cmd_fsck, "check every object and reference; exit 1 on any problem", []),
    "watch": (_cmd_watch, "print one JSON line per commit on the branch (Ctrl-C stops)", []),
    "call": (_cmd_call, "call FUNCTION of a stored module with JSON arguments; print its JSON "
                        "result",
             [("target", {"metavar": "PATH|HASH"}), ("function", {"metavar": "FUNCTION"}),
              ("json_args", {"metavar": "JSON_ARG", "nargs": "*"})]),
    "run": (_cmd_run, "run a stored wasi:cli/run component or WASI command module",
            [("target", {"metavar": "PATH|HASH"}),
             ("args", {"metavar": "ARG", "nargs": argparse.REMAINDER})]),
    "exports": (_cmd_exports, "print each callable export of a stored module with its types",
                [("target", {"metavar": "PATH|HASH"})]),
    "push": (_cmd_push, "push PATH to an OCI registry as a Wasm OCI artifact (prints its "
                        "digest); --all mirrors every module of the branch",
             [("path", {"metavar": "PATH", "nargs": "?",
                        "help": "module to push (omitted with --all)"}),
              ("reference", {"metavar": "REFERENCE",
                             "help": "oci://HOST[:PORT]/REPO[:TAG|@DIGEST] (default tag "
                                     "latest); with --all, oci://HOST[:PORT][/PREFIX]"}),
              ("--all", {"action": "store_true",
                         "help": "push every module: a repository per path, tags for the "
                                 "branch and v0, v1, ... per version; sends only what the "
                                 "registry lacks"})] + REGISTRY_OPTIONS),
    "pull": (_cmd_pull, "store the module of a Wasm OCI artifact at PATH (one commit naming "
                        "the source); prints its hash. Several pairs: one commit for all",
             [("pairs", {"metavar": "REFERENCE PATH", "nargs": "+",
                         "help": "oci://HOST[:PORT]/REPO[:TAG|@DIGEST] and where to store its "
                                 "module; more pairs (one registry) are fetched concurrently "
                                 "and stored together in one commit once all are checked "
                                 "(any failure stores nothing)"})]
             + REGISTRY_OPTIONS),
    "server": (None, "run the HTTP API (options: python http_server.py --help)", []),
    "serve": (None, "serve a stored wasi:http component (an HTTP app) on a port of its own, as "
                    "`wasmtime serve` does; the next request after a new version of PATH runs it "
                    "(a HASH serves that module for good)",
              [("target", {"metavar": "PATH|HASH"})]),
}


CLI_EXAMPLES = """examples:
  python wasmstore.py add add.wasm /math/add.wasm     store a module, print its hash
  cat add.wasm | python wasmstore.py add - add.wasm   from stdin
  python wasmstore.py list /math                      hash and path of each module
  python wasmstore.py versions /math/add.wasm         every version, oldest first
  python wasmstore.py rollback /math/add.wasm         undo its latest change
  python wasmstore.py --branch dev add x.wasm         work on branch dev
  python wasmstore.py push /math/add.wasm oci://ghcr.io/me/add:v1   to a registry
  python wasmstore.py pull oci://localhost:5000/add add.wasm        from a registry
  python wasmstore.py server --port 6384              serve the HTTP API
  python wasmstore.py serve /apps/hello.wasm          serve a stored HTTP app on :8080

Global options may also follow the command. Errors print one line on stderr
and exit 1 (also "not found"); bad usage exits 2. 'COMMAND --help' explains one
command."""


# The commands that make commits: the only ones --author means something to.
COMMITTING_COMMANDS = ("add", "import", "set", "remove", "rollback", "restore", "merge", "gc",
                       "pull")


def _add_global_options(parser, suppress, author=True):
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--root", default=default(None),
                        help=f"store root (env WASMSTORE_ROOT; default {DEFAULT_ROOT})")
    parser.add_argument("--branch", default=default(None),
                        help="branch to use (env WASMSTORE_BRANCH; default: the store's default)")
    # Commands that make no commit accept --author only to refuse it with a clear message.
    parser.add_argument("--author", default=default(None),
                        help=f"commit author, for commands that make commits (env "
                             f"WASMSTORE_AUTHOR; default {DEFAULT_AUTHOR})" if author else
                        argparse.SUPPRESS)


def _build_parser(command=None):
    """The parser; the options of call/run/exports are added only when `command` is one of
    them, so that other commands never import kvhost (and wasmtime)."""
    parser = argparse.ArgumentParser(
        prog="wasmstore",
        description="A versioned, content-addressed store for WebAssembly modules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CLI_EXAMPLES)
    _add_global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"wasmstore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, arguments) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name != "server":
            _add_global_options(sub, suppress=True, author=name in COMMITTING_COMMANDS)
        for argument, options in arguments:
            sub.add_argument(argument, **options)
        if name == command and name in RUN_COMMANDS:
            _add_run_options(sub, name)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = _split_server_args(argv)
    try:
        parser = _build_parser(_command_word(argv))
    except StoreError as exc:
        sys.stderr.write(f"wasmstore: error: {exc}\n")
        return 2
    args = parser.parse_args(argv if server_args is None else argv[:argv.index("server") + 1])
    if args.author is not None and args.command not in COMMITTING_COMMANDS:
        parser.error("--author is for the commands that make commits "
                     f"({', '.join(COMMITTING_COMMANDS)}); {args.command} makes none"
                     + (" (the server takes Wasmstore-Author per request)"
                        if args.command == "server" else ""))
    root = args.root or os.environ.get("WASMSTORE_ROOT") or DEFAULT_ROOT
    args.branch = args.branch or os.environ.get("WASMSTORE_BRANCH") or None
    args.author = args.author or os.environ.get("WASMSTORE_AUTHOR") or None
    try:
        if args.command == "server":
            return _run_server("server", ["--root", root] + server_args)   # a later --root wins
        if args.command == "serve":
            return _run_server("serve", _serve_argv(args, root))
        if args.command == "load-backup":
            load_backup(args.file, root)
            _print_line(f"backup loaded into {os.path.abspath(os.path.expanduser(root))}")
            return 0
        with Store(root) as store:
            handler = COMMANDS[args.command][0]
            return handler(store, args) or 0
    except StoreError as exc:
        sys.stderr.write(f"wasmstore: error: {exc}\n")
        return error_meaning(exc).exit_status
    except BrokenPipeError:         # stdout closed early (| head): a normal end
        _discard_stdout()
        return 0
    except OSError as exc:
        sys.stderr.write(f"wasmstore: error: {exc.strerror or exc}"
                         f"{': ' + repr(exc.filename) if exc.filename else ''}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _run_server(command, argv):
    """Become the HTTP server: run http_server.py as a program in this process (os.execv).
    It is not imported: the HTTP layer is built on the store, and the store never depends on
    it, so wasmstore.py copied alone still works (the server and serve commands then say what
    is missing)."""
    program = _server_program()
    if program is None:
        raise StoreError(f"the {command} command needs http_server.py next to "
                         f"{__file__} (copy it there, or run python http_server.py)")
    sys.stdout.flush()
    sys.stderr.flush()
    # its usage lines and errors then name this command (http_server.AS_PROGRAM)
    os.execv(sys.executable, [sys.executable, program, "--as-program", f"wasmstore {command}"]
             + argv)


def _server_program():
    """http_server.py's file: the one next to this file (a checkout, a copied pair, or
    site-packages after `pip install`), else wherever the module would be imported from."""
    program = os.path.join(os.path.dirname(os.path.abspath(__file__)), "http_server.py")
    if os.path.isfile(program):
        return program
    import importlib.util                      # finds the module without importing it
    try:
        spec = importlib.util.find_spec("http_server")
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return origin if origin and origin.endswith(".py") and os.path.isfile(origin) else None


def _command_index(argv):
    """Where the command word is in argv (global options and their values come first), or None."""
    skip_value = False
    for index, word in enumerate(argv):
        if skip_value:
            skip_value = False
        elif word in ("--root", "--branch", "--author"):
            skip_value = True
        elif not word.startswith("-"):
            return index
    return None


def _command_word(argv):
    index = _command_index(argv)
    return None if index is None else argv[index]


def _split_server_args(argv):
    """Arguments after 'server' go to http_server unparsed (None: not a server command)."""
    index = _command_index(argv)
    return argv[index + 1:] if index is not None and argv[index] == "server" else None


def _end_process(status):
    """sys.exit's status; ends at once if a guest is still blocked past its deadline (kvhost)."""
    kvhost = sys.modules.get("kvhost")
    return kvhost.end_process(status) if kvhost is not None else status


def _discard_stdout():
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def console_main():
    """The `wasmstore` command (python wasmstore.py, or the script pip installs): main(), then
    the exit, also when stdout was closed early or a guest is still blocked."""
    try:
        status = _end_process(main())
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    console_main()
