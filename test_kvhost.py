# SPDX-License-Identifier: Apache-2.0
"""Tests for kvhost.py: backend contract (memory, SQLite, a real redis-server), the wasi:keyvalue
glue through hand-written WAT guests (guests/host/), the sandbox, the compile cache and the CLI.

Run from the repository root:  python -m unittest test_kvhost -v
The Redis tests start `redis-server` (Debian package redis-server) on a free loopback port.
"""

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import kvhost

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(HERE, "guests", "host")
PROBE = os.path.join(GUESTS, "kv-probe.wat")              # wasi:keyvalue@0.2.0-draft2
PROBE_DRAFT = os.path.join(GUESTS, "kv-probe-draft.wat")  # wasi:keyvalue@0.2.0-draft
WATCHER = os.path.join(GUESTS, "watcher-probe.wat")
WASI_PROBE = os.path.join(GUESTS, "wasi-probe.wat")
TYPES_PROBE = os.path.join(GUESTS, "types-probe.wat")   # one export per component value shape
REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)"
# Under CI a missing redis-server fails the Redis tests instead of skipping them.
SKIP_REDIS = REDIS_SERVER is None and not os.environ.get("CI")


def read_text(path):
    with open(path) as f:
        return f.read()


def temp_dir(test):
    path = tempfile.mkdtemp(prefix="kvhost-test-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port, *args, password=None):
    """One command over a fresh socket (test-side helper, independent of kvhost's client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, s.makefile("rb") as reader:
        parts = ([("AUTH", password)] if password else []) + [args]
        payload = b""
        for cmd in parts:
            payload += b"*%d\r\n" % len(cmd)
            for a in cmd:
                a = a if isinstance(a, bytes) else str(a).encode()
                payload += b"$%d\r\n%s\r\n" % (len(a), a)
        s.sendall(payload)
        reply = None
        for _ in parts:
            reply = reader.readline()
        return reply


class RedisServer:
    """A real redis-server on a free loopback port, without persistence, in a temp dir."""

    def __init__(self, directory, port=None):
        self.directory = directory
        self.port = port or free_port()
        self.process = None

    def start(self):
        if REDIS_SERVER is None:
            raise RuntimeError(NO_REDIS)
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    if redis_command(self.port, "PING").startswith(b"+PONG"):
                        return self
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        except BaseException:
            self.stop()     # never leave a server behind
            raise

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


# ---------------------------------------------------------------------------
# backend contract: one set of tests, run against every backend
# ---------------------------------------------------------------------------

class BackendContract:
    """Mixin: subclasses provide make_backend(max_value_size)."""

    NS = "tenant-a"

    def setUp(self):
        self.backend = self.make_backend()
        self.addCleanup(self.backend.close)

    def test_get_missing_key_is_none_and_exists_false(self):
        self.assertIsNone(self.backend.get(self.NS, "b", "nope"))
        self.assertFalse(self.backend.exists(self.NS, "b", "nope"))

    def test_set_get_overwrite_and_binary_values(self):
        value = bytes(range(256))
        self.backend.set(self.NS, "b", "k", value)
        self.assertEqual(self.backend.get(self.NS, "b", "k"), value)
        self.assertTrue(self.backend.exists(self.NS, "b", "k"))
        self.backend.set(self.NS, "b", "k", b"")
        self.assertEqual(self.backend.get(self.NS, "b", "k"), b"")
        self.assertTrue(self.backend.exists(self.NS, "b", "k"))

    def test_unicode_keys(self):
        self.backend.set(self.NS, "b", "clé/ключ/🔑", b"v")
        self.assertEqual(self.backend.get(self.NS, "b", "clé/ключ/🔑"), b"v")
        self.assertEqual(self.backend.list_page(self.NS, "b")[0], ["clé/ключ/🔑"])

    def test_delete_existing_and_missing(self):
        self.backend.set(self.NS, "b", "k", b"v")
        self.backend.delete(self.NS, "b", "k")
        self.assertIsNone(self.backend.get(self.NS, "b", "k"))
        self.backend.delete(self.NS, "b", "k")   # missing: fine

    def _fill(self, count=2500):
        keys = [f"key-{i:05d}" for i in range(count)]
        self.backend.set_many(self.NS, "big", [(k, b"x") for k in reversed(keys)])
        return keys

    def test_list_pages_2500_keys_with_opaque_cursor(self):
        keys = self._fill()
        pages, cursor = [], None
        while True:
            page, cursor = self.backend.list_page(self.NS, "big", cursor)
            pages.append(page)
            if cursor is None:
                break
            self.assertIsInstance(cursor, str)
        self.assertEqual([len(p) for p in pages], [1000, 1000, 500])
        self.assertEqual(sum(pages, []), keys)

    def test_list_pages_2500_keys_with_offset_cursor(self):
        keys = self._fill()
        pages, offset = [], None
        while True:
            page, offset = self.backend.list_page_at(self.NS, "big", offset)
            pages.append(page)
            if offset is None:
                break
        self.assertEqual([len(p) for p in pages], [1000, 1000, 500])
        self.assertEqual(sum(pages, []), keys)

    def test_opaque_cursor_resumes_after_last_key_despite_concurrent_writes(self):
        keys = self._fill()
        page, cursor = self.backend.list_page(self.NS, "big")
        self.backend.set(self.NS, "big", "key-00000a", b"before the cursor")   # sorts before the last key seen
        self.backend.delete(self.NS, "big", keys[1000])
        self.backend.set(self.NS, "big", "key-01500a", b"after")
        page2, _ = self.backend.list_page(self.NS, "big", cursor)
        self.assertEqual(page2[0], keys[1001])
        self.assertIn("key-01500a", page2)
        self.assertNotIn("key-00000a", page2)

    def test_invalid_cursor_is_an_operation_error(self):
        for cursor in ("garbage", "k1.%%%", "k1." + base64.urlsafe_b64encode(b"\xff\xfe").decode()):
            with self.assertRaisesRegex(kvhost.OperationError, "invalid cursor"):
                self.backend.list_page(self.NS, "b", cursor)
        with self.assertRaisesRegex(kvhost.OperationError, "invalid cursor"):
            self.backend.list_page_at(self.NS, "b", -1)

    def test_empty_bucket_lists_nothing(self):
        self.assertEqual(self.backend.list_page(self.NS, "empty"), ([], None))
        self.assertEqual(self.backend.list_page_at(self.NS, "empty", 5000), ([], None))

    def test_increment_on_missing_starts_at_zero_and_stores_decimal(self):
        self.assertEqual(self.backend.increment(self.NS, "b", "n", 5), 5)
        self.assertEqual(self.backend.increment(self.NS, "b", "n", -7), -2)
        self.assertEqual(self.backend.get(self.NS, "b", "n"), b"-2")
        self.assertEqual(self.backend.increment(self.NS, "b", "u", 3, signed=False), 3)
        self.assertEqual(self.backend.get(self.NS, "b", "u"), b"3")

    def test_increment_of_non_numeric_value_fails_and_leaves_it(self):
        for value in (b"abc", b"007", b"+5", b" 5", b"-0", b"1.5", b""):
            self.backend.set(self.NS, "b", "k", value)
            with self.assertRaises(kvhost.OperationError, msg=value):
                self.backend.increment(self.NS, "b", "k", 1)
            self.assertEqual(self.backend.get(self.NS, "b", "k"), value)

    def test_increment_s64_overflow_fails_and_leaves_value(self):
        top = str((1 << 63) - 1).encode()
        self.backend.set(self.NS, "b", "k", top)
        with self.assertRaisesRegex(kvhost.OperationError, "overflow"):
            self.backend.increment(self.NS, "b", "k", 1)
        self.assertEqual(self.backend.get(self.NS, "b", "k"), top)
        self.backend.set(self.NS, "b", "low", str(-(1 << 63)).encode())
        with self.assertRaisesRegex(kvhost.OperationError, "overflow"):
            self.backend.increment(self.NS, "b", "low", -1)

    def test_increment_u64_range(self):
        self.assertEqual(self.backend.increment(self.NS, "b", "u", (1 << 64) - 1, signed=False), (1 << 64) - 1)
        with self.assertRaisesRegex(kvhost.OperationError, "overflow"):
            self.backend.increment(self.NS, "b", "u", 1, signed=False)
        self.assertEqual(self.backend.get(self.NS, "b", "u"), str((1 << 64) - 1).encode())
        with self.assertRaises(kvhost.OperationError):     # beyond s64: not a draft2 counter
            self.backend.increment(self.NS, "b", "u", 1)
        self.backend.set(self.NS, "b", "neg", b"-5")
        with self.assertRaisesRegex(kvhost.OperationError, "out of range"):
            self.backend.increment(self.NS, "b", "neg", 1, signed=False)
        self.assertEqual(self.backend.get(self.NS, "b", "neg"), b"-5")

    def test_increment_rejects_bad_delta(self):
        for delta, signed in ((1 << 63, True), (-1, False), ("1", True), (True, True)):
            with self.assertRaises(kvhost.ArgumentError):
                self.backend.increment(self.NS, "b", "k", delta, signed=signed)

    def test_compare_and_swap_success_and_conflict(self):
        self.assertTrue(self.backend.compare_and_swap(self.NS, "b", "k", None, b"first"))
        self.assertFalse(self.backend.compare_and_swap(self.NS, "b", "k", None, b"again"))
        self.assertFalse(self.backend.compare_and_swap(self.NS, "b", "k", b"stale", b"x"))
        self.assertEqual(self.backend.get(self.NS, "b", "k"), b"first")
        self.assertTrue(self.backend.compare_and_swap(self.NS, "b", "k", b"first", b"second"))
        self.assertEqual(self.backend.get(self.NS, "b", "k"), b"second")

    def test_get_many_answers_positionally_with_missing_and_duplicates(self):
        self.backend.set_many(self.NS, "b", [("a", b"1"), ("b", b"2")])
        self.assertEqual(self.backend.get_many(self.NS, "b", ["b", "missing", "a", "b"]), [b"2", None, b"1", b"2"])
        self.assertEqual(self.backend.get_many(self.NS, "b", []), [])

    def test_set_many_and_delete_many(self):
        self.backend.set_many(self.NS, "b", [("a", b"1"), ("b", b"2"), ("c", b"3")])
        self.backend.delete_many(self.NS, "b", ["a", "c", "never-there"])
        self.assertEqual(self.backend.list_page(self.NS, "b")[0], ["b"])

    def test_set_many_is_all_or_nothing_on_invalid_input(self):
        with self.assertRaises(kvhost.OperationError):
            self.backend.set_many(self.NS, "b", [("ok", b"1"), ("x" * 5000, b"2")])
        self.assertIsNone(self.backend.get(self.NS, "b", "ok"))

    def test_namespaces_and_buckets_are_isolated(self):
        self.backend.set("tenant-a", "b", "k", b"a")
        self.backend.set("tenant-b", "b", "k", b"b")
        self.backend.set("tenant-a", "other", "k", b"o")
        self.assertEqual(self.backend.get("tenant-a", "b", "k"), b"a")
        self.assertEqual(self.backend.get("tenant-b", "b", "k"), b"b")
        self.assertEqual(self.backend.list_page("tenant-b", "other"), ([], None))
        self.backend.set("odd/name:with*glob?", "b", "k", b"z")   # namespaces are arbitrary text
        self.assertEqual(self.backend.list_page("odd/name:with*glob?", "b")[0], ["k"])
        self.assertEqual(self.backend.list_page("odd", "b"), ([], None))

    def test_key_limit_is_4_kib_of_utf8(self):
        self.backend.set(self.NS, "b", "k" * 4096, b"v")
        self.assertEqual(self.backend.get(self.NS, "b", "k" * 4096), b"v")
        with self.assertRaisesRegex(kvhost.OperationError, "key too large"):
            self.backend.set(self.NS, "b", "k" * 4097, b"v")
        with self.assertRaisesRegex(kvhost.OperationError, "key too large"):
            self.backend.get(self.NS, "b", "é" * 2049)     # 4098 bytes

    def test_value_limit_default_16_mib(self):
        self.assertEqual(self.backend.max_value_size, 16 * 1024 * 1024)
        big = b"v" * (16 * 1024 * 1024)
        self.backend.set(self.NS, "b", "big", big)
        self.assertEqual(len(self.backend.get(self.NS, "b", "big")), len(big))
        with self.assertRaisesRegex(kvhost.OperationError, "value too large"):
            self.backend.set(self.NS, "b", "big", big + b"!")

    def test_value_limit_is_configurable(self):
        small = self.make_backend(max_value_size=10)
        self.addCleanup(small.close)
        small.set(self.NS, "b", "k", b"0123456789")
        with self.assertRaisesRegex(kvhost.OperationError, "value too large"):
            small.set(self.NS, "b", "k", b"0123456789!")
        with self.assertRaisesRegex(kvhost.OperationError, "value too large"):
            small.compare_and_swap(self.NS, "b", "k", b"0123456789", b"0123456789!")
        self.assertEqual(small.get(self.NS, "b", "k"), b"0123456789")

    def test_invalid_names_are_argument_errors(self):
        for ns, bucket, key in (("", "b", "k"), ("ns", "bad bucket", "k"), ("ns", "", "k"), ("ns", "b" * 129, "k"),
                                ("ns", "b", 5), ("ns", "b", "\udcff")):
            with self.assertRaises(kvhost.ArgumentError):
                self.backend.get(ns, bucket, key)
        with self.assertRaises(kvhost.ArgumentError):
            self.backend.set(self.NS, "b", "k", "not bytes")

    def test_increments_from_threads_add_up(self):
        def work():
            for _ in range(100):
                self.backend.increment(self.NS, "b", "counter", 1)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(self.backend.get(self.NS, "b", "counter"), b"400")


class MemoryBackendTest(BackendContract, unittest.TestCase):
    def make_backend(self, max_value_size=kvhost.DEFAULT_MAX_VALUE_BYTES):
        return kvhost.open_backend("memory:", max_value_size)


class SqliteBackendTest(BackendContract, unittest.TestCase):
    def make_backend(self, max_value_size=kvhost.DEFAULT_MAX_VALUE_BYTES):
        if not hasattr(self, "db_path"):
            self.db_path = os.path.join(temp_dir(self), "kv.sqlite3")
        return kvhost.open_backend("sqlite:" + self.db_path, max_value_size)

    def test_data_survives_reopen_and_uses_wal(self):
        self.backend.set(self.NS, "b", "k", b"durable")
        self.backend.close()
        again = kvhost.open_backend("sqlite:" + self.db_path)
        self.addCleanup(again.close)
        self.assertEqual(again.get(self.NS, "b", "k"), b"durable")
        mode = sqlite3.connect(self.db_path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

    def test_increments_from_processes_add_up(self):
        script = ("import sys, kvhost\nb = kvhost.open_backend(sys.argv[1])\n"
                  "for _ in range(150): b.increment('ns', 'b', 'n', 1)\n")
        procs = [subprocess.Popen([sys.executable, "-c", script, "sqlite:" + self.db_path], cwd=HERE)
                 for _ in range(3)]
        for p in procs:
            self.assertEqual(p.wait(timeout=120), 0)
        self.assertEqual(self.backend.get("ns", "b", "n"), b"450")


@unittest.skipIf(SKIP_REDIS, NO_REDIS)
class RedisBackendTest(BackendContract, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.redis_dir = tempfile.mkdtemp(prefix="kvhost-redis-")
        try:
            cls.server = RedisServer(cls.redis_dir).start()
        except BaseException:
            shutil.rmtree(cls.redis_dir, True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.redis_dir, True)

    def setUp(self):
        redis_command(self.server.port, "FLUSHALL")
        super().setUp()

    def make_backend(self, max_value_size=kvhost.DEFAULT_MAX_VALUE_BYTES):
        return kvhost.open_backend(self.server.url, max_value_size)

    def test_counters_are_plain_redis_integers(self):
        self.backend.increment(self.NS, "b", "n", 41)
        name = "kv:%s:b:n" % self.NS
        self.assertEqual(redis_command(self.server.port, "INCRBY", name, 1), b":42\r\n")
        self.assertEqual(self.backend.get(self.NS, "b", "n"), b"42")

    def test_replies_around_the_read_buffer_size_on_one_connection(self):
        # One pooled connection reads them all: replies that fill, straddle and outgrow its
        # 64 KiB buffer, then small ones again (after it shrinks back), in an order that leaves
        # partial replies at the buffer's end.
        backend = kvhost.RedisBackend(self.server.url, pool_size=1)
        self.addCleanup(backend.close)
        size = kvhost._RespConnection.BUFFER
        values = [os.urandom(n) for n in (0, 1, size - 8, size - 2, size, size + 1, 3 * size + 5, 7, size - 1)]
        for i, value in enumerate(values):
            backend.set(self.NS, "b", f"k{i}", value)
        for _ in range(2):
            for i, value in enumerate(values):
                self.assertEqual(backend.get(self.NS, "b", f"k{i}"), value, f"value {i} ({len(value)} bytes)")
        self.assertEqual(backend.get_many(self.NS, "b", [f"k{i}" for i in range(len(values))] + ["none"]),
                         values + [None])
        self.assertEqual(len(backend._pool), 1)

    def test_bad_url_is_an_argument_error(self):
        for url in ("redis://", "redis://host:notaport/0", "redis://host:1/x"):
            with self.assertRaises(kvhost.ArgumentError):
                kvhost.open_backend(url)


class OpenBackendTest(unittest.TestCase):
    def test_unknown_scheme_is_one_clear_error(self):
        with self.assertRaisesRegex(kvhost.ArgumentError, "invalid backend URL 'mysql://x'"):
            kvhost.open_backend("mysql://x")

    def test_default_is_durable_sqlite_under_home(self):
        home = temp_dir(self)
        old = os.environ.get("HOME")
        os.environ["HOME"] = home
        self.addCleanup(lambda: os.environ.__setitem__("HOME", old) if old else os.environ.pop("HOME"))
        backend = kvhost.open_backend()
        self.addCleanup(backend.close)
        self.assertIsInstance(backend, kvhost.SqliteBackend)
        self.assertEqual(backend.path, os.path.join(home, ".wasmstore", "kv.sqlite3"))


# ---------------------------------------------------------------------------
# the host glue, through WAT guests
# ---------------------------------------------------------------------------

class FaultyBackend(kvhost.MemoryBackend):
    """Raises the error a key names: tests every error case a guest can receive from get."""

    def _get(self, namespace, bucket, key):
        if key == "denied":
            raise kvhost.AccessDeniedError("no")
        if key == "gone":
            raise kvhost.NoSuchStoreError("no")
        if key == "broken":
            raise kvhost.BackendError("disk on fire")
        if key == "bug":
            raise RuntimeError("unexpected")
        return super()._get(namespace, bucket, key)


class GuestGlueTest(unittest.TestCase):
    def setUp(self):
        self.host = kvhost.Host(kv="memory:", cache_dir=temp_dir(self))
        self.addCleanup(self.host.close)
        self.probe = self.host.load(PROBE)
        self.draft = self.host.load(PROBE_DRAFT)

    def call(self, function, *args, guest=None):
        return self.host.call(guest or self.probe, function, list(args))

    def test_both_drafts_run_in_one_host_and_share_data(self):
        self.assertEqual(self.call("set", "b", "k", "aGk="), {"ok": None})
        self.assertEqual(self.call("get", "b", "k", guest=self.draft), {"ok": [104, 105]})
        self.assertEqual(self.call("set", "b", "d", [7], guest=self.draft), {"ok": None})
        self.assertEqual(self.call("get", "b", "d"), {"ok": [7]})

    def test_get_missing_key_is_ok_none(self):
        self.assertEqual(self.call("get", "b", "missing"), {"ok": None})

    def test_get_of_an_empty_and_a_one_byte_value(self):
        # Both sizes take the fast lowering of ok(some(bytes)); an empty list must stay ok(some([])).
        self.host.backend.set("default", "b", "empty", b"")
        self.host.backend.set("default", "b", "one", b"\xff")
        self.assertEqual(self.call("get", "b", "empty"), {"ok": []})
        self.assertEqual(self.call("get", "b", "one"), {"ok": [255]})

    def test_get_returns_each_error_case_to_the_guest(self):
        # Pins the wasmtime-py 50 bug: lowering an err for result<option<list<u8>>, error> fails
        # with "value not valid for this variant" unless the case is explicit (kvhost.Err).
        host = kvhost.Host(kv=FaultyBackend(), cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "get", ["b", "denied"]), {"err": {"tag": "access-denied"}})
        self.assertEqual(host.call(guest, "get", ["b", "gone"]), {"err": {"tag": "no-such-store"}})
        self.assertEqual(host.call(guest, "get", ["b", "broken"]),
                         {"err": {"tag": "other", "value": "disk on fire"}})
        self.assertEqual(host.call(guest, "get", ["b", "bug"]),
                         {"err": {"tag": "other", "value": "internal error: RuntimeError: unexpected"}})
        self.assertEqual(host.call(guest, "get", ["b", "fine"]), {"ok": None})

    def test_stock_wasmtime_lowering_still_has_the_bug(self):
        # If this starts failing, wasmtime-py fixed the bug and the Err marker could go.
        import wasmtime.component as wc
        engine = kvhost.wasmtime.Engine()
        store = kvhost.wasmtime.Store(engine)
        component = wc.Component(engine, read_text(PROBE))
        get = component.type.exports(engine)["get"].ty
        with self.assertRaisesRegex(ValueError, "value not valid for this variant"):
            get.result.convert_to_c(store, wc.Variant("access-denied"), kvhost.ctypes.pointer(kvhost._VAL()))

    def test_open_checks_ids_allow_and_deny_lists(self):
        host = kvhost.Host(kv="memory:", allow_buckets=["ok", "secret"], deny_buckets=["secret"], cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "get", ["ok", "k"]), {"ok": None})
        self.assertEqual(host.call(guest, "get", ["secret", "k"]), {"err": {"tag": "access-denied"}})
        self.assertEqual(host.call(guest, "get", ["elsewhere", "k"]), {"err": {"tag": "no-such-store"}})
        self.assertEqual(self.call("get", "bad id!", "k"), {"err": {"tag": "no-such-store"}})

    def test_empty_bucket_id_means_default(self):
        self.call("set", "", "k", [1])
        self.assertEqual(self.host.backend.get("default", "default", "k"), b"\x01")

    def test_writes_are_visible_to_later_opens(self):
        self.call("set", "b", "k", [1])
        self.assertEqual(self.call("get", "b", "k"), {"ok": [1]})   # a new store and a new open

    def test_namespaces_isolate_guests_sharing_a_backend(self):
        shared = kvhost.MemoryBackend()
        a = kvhost.Host(kv=shared, namespace="module-a", cache_dir=False)
        b = kvhost.Host(kv=shared, namespace="module-b", cache_dir=False)
        guest_a, guest_b = a.load(PROBE), b.load(PROBE)
        a.call(guest_a, "set", ["b", "k", [1]])
        self.assertEqual(b.call(guest_b, "get", ["b", "k"]), {"ok": None})
        self.assertEqual(a.call(guest_a, "get", ["b", "k"]), {"ok": [1]})

    def test_list_keys_pages_2500_keys_with_string_cursor(self):
        keys = [f"k{i:04d}" for i in range(2500)]
        self.host.backend.set_many("default", "big", [(k, b"") for k in keys])
        seen, cursor, pages = [], None, 0
        while True:
            page = self.call("list-keys", "big", cursor)["ok"]
            seen += page["keys"]
            pages += 1
            cursor = page["cursor"]
            if cursor is None:
                break
        self.assertEqual((seen, pages), (keys, 3))

    def test_list_keys_pages_2500_keys_with_numeric_cursor(self):
        keys = [f"k{i:04d}" for i in range(2500)]
        self.host.backend.set_many("default", "big", [(k, b"") for k in keys])
        seen, cursor = [], None
        while True:
            page = self.call("list-keys", "big", cursor, guest=self.draft)["ok"]
            seen += page["keys"]
            cursor = page["cursor"]
            if cursor is None:
                break
            self.assertIsInstance(cursor, int)
        self.assertEqual(seen, keys)

    def test_invalid_cursor_is_other(self):
        self.assertEqual(self.call("list-keys", "b", "nonsense"),
                         {"err": {"tag": "other", "value": "invalid cursor"}})

    def test_increment_s64_and_u64_through_guests(self):
        self.assertEqual(self.call("incr", "b", "n", -3), {"ok": -3})
        self.assertEqual(self.call("incr", "b", "u", (1 << 64) - 1, guest=self.draft), {"ok": (1 << 64) - 1})
        self.assertEqual(self.call("incr", "b", "u", 1, guest=self.draft),
                         {"err": {"tag": "other", "value": "increment overflows"}})
        self.assertEqual(self.call("incr", "b", "n", 1, guest=self.draft)["err"]["tag"], "other")
        self.call("set", "b", "text", [104])
        self.assertEqual(self.call("incr", "b", "text", 1),
                         {"err": {"tag": "other", "value": "value is not a decimal integer"}})
        self.assertEqual(self.call("get", "b", "text"), {"ok": [104]})

    def test_cas_swap_success_and_conflict(self):
        self.assertEqual(self.call("swap-if", "b", "c", [1]), {"ok": True})
        self.assertEqual(self.call("cas-race", "b", "c", [2], [3]), {"ok": False})   # someone wrote in between
        self.assertEqual(self.call("get", "b", "c"), {"ok": [2]})
        self.assertEqual(self.call("swap-if", "b", "c", [4]), {"ok": True})
        self.assertEqual(self.call("get", "b", "c"), {"ok": [4]})

    def test_get_many_with_missing_and_duplicate_keys(self):
        self.call("set", "b", "a", [1])
        self.assertEqual(self.call("get-many", "b", ["a", "zz", "a"]), {"ok": [["a", [1]], None, ["a", [1]]]})

    def test_value_limit_reaches_the_guest_as_other(self):
        host = kvhost.Host(kv="memory:", max_value_size=100, cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "set", ["b", "k", [0] * 100]), {"ok": None})
        result = host.call(guest, "set", ["b", "k", [0] * 101])
        self.assertEqual(result["err"]["tag"], "other")
        self.assertIn("value too large", result["err"]["value"])

    def test_value_limit_with_a_backend_object_is_refused_not_ignored(self):
        backend = kvhost.open_backend("memory:")
        with self.assertRaises(kvhost.ArgumentError) as caught:
            kvhost.Host(kv=backend, max_value_size=100, cache_dir=False)
        self.assertIn("carries its own limit", str(caught.exception))

    def test_large_values_cross_the_boundary_intact(self):
        value = os.urandom(300_000)
        self.assertEqual(self.call("set", "b", "big", base64.b64encode(value).decode()), {"ok": None})
        self.assertEqual(self.host.backend.get("default", "b", "big"), value)
        self.assertEqual(bytes(self.call("get", "b", "big")["ok"]), value)

    def test_watcher_gets_on_set_and_on_delete_in_order(self):
        watcher = self.host.load(WATCHER)
        self.host.attach_watcher(watcher, ["watched"])
        self.call("set", "watched", "k1", [1])
        self.call("set", "watched", "k2", [2])
        self.call("set", "unwatched", "k3", [3])
        self.call("delete", "watched", "k1")
        get = lambda key: self.host.backend.get("default", "watched", key)
        self.assertEqual((get("sets"), get("deletes"), get("last-set")), (b"2", b"1", b"k2"))
        self.assertIsNone(self.host.backend.get("default", "unwatched", "sets"))
        self.assertEqual(self.host.watch_errors, [])

    def test_attach_watcher_requires_the_watcher_export(self):
        with self.assertRaisesRegex(kvhost.ArgumentError, "does not export wasi:keyvalue/watcher"):
            self.host.attach_watcher(self.probe, ["b"])

    def test_guest_with_mismatched_kv_import_is_refused_naming_it(self):
        text = read_text(PROBE).replace(
            '(export "[method]bucket.exists" (func (param "self" (borrow $bucket)) (param "key" string)\n'
            '      (result (result bool (error $err)))))',
            '(export "[method]bucket.exists" (func (param "self" (borrow $bucket)) (param "key" string)\n'
            '      (result (result u32 (error $err)))))')
        self.assertNotEqual(text, read_text(PROBE))
        text = text.replace("(result u32)\n    (canon lift (core func $main \"exists-loop\")",
                            "(result u32)\n    (canon lift (core func $main \"exists-loop\")")
        with self.assertRaisesRegex(kvhost.GuestError,
                                    r"wasi:keyvalue/store@0.2.0-draft2#\[method\]bucket.exists .*result<u32.*"
                                    r"the WIT says .*result<bool"):
            self.host.load(text)

    def test_guest_importing_an_unknown_kv_version_is_refused(self):
        text = read_text(PROBE).replace("wasi:keyvalue/store@0.2.0-draft2", "wasi:keyvalue/store@0.1.0")
        with self.assertRaisesRegex(kvhost.GuestError, r"imports wasi:keyvalue/store@0.1.0, which this host"):
            self.host.load(text)

    def test_bad_arguments_are_argument_errors(self):
        with self.assertRaisesRegex(kvhost.ArgumentError, "expected string, got 5"):
            self.call("get", 5, "k")
        with self.assertRaisesRegex(kvhost.ArgumentError, "takes 2 argument"):
            self.call("get", "b")
        with self.assertRaisesRegex(kvhost.ArgumentError, "exports no function 'nope'"):
            self.call("nope")
        with self.assertRaisesRegex(kvhost.ArgumentError, "expected list<u8>"):
            self.call("set", "b", "k", [256])


def resident_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class BoxedValueTest(unittest.TestCase):
    """option / result / variant payloads live in heap vals (val_new); lifting frees them."""

    @unittest.skipUnless(os.path.exists("/proc/self/statm"), "needs /proc/self/statm to read the process size")
    def test_lifting_boxed_payloads_frees_the_boxes(self):
        import ctypes
        desc = ("result", ("option", ("list", ("u8",))), ("variant", (("other", ("string",)),)))
        lower, lift = kvhost.make_lower(desc), kvhost.make_lift(desc, json_mode=True)
        slot = kvhost._VAL()
        addr = ctypes.addressof(slot)

        def round_trip(value):
            lower(0, value, addr)
            return lift(0, addr)
        self.assertEqual(round_trip(b"ab"), {"ok": [97, 98]})
        self.assertEqual(round_trip(kvhost.Err(kvhost.wc.Variant("other", "x"))),
                         {"err": {"tag": "other", "value": "x"}})
        for _ in range(2000):       # warm the allocator up
            round_trip(b"ab")
        before = resident_kib()
        for _ in range(40_000):     # 3 boxes each: leaking them would be about 4 MiB
            round_trip(kvhost.Err(kvhost.wc.Variant("other", "x")))
            round_trip(b"ab")
        self.assertLess(resident_kib() - before, 1024)


class JsonMappingTest(unittest.TestCase):
    """Host.call / `kvhost.py call`: JSON to and from every component value type."""

    @classmethod
    def setUpClass(cls):
        cls.host = kvhost.Host(kv="memory:", cache_dir=False)
        cls.guest = cls.host.load(TYPES_PROBE)

    @classmethod
    def tearDownClass(cls):
        cls.host.close()

    def call(self, function, *args):
        return self.host.call(self.guest, function, list(args))

    def test_scalars(self):
        self.assertEqual(self.call("not", True), False)
        self.assertEqual(self.call("echo-char", "é"), "é")
        self.assertEqual(self.call("echo-s8", -128), -128)
        self.assertEqual(self.call("echo-u16", 65535), 65535)
        self.assertEqual(self.call("echo-u32", 4294967295), 4294967295)
        self.assertEqual(self.call("echo-s64", -(1 << 63)), -(1 << 63))
        self.assertEqual(self.call("echo-u64", (1 << 64) - 1), (1 << 64) - 1)
        self.assertEqual(self.call("echo-f32", 1.5), 1.5)
        self.assertEqual(self.call("add-f64", 0.25, 2), 2.25)

    def test_strings_and_lists(self):
        self.assertEqual(self.call("echo-string", "héllo ✓"), "héllo ✓")
        self.assertEqual(self.call("echo-bytes", [7, 8, 255]), [7, 8, 255])
        self.assertEqual(self.call("echo-bytes", base64.b64encode(b"\x00\x01\x02").decode()), [0, 1, 2])
        self.assertEqual(self.call("echo-bytes", []), [])
        self.assertEqual(self.call("count-strings", ["a", "b", "c"]), 3)

    def test_enum_flags_record_tuple(self):
        self.assertEqual(self.call("echo-enum", "green"), "green")
        self.assertEqual(self.call("echo-flags", ["exec", "read"]), ["read", "exec"])
        self.assertEqual(self.call("echo-flags", []), [])
        self.assertEqual(self.call("swap-point", {"x": 1, "y": -2}), {"x": -2, "y": 1})
        self.assertEqual(self.call("swap-pair", [300, 7]), [7, 300])

    def test_option_result_variant(self):
        self.assertIsNone(self.call("opt-inc", None))
        self.assertEqual(self.call("opt-inc", 41), 42)
        self.assertEqual(self.call("res", {"ok": 1}), {"ok": 2})
        self.assertEqual(self.call("res", {"err": "four"}), {"err": 4})
        self.assertEqual(self.call("var", {"tag": "a"}), 0)
        self.assertEqual(self.call("var", {"tag": "b", "value": 9}), 9)
        self.assertEqual(self.call("var", {"tag": "c", "value": "xyz"}), 3)
        self.assertEqual(self.call("make-var", 0), {"tag": "a"})
        self.assertEqual(self.call("make-var", 5), {"tag": "b", "value": 5})

    def test_values_of_the_wrong_shape_are_argument_errors(self):
        for function, arg in (("echo-enum", "purple"), ("echo-flags", ["read", "fly"]), ("echo-char", "ab"),
                              ("echo-s8", 128), ("echo-u64", -1), ("echo-u32", 1.5), ("not", 1),
                              ("echo-bytes", "not base64!"), ("echo-bytes", [256]), ("swap-point", {"x": 1}),
                              ("swap-pair", [1]), ("res", {"ok": 1, "err": "x"}), ("res", 5),
                              ("var", {"tag": "d"}), ("var", {"tag": "a", "value": 1}), ("echo-string", None)):
            with self.assertRaises(kvhost.ArgumentError, msg=(function, arg)):
                self.call(function, arg)


# ---------------------------------------------------------------------------
# failing backends
# ---------------------------------------------------------------------------

class SqliteFailureTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(temp_dir(self), "kv.sqlite3")
        self.backend = kvhost.SqliteBackend(self.path, busy_timeout=0.2)
        self.addCleanup(self.backend.close)
        self.host = kvhost.Host(kv=self.backend, cache_dir=False)
        self.addCleanup(self.host.close)
        self.guest = self.host.load(PROBE)

    def call(self, *args):
        return self.host.call(self.guest, args[0], list(args[1:]))

    def test_disk_full_is_other_and_the_host_recovers(self):
        self.call("set", "b", "k", [1])
        db = self.backend.connection()    # this thread's connection: the one the guest uses
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        result = self.call("set", "b", "big", "A" * 200_000)
        self.assertEqual(result["err"]["tag"], "other")
        self.assertIn("full", result["err"]["value"])
        self.assertEqual(self.call("get", "b", "k"), {"ok": [1]})
        db.execute("PRAGMA max_page_count = 1073741823")
        self.assertEqual(self.call("set", "b", "big", "QUJD"), {"ok": None})

    def test_locked_database_is_other_and_the_host_recovers(self):
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")
        result = self.call("set", "b", "k", [1])
        self.assertEqual(result, {"err": {"tag": "other", "value": "sqlite: database is locked"}})
        other.execute("COMMIT")
        self.assertEqual(self.call("set", "b", "k", [1]), {"ok": None})
        self.assertEqual(self.call("incr", "b", "n", 2), {"ok": 2})


@unittest.skipIf(SKIP_REDIS, NO_REDIS)
class RedisFailureTest(unittest.TestCase):
    def setUp(self):
        self.server = RedisServer(temp_dir(self)).start()
        self.addCleanup(self.server.stop)

    def test_redis_killed_mid_run_is_other_and_the_host_recovers(self):
        backend = kvhost.RedisBackend(self.server.url, timeout=1.0)
        self.addCleanup(backend.close)
        host = kvhost.Host(kv=backend, cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "set", ["b", "k", [1]]), {"ok": None})
        self.server.stop()
        result = host.call(guest, "get", ["b", "k"])
        self.assertEqual(result["err"]["tag"], "other")
        self.assertIn("redis", result["err"]["value"])
        self.assertEqual(host.call(guest, "incr", ["b", "n", 1])["err"]["tag"], "other")
        self.server.start()   # same port, empty (no persistence)
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"ok": None})
        self.assertEqual(host.call(guest, "set", ["b", "k", [2]]), {"ok": None})
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"ok": [2]})

    def test_hung_redis_times_out_as_other_and_the_host_recovers(self):
        backend = kvhost.RedisBackend(self.server.url, timeout=0.5)
        self.addCleanup(backend.close)
        host = kvhost.Host(kv=backend, cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "set", ["b", "k", [1]]), {"ok": None})
        os.kill(self.server.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            result = host.call(guest, "get", ["b", "k"])
            self.assertLess(time.monotonic() - start, 3)
        finally:
            os.kill(self.server.process.pid, signal.SIGCONT)
        self.assertEqual(result, {"err": {"tag": "other", "value": "redis: timed out after 0.5 s"}})
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"ok": [1]})

    def test_redis_acl_denial_is_access_denied(self):
        redis_command(self.server.port, "ACL", "SETUSER", "limited", "on", ">pw", "~elsewhere:*", "+@all")
        backend = kvhost.RedisBackend(f"redis://limited:pw@127.0.0.1:{self.server.port}/0")
        self.addCleanup(backend.close)
        host = kvhost.Host(kv=backend, cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"err": {"tag": "access-denied"}})
        wrong = kvhost.Host(kv=f"redis://limited:wrong@127.0.0.1:{self.server.port}/0", cache_dir=False)
        self.addCleanup(wrong.close)
        self.assertEqual(wrong.call(wrong.load(PROBE), "get", ["b", "k"]), {"err": {"tag": "access-denied"}})


# ---------------------------------------------------------------------------
# sandbox
# ---------------------------------------------------------------------------

class SandboxTest(unittest.TestCase):
    def host(self, **options):
        host = kvhost.Host(kv="memory:", cache_dir=False, **options)
        self.addCleanup(host.close)
        return host

    def test_timeout_stops_an_infinite_loop(self):
        host = self.host(timeout=0.5)
        guest = host.load(PROBE)
        start = time.monotonic()
        with self.assertRaisesRegex(kvhost.TrapError, "timeout"):
            host.call(guest, "spin", [])
        self.assertLess(time.monotonic() - start, 3.0)

    def test_default_timeout_is_ten_seconds(self):
        self.assertEqual(kvhost.Host(cache_dir=False).timeout, 10.0)

    def test_fuel_stops_an_infinite_loop(self):
        host = self.host(fuel=1_000_000)
        guest = host.load(PROBE)
        with self.assertRaisesRegex(kvhost.TrapError, "fuel"):
            host.call(guest, "spin", [])

    def test_memory_growth_past_max_memory_fails_inside_the_guest(self):
        host = self.host(max_memory=4 * 65536)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "grow", [2]), 1)      # 1 -> 3 pages: allowed
        self.assertEqual(host.call(guest, "grow", [4]), -1)     # 1 -> 5 pages: refused, guest sees -1
        unlimited = self.host()
        self.assertEqual(unlimited.call(unlimited.load(PROBE), "grow", [4]), 1)

    def test_each_call_gets_a_fresh_store(self):
        host = self.host()
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "grow", [1]), 1)
        self.assertEqual(host.call(guest, "grow", [1]), 1)      # memory is back to one page

    def test_a_trap_never_takes_the_host_down(self):
        host = self.host(timeout=0.3)
        guest = host.load(PROBE)
        with self.assertRaises(kvhost.TrapError):
            host.call(guest, "spin", [])
        self.assertEqual(host.call(guest, "set", ["b", "k", [1]]), {"ok": None})
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"ok": [1]})

    def test_no_environment_and_no_filesystem_unless_granted(self):
        os.environ["KVHOST_TEST_SECRET"] = "1"
        self.addCleanup(os.environ.pop, "KVHOST_TEST_SECRET")
        host = self.host()
        guest = host.load(WASI_PROBE)
        self.assertEqual(host.call(guest, "env-count", []), 0)
        self.assertEqual(host.call(guest, "dir-count", []), 0)
        granted = self.host(env={"A": "1", "B": "2"}, dirs=[(temp_dir(self), "/data")])
        guest = granted.load(WASI_PROBE)
        self.assertEqual(granted.call(guest, "env-count", []), 2)
        self.assertEqual(granted.call(guest, "dir-count", []), 1)

    def test_no_network(self):
        # 101 = create-tcp-socket answered error-code access-denied (0 would mean a socket was bound).
        host = self.host()
        self.assertEqual(host.call(host.load(WASI_PROBE), "bind-probe", []), 101)

    def test_host_exceptions_never_escape_into_wasmtime(self):
        from wasmtime.component import _enter
        host = kvhost.Host(kv=FaultyBackend(), cache_dir=False)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "get", ["b", "bug"])["err"]["tag"], "other")
        self.assertIsNone(_enter.LAST_EXCEPTION)

    def test_threads_share_the_engine_with_a_store_each(self):
        path = os.path.join(temp_dir(self), "kv.sqlite3")
        host = kvhost.Host(kv="sqlite:" + path, cache_dir=False, fuel=5_000_000)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        errors, traps = [], []

        def count():
            try:
                self.assertGreaterEqual(host.call(guest, "incr-loop", ["b", "n", 50]), 50)
            except Exception as e:  # collected and asserted below
                errors.append(e)

        def trap():
            try:
                host.call(guest, "spin", [])
            except kvhost.TrapError as e:
                traps.append(e)
        threads = [threading.Thread(target=count) for _ in range(6)] + [threading.Thread(target=trap) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual((errors, len(traps)), ([], 2))
        self.assertEqual(host.backend.get("default", "b", "n"), b"300")

    def test_invalid_limits_are_argument_errors(self):
        for options in ({"timeout": 0}, {"timeout": -1}, {"fuel": 0}, {"max_memory": -5}, {"namespace": ""},
                        {"allow_buckets": ["bad id"]}, {"env": {"A=B": "x"}}, {"dirs": [("/nonexistent/x", "/d")]}):
            with self.assertRaises(kvhost.ArgumentError, msg=options):
                kvhost.Host(cache_dir=False, **options)


# ---------------------------------------------------------------------------
# compile cache
# ---------------------------------------------------------------------------

def big_component_text(functions=3000):
    """A component with a large core module: slow to compile, quick to deserialize."""
    body = "\n".join(
        f'(func $f{i} (export "f{i}") (param i32) (result i32) '
        f'(i32.add (i32.mul (local.get 0) (i32.const {i})) (i32.xor (local.get 0) (i32.const {i * 7}))))'
        for i in range(functions))
    return (f'(component (core module $M {body}) (core instance $m (instantiate $M))'
            f' (func (export "f1") (param "x" s32) (result s32) (canon lift (core func $m "f1"))))')


class CompileCacheTest(unittest.TestCase):
    def setUp(self):
        self.cache = temp_dir(self)

    def entries(self):
        return sorted(os.listdir(self.cache))

    def test_compiled_guest_is_cached_and_reused(self):
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        files = self.entries()
        self.assertEqual(len(files), 1)
        self.assertTrue(files[0].endswith(".component"))
        compiled = []
        original = kvhost.wc.Component

        class Counting(original):
            def __init__(self, *a, **k):
                compiled.append(1)
                super().__init__(*a, **k)
        kvhost.wc.Component = Counting
        self.addCleanup(setattr, kvhost.wc, "Component", original)
        host = kvhost.Host(cache_dir=self.cache, kv="memory:")
        guest = host.load(PROBE)
        self.assertEqual(compiled, [])
        self.assertEqual(host.call(guest, "get", ["b", "k"]), {"ok": None})
        with self.assertRaisesRegex(kvhost.ArgumentError, "loaded by another Host"):
            kvhost.Host(cache_dir=False).call(guest, "get", ["b", "k"])

    def test_corrupt_entry_is_recompiled_never_trusted(self):
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        path = os.path.join(self.cache, self.entries()[0])
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"\xff" * 50)          # bit rot inside the compiled code
        host = kvhost.Host(cache_dir=self.cache, kv="memory:")
        guest = host.load(PROBE)
        self.assertEqual(host.call(guest, "set", ["b", "k", [1]]), {"ok": None})
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(kvhost.hashlib.sha256(data[len(kvhost.CACHE_MAGIC) + 32:]).digest(),
                         data[len(kvhost.CACHE_MAGIC):len(kvhost.CACHE_MAGIC) + 32])   # rewritten, valid again

    def test_truncated_or_foreign_entries_are_recompiled(self):
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        path = os.path.join(self.cache, self.entries()[0])
        for junk in (b"", b"KVHCACHE1\n", b"not a cache entry at all" * 10):
            with open(path, "wb") as f:
                f.write(junk)
            guest = kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
            self.assertEqual(guest.kind, "component")

    def test_cache_key_covers_engine_settings(self):
        host = kvhost.Host(cache_dir=self.cache, kv="memory:")
        first = host._cache_path("component", "ab" * 32)
        old = kvhost.ENGINE_SETTINGS
        kvhost.ENGINE_SETTINGS = old + ";other"
        self.addCleanup(setattr, kvhost, "ENGINE_SETTINGS", old)
        self.assertNotEqual(host._cache_path("component", "ab" * 32), first)

    def test_concurrent_writers_leave_one_valid_entry_and_no_debris(self):
        errors = []

        def load():
            try:
                kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
            except Exception as e:   # asserted below
                errors.append(e)
        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(self.entries()), 1)
        self.assertFalse([f for f in self.entries() if f.startswith(".tmp-")])

    def test_warm_start_of_a_large_component_in_a_new_process(self):
        path = os.path.join(temp_dir(self), "big.wat")
        with open(path, "w") as f:
            f.write(big_component_text())
        script = ("import sys, time\nt = time.perf_counter()\nimport kvhost\n"
                  "h = kvhost.Host(kv='memory:', cache_dir=sys.argv[2])\ng = h.load(sys.argv[1])\n"
                  "assert h.call(g, 'f1', [3]) == (3 * 1) + (3 ^ 7)\nprint(time.perf_counter() - t)\n")
        run = lambda: float(subprocess.check_output([sys.executable, "-c", script, path, self.cache], cwd=HERE))
        cold = run()
        warm = min(run() for _ in range(2))
        self.assertLessEqual(warm, 0.5, f"warm start {warm:.3f}s (cold {cold:.3f}s)")
        self.assertLess(warm, cold)


# ---------------------------------------------------------------------------
# core modules
# ---------------------------------------------------------------------------

CORE_MODULE = """(module
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "mix") (param i64 f64) (result f64) (f64.add (f64.convert_i64_s (local.get 0)) (local.get 1)))
  (func (export "spin") (loop $l (br $l)))
  (func (export "_start")))"""


class CoreModuleTest(unittest.TestCase):
    def setUp(self):
        self.host = kvhost.Host(kv="memory:", cache_dir=temp_dir(self), timeout=0.5)
        self.addCleanup(self.host.close)
        self.guest = self.host.load(CORE_MODULE)

    def test_core_module_calls_with_numbers(self):
        self.assertEqual(self.guest.kind, "module")
        self.assertEqual(self.host.call(self.guest, "add", [2, 40]), 42)
        self.assertEqual(self.host.call(self.guest, "mix", [2, 0.5]), 2.5)
        self.assertEqual(self.host.run(self.guest), 0)

    def test_core_module_exit_status(self):
        guest = self.host.load('(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
                               ' (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const 7))))')
        self.assertEqual(self.host.run(guest), 7)
        with self.assertRaises(kvhost.GuestExit) as caught:
            self.host.call(guest, "_start", [])
        self.assertEqual(caught.exception.status, 7)

    def test_core_module_traps_and_bad_arguments(self):
        with self.assertRaisesRegex(kvhost.TrapError, "timeout"):
            self.host.call(self.guest, "spin", [])
        with self.assertRaisesRegex(kvhost.ArgumentError, "expected i32"):
            self.host.call(self.guest, "add", ["x", 1])


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

class CliTest(unittest.TestCase):
    def setUp(self):
        self.db = os.path.join(temp_dir(self), "kv.sqlite3")
        self.cache = temp_dir(self)

    def cli(self, *args, kv=True):
        argv = [sys.executable, os.path.join(HERE, "kvhost.py")] + list(args[:1])
        if kv:
            argv += ["--kv", "sqlite:" + self.db]
        if args[:1] in (("run",), ("call",)):
            argv += ["--cache-dir", self.cache]
        argv += list(args[1:])
        return subprocess.run(argv, capture_output=True, text=True, cwd=HERE, timeout=60)

    def test_call_prints_one_line_of_json(self):
        done = self.cli("call", PROBE, "set", '"b"', '"k"', '"aGk="')
        self.assertEqual((done.returncode, done.stdout), (0, '{"ok":null}\n'))
        done = self.cli("call", PROBE, "get", '"b"', '"k"')
        self.assertEqual((done.returncode, done.stdout), (0, '{"ok":[104,105]}\n'))
        done = self.cli("call", PROBE, "wasi:keyvalue/nothing#get", '"b"')
        self.assertEqual(done.returncode, 2)

    def test_call_argument_errors_exit_2_with_one_line(self):
        for args, message in ((("get", "not-json", '"k"'), "invalid JSON argument"),
                              (("get", "5", '"k"'), "expected string, got 5"),
                              (("get", '"b"'), "takes 2 argument"),
                              (("nope",), "exports no function 'nope'")):
            done = self.cli("call", PROBE, *args)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
            self.assertIn(message, done.stderr)
        done = self.cli("call", "/nonexistent/guest.wasm", "f")
        self.assertEqual((done.returncode, done.stderr.count("\n")), (2, 1))
        done = self.cli("call", "--env", "novalue", PROBE, "f")
        self.assertEqual(done.returncode, 2)
        self.assertIn("expected NAME=VALUE", done.stderr)

    def test_trap_exits_1_with_the_reason(self):
        done = self.cli("call", "--timeout", "0.3", PROBE, "spin")
        self.assertEqual(done.returncode, 1)
        self.assertRegex(done.stderr, r"^kvhost: trap: timeout: .*interrupt.*\n$")
        done = self.cli("call", "--fuel", "1000", PROBE, "spin")
        self.assertEqual(done.returncode, 1)
        self.assertIn("fuel", done.stderr)

    def test_run_passes_stdout_through_and_returns_the_exit_status(self):
        done = self.cli("run", WASI_PROBE)
        self.assertEqual((done.returncode, done.stdout), (0, "hello from wasi-probe\n"))
        done = self.cli("run", WASI_PROBE, "some-argument")
        self.assertEqual((done.returncode, done.stdout), (1, "hello from wasi-probe\n"))
        done = self.cli("run", WASI_PROBE, "exit", "more")     # wasi:cli/exit exit(ok): status 0
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "hello from wasi-probe\n", ""))

    def test_kv_subcommand_edits_and_inspects_data(self):
        self.assertEqual(self.cli("kv", "set", "b", "k", "hello").returncode, 0)
        self.assertEqual(self.cli("kv", "get", "b", "k").stdout, "hello\n")
        self.assertEqual(self.cli("kv", "incr", "b", "n").stdout, "1\n")
        self.assertEqual(self.cli("kv", "incr", "b", "n", "41").stdout, "42\n")
        self.assertEqual(self.cli("kv", "list", "b").stdout, "k\nn\n")
        self.assertEqual(self.cli("kv", "delete", "b", "k").returncode, 0)
        done = self.cli("kv", "get", "b", "k")
        self.assertEqual((done.returncode, done.stderr), (1, "kvhost: error: no key 'k' in bucket 'b'\n"))
        done = self.cli("kv", "set", "b")
        self.assertEqual(done.returncode, 2)
        done = self.cli("kv", "get", "bad bucket", "k")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid bucket", done.stderr)

    def test_guest_data_is_visible_to_the_kv_subcommand_in_its_namespace(self):
        self.cli("call", "--namespace", "app", PROBE, "incr", '"counter"', '"hits"', "5")
        self.assertEqual(self.cli("kv", "--namespace", "app", "get", "counter", "hits").stdout, "5\n")
        self.assertEqual(self.cli("kv", "get", "counter", "hits").returncode, 1)

    def test_refused_guest_exits_2_with_one_line(self):
        bad = os.path.join(temp_dir(self), "bad.wat")
        with open(bad, "w") as f:
            f.write(read_text(PROBE).replace("wasi:keyvalue/store@0.2.0-draft2", "wasi:keyvalue/store@9.9.9"))
        done = self.cli("call", bad, "get", '"b"', '"k"')
        self.assertEqual((done.returncode, done.stdout, done.stderr.count("\n")), (2, "", 1))
        self.assertIn("wasi:keyvalue/store@9.9.9", done.stderr)
        with open(bad, "wb") as f:
            f.write(b"\0asm\x0d\0\x01\0garbage")
        done = self.cli("run", bad)
        self.assertEqual((done.returncode, done.stderr.count("\n")), (2, 1))
        self.assertIn("cannot compile", done.stderr)

    def test_main_in_process_returns_status(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(kvhost.main(["bogus"]), 2)
        self.assertTrue(err.getvalue().startswith("kvhost: error:"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(kvhost.main(["call", "--kv", "memory:", "--cache-dir", self.cache, PROBE,
                                          "incr", '"b"', '"k"', "3"]), 0)
        self.assertEqual(json.loads(out.getvalue()), {"ok": 3})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(kvhost.main(["kv", "--kv", "sqlite:" + self.db, "set", "b", "k", "v"]), 0)
            self.assertEqual(kvhost.main(["kv", "--kv", "sqlite:" + self.db, "get", "b", "k"]), 0)
        self.assertEqual(out.getvalue(), "v\n")


class ModuleShapeTest(unittest.TestCase):
    def test_public_names_and_metadata(self):
        for name in kvhost.__all__:
            self.assertTrue(hasattr(kvhost, name), name)
        self.assertRegex(kvhost.__version__, r"^\d+\.\d+\.\d+$")
        self.assertTrue(issubclass(kvhost.BackendError, kvhost.KvError))

    def test_import_has_no_side_effects(self):
        home = temp_dir(self)
        code = "import kvhost"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                              env=dict(os.environ, HOME=home, XDG_CACHE_HOME=os.path.join(home, "c")))
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertEqual(os.listdir(home), [])


if __name__ == "__main__":
    unittest.main()
