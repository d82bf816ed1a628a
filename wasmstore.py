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

Layout under the root: ``HEAD`` names the default branch; ``refs/heads/<branch>`` holds a
branch's head commit (hex + newline; empty while the branch has no commits);
``objects/<2 hex>/<62 hex>`` holds every object, named by the SHA-256 of its bytes: module
objects are the raw module bytes, trees and commits are canonical JSON; ``tmp/`` holds files
being written (a killed writer's leftovers there are removed by gc).

Map of this file: constants and exceptions; names (paths, branches, hashes); module
validation (wasmtime, imported lazily); filesystem primitives (durable batches, locks, a
small LRU); the Store (objects, refs, tree edits, operations, history, watch, gc, backup,
fsck); the command line (``main``).

Durability: objects and refs are written to a temporary file, fsynced, renamed into place,
and their directory fsynced, before a write is acknowledged. Independent files are fsynced
concurrently so the filesystem can commit them together. A ref changes only under an
exclusive ``flock`` of the refs directory, by compare-and-swap against the head the change
was computed from, so writers in many threads and processes never lose an update. Readers
take no lock.
"""

__version__ = "0.1.0"
__all__ = [
    "Store", "StoreError", "InvalidInput", "InvalidModule", "TooLarge", "NotFound",
    "Conflict", "MergeConflict", "CorruptObject", "validate_path", "format_path",
    "validate_branch", "validate_hash", "validate_module", "load_backup", "Runner", "Target",
    "default_kv_url", "parse_namespace_map", "main",
]

import argparse
import collections
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import shutil
import sys
import tarfile
import threading
import time
import zlib

# --------------------------------------------------------------------------- constants

DEFAULT_ROOT = "~/.wasmstore"
DEFAULT_BRANCH = "main"
DEFAULT_AUTHOR = "wasmstore"
HASH_LENGTH = 64                      # SHA-256, lowercase hex
MAX_SEGMENT_BYTES = 255               # the common filesystem name limit, so export works
MAX_SEGMENTS = 64                     # keeps trees shallow and commits O(depth)
MAX_AUTHOR_CHARS = 256                # authors come from HTTP headers: keep commits small
BRANCH_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
HASH_TEXT = re.compile(r"[0-9a-fA-F]{64}\Z")
WASM_MAGIC = b"\0asm"
COMPONENT_HEADER = WASM_MAGIC + b"\x0d\x00\x01\x00"   # component-model binary, layer 1
CHUNK_SIZE = 1 << 20                  # streaming reads: bounded memory for any module size
OBJECT_CACHE_WEIGHT = 400_000         # parsed trees/commits kept, counted in tree entries
MODULE_CACHE_BYTES = 64 << 20         # small module bytes kept for warm finds
MODULE_CACHE_ITEM_BYTES = 1 << 20     # bigger modules are always read from disk
INDEX_CACHE_TREES = 4                 # hash -> paths indexes kept (latest root trees)
FSYNC_WORKERS = 8                     # concurrent fsyncs let ext4 commit them together
STALE_TMP_SECONDS = 24 * 3600         # a temp file this old is debris even if its pid lives
WATCH_WALK_LIMIT = 10_000             # commits walked to split a ref jump into events


# --------------------------------------------------------------------------- exceptions

class StoreError(Exception):
    """Root of every error this module raises; str() is a one-line message for users."""
    http_status = 500


class InvalidInput(StoreError):
    """Bad path, branch name, hash, index or argument."""
    http_status = 400


class InvalidModule(InvalidInput):
    """The bytes are not a valid WebAssembly module or component."""


class TooLarge(InvalidInput):
    """A module is over the size limit the caller set."""
    http_status = 413


class NotFound(StoreError):
    """No such module, path, branch, commit or object."""
    http_status = 404


class Conflict(StoreError):
    """The operation conflicts with the store's state (branch exists, nothing to roll back...)."""
    http_status = 409


class MergeConflict(Conflict):
    """A merge changed the same paths differently on both sides; nothing was written."""

    def __init__(self, source, paths):
        self.source = source
        self.paths = list(paths)
        super().__init__(f"merge of {source!r} conflicts at {', '.join(self.paths)}")


class CorruptObject(StoreError):
    """An object or ref failed its integrity check: it is never returned as data."""
    http_status = 500


class _RefMoved(Conflict):
    """A ref changed between read and swap under the lock: something wrote it without
    taking the lock. Nothing was written; retrying is safe."""

    def __init__(self, branch):
        super().__init__(f"branch {branch!r} changed while this change was being written "
                         "(a writer without the lock?); nothing was written, retry")


# --------------------------------------------------------------------------- names

def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_path(path):
    """Return the segments of a store path, or raise InvalidInput.

    One leading "/" is allowed (the printed form). "" and "/" are the root (no segments).
    """
    if not isinstance(path, str):
        raise InvalidInput(f"invalid path {_short(path)}: expected a string")
    if len(path) > MAX_SEGMENTS * (MAX_SEGMENT_BYTES + 1) + 1:
        raise InvalidInput(f"invalid path {_short(path)}: longer than any valid path")
    return _parse_path(path)


@functools.lru_cache(maxsize=8192)
def _parse_path(path):
    """validate_path's work, cached: valid paths repeat (every find parses one)."""
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


def validate_branch(name):
    """Return name if it is a valid branch name, else raise InvalidInput."""
    if not isinstance(name, str) or not BRANCH_NAME.match(name) or name.startswith("."):
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


# --------------------------------------------------------------------------- validation

_engine_lock = threading.Lock()
_engine_holder = []   # one lazily created wasmtime.Engine shared by every Store


def _wasmtime_engine():
    with _engine_lock:
        if not _engine_holder:
            try:
                import wasmtime
            except ImportError:
                raise StoreError("validating modules needs the wasmtime package "
                                 "(pip install -r requirements.txt)") from None
            _engine_holder.append(wasmtime.Engine())
        return _engine_holder[0]


def validate_module(data):
    """Raise InvalidModule unless data (bytes, bytearray or mmap) is valid WebAssembly.

    Core modules are checked by wasmtime's validator. Components are checked section by
    section: framing, section ids, and every embedded core module (and nested component)
    by the same validator. Nothing is compiled.
    """
    view = memoryview(data)
    if not len(view):
        raise InvalidModule("invalid module: empty input: unexpected end-of-file (at offset 0x0)")
    with view:
        if bytes(view[:8]) == COMPONENT_HEADER:
            _validate_component(data, view, 0, len(view))
        else:
            _validate_core(data, 0, len(view))


def _validate_core(data, start, end):
    import ctypes
    import wasmtime
    engine = _wasmtime_engine()
    try:
        from wasmtime import _ffi as ffi
        base = _buffer_address(data)
        pointer = ctypes.cast(base + start, ctypes.POINTER(ctypes.c_uint8))
        error = ffi.wasmtime_module_validate(engine.ptr(), pointer, end - start)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModule("invalid module: " + " ".join(str(exc).split())) from None
    except (ImportError, AttributeError, TypeError):
        # A wasmtime without the private FFI names: the public API (one copy of the bytes).
        try:
            wasmtime.Module.validate(engine, bytes(memoryview(data)[start:end]))
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule("invalid module: " + " ".join(str(exc).split())) from None


def _buffer_address(data):
    """Address of data's buffer without copying it (bytes, bytearray or writable mmap)."""
    import ctypes
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    return ctypes.addressof(ctypes.c_char.from_buffer(data))


def _validate_component(data, view, start, end, depth=0):
    if depth > 16:
        raise InvalidModule("invalid module: components nested too deeply")
    if end - start < 8 or bytes(view[start:start + 8]) != COMPONENT_HEADER:
        raise InvalidModule(f"invalid module: bad component header (at offset {start:#x})")
    pos = start + 8
    while pos < end:
        section_id = view[pos]
        size, pos = _read_leb_u32(view, pos + 1, end)
        if pos + size > end:
            raise InvalidModule(f"invalid module: unexpected end-of-file (at offset {end:#x})")
        if section_id == 1:
            _validate_core(data, pos, pos + size)
        elif section_id == 4:
            _validate_component(data, view, pos, pos + size, depth + 1)
        elif section_id > 12:
            raise InvalidModule(f"invalid module: invalid section id {section_id} "
                                f"(at offset {pos:#x})")
        pos += size


def _read_leb_u32(view, pos, end):
    result = shift = 0
    while True:
        if pos >= end:
            raise InvalidModule(f"invalid module: unexpected end-of-file (at offset {pos:#x})")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 28:
            raise InvalidModule(f"invalid module: invalid LEB128 number (at offset {pos:#x})")


# --------------------------------------------------------------------------- primitives

def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_key(path):
    """(inode, mtime, size) of a file, None if missing: tells a replaced file from a cached one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _read_exactly(fd, size):
    """Read size bytes (fewer at end of file): one read() for the usual small object."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


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


class _LRU:
    """A thread-safe cache bounded by the sum of its entries' weights.

    Hits are lock-free dict reads (the hot path of every find); eviction is oldest-first,
    which suits immutable, content-addressed objects.
    """

    def __init__(self, max_weight):
        self._items = {}
        self._weight = 0
        self._max_weight = max_weight
        self._lock = threading.Lock()

    def get(self, key):
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key, value, weight=1):
        if weight > self._max_weight:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            self._items[key] = (value, weight)
            self._weight += weight
            while self._weight > self._max_weight:
                oldest = next(iter(self._items))
                self._weight -= self._items.pop(oldest)[1]


class _Batch:
    """Objects one change writes: new (hash, bytes) and already-written temp files."""

    def __init__(self):
        self.blobs = {}        # hash -> bytes
        self.files = {}        # hash -> temp file path (data written, not yet fsynced)
        self.parsed = {}       # hash -> parsed tree/commit, cached once the batch lands

    def add(self, digest, data, parsed=None):
        self.blobs[digest] = data
        if parsed is not None:
            self.parsed[digest] = parsed


# --------------------------------------------------------------------------- store

class Store:
    """A wasmstore root directory. Thread-safe; many processes may share one root."""

    def __init__(self, root=DEFAULT_ROOT):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self._objects_dir = os.path.join(self.root, "objects")
        self._heads_dir = os.path.join(self.root, "refs", "heads")
        self._tmp_dir = os.path.join(self.root, "tmp")
        self._head_file = os.path.join(self.root, "HEAD")
        self._history = _HistoryCache(os.path.join(self.root, "cache", "history"))
        self._objects = _LRU(OBJECT_CACHE_WEIGHT)
        self._modules = _LRU(MODULE_CACHE_BYTES)
        self._indexes = _LRU(INDEX_CACHE_TREES)
        self._verified = _LRU(200_000)       # hash -> stat key of a hash-checked object file
        self._ref_cache = {}                 # branch -> (stat key, head)
        self._ref_paths = {}                 # branch -> ref file name (validated names only)
        self._default_cache = (None, None)   # (stat key of HEAD, default branch)
        self._commit_counts = _LRU(200_000)  # commit -> first-parent chain length
        self._thread_lock = threading.Lock()
        self._pool = None
        self._pool_lock = threading.Lock()
        self._tmp_names = itertools.count()
        self._known_dirs = set()
        self._empty_tree = self._encode_tree({})
        self._init_layout()

    def __repr__(self):
        return f"Store({self.root!r})"

    def close(self):
        """Stop the fsync worker threads (they are restarted on the next write)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool:
            pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------------- layout

    def _init_layout(self):
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store root {self.root!r} exists and is not a directory")
        for directory in (self._objects_dir, self._heads_dir, self._tmp_dir):
            os.makedirs(directory, exist_ok=True)
        created = self._create_if_missing(self._head_file, DEFAULT_BRANCH + "\n")
        if created:
            self._create_if_missing(os.path.join(self._heads_dir, DEFAULT_BRANCH), "")
            for directory in (self._heads_dir, os.path.dirname(self._heads_dir), self.root):
                _fsync_path(directory)

    def _create_if_missing(self, path, text):
        """Durably create path with text unless it exists (atomic across processes)."""
        if os.path.exists(path):
            return False
        tmp, fd = self._new_tmp()
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
            os.close(fd)
            fd = None
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            _fsync_path(os.path.dirname(path))
            return True
        finally:
            if fd is not None:
                os.close(fd)
            os.unlink(tmp)

    def _new_tmp(self, mode=0o600):
        name = f"{os.getpid()}-{next(self._tmp_names)}-{os.urandom(4).hex()}.tmp"
        path = os.path.join(self._tmp_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        return path, fd

    def _object_path(self, digest):
        return os.path.join(self._objects_dir, digest[:2], digest[2:])

    def _ref_path(self, branch):
        path = self._ref_paths.get(branch)
        if path is None:
            path = os.path.join(self._heads_dir, branch)
            if len(self._ref_paths) < 1024:        # bounded: names may come from requests
                self._ref_paths[branch] = path
        return path

    # ------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def _ref_lock(self):
        """Exclusive across threads (a mutex) and processes (flock on refs/heads)."""
        with self._thread_lock:
            fd = os.open(self._heads_dir, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)   # closing releases the flock, also when a process dies

    @contextlib.contextmanager
    def _objects_lock(self, shared):
        """gc deletes objects under LOCK_EX; backup copies them under LOCK_SH."""
        fd = os.open(self._objects_dir, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------- objects

    def _read_verified(self, digest):
        """The bytes of an object, checked against its name."""
        try:
            fd = os.open(self._object_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such object {digest}") from None
        try:
            data = _read_exactly(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptObject(f"object {digest} is corrupt (its content does not match "
                                "its hash); run fsck")
        return data

    def _load(self, digest, kind):
        """A parsed tree (dict name -> (kind, hash)) or commit (dict), cached."""
        cached = self._objects.get(digest)
        if cached is None:
            data = self._read_verified(digest)
            cached = _parse_object(data, digest)
            self._objects.put(digest, cached, _weight(cached))
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
        batch.add(digest, data, ("tree", entries))
        return digest

    def _put_commit(self, tree, parents, author, message, batch):
        document = {"author": author, "date": int(time.time()), "message": message,
                    "parents": list(parents), "tree": tree, "type": "commit"}
        data = _canonical_json(document)
        digest = hashlib.sha256(data).hexdigest()
        batch.add(digest, data, ("commit", document))
        return digest

    def _object_exists(self, digest):
        return os.path.exists(self._object_path(digest))

    def _is_module_object(self, digest):
        try:
            with open(self._object_path(digest), "rb") as handle:
                return handle.read(4) == WASM_MAGIC
        except FileNotFoundError:
            return False

    def _pool_map(self, function, items):
        items = list(items)
        if len(items) <= 1:
            return [function(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    FSYNC_WORKERS, thread_name_prefix="wasmstore-fsync")
            pool = self._pool
        return list(pool.map(function, items))

    def _ensure_fanout_dir(self, directory):
        if directory in self._known_dirs:
            return False
        try:
            os.mkdir(directory)
            created = True
        except FileExistsError:
            created = False
        self._known_dirs.add(directory)
        return created

    def _land(self, batch, ref_update=None):
        """Make a batch of objects durable, then (optionally) swap a ref.

        Order: write temp files; fsync them all concurrently (with the new ref's temp);
        rename them into place; fsync their directories concurrently; then rename the ref
        and fsync its directory. A crash at any point leaves only complete objects and a
        ref that points at durable objects.
        """
        pending = []                     # (temp path, final path)
        open_fds = []
        ref_tmp = None
        try:
            for digest, data in batch.blobs.items():
                final = self._object_path(digest)
                if os.path.exists(final):
                    continue
                tmp, fd = self._new_tmp(0o444)
                open_fds.append(fd)
                pending.append((tmp, final))
                _write_all(fd, data)
            for digest, tmp in batch.files.items():
                final = self._object_path(digest)
                if os.path.exists(final):
                    continue
                open_fds.append(os.open(tmp, os.O_RDONLY | os.O_CLOEXEC))
                pending.append((tmp, final))
            if ref_update:
                ref_tmp, fd = self._new_tmp(0o644)
                open_fds.append(fd)
                _write_all(fd, (ref_update[2] + "\n").encode("ascii"))
            self._pool_map(os.fsync, open_fds)
            for fd in open_fds:
                os.close(fd)
            open_fds = []
            dirs_to_sync = set()
            for tmp, final in pending:
                directory = os.path.dirname(final)
                if self._ensure_fanout_dir(directory):
                    dirs_to_sync.add(self._objects_dir)
                os.rename(tmp, final)
                dirs_to_sync.add(directory)
            pending = []
            self._pool_map(_fsync_path, dirs_to_sync)
            if ref_update:
                branch, old, new = ref_update
                self._swap_ref(branch, old, new, ref_tmp)
                ref_tmp = None
        finally:
            for fd in open_fds:
                os.close(fd)
            for tmp in [tmp for tmp, _ in pending] + ([ref_tmp] if ref_tmp else []):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for digest, parsed in batch.parsed.items():
            self._objects.put(digest, parsed, _weight(parsed))

    # ------------------------------------------------------------------- refs

    def _branch(self, branch):
        return validate_branch(branch) if branch is not None else self.default_branch

    def _read_ref(self, branch, fresh=False):
        """Head commit of a branch (None while it has no commits); NotFound if missing."""
        path = self._ref_path(branch)
        key = _stat_key(path)
        if key is None:
            raise NotFound(f"no such branch {branch!r}")
        cached = self._ref_cache.get(branch)
        if cached is not None and cached[0] == key and not fresh:
            return cached[1]
        try:
            with open(path, "rb") as handle:
                text = handle.read(HASH_LENGTH + 2).decode("ascii", "replace").strip()
        except FileNotFoundError:
            raise NotFound(f"no such branch {branch!r}") from None
        if text and not _is_hash(text):
            raise CorruptObject(f"ref of branch {branch!r} is corrupt: {text[:70]!r}")
        head = text or None
        self._ref_cache[branch] = (key, head)
        return head

    def _swap_ref(self, branch, old, new, tmp):
        """Compare-and-swap a ref (the caller holds the ref lock and wrote tmp durably)."""
        if self._read_ref(branch, fresh=True) != old:
            raise _RefMoved(branch)
        os.rename(tmp, self._ref_path(branch))
        _fsync_path(self._heads_dir)
        self._ref_cache.pop(branch, None)

    def _write_ref(self, branch, old, new):
        """Set a ref to an existing commit (no new objects), under the ref lock."""
        self._land(_Batch(), (branch, old, new or ""))

    def head(self, *, branch=None):
        """Head commit of a branch, or None while it has no commits."""
        return self._read_ref(self._branch(branch))

    def _head_tree(self, branch):
        """(head, root tree hash or None) of a branch, robust against a concurrent gc."""
        for attempt in range(3):
            head = self._read_ref(branch, fresh=attempt > 0)
            if head is None:
                return None, None
            try:
                return head, self._commit(head)["tree"]
            except NotFound:
                continue   # gc replaced the head after we read it: read it again
        raise NotFound(f"head of branch {branch!r} cannot be read")

    # ------------------------------------------------------------------- trees

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

    # ------------------------------------------------------------------- changes

    def _change(self, branch, author, message, edit):
        """Run edit(head, tree, batch) -> new root tree under the ref lock; commit if changed.

        Returns the new head (or the old one when nothing changed).
        """
        branch = self._branch(branch)
        author = _author(author)
        with self._ref_lock():
            head = self._read_ref(branch, fresh=True)
            tree = self._commit(head)["tree"] if head else None
            batch = _Batch()
            try:
                new_tree = edit(head, tree, batch)
                if new_tree == tree or (tree is None and new_tree == self._empty_tree[0]
                                        and head is None):
                    return head
                parents = [head] if head else []
                commit = self._put_commit(new_tree, parents, author, message, batch)
                self._land(batch, (branch, head, commit))
                self._history.record(commit, head, self.changes(head, commit))
                return commit
            finally:
                for tmp in batch.files.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)

    def _ingest(self, source, size_limit=None):
        """Stream a file name or binary file object into a temp file: (temp, hash, size)."""
        tmp, fd = self._new_tmp(0o444)
        digest = hashlib.sha256()
        size = 0
        try:
            handle = open(source, "rb") if isinstance(source, (str, bytes, os.PathLike)) \
                else contextlib.nullcontext(source)
            with handle as reader:
                while True:
                    chunk = reader.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size_limit is not None and size > size_limit:
                        raise TooLarge(f"module is larger than the limit of {size_limit} bytes")
                    digest.update(chunk)
                    _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, digest.hexdigest(), size

    def _validate_file(self, path, size):
        if size == 0:
            validate_module(b"")
            return
        with open(path, "rb") as handle:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
                validate_module(mapped)

    def _set_module(self, segments, digest, branch, author, message, source=None):
        """Point segments at module digest; source = bytes or a temp file to store."""
        if not segments:
            raise InvalidInput("a module needs a path, not the root")

        def edit(head, tree, batch):
            if isinstance(source, (bytes, bytearray)):
                batch.add(digest, bytes(source))
            elif source is not None:
                batch.files[digest] = source
            elif not self._is_module_object(digest):
                raise NotFound(f"no such module {digest}")
            return self._edit_root(tree, {segments: ("module", digest)}, batch, strict=True)

        self._change(branch, author, message, edit)
        return digest

    # ------------------------------------------------------------------- operations

    def add(self, path, data, *, branch=None, author=None):
        """Validate data, store it and point path at it. Returns the module hash."""
        segments = validate_path(path)
        if not segments:
            raise InvalidInput("a module needs a path, not the root")
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInput("module data must be bytes")
        self._read_ref(self._branch(branch))
        validate_module(data)
        digest = hashlib.sha256(data).hexdigest()
        return self._set_module(segments, digest, branch, author,
                                f"Import {format_path(segments)}", bytes(data))

    def add_file(self, path, source, *, branch=None, author=None, size_limit=None):
        """Like add, reading a file name or binary file object in chunks (any size)."""
        segments = validate_path(path)
        if not segments:
            raise InvalidInput("a module needs a path, not the root")
        self._read_ref(self._branch(branch))
        tmp, digest, size = self._ingest(source, size_limit)
        try:
            self._validate_file(tmp, size)
            return self._set_module(segments, digest, branch, author,
                                    f"Import {format_path(segments)}", tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def import_tree(self, directory, prefix="", *, branch=None, author=None):
        """Store every *.wasm file under directory (validated) in one commit.

        Returns {printed path: hash}. Any invalid file: nothing is stored.
        """
        base = validate_path(prefix)
        files = _wasm_files(directory)
        if not files:
            raise InvalidInput(f"no *.wasm files under {directory!r}")
        self._read_ref(self._branch(branch))
        edits, temps, stored = {}, {}, {}
        try:
            for relative, filename in files:
                segments = base + validate_path(relative)
                tmp, digest, size = self._ingest(filename)
                if digest in temps:
                    os.unlink(tmp)          # the same module twice: one object
                else:
                    temps[digest] = tmp
                try:
                    self._validate_file(temps[digest], size)
                except InvalidModule as exc:
                    raise InvalidModule(f"{filename}: {exc}") from None
                edits[segments] = ("module", digest)
                stored[format_path(segments)] = digest

            def edit(head, tree, batch):
                batch.files.update(temps)
                return self._edit_root(tree, edits, batch, strict=True)

            message = f"Import {format_path(base)} ({len(edits)} modules)"
            self._change(branch, author, message, edit)
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
        data = self._read_verified(digest)
        if data[:4] != WASM_MAGIC:
            raise NotFound(f"no such module {digest}")
        if len(data) <= MODULE_CACHE_ITEM_BYTES:
            self._modules.put(digest, data, len(data))
        return data

    def module_filename(self, digest):
        """The object file of a module, after checking its content (result cached)."""
        digest = validate_hash(digest)
        path = self._object_path(digest)
        key = _stat_key(path)
        if key is None:
            raise NotFound(f"no such module {digest}")
        if self._verified.get(digest) != key:
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                head = handle.read(4)
                hasher.update(head)
                for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
                    hasher.update(chunk)
            if hasher.hexdigest() != digest:
                raise CorruptObject(f"object {digest} is corrupt (its content does not "
                                    "match its hash); run fsck")
            if head != WASM_MAGIC:
                raise NotFound(f"no such module {digest}")
            self._verified.put(digest, key)
        return path

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
        removed = []

        def edit(head, tree, batch):
            if kind == "hash":
                paths = self._index(tree).get(value)
                if not paths:
                    raise NotFound(f"no module with hash {value} on the branch")
            else:
                if self._entry_at(tree, value) is None:
                    raise NotFound(f"nothing at {format_path(value)} on the branch")
                paths = [value]
            removed[:] = [format_path(p) for p in paths]
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

    # ------------------------------------------------------------------- history

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
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise InvalidInput(f"invalid version index {_short(index)}: expected an "
                               "integer") from None
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

    def log(self, limit=None, *, branch=None):
        """Commit infos along first parents from the head, newest first."""
        head = self._read_ref(self._branch(branch))
        chain = self._first_parents(head)
        if limit is not None:
            chain = itertools.islice(chain, max(0, int(limit)))
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

    # ------------------------------------------------------------------- branches

    @property
    def default_branch(self):
        """The branch used when none is named (persisted in HEAD)."""
        try:
            key = _stat_key(self._head_file)
            if key is not None and self._default_cache[0] == key:
                return self._default_cache[1]
            with open(self._head_file, encoding="utf-8", errors="replace") as handle:
                name = handle.read(256).strip()
        except FileNotFoundError:
            raise CorruptObject(f"{self._head_file} is missing; run fsck") from None
        try:
            validate_branch(name)
        except InvalidInput:
            raise CorruptObject(f"HEAD is corrupt: {name[:70]!r}") from None
        self._default_cache = (key, name)
        return name

    def set_default_branch(self, name):
        """Make an existing branch the default."""
        validate_branch(name)
        with self._ref_lock():
            self._read_ref(name, fresh=True)
            tmp, fd = self._new_tmp(0o644)
            try:
                _write_all(fd, (name + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._head_file)
            _fsync_path(self.root)

    def branches(self):
        """Sorted names of every branch."""
        return sorted(name for name in os.listdir(self._heads_dir)
                      if BRANCH_NAME.match(name) and not name.startswith("."))

    def create_branch(self, name, *, branch=None):
        """Create branch name at the head of branch (default: the default branch)."""
        validate_branch(name)
        source = self._branch(branch)
        with self._ref_lock():
            head = self._read_ref(source, fresh=True)
            if os.path.exists(self._ref_path(name)):
                raise Conflict(f"branch {name!r} already exists")
            if not self._create_if_missing(self._ref_path(name),
                                           (head + "\n") if head else ""):
                raise Conflict(f"branch {name!r} already exists")

    def delete_branch(self, name):
        """Delete a branch (not the default one)."""
        validate_branch(name)
        with self._ref_lock():
            # Checked under the lock that guards HEAD too: a concurrent switch of the default
            # branch to `name` must not leave HEAD naming a deleted branch.
            if name == self.default_branch:
                raise Conflict(f"refusing to delete the default branch {name!r}")
            try:
                os.unlink(self._ref_path(name))
            except FileNotFoundError:
                raise NotFound(f"no such branch {name!r}") from None
            _fsync_path(self._heads_dir)
            self._ref_cache.pop(name, None)

    def merge(self, source, *, branch=None, author=None):
        """Merge branch source into branch: fast-forward, or a three-way merge per path."""
        validate_branch(source)
        target = self._branch(branch)
        author = _author(author)
        with self._ref_lock():
            theirs = self._read_ref(source, fresh=True)
            ours = self._read_ref(target, fresh=True)
            if theirs is None or theirs == ours or self._is_ancestor(theirs, ours):
                return
            if ours is None or self._is_ancestor(ours, theirs):
                self._write_ref(target, ours, theirs)
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

    # ------------------------------------------------------------------- watch

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

    # ------------------------------------------------------------------- gc

    def gc(self, *, branch=None, author=None):
        """Squash the branch's history into one "GC" commit, then delete every object
        not reachable from any branch. Returns the number of object files deleted."""
        branch = self._branch(branch)
        author = _author(author)
        with self._ref_lock(), self._objects_lock(shared=False):
            head = self._read_ref(branch, fresh=True)
            if head and self._commit(head)["parents"]:
                batch = _Batch()
                tree = self._commit(head)["tree"]
                squashed = self._put_commit(tree, [], author, "GC", batch)
                self._land(batch, (branch, head, squashed))
                self._history.record(squashed, None, self.changes(None, squashed))
            heads = [self._read_ref(name, fresh=True) for name in self.branches()]
            reachable = self._reachable(heads)
            deleted = self._sweep(reachable)
            self._history.compact(reachable)
            self._remove_stale_temps()
        return deleted

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

    def _sweep(self, reachable):
        deleted = 0
        for fanout in sorted(os.listdir(self._objects_dir)):
            directory = os.path.join(self._objects_dir, fanout)
            if len(fanout) != 2 or not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                digest = fanout + name
                if _is_hash(digest) and digest == digest.lower() and digest not in reachable:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                        deleted += 1
                        self._verified.put(digest, None)
        return deleted

    def _remove_stale_temps(self):
        now = time.time()
        for name in os.listdir(self._tmp_dir):
            path = os.path.join(self._tmp_dir, name)
            pid = name.split("-", 1)[0]
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            dead = pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))
            if dead or age > STALE_TMP_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    # ------------------------------------------------------------------- export, backup

    def export(self, directory, commit=None, *, branch=None):
        """Write every module of the branch (or commit) under directory as plain files.
        Returns the number of files written. Never writes outside directory."""
        if commit is not None:
            tree = self._commit(self.commit_info(commit)["hash"])["tree"]
        else:
            _, tree = self._head_tree(self._branch(branch))
        base = os.path.realpath(directory)
        os.makedirs(base, exist_ok=True)
        count = 0
        for segments, digest in self._walk_modules(tree):
            parent = os.path.join(base, *segments[:-1])
            os.makedirs(parent, exist_ok=True)
            if os.path.realpath(parent) != parent:
                raise StoreError(f"refusing to export through a symbolic link at {parent!r}")
            self._copy_module_to(digest, os.path.join(parent, segments[-1]))
            count += 1
        return count

    def _copy_module_to(self, digest, target):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        hasher = hashlib.sha256()
        try:
            fd = os.open(target, flags, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write {target!r}: {exc.strerror}") from None
        try:
            with open(self._object_path(digest), "rb") as source:
                for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
                    hasher.update(chunk)
                    _write_all(fd, chunk)
        finally:
            os.close(fd)
        if hasher.hexdigest() != digest:
            os.unlink(target)
            raise CorruptObject(f"object {digest} is corrupt; run fsck")

    def backup(self, filename):
        """Write a consistent .tar.gz of the store (HEAD, refs, reachable objects).
        Returns the number of objects in it."""
        filename = os.path.abspath(filename)
        if filename == self.root or filename.startswith(self.root + os.sep):
            raise InvalidInput("the backup file must be outside the store root")
        with contextlib.ExitStack() as locks:
            with self._ref_lock():
                locks.enter_context(self._objects_lock(shared=True))
                refs = {name: self._read_ref(name, fresh=True) for name in self.branches()}
                default = self.default_branch
            objects = sorted(self._reachable(refs.values()))
            tmp = f"{filename}.{os.getpid()}.tmp"
            try:
                with tarfile.open(tmp, "w:gz") as archive:
                    _add_bytes(archive, "HEAD", (default + "\n").encode())
                    for name, head in sorted(refs.items()):
                        _add_bytes(archive, f"refs/heads/{name}",
                                   (head + "\n").encode() if head else b"")
                    for digest in objects:
                        archive.add(self._object_path(digest),
                                    f"objects/{digest[:2]}/{digest[2:]}", recursive=False)
                _fsync_path(tmp)
                os.replace(tmp, filename)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return len(objects)

    @classmethod
    def load_backup(cls, filename, root):
        """Extract a backup into root (missing or empty) safely and check it: a Store."""
        return load_backup(filename, root)

    # ------------------------------------------------------------------- fsck

    def fsck(self):
        """Problems found (empty list = clean): object hashes, references, refs, HEAD."""
        return self._fsck()[0]

    def _fsck(self):
        problems = []
        kinds = {}           # hash -> "module" | "tree" | "commit" | None (bad, reported)
        for digest, path in self._object_files(problems):
            kinds[digest] = _check_object_file(path, digest, problems)
        for digest, kind in kinds.items():
            if kind in ("tree", "commit"):
                self._check_references(digest, kind, kinds, problems)
        try:
            default = self.default_branch
            if default not in self.branches():
                problems.append(f"HEAD names a missing branch {default!r}")
        except StoreError as exc:
            problems.append(str(exc))
        for name in self.branches():
            try:
                head = self._read_ref(name, fresh=True)
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if head and kinds.get(head) != "commit":
                problems.append(f"branch {name!r} points at a missing commit {head}")
        return problems, len(kinds)

    def _object_files(self, problems):
        for fanout in sorted(os.listdir(self._objects_dir)):
            directory = os.path.join(self._objects_dir, fanout)
            if not os.path.isdir(directory):
                problems.append(f"unexpected file objects/{fanout}")
                continue
            for name in sorted(os.listdir(directory)):
                digest = fanout + name
                if not _is_hash(digest) or digest != digest.lower():
                    problems.append(f"unexpected file objects/{fanout}/{name}")
                    continue
                yield digest, os.path.join(directory, name)

    def _check_references(self, digest, kind, kinds, problems):
        try:
            parsed = _parse_object(self._read_verified(digest), digest)[1]
        except StoreError as exc:
            problems.append(str(exc))
            return
        if kind == "tree":
            wanted = [(child, child_kind) for child_kind, child in parsed.values()]
        else:
            wanted = [(parsed["tree"], "tree")] + [(p, "commit") for p in parsed["parents"]]
        for child, child_kind in wanted:
            if kinds.get(child, child_kind) is None:
                continue             # a bad object: reported once, where it was read
            if kinds.get(child) != child_kind:
                problems.append(f"{kind} {digest} refers to a missing {child_kind} {child}")


# --------------------------------------------------------------------------- history cache

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

    def __init__(self, path):
        self.path = path
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
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
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
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            with open(tmp, "wb") as handle:
                handle.write(b"".join(lines))
            os.replace(tmp, self.path)


def _history_line(fields):
    body = "\t".join(fields)
    return f"{body}\t{zlib.crc32(body.encode('utf-8')):08x}\n".encode("utf-8")


# --------------------------------------------------------------------------- object helpers

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
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise CorruptObject(f"object {digest} is not a module, tree or commit")


def _commit_info(digest, commit):
    info = {"hash": digest}
    if commit["parents"]:
        info["parents"] = list(commit["parents"])
    info.update(author=commit["author"], date=commit["date"], message=commit["message"])
    return info


def _check_object_file(path, digest, problems):
    """Hash-check one object file by streaming it; returns its kind or None."""
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            head = handle.read(CHUNK_SIZE)
            hasher.update(head)
            for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
                hasher.update(chunk)
    except OSError as exc:
        problems.append(f"object {digest} cannot be read: {exc.strerror}")
        return None
    if hasher.hexdigest() != digest:
        problems.append(f"object {digest} is corrupt (content does not match its hash)")
        return None
    if head[:4] == WASM_MAGIC:
        return "module"
    if head[:1] == b"{":
        try:
            with open(path, "rb") as handle:
                return _parse_object(handle.read(), digest)[0]
        except CorruptObject as exc:
            problems.append(str(exc))
            return None
    problems.append(f"object {digest} is not a module, tree or commit")
    return None


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
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    archive.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- backup loading

_BACKUP_MEMBER = re.compile(
    r"(HEAD|refs|refs/heads|refs/heads/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|objects"
    r"|objects/[0-9a-f]{2}|objects/[0-9a-f]{2}/[0-9a-f]{62})\Z")
_DERIVED_MEMBER = re.compile(r"(tmp|cache)(/[^/]+)?\Z")   # temp files and caches: skipped


def load_backup(filename, root):
    """Extract a backup made by Store.backup into root (missing or empty), check it with
    fsck, and return the Store. Members that could escape root are refused; on any
    problem the partly extracted root is removed again."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise InvalidInput(f"cannot load a backup into {root!r}: it is not an empty directory")
    try:
        archive = tarfile.open(filename, "r:*")
    except FileNotFoundError:
        raise NotFound(f"no such backup file {filename!r}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInput(f"{filename!r} is not a readable backup: {exc}") from None
    created = not os.path.exists(root)
    try:
        with archive:
            _extract_members(archive, root)
        store = Store(root)
        problems = store.fsck()
        if problems:
            raise CorruptObject(f"backup {filename!r} fails fsck: {problems[0]} "
                                f"({len(problems)} problems)")
        return store
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for name in os.listdir(root):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        raise


def _extract_members(archive, root):
    seen_head = False
    for member in archive:
        name = member.name[2:] if member.name.startswith("./") else member.name
        name = name.rstrip("/")
        if name in ("", ".") or _DERIVED_MEMBER.match(name):
            continue
        if not _BACKUP_MEMBER.match(name) or not (member.isfile() or member.isdir()):
            raise InvalidInput(f"backup member {member.name!r} is not part of a store; "
                               "refusing to extract it")
        target = os.path.join(root, *name.split("/"))
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = archive.extractfile(member)
        with open(target, "xb") as out:
            shutil.copyfileobj(source, out, CHUNK_SIZE)
        if name.startswith("objects/"):
            os.chmod(target, 0o444)
        seen_head = seen_head or name == "HEAD"
    if not seen_head:
        raise InvalidInput("the archive has no HEAD: it is not a wasmstore backup")


# --------------------------------------------------------------------------- running stored modules

KV_FILE = "kv.sqlite3"                 # the default kv backend lives with the store


def default_kv_url(root):
    """sqlite:<root>/kv.sqlite3: stored modules keep their state next to the store."""
    return "sqlite:" + os.path.join(os.path.abspath(os.path.expanduser(os.fspath(root))), KV_FILE)


def _kvhost():
    """kvhost.py, the runtime: a sibling file, needed only to run modules."""
    try:
        import kvhost
    except ModuleNotFoundError as exc:
        if exc.name not in ("kvhost", "wasmtime"):
            raise
        raise StoreError("running modules needs kvhost.py next to wasmstore.py and the wasmtime "
                         "package (pip install wasmtime)") from None
    return kvhost


def parse_namespace_map(entries):
    """[(prefix segments, namespace)] from "PREFIX=NAMESPACE" texts, longest prefix first."""
    parsed = []
    for entry in entries or ():
        prefix, sep, namespace = str(entry).partition("=")
        if not sep or not namespace or "\0" in namespace or len(namespace) > 1024:
            raise InvalidInput(f"invalid namespace mapping {_short(entry)}: expected PREFIX=NAMESPACE")
        parsed.append((validate_path(prefix), namespace))
    return sorted(parsed, key=lambda item: -len(item[0]))


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
    hash uses "sha256:<hash>"; `namespaces` ([(prefix segments, namespace)], see
    parse_namespace_map) lets an operator give every module under a prefix one shared
    namespace. Core modules whose imports name a store path (or a hash) are linked to those
    modules in the same commit. `host` is a kvhost.Host (default: one made from host_options,
    with kv=sqlite under the store root)."""

    def __init__(self, store, host=None, *, namespaces=(), **host_options):
        kvhost = _kvhost()
        self.store = store
        self.namespaces = list(namespaces)
        self._owns_host = host is None
        if host is None:
            host_options.setdefault("kv", default_kv_url(store.root))
            host = kvhost.Host(**host_options)
        self.host = host

    def close(self):
        if self._owns_host:
            self.host.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- resolution ------------------------------------------------------------------------------

    def resolve(self, path_or_hash, *, branch=None, version=None, commit=None):
        """The Target for a path or hash on a branch, at an older version index, or in a commit."""
        if version is not None and commit is not None:
            raise InvalidInput("give a version or a commit, not both")
        kind, value = _target(path_or_hash)
        if version is not None:
            if kind == "hash":
                raise InvalidInput("versions belong to a path; a hash names one module already")
            digest, commit = self.store.version(version, path_or_hash, branch=branch)
        else:
            digest, commit = self.store.module_at(path_or_hash, branch=branch, commit=commit)
        path = format_path(value) if kind == "path" else None
        return Target(digest, commit, path, self.namespace_for(path, digest))

    def namespace_for(self, path, digest):
        """The kv namespace of a module: its path, a mapped prefix's namespace, or sha256:<hash>."""
        if path is None:
            return f"sha256:{digest}"
        segments = validate_path(path)
        for prefix, namespace in self.namespaces:
            if tuple(segments[:len(prefix)]) == tuple(prefix):
                return namespace
        return path

    def load(self, target):
        """The kvhost Guest for a target (compiled once per module hash)."""
        guest = self.host.loaded(target.digest)
        if guest is None:
            guest = self.host.load(self.store.module_filename(target.digest), digest=target.digest,
                                   name=target.path or target.digest)
        return guest

    def _linker_for(self, target):
        """resolve(import module name) for kvhost: store paths and hashes in the target's commit."""
        def resolve(module_name):
            if not module_name.startswith("/") and not _is_hash(module_name):
                return None
            try:
                digest, _ = self.store.module_at(module_name, commit=target.commit)
            except (InvalidInput, NotFound):
                return None
            return self.load(Target(digest, target.commit, module_name, None))
        return resolve

    def _prepare(self, path_or_hash, branch, version, commit):
        target = self.resolve(path_or_hash, branch=branch, version=version, commit=commit)
        return target, self.load(target)

    # -- running ---------------------------------------------------------------------------------

    def call(self, path_or_hash, function, args=(), *, branch=None, version=None, commit=None,
             namespace=None, stats=None):
        """Call an exported function with JSON-style arguments (kvhost.Host.call's mapping)."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        return self.host.call(guest, function, args, namespace=namespace or target.namespace,
                              resolve=self._linker_for(target), stats=stats)

    def run(self, path_or_hash, argv=(), *, branch=None, version=None, commit=None, namespace=None,
            stdin=None, stats=None):
        """Run a wasi:cli/run component or a WASI command module; returns its exit status."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        return self.host.run(guest, argv, namespace=namespace or target.namespace,
                             resolve=self._linker_for(target), stdin=stdin, stats=stats)

    def run_captured(self, path_or_hash, argv=(), *, branch=None, version=None, commit=None,
                     namespace=None, stdin=b"", limit=None, stats=None):
        """Like run(), with stdout and stderr kept (kvhost.RunResult)."""
        target, guest = self._prepare(path_or_hash, branch, version, commit)
        options = {} if limit is None else {"limit": limit}
        return self.host.run_captured(guest, argv, namespace=namespace or target.namespace,
                                      resolve=self._linker_for(target), stdin=stdin, stats=stats, **options)

    def exports(self, path_or_hash, *, branch=None, version=None, commit=None):
        """The callable exports of a stored module (kvhost.describe_exports)."""
        _, guest = self._prepare(path_or_hash, branch, version, commit)
        return self.host.exports(guest)


# --------------------------------------------------------------------------- CLI

def _print_line(text):
    sys.stdout.write(text + "\n")


def _cmd_add(store, args):
    if args.file == "-":
        if not args.path:
            raise InvalidInput("reading a module from stdin needs a PATH argument")
        digest = store.add_file(args.path, sys.stdin.buffer, branch=args.branch,
                                author=args.author)
    else:
        if not os.path.isfile(args.file):
            raise NotFound(f"no such file {args.file!r}")
        path = args.path if args.path is not None else os.path.basename(args.file)
        digest = store.add_file(path, args.file, branch=args.branch, author=args.author)
    _print_line(digest)


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


def _format_date(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


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
    elif args.name and args.delete:
        store.delete_branch(args.name)
    elif args.name:
        store.create_branch(args.name, branch=args.branch)
    else:
        default = store.default_branch
        for name in store.branches():
            _print_line(("* " if name == default else "  ") + name if args.verbose else name)


def _cmd_merge(store, args):
    store.merge(args.source, branch=args.branch, author=args.author)


def _cmd_gc(store, args):
    _print_line(str(store.gc(branch=args.branch, author=args.author)))


def _cmd_export(store, args):
    count = store.export(args.output, args.commit, branch=args.branch)
    _print_line(f"exported {count} modules to {os.path.abspath(args.output)}")


def _cmd_backup(store, args):
    count = store.backup(args.file)
    _print_line(f"backup of {count} objects written to {os.path.abspath(args.file)}")


def _cmd_fsck(store, args):
    problems, checked = store._fsck()
    for problem in problems:
        _print_line(problem)
    _print_line(f"fsck: {checked} objects checked, {len(problems)} problems")
    return 1 if problems else 0


def _cmd_watch(store, args):
    try:
        for commit, changes in store.watch(branch=args.branch):
            _print_line(json.dumps(changes))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0


RUN_COMMANDS = ("call", "run", "exports")     # their options come from kvhost (imported only for them)


def _runner(store, args):
    kvhost = _kvhost()
    host = kvhost.host_from_args(args, kv=args.kv or default_kv_url(store.root))
    return Runner(store, host, namespaces=parse_namespace_map(args.namespace_map))


def _run_guest(store, args, work):
    """Run work(runner) within the sandbox's deadline; kvhost errors become kvhost's CLI statuses."""
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

    def call(runner):
        json_args = kvhost.parse_json_args(args.json_args)
        result = runner.call(args.target, args.function, json_args, namespace=args.namespace, **_selector(args))
        kvhost.print_json(result, sys.stdout)
        return 0
    return _run_guest(store, args, call)


def _cmd_run(store, args):
    def run(runner):
        sys.stdout.flush()
        return runner.run(args.target, args.args, namespace=args.namespace, **_selector(args))
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
    sub.add_argument("--version", dest="version_index", type=int, metavar="INDEX",
                     help="run version INDEX of the path (0 = oldest; see 'versions')")
    sub.add_argument("--commit", metavar="COMMIT", help="run the module as it was in COMMIT")


def _add_run_options(sub, name):
    """The options of call/run/exports; the sandbox and kv ones are kvhost's own."""
    _add_selector_options(sub)
    kvhost = _kvhost()
    if name == "exports":
        sub.add_argument("--json", action="store_true", help="one JSON document instead of one line each")
        sub.add_argument("--cache-dir", help="compile cache directory (default ~/.cache/wasmstore/kvhost)")
        return
    kvhost.add_store_options(sub, kv_default=None, kv_default_text="sqlite under the store root")
    sub.add_argument("--namespace-map", action="append", default=[], metavar="PREFIX=NS",
                     help="modules under PREFIX share kv namespace NS (repeatable; default: each path "
                          "is its own namespace, a hash is sha256:<hash>)")
    kvhost.add_sandbox_options(sub)


COMMANDS = {
    # name: (handler, help, [(argument, options)])
    "add": (_cmd_add, "validate and store a module (FILE '-' reads stdin); prints its hash",
            [("file", {"metavar": "FILE"}),
             ("path", {"metavar": "PATH", "nargs": "?",
                       "help": "where to store it (default: the file's base name)"})]),
    "import": (_cmd_import, "store every *.wasm file under DIR in one commit",
               [("directory", {"metavar": "DIR"}),
                ("prefix", {"metavar": "PREFIX", "nargs": "?", "help": "path to store them under"})]),
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
            [("-n", {"type": int, "metavar": "N", "help": "at most N commits"})]),
    "branch": (_cmd_branch, "create, delete, list or switch branches",
               [("name", {"metavar": "NAME", "nargs": "?", "help": "branch to create or delete"}),
                ("--delete", {"action": "store_true", "help": "delete NAME"}),
                ("--list", {"action": "store_true", "help": "list branches (the default)"}),
                ("--verbose", {"action": "store_true", "help": "mark the default branch"}),
                ("--switch", {"metavar": "NAME", "help": "make NAME the default branch"})]),
    "merge": (_cmd_merge, "merge BRANCH into the selected branch",
              [("source", {"metavar": "BRANCH"})]),
    "gc": (_cmd_gc, "squash the branch's history and delete unreachable objects", []),
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
    "call": (_cmd_call, "call FUNCTION of a stored module with JSON arguments; print its JSON result",
             [("target", {"metavar": "PATH|HASH"}), ("function", {"metavar": "FUNCTION"}),
              ("json_args", {"metavar": "JSON_ARG", "nargs": "*"})]),
    "run": (_cmd_run, "run a stored wasi:cli/run component or WASI command module",
            [("target", {"metavar": "PATH|HASH"}), ("args", {"metavar": "ARG", "nargs": argparse.REMAINDER})]),
    "exports": (_cmd_exports, "print each callable export of a stored module with its types",
                [("target", {"metavar": "PATH|HASH"})]),
    "server": (None, "run the HTTP API (options: python http_server.py --help)", []),
}


CLI_EXAMPLES = """examples:
  python wasmstore.py add add.wasm /math/add.wasm     store a module, print its hash
  cat add.wasm | python wasmstore.py add - add.wasm   from stdin
  python wasmstore.py list /math                      hash and path of each module
  python wasmstore.py versions /math/add.wasm         every version, oldest first
  python wasmstore.py rollback /math/add.wasm         undo its latest change
  python wasmstore.py --branch dev add x.wasm         work on branch dev
  python wasmstore.py server --port 6384              serve the HTTP API

Global options may also follow the command. Errors print one line on stderr
and exit 1 (also "not found"); bad usage exits 2. 'COMMAND --help' explains one
command."""


def _add_global_options(parser, suppress):
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--root", default=default(None),
                        help=f"store root (env WASMSTORE_ROOT; default {DEFAULT_ROOT})")
    parser.add_argument("--branch", default=default(None),
                        help="branch to use (env WASMSTORE_BRANCH; default: the store's default)")
    parser.add_argument("--author", default=default(None),
                        help=f"commit author (env WASMSTORE_AUTHOR; default {DEFAULT_AUTHOR})")


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
            _add_global_options(sub, suppress=True)
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
    root = args.root or os.environ.get("WASMSTORE_ROOT") or DEFAULT_ROOT
    args.branch = args.branch or os.environ.get("WASMSTORE_BRANCH") or None
    args.author = args.author or os.environ.get("WASMSTORE_AUTHOR") or None
    try:
        if args.command == "server":
            import http_server
            return http_server.main(server_args + ["--root", root])
        if args.command == "load-backup":
            load_backup(args.file, root)
            _print_line(f"backup loaded into {os.path.abspath(os.path.expanduser(root))}")
            return 0
        with Store(root) as store:
            handler = COMMANDS[args.command][0]
            return handler(store, args) or 0
    except StoreError as exc:
        sys.stderr.write(f"wasmstore: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"wasmstore: error: {exc.strerror or exc}"
                         f"{': ' + repr(exc.filename) if exc.filename else ''}\n")
        return 1
    except KeyboardInterrupt:
        return 130


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


if __name__ == "__main__":
    try:
        sys.exit(_end_process(main()))
    except BrokenPipeError:
        sys.exit(1)
