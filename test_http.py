# SPDX-License-Identifier: Apache-2.0
"""Tests of http_server.py: every route, auth, TLS, CORS, limits, WebSocket watch, fuzzing,
timeouts, concurrency, graceful shutdown and observability.

Run from the repository root: python -m unittest test_http -v
Env WASMSTORE_HTTP_STRESS_SECONDS sets the concurrent-clients test duration (default 20).
"""

import base64
import hashlib
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import http_server
import wasmstore

HERE = os.path.dirname(os.path.abspath(__file__))
STRESS_SECONDS = float(os.environ.get("WASMSTORE_HTTP_STRESS_SECONDS", "20"))
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ------------------------------------------------------------------------------- helpers

def _leb(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wasm_module(tag, padding=0):
    """A valid core module: the header plus a custom section named `tag` (distinct bytes)."""
    name = tag.encode() if isinstance(tag, str) else tag
    payload = _leb(len(name)) + name + b"\x00" * padding
    return b"\0asm\x01\0\0\0" + b"\x00" + _leb(len(payload)) + payload


def wasm_module_of_size(size, tag="sized"):
    """A valid module of exactly `size` bytes (the custom section's length field grows with it)."""
    padding = size - len(wasm_module(tag))
    while len(wasm_module(tag, padding)) > size:
        padding -= 1
    module = wasm_module(tag, padding)
    if len(module) != size:
        raise ValueError(f"cannot build a module of exactly {size} bytes")
    return module


def sha(data):
    return hashlib.sha256(data).hexdigest()


class LiveServer:
    """A make_server() instance on a free loopback port, served from a thread."""

    def __init__(self, testcase, root=None, **options):
        if root is None:
            parent = tempfile.mkdtemp(prefix="wasmstore-http-")
            testcase.addCleanup(shutil.rmtree, parent, True)
            root = os.path.join(parent, "root")
        self.root = root
        self.store = wasmstore.Store(root)
        self.log = io.StringIO()
        options.setdefault("log", self.log)
        self.server = http_server.make_server(self.store, "127.0.0.1", 0, **options)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        testcase.addCleanup(self.stop)

    def stop(self):
        if not self.server.draining:
            self.server.graceful_shutdown(grace=5)
        self.thread.join(5)

    def connect(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, conn=None):
        """(status, headers dict with lower-case names, body bytes)."""
        own = conn is None
        conn = conn or self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            if own:
                conn.close()

    def raw(self, data, timeout=3.0):
        """Send raw bytes, return everything the server sends until it closes (or timeout)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
            except OSError:
                pass
            return read_until_close(sock, timeout)


def read_until_close(sock, timeout):
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def statuses(raw_response):
    return [int(code) for code in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", raw_response, re.M)]


def metric(text, name, **labels):
    """Value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample))
        if sample.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


class WsClient:
    """A tiny RFC 6455 client: masked frames out, unmasked frames in."""

    def __init__(self, port, path="/api/v1/watch", headers=None, timeout=5.0, tls_context=None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = self._read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.accept_ok = f"Sec-WebSocket-Accept: {expected}" in self.head

    def _read_until(self, marker):
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exact(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, opcode, payload=b"", masked=True):
        head = bytearray([0x80 | opcode])
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head.append(mask_bit | length)
        else:
            head.append(mask_bit | 126)
            head += length.to_bytes(2, "big")
        if masked:
            mask = os.urandom(4)
            head += mask
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(head) + payload)

    def recv(self, timeout=5.0):
        """(opcode, payload) of the next frame; the server's frames must be unmasked."""
        self.sock.settimeout(timeout)
        first, second = self._read_exact(2)
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self._read_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._read_exact(8), "big")
        return first & 0x0F, self._read_exact(length)

    def recv_data(self, timeout=5.0):
        """Next text frame as JSON, answering nothing and skipping pings."""
        while True:
            opcode, payload = self.recv(timeout)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError("server closed the watch")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def make_self_signed_cert(directory):
    key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def start_server_process(testcase, root, *args, env=None):
    """`python http_server.py --root ROOT --port 0 ...`: (process, port) once it listens."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "http_server.py"), "--root", root,
                             "--port", "0", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=env, text=True, cwd=HERE)

    def cleanup():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()
    testcase.addCleanup(cleanup)
    line = proc.stderr.readline()
    match = re.search(r"https?://127\.0\.0\.1:(\d+)", line)
    testcase.assertIsNotNone(match, f"no listening line from the server: {line!r}")
    return proc, int(match.group(1))


# ------------------------------------------------------------------------ pure functions

class PureFunctionTests(unittest.TestCase):
    """Parsing, routing, auth and the error table, without a socket."""

    def test_parse_target_decodes_segments_and_drops_empty_ones(self):
        segments, query = http_server.parse_target("/api/v1//module/a%20b/%C3%A9.wasm?branch=dev")
        self.assertEqual(segments, ("api", "v1", "module", "a b", "é.wasm"))
        self.assertEqual(query, {"branch": "dev"})

    def test_parse_target_rejects_bad_input(self):
        for target in ["/api/v1/module/%zz", "/api/v1/module/%4", "/a/%", "/a/%c3%28",
                       "/a/%2e%2e/b", "/a/../b", "/a/./b", "/a/%2E", "/a/x%2fy", "/a/%00",
                       "/a/\x00", "/a/\x7f", "relative/path", "*"]:
            with self.subTest(target=target):
                with self.assertRaises(http_server.HttpError) as ctx:
                    http_server.parse_target(target)
                self.assertEqual(ctx.exception.status, 400)

    def test_match_route_finds_params_and_rest(self):
        route, params, rest = http_server.match_route(
            "POST", ("api", "v1", "restore", "c" * 64, "dir", "a.wasm"))
        self.assertEqual((route.name, params, rest), ("restore", ("c" * 64,), "dir/a.wasm"))
        route, params, rest = http_server.match_route("HEAD", ("api", "v1", "module", "x.wasm"))
        self.assertEqual((route.method, rest), ("GET", "x.wasm"))

    def test_match_route_404_and_405_with_allow(self):
        with self.assertRaises(http_server.HttpError) as ctx:
            http_server.match_route("GET", ("api", "v1", "nope"))
        self.assertEqual(ctx.exception.status, 404)
        with self.assertRaises(http_server.HttpError) as ctx:
            http_server.match_route("GET", ("api", "v1", "snapshot", "extra"))
        self.assertEqual(ctx.exception.status, 404)
        with self.assertRaises(http_server.HttpError) as ctx:
            http_server.match_route("PUT", ("api", "v1", "module", "a.wasm"))
        self.assertEqual(ctx.exception.status, 405)
        self.assertIn(("Allow", "DELETE, GET, HEAD, POST"), ctx.exception.headers)

    def test_error_table_maps_store_errors(self):
        cases = [(wasmstore.InvalidInput("bad path"), 400),
                 (wasmstore.InvalidModule("unexpected end-of-file"), 400),
                 (wasmstore.TooLarge("too big"), 413),
                 (wasmstore.NotFound("nope"), 404),
                 (wasmstore.Conflict("exists"), 409),
                 (wasmstore.MergeConflict("dev", ["/a.wasm"]), 409),
                 (wasmstore.CorruptObject("bad object"), 500),
                 (http_server.HttpError(431, "big"), 431)]
        for exc, status in cases:
            with self.subTest(exc=type(exc).__name__):
                reply = http_server.error_reply(exc)
                self.assertEqual(reply.status, status)
                self.assertEqual(reply.body.count(b"\n"), 1)
                self.assertIn(str(exc).encode(), reply.body)

    def test_unexpected_exception_is_500_without_details(self):
        reply = http_server.error_reply(RuntimeError("secret internals\nTraceback"))
        self.assertEqual(reply.status, 500)
        self.assertEqual(reply.body, b"internal server error\n")

    def test_multiline_messages_become_one_line(self):
        reply = http_server.error_reply(wasmstore.InvalidInput("line one\nline two"))
        self.assertEqual(reply.body, b"line one line two\n")

    def test_auth_table_401_403_and_ok(self):
        table = http_server.AuthTable("admin:*; reader : GET ;writer:GET,POST")
        table.check("admin", "DELETE")
        table.check("reader", "GET")
        table.check("reader", "HEAD")                  # HEAD counts as GET
        table.check("writer", "POST")
        for key, method, status in [(None, "GET", 401), ("", "GET", 401), ("nobody", "GET", 401),
                                    ("reader", "POST", 403), ("writer", "DELETE", 403),
                                    ("admi", "GET", 401), ("adminx", "GET", 401)]:
            with self.subTest(key=key, method=method):
                with self.assertRaises(http_server.HttpError) as ctx:
                    table.check(key, method)
                self.assertEqual(ctx.exception.status, status)
                if key:
                    self.assertNotIn(key, str(ctx.exception))

    def test_auth_spec_errors_never_echo_the_key(self):
        for spec in ["sekrit", "sekrit:", "sekrit:G3T", ":GET", "sekrit:GET;sekrit:POST", ";"]:
            with self.subTest(spec=spec):
                with self.assertRaises(http_server.ServerError) as ctx:
                    http_server.AuthTable(spec)
                self.assertNotIn("sekrit", str(ctx.exception))

    def test_disabled_auth_allows_everything(self):
        http_server.AuthTable(None).check(None, "DELETE")

    def test_handlers_run_without_a_socket(self):
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        store = wasmstore.Store(os.path.join(parent, "root"))
        module = wasm_module("pure")
        call = http_server.Call(path="dir/a.wasm", max_body=1000)
        reply = http_server.add_module(store, call, io.BytesIO(module))
        self.assertEqual((reply.status, reply.body), (200, sha(module).encode()))
        reply = http_server.get_module(store, call, b"")
        try:
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.body.read(), module)
            self.assertIn(("ETag", f'"{sha(module)}"'), reply.headers)
        finally:
            reply.close()
        reply = http_server.list_modules(store, http_server.Call(path="dir"), b"")
        self.assertEqual(json.loads(reply.body), {"/dir/a.wasm": sha(module)})
        with self.assertRaises(wasmstore.TooLarge):
            http_server.add_module(store, http_server.Call(path="b.wasm", max_body=10), io.BytesIO(module))

    def test_read_headers_case_insensitive_and_repeated(self):
        source = io.BytesIO(b"Host: x\r\nX-A: 1\r\nx-a:  2 \r\nWasmstore-Branch: dev\r\n\r\nBODY")
        headers = http_server.read_headers(source)
        self.assertEqual(headers.get("wasmstore-branch"), "dev")
        self.assertEqual(headers.get_all("X-A"), ["1", "2"])
        self.assertIsNone(headers.get("Missing"))
        self.assertEqual(source.read(), b"BODY")            # stops at the empty line

    def test_read_headers_limits_and_malformed_fields(self):
        cases = [(b"X: " + b"y" * 40000 + b"\r\n\r\n", 431),
                 (b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
                 (b"No colon here\r\n\r\n", 400),
                 (b"Bad Name: v\r\n\r\n", 400),
                 (b"X: v\r\n folded\r\n\r\n", 400),
                 (b"X: a\x00b\r\n\r\n", 400),
                 (b"X: v\r\n", 400)]                        # ends before the empty line
        for data, status in cases:
            with self.subTest(data=data[:30]):
                with self.assertRaises(http_server.HttpError) as ctx:
                    http_server.read_headers(io.BytesIO(data))
                self.assertEqual(ctx.exception.status, status)

    def test_limited_reader_refuses_a_short_body(self):
        reader = http_server.LimitedReader(io.BytesIO(b"abc"), 5)
        with self.assertRaises(http_server.HttpError) as ctx:
            reader.read()
        self.assertEqual(ctx.exception.status, 400)

    def test_chunked_reader_decodes_and_limits(self):
        data = b"4\r\nwasm\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nNEXT"
        source = io.BufferedReader(io.BytesIO(data))
        self.assertEqual(http_server.ChunkedReader(source, 100).read(), b"wasmabc")
        self.assertEqual(source.read(), b"NEXT")            # nothing read past the body
        with self.assertRaises(http_server.HttpError) as ctx:
            http_server.ChunkedReader(io.BufferedReader(io.BytesIO(data)), 5).read()
        self.assertEqual(ctx.exception.status, 413)
        with self.assertRaises(http_server.HttpError):
            http_server.ChunkedReader(io.BufferedReader(io.BytesIO(b"zz\r\n")), 100).read()

    def test_frame_parser_unmasks_and_rejects_unmasked(self):
        parser = http_server.FrameParser()
        parser.feed(http_server.encode_frame(0x9, b"hello", mask=b"\x01\x02\x03\x04")[:4])
        self.assertEqual(list(parser.frames()), [])        # incomplete
        parser.feed(http_server.encode_frame(0x9, b"hello", mask=b"\x01\x02\x03\x04")[4:])
        self.assertEqual(list(parser.frames()), [(0x9, b"hello")])
        parser.feed(http_server.encode_frame(0x1, b"x"))
        with self.assertRaises(http_server.WebSocketProtocolError) as ctx:
            list(parser.frames())
        self.assertEqual(ctx.exception.code, 1002)


# ------------------------------------------------------------------------- every route

class RouteTests(unittest.TestCase):

    def setUp(self):
        self.live = LiveServer(self)
        self.a = wasm_module("a")
        self.b = wasm_module("b")

    def add(self, path, data, **headers):
        status, _, body = self.live.request("POST", "/api/v1/module/" + path, data, headers)
        self.assertEqual(status, 200, body)
        return body.decode()

    def test_add_returns_the_sha256_as_plain_text(self):
        self.assertEqual(self.add("dir/a.wasm", self.a), sha(self.a))

    def test_add_invalid_module_400_with_validator_message(self):
        status, _, body = self.live.request("POST", "/api/v1/module/bad.wasm", self.a[:6])
        self.assertEqual(status, 400)
        self.assertIn(b"unexpected end-of-file", body)
        self.assertEqual(self.live.store.list(), {})

    def test_add_bad_path_400(self):
        for path in ["%2e%2e/x.wasm", "a/%00.wasm", "a%2fb.wasm", ""]:
            with self.subTest(path=path):
                status, _, _ = self.live.request("POST", "/api/v1/module/" + path, self.a)
                self.assertEqual(status, 400)

    def test_get_module_by_path_and_hash(self):
        digest = self.add("dir/a.wasm", self.a)
        for target in ["dir/a.wasm", "/dir/a.wasm", digest]:
            with self.subTest(target=target):
                status, headers, body = self.live.request("GET", "/api/v1/module/" + target)
                self.assertEqual((status, body), (200, self.a))
                self.assertEqual(headers["content-type"], "application/wasm")
                self.assertEqual(headers["wasmstore-hash"], digest)
                self.assertEqual(headers["etag"], f'"{digest}"')
                self.assertEqual(headers["content-length"], str(len(self.a)))

    def test_get_missing_module_404_and_directory_404(self):
        self.add("dir/a.wasm", self.a)
        for target in ["nope.wasm", "dir", "f" * 64]:
            with self.subTest(target=target):
                self.assertEqual(self.live.request("GET", "/api/v1/module/" + target)[0], 404)

    def test_etag_304_on_if_none_match(self):
        digest = self.add("a.wasm", self.a)
        status, headers, body = self.live.request("GET", "/api/v1/module/a.wasm",
                                                  headers={"If-None-Match": f'"{digest}"'})
        self.assertEqual((status, body), (304, b""))
        self.assertEqual(headers["etag"], f'"{digest}"')
        status, _, body = self.live.request("GET", "/api/v1/module/a.wasm",
                                            headers={"If-None-Match": '"other", W/"x"'})
        self.assertEqual((status, body), (200, self.a))
        self.add("a.wasm", self.b)                             # the path now holds new bytes
        status, _, body = self.live.request("GET", "/api/v1/module/a.wasm",
                                            headers={"If-None-Match": f'"{digest}"'})
        self.assertEqual((status, body), (200, self.b))

    def test_download_sees_a_write_by_another_store_object(self):
        self.add("a.wasm", self.a)
        self.assertEqual(self.live.request("GET", "/api/v1/module/a.wasm")[2], self.a)
        wasmstore.Store(self.live.root).add("a.wasm", self.b)   # as another process would
        status, headers, body = self.live.request("GET", "/api/v1/module/a.wasm")
        self.assertEqual((status, body, headers["wasmstore-hash"]), (200, self.b, sha(self.b)))
        wasmstore.Store(self.live.root).remove("a.wasm")
        self.assertEqual(self.live.request("GET", "/api/v1/module/a.wasm")[0], 404)

    def test_head_module_200_or_404_without_body(self):
        self.add("a.wasm", self.a)
        status, headers, body = self.live.request("HEAD", "/api/v1/module/a.wasm")
        self.assertEqual((status, body, headers["content-length"]), (200, b"", str(len(self.a))))
        self.assertEqual(self.live.request("HEAD", "/api/v1/module/b.wasm")[0], 404)

    def test_delete_module_200_then_404(self):
        self.add("a.wasm", self.a)
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/a.wasm")[0], 200)
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/a.wasm")[0], 404)
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/")[0], 400)

    def test_list_all_and_prefix(self):
        da, db = self.add("x/a.wasm", self.a), self.add("y/b.wasm", self.b)
        status, headers, body = self.live.request("GET", "/api/v1/modules")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body), {"/x/a.wasm": da, "/y/b.wasm": db})
        self.assertEqual(json.loads(self.live.request("GET", "/api/v1/modules/x")[2]), {"/x/a.wasm": da})
        self.assertEqual(json.loads(self.live.request("GET", "/api/v1/modules/")[2]),
                         {"/x/a.wasm": da, "/y/b.wasm": db})

    def test_hash_route(self):
        digest = self.add("x/a.wasm", self.a)
        self.assertEqual(self.live.request("GET", "/api/v1/hash/x/a.wasm")[2], digest.encode())
        self.assertEqual(self.live.request("GET", "/api/v1/hash/x")[0], 200)   # tree hash
        self.assertEqual(self.live.request("GET", "/api/v1/hash/nope")[0], 404)

    def test_set_route(self):
        digest = self.add("a.wasm", self.a)
        status, _, _ = self.live.request("POST", f"/api/v1/hash/{digest}/c.wasm")
        self.assertEqual(status, 200)
        self.assertEqual(self.live.store.find("c.wasm"), self.a)
        self.assertEqual(self.live.request("POST", f"/api/v1/hash/{'0' * 64}/d.wasm")[0], 404)
        self.assertEqual(self.live.request("POST", "/api/v1/hash/nothex/d.wasm")[0], 400)

    def test_versions_and_version(self):
        da, db = self.add("a.wasm", self.a), self.add("a.wasm", self.b)
        versions = json.loads(self.live.request("GET", "/api/v1/versions/a.wasm")[2])
        self.assertEqual([v[0] for v in versions], [da, db])
        self.assertTrue(all(re.fullmatch("[0-9a-f]{64}", v[1]) for v in versions))
        self.assertEqual(self.live.request("GET", "/api/v1/version/0/a.wasm")[2], self.a)
        status, headers, body = self.live.request("GET", "/api/v1/version/1/a.wasm")
        self.assertEqual((status, body, headers["wasmstore-hash"]), (200, self.b, db))
        self.assertEqual(self.live.request("GET", "/api/v1/version/2/a.wasm")[0], 404)
        self.assertEqual(self.live.request("GET", "/api/v1/version/x/a.wasm")[0], 400)

    def test_rollback_path_and_whole_branch(self):
        self.add("a.wasm", self.a)
        self.add("a.wasm", self.b)
        self.assertEqual(self.live.request("POST", "/api/v1/rollback/a.wasm")[0], 200)
        self.assertEqual(self.live.store.find("a.wasm"), self.a)
        self.add("c.wasm", self.b)
        self.assertEqual(self.live.request("POST", "/api/v1/rollback")[0], 200)
        self.assertFalse(self.live.store.contains("c.wasm"))

    def test_rollback_with_nothing_to_roll_back_409(self):
        status, _, body = self.live.request("POST", "/api/v1/rollback")
        self.assertEqual(status, 409, body)

    def test_snapshot_restore_and_commit_info(self):
        self.assertEqual(self.live.request("GET", "/api/v1/snapshot")[0], 404)   # no commits yet
        self.add("a.wasm", self.a)
        commit = self.live.request("GET", "/api/v1/snapshot")[2].decode()
        self.add("b.wasm", self.b)
        self.assertEqual(self.live.request("POST", f"/api/v1/restore/{commit}")[0], 200)
        self.assertEqual(sorted(self.live.store.list()), ["/a.wasm"])
        info = json.loads(self.live.request("GET", f"/api/v1/commit/{commit}",
                                            headers={"Wasmstore-Branch": "main"})[2])
        self.assertEqual(list(info), ["hash", "author", "date", "message"])
        self.assertEqual((info["hash"], info["message"]), (commit, "Import /a.wasm"))
        self.assertEqual(self.live.request("POST", f"/api/v1/restore/{'0' * 64}")[0], 404)
        self.assertEqual(self.live.request("GET", f"/api/v1/commit/{'0' * 64}")[0], 404)

    def test_restore_one_path(self):
        self.add("a.wasm", self.a)
        commit = self.live.store.snapshot()
        self.add("a.wasm", self.b)
        self.add("b.wasm", self.b)
        self.assertEqual(self.live.request("POST", f"/api/v1/restore/{commit}/a.wasm")[0], 200)
        self.assertEqual(self.live.store.find("a.wasm"), self.a)
        self.assertTrue(self.live.store.contains("b.wasm"))

    def test_branches_create_switch_delete(self):
        self.add("a.wasm", self.a)
        self.assertEqual(self.live.request("POST", "/api/v1/branch/dev")[0], 200)
        self.assertEqual(self.live.request("POST", "/api/v1/branch/dev")[0], 409)
        self.assertEqual(self.live.request("POST", "/api/v1/branch/..bad")[0], 400)
        self.assertEqual(json.loads(self.live.request("GET", "/api/v1/branches")[2]), ["dev", "main"])
        self.assertEqual(self.live.request("GET", "/api/v1/branch")[2], b"main")
        self.assertEqual(self.live.request("PUT", "/api/v1/branch/dev")[0], 200)
        self.assertEqual(self.live.request("GET", "/api/v1/branch")[2], b"dev")
        self.assertEqual(self.live.request("DELETE", "/api/v1/branch/dev")[0], 409)   # default
        self.assertEqual(self.live.request("PUT", "/api/v1/branch/main")[0], 200)
        self.assertEqual(self.live.request("DELETE", "/api/v1/branch/dev")[0], 200)
        self.assertEqual(self.live.request("DELETE", "/api/v1/branch/dev")[0], 404)
        self.assertEqual(self.live.request("PUT", "/api/v1/branch/nope")[0], 404)

    def test_create_branch_from_the_request_branch(self):
        self.add("a.wasm", self.a)
        self.live.request("POST", "/api/v1/branch/dev")
        self.add("d.wasm", self.b, **{"Wasmstore-Branch": "dev"})
        self.assertEqual(self.live.request("POST", "/api/v1/branch/fromdev",
                                           headers={"Wasmstore-Branch": "dev"})[0], 200)
        self.assertEqual(sorted(self.live.store.list(branch="fromdev")), ["/a.wasm", "/d.wasm"])

    def test_branch_header_on_data_routes(self):
        self.add("a.wasm", self.a)
        self.live.request("POST", "/api/v1/branch/dev")
        dev = {"Wasmstore-Branch": "dev"}
        digest = self.add("b.wasm", self.b, **dev)
        self.assertEqual(sorted(self.live.store.list(branch="dev")), ["/a.wasm", "/b.wasm"])
        self.assertEqual(sorted(self.live.store.list()), ["/a.wasm"])
        self.assertEqual(self.live.request("GET", "/api/v1/module/b.wasm", headers=dev)[0], 200)
        self.assertEqual(self.live.request("GET", "/api/v1/module/b.wasm")[0], 404)
        self.assertEqual(self.live.request("HEAD", "/api/v1/module/b.wasm", headers=dev)[0], 200)
        self.assertEqual(self.live.request("GET", "/api/v1/hash/b.wasm", headers=dev)[2], digest.encode())
        self.assertEqual(len(json.loads(self.live.request("GET", "/api/v1/versions/b.wasm", headers=dev)[2])), 1)
        self.assertEqual(self.live.request("GET", "/api/v1/snapshot", headers=dev)[2].decode(),
                         self.live.store.snapshot(branch="dev"))
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/b.wasm", headers=dev)[0], 200)
        self.assertEqual(self.live.request("POST", "/api/v1/rollback", headers=dev)[0], 200)
        self.assertTrue(self.live.store.contains("b.wasm", branch="dev"))
        for method, path in [("GET", "/api/v1/modules"), ("GET", "/api/v1/module/a.wasm"),
                             ("POST", "/api/v1/module/z.wasm"), ("GET", "/api/v1/snapshot"),
                             ("POST", "/api/v1/gc"), ("POST", "/api/v1/merge/main")]:
            with self.subTest(method=method, path=path):
                status, _, _ = self.live.request(method, path, self.a if method == "POST" else None,
                                                 {"Wasmstore-Branch": "nope"})
                self.assertEqual(status, 404)
        self.assertEqual(self.live.request("GET", "/api/v1/modules",
                                           headers={"Wasmstore-Branch": "../x"})[0], 400)

    def test_author_header_is_recorded(self):
        self.add("a.wasm", self.a, **{"Wasmstore-Author": "alice"})
        self.assertEqual(self.live.store.commit_info(self.live.store.snapshot())["author"], "alice")
        self.add("b.wasm", self.b, **{"Wasmstore-Author": "José".encode("utf-8").decode("latin-1")})
        self.assertEqual(self.live.store.commit_info(self.live.store.snapshot())["author"], "José")

    def test_merge_and_merge_conflict(self):
        self.add("a.wasm", self.a)
        self.live.request("POST", "/api/v1/branch/dev")
        self.add("d.wasm", self.b, **{"Wasmstore-Branch": "dev"})
        self.assertEqual(self.live.request("POST", "/api/v1/merge/dev")[0], 200)
        self.assertTrue(self.live.store.contains("d.wasm"))
        self.add("c.wasm", self.a)
        self.add("c.wasm", self.b, **{"Wasmstore-Branch": "dev"})
        status, _, body = self.live.request("POST", "/api/v1/merge/dev")
        self.assertEqual(status, 409)
        self.assertIn(b"/c.wasm", body)
        self.assertEqual(self.live.request("POST", "/api/v1/merge/nope")[0], 404)

    def test_gc_returns_200_and_count(self):
        self.add("a.wasm", self.a)
        self.add("a.wasm", self.b)
        status, _, body = self.live.request("POST", "/api/v1/gc")
        self.assertEqual(status, 200)
        self.assertGreater(int(body), 0)
        self.assertEqual(self.live.store.fsck(), [])

    def test_auth_route_without_auth_configured(self):
        for method in ["GET", "POST", "DELETE", "PUT"]:
            self.assertEqual(self.live.request(method, "/api/v1/auth")[0], 200)

    def test_unknown_routes_and_methods(self):
        self.assertEqual(self.live.request("GET", "/")[0], 404)
        self.assertEqual(self.live.request("GET", "/api/v2/modules")[0], 404)
        self.assertEqual(self.live.request("GET", "/api/v1/nope")[0], 404)
        status, headers, _ = self.live.request("PATCH", "/api/v1/module/a.wasm")
        self.assertEqual((status, headers["allow"]), (405, "DELETE, GET, HEAD, POST"))
        self.assertEqual(statuses(self.live.raw(b"BREW /api/v1/modules HTTP/1.1\r\n\r\n")), [501])

    def test_errors_are_one_plain_text_line(self):
        status, headers, body = self.live.request("GET", "/api/v1/module/nope.wasm")
        self.assertEqual(status, 404)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertEqual(body.count(b"\n"), 1)
        self.assertTrue(body.endswith(b"\n"))

    def test_keep_alive_and_content_length_everywhere(self):
        conn = self.live.connect()
        self.addCleanup(conn.close)
        digest = self.add("a.wasm", self.a)
        for method, path in [("GET", "/api/v1/modules"), ("GET", "/api/v1/module/a.wasm"),
                             ("GET", "/api/v1/module/none"), ("DELETE", "/api/v1/branch/main"),
                             ("POST", f"/api/v1/hash/{digest}/b.wasm"), ("GET", "/api/v1/branches")]:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            self.assertIsNotNone(response.getheader("Content-Length"), path)
            self.assertFalse(response.will_close, path)
        # all on one socket: http.client would have reconnected otherwise
        self.assertIsNotNone(conn.sock)

    def test_chunked_upload_and_expect_continue(self):
        conn = self.live.connect()
        self.addCleanup(conn.close)
        conn.request("POST", "/api/v1/module/chunked.wasm", body=iter([self.a[:5], self.a[5:]]),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, sha(self.a).encode()))
        raw = self.live.raw(b"POST /api/v1/module/e.wasm HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.b) + self.b)
        self.assertEqual(statuses(raw), [100, 200])
        self.assertEqual(self.live.store.find("e.wasm"), self.b)

    def test_upload_without_length_411(self):
        raw = self.live.raw(b"POST /api/v1/module/a.wasm HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(statuses(raw), [411])

    def test_bodyless_delete_without_content_length(self):
        self.add("a.wasm", self.a)
        raw = self.live.raw(b"DELETE /api/v1/module/a.wasm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(statuses(raw), [200])
        self.assertFalse(self.live.store.contains("a.wasm"))

    def test_large_module_download_uses_sendfile_and_is_exact(self):
        big = wasm_module("big", padding=3 * 1024 * 1024)
        digest = self.add("big.wasm", big)
        status, headers, body = self.live.request("GET", "/api/v1/module/big.wasm")
        self.assertEqual((status, sha(body)), (200, digest))


class BodyLimitTests(unittest.TestCase):

    def setUp(self):
        self.live = LiveServer(self, max_body=1000)

    def test_413_before_the_body_is_read(self):
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=5) as sock:
            sock.sendall(b"POST /api/v1/module/big.wasm HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
            started = time.monotonic()
            raw = read_until_close(sock, 5)          # no body sent: the answer must not wait for it
        self.assertEqual(statuses(raw), [413])       # and no "100 Continue" before it
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn(b"Connection: close", raw)
        text = self.live.server.metrics.render().decode()
        self.assertEqual(metric(text, "wasmstore_http_request_body_bytes_total"), 0)

    def test_body_at_the_limit_is_accepted_and_over_it_refused(self):
        module = wasm_module_of_size(1000)
        self.assertEqual(self.live.request("POST", "/api/v1/module/ok.wasm", module)[0], 200)
        self.assertEqual(self.live.request("POST", "/api/v1/module/no.wasm", module + b"\0")[0], 413)

    def test_chunked_body_over_the_limit_413(self):
        conn = self.live.connect()
        self.addCleanup(conn.close)
        chunks = [wasm_module("x")] + [b"\0" * 500] * 4
        conn.request("POST", "/api/v1/module/c.wasm", body=iter(chunks), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        self.assertEqual(conn.getresponse().status, 413)
        self.assertEqual(self.live.store.list(), {})

    def test_body_on_a_bodyless_route_is_drained_or_refused(self):
        conn = self.live.connect()
        self.addCleanup(conn.close)
        conn.request("GET", "/api/v1/modules", body=b"x" * 100)
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"{}"))
        conn.request("GET", "/api/v1/branches")            # same connection still in sync
        self.assertEqual(conn.getresponse().read(), b'["main"]')
        raw = self.live.raw(b"POST /api/v1/gc HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        self.assertEqual(statuses(raw), [413])


# ------------------------------------------------------------------------- auth, TLS, CORS

class AuthTests(unittest.TestCase):
    KEYS = "admin-key-123:*;reader-key-456:GET;poster-key-789:GET,POST"

    def setUp(self):
        self.live = LiveServer(self, auth=self.KEYS)

    def test_401_without_or_with_unknown_key(self):
        for headers in [{}, {"Wasmstore-Auth": "wrong"}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic admin-key-123"}]:
            with self.subTest(headers=headers):
                self.assertEqual(self.live.request("GET", "/api/v1/modules", headers=headers)[0], 401)

    def test_403_for_a_method_the_key_may_not_use(self):
        status, _, body = self.live.request("POST", "/api/v1/module/a.wasm", wasm_module("a"),
                                            {"Wasmstore-Auth": "reader-key-456"})
        self.assertEqual(status, 403)
        self.assertNotIn(b"reader-key-456", body)
        self.assertEqual(self.live.store.list(), {})
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/a.wasm",
                                           headers={"Wasmstore-Auth": "poster-key-789"})[0], 403)

    def test_allowed_keys_in_either_header(self):
        module = wasm_module("a")
        status, _, _ = self.live.request("POST", "/api/v1/module/a.wasm", module,
                                         {"Authorization": "Bearer poster-key-789"})
        self.assertEqual(status, 200)
        self.assertEqual(self.live.request("GET", "/api/v1/module/a.wasm",
                                           headers={"Wasmstore-Auth": "reader-key-456"})[2], module)
        self.assertEqual(self.live.request("HEAD", "/api/v1/module/a.wasm",
                                           headers={"Wasmstore-Auth": "reader-key-456"})[0], 200)
        self.assertEqual(self.live.request("DELETE", "/api/v1/module/a.wasm",
                                           headers={"Wasmstore-Auth": "admin-key-123"})[0], 200)

    def test_auth_route_answers_per_method(self):
        reader = {"Wasmstore-Auth": "reader-key-456"}
        self.assertEqual(self.live.request("GET", "/api/v1/auth", headers=reader)[0], 200)
        self.assertEqual(self.live.request("HEAD", "/api/v1/auth", headers=reader)[0], 200)
        self.assertEqual(self.live.request("POST", "/api/v1/auth", headers=reader)[0], 403)
        self.assertEqual(self.live.request("DELETE", "/api/v1/auth",
                                           headers={"Wasmstore-Auth": "admin-key-123"})[0], 200)
        self.assertEqual(self.live.request("GET", "/api/v1/auth")[0], 401)

    def test_unknown_routes_and_metrics_need_a_key_too(self):
        self.assertEqual(self.live.request("GET", "/api/v1/nope")[0], 401)
        self.assertEqual(self.live.request("GET", "/metrics")[0], 401)
        self.assertEqual(self.live.request("GET", "/metrics",
                                           headers={"Wasmstore-Auth": "reader-key-456"})[0], 200)

    def test_keys_never_logged_nor_echoed(self):
        for key in ["admin-key-123", "reader-key-456", "not-a-key-000"]:
            for method in ["GET", "POST", "DELETE"]:
                _, headers, body = self.live.request(method, "/api/v1/auth", headers={"Wasmstore-Auth": key})
                self.assertNotIn(key.encode(), body)
                self.assertNotIn(key, json.dumps(headers))
        ws = WsClient(self.live.port, "/api/v1/watch?auth=reader-key-456")
        ws.close()
        log = self.live.log.getvalue()
        self.assertIn('"GET /api/v1/auth" 200', log)
        for key in ["admin-key-123", "reader-key-456", "not-a-key-000"]:
            self.assertNotIn(key, log)

    def test_watch_accepts_the_key_as_a_query_parameter(self):
        ws = WsClient(self.live.port, "/api/v1/watch?auth=reader-key-456")
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101)
        ws2 = WsClient(self.live.port, "/api/v1/watch")
        self.addCleanup(ws2.close)
        self.assertEqual(ws2.status, 401)


class TlsTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        if shutil.which("openssl") is None:
            reason = "the openssl command is needed to create a test certificate (.ci/run installs it)"
            if os.environ.get("CI"):
                raise RuntimeError(reason)            # in CI a missing prerequisite is a failure
            raise unittest.SkipTest(reason)
        cls.certdir = tempfile.mkdtemp()
        cls.keyfile, cls.certfile = make_self_signed_cert(cls.certdir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.certdir, True)

    def setUp(self):
        self.live = LiveServer(self, tls=(self.keyfile, self.certfile), timeout=2)
        self.context = ssl.create_default_context(cafile=self.certfile)

    def connect(self):
        conn = http.client.HTTPSConnection("127.0.0.1", self.live.port, context=self.context, timeout=10)
        self.addCleanup(conn.close)
        return conn

    def test_https_roundtrip_with_download_over_tls(self):
        conn = self.connect()
        big = wasm_module("tls", padding=700 * 1024)
        conn.request("POST", "/api/v1/module/t.wasm", body=big)
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, sha(big).encode()))
        conn.request("GET", "/api/v1/module/t.wasm")          # same keep-alive TLS connection
        response = conn.getresponse()
        self.assertEqual((response.status, sha(response.read())), (200, sha(big)))

    def test_plain_http_to_the_tls_port_does_not_hurt_the_server(self):
        self.live.raw(b"GET /api/v1/modules HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        conn = self.connect()
        conn.request("GET", "/api/v1/modules")
        self.assertEqual(conn.getresponse().status, 200)

    def test_watch_over_tls(self):
        ws = WsClient(self.live.port, tls_context=self.context)
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101)
        digest = self.live.store.add("w.wasm", wasm_module("w"))
        self.assertEqual(ws.recv_data(), {"/w.wasm": {"action": "added", "hash": digest}})

    def test_server_process_with_tls_option(self):
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        proc, port = start_server_process(self, os.path.join(parent, "root"), "--quiet",
                                          "--tls", f"{self.keyfile},{self.certfile}")
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=self.context, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/api/v1/branches")
        self.assertEqual(conn.getresponse().read(), b'["main"]')


class CorsTests(unittest.TestCase):

    def test_preflight_and_allow_origin_everywhere(self):
        live = LiveServer(self, cors=True, auth="k:GET")
        status, headers, _ = live.request("OPTIONS", "/api/v1/module/a.wasm", headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "wasmstore-auth, wasmstore-branch"})
        self.assertEqual(status, 204)                          # no key needed for a preflight
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertIn("POST", headers["access-control-allow-methods"])
        allowed = headers["access-control-allow-headers"].lower()
        self.assertIn("wasmstore-auth", allowed)
        self.assertIn("wasmstore-branch", allowed)
        for method, path, key in [("GET", "/api/v1/modules", "k"), ("GET", "/api/v1/modules", None),
                                  ("GET", "/api/v1/nope", "k")]:
            status, headers, _ = live.request(method, path, headers={"Wasmstore-Auth": key} if key else {})
            self.assertEqual(headers.get("access-control-allow-origin"), "*", (path, status))
            self.assertIn("Wasmstore-Hash", headers["access-control-expose-headers"])

    def test_no_cors_headers_unless_enabled(self):
        live = LiveServer(self)
        _, headers, _ = live.request("GET", "/api/v1/modules")
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertEqual(live.request("OPTIONS", "/api/v1/modules")[0], 405)


# ----------------------------------------------------------------------------- WebSocket

class WatchTests(unittest.TestCase):

    def setUp(self):
        self.live = LiveServer(self)

    def watch(self, path="/api/v1/watch", headers=None):
        ws = WsClient(self.live.port, path, headers)
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101, ws.head)
        self.assertTrue(ws.accept_ok, ws.head)
        return ws

    def wait_for_gauge(self, value, seconds=5):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.live.server.metrics.websocket_clients == value:
                return True
            time.sleep(0.02)
        return False

    def test_one_event_per_commit_added_updated_removed(self):
        ws = self.watch()
        a, b = wasm_module("a"), wasm_module("b")
        self.live.request("POST", "/api/v1/module/x.wasm", a)
        self.live.request("POST", "/api/v1/module/x.wasm", b)
        self.live.request("DELETE", "/api/v1/module/x.wasm")
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "added", "hash": sha(a)}})
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "updated",
                                                      "hash": {"old": sha(a), "new": sha(b)}}})
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "removed", "hash": sha(b)}})

    def test_quick_successive_commits_are_separate_events(self):
        ws = self.watch()
        modules = [wasm_module(f"q{i}") for i in range(5)]
        for i, module in enumerate(modules):
            self.live.store.add(f"q{i}.wasm", module)
        events = [ws.recv_data() for _ in modules]
        self.assertEqual(events, [{f"/q{i}.wasm": {"action": "added", "hash": sha(m)}}
                                  for i, m in enumerate(modules)])

    def test_branch_header_and_query_select_the_watched_branch(self):
        self.live.store.create_branch("dev")
        ws_dev = self.watch(headers={"Wasmstore-Branch": "dev"})
        ws_dev_q = self.watch("/api/v1/watch?branch=dev")
        ws_main = self.watch()
        digest = self.live.store.add("d.wasm", wasm_module("d"), branch="dev")
        main_digest = self.live.store.add("m.wasm", wasm_module("m"))
        expected = {"/d.wasm": {"action": "added", "hash": digest}}
        self.assertEqual(ws_dev.recv_data(), expected)
        self.assertEqual(ws_dev_q.recv_data(), expected)
        self.assertEqual(ws_main.recv_data(), {"/m.wasm": {"action": "added", "hash": main_digest}})
        ws = WsClient(self.live.port, headers={"Wasmstore-Branch": "nope"})
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 404)

    def test_commit_by_a_separate_cli_process_seen_within_one_second(self):
        ws = self.watch()
        module = wasm_module("from-cli")
        path = os.path.join(self.live.root, "..", "cli.wasm")
        with open(path, "wb") as handle:
            handle.write(module)
        result = subprocess.run([sys.executable, os.path.join(HERE, "wasmstore.py"), "--root",
                                 self.live.root, "add", path, "cli/x.wasm"],
                                capture_output=True, text=True, timeout=60)
        committed = time.monotonic()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), sha(module))
        event = ws.recv_data(timeout=1.0)
        self.assertLess(time.monotonic() - committed, 1.0)
        self.assertEqual(event, {"/cli/x.wasm": {"action": "added", "hash": sha(module)}})

    def test_ping_pong_and_close_handshake(self):
        ws = self.watch()
        ws.send(0x9, b"are you there")
        self.assertEqual(ws.recv(), (0xA, b"are you there"))
        ws.send(0x8, (1000).to_bytes(2, "big") + b"bye")
        opcode, payload = ws.recv()
        self.assertEqual((opcode, payload[:2]), (0x8, (1000).to_bytes(2, "big")))
        self.assertEqual(read_until_close(ws.sock, 2), b"")    # then the server closes the TCP side
        self.assertTrue(self.wait_for_gauge(0))

    def test_unmasked_client_frame_is_a_protocol_error(self):
        ws = self.watch()
        ws.send(0x1, b"hello", masked=False)
        opcode, payload = ws.recv()
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (0x8, 1002))

    def test_client_text_frames_are_ignored(self):
        ws = self.watch()
        ws.send(0x1, b"hello")
        digest = self.live.store.add("t.wasm", wasm_module("t"))
        self.assertEqual(ws.recv_data(), {"/t.wasm": {"action": "added", "hash": digest}})

    def test_dead_client_is_dropped(self):
        ws = self.watch()
        self.assertTrue(self.wait_for_gauge(1))
        ws.sock.close()
        self.live.store.add("x.wasm", wasm_module("x"))
        self.assertTrue(self.wait_for_gauge(0))
        self.assertEqual(self.live.server.hub.watchers, {})     # the branch watcher stopped too

    def test_slow_client_is_dropped_without_blocking_others(self):
        live = LiveServer(self, timeout=1.0)
        slow = WsClient(live.port)                   # never reads
        self.addCleanup(slow.close)
        fast = WsClient(live.port)
        self.addCleanup(fast.close)
        received = []

        def read_fast():
            try:
                while True:
                    received.append(fast.recv_data(timeout=10))
            except (OSError, ConnectionError, AssertionError):
                pass
        reader = threading.Thread(target=read_fast, daemon=True)
        reader.start()
        deadline = time.monotonic() + 5
        while live.server.metrics.websocket_clients != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Big events through the hub's broadcast (what the branch watcher calls), far more
        # than the slow client's socket buffers plus its queue can hold.
        watcher = live.server.hub.watchers["main"]
        count = http_server.WS_QUEUE_SIZE + 200
        in_broadcast = 0.0
        for i in range(count):
            message = json.dumps({f"/p{i}.wasm": "x" * 50000})
            started = time.monotonic()
            live.server.hub.broadcast(watcher, message)
            in_broadcast += time.monotonic() - started
            wait_until = time.monotonic() + 5             # let the fast reader keep up
            while i - len(received) > 100 and time.monotonic() < wait_until:
                time.sleep(0.005)
        self.assertLess(in_broadcast, 1.0)                # the hub never blocked on the slow one
        deadline = time.monotonic() + 20
        while len(received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(received), count)       # the fast client got every event, in order
        self.assertEqual([list(e)[0] for e in received], [f"/p{i}.wasm" for i in range(count)])
        deadline = time.monotonic() + 5
        while live.server.metrics.websocket_clients != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(live.server.metrics.websocket_clients, 1)   # the slow one was dropped
        self.assertEqual(live.request("GET", "/api/v1/branches")[0], 200)

    def test_deleting_the_watched_branch_closes_with_1001(self):
        self.live.store.create_branch("gone")
        ws = self.watch(headers={"Wasmstore-Branch": "gone"})
        self.assertEqual(self.live.request("DELETE", "/api/v1/branch/gone")[0], 200)
        opcode, payload = ws.recv()
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (0x8, 1001))
        self.assertTrue(self.wait_for_gauge(0))

    def test_plain_get_on_watch_is_426(self):
        self.assertEqual(self.live.request("GET", "/api/v1/watch")[0], 426)

    def test_shutdown_closes_watchers_with_1001(self):
        ws = self.watch()
        self.live.server.graceful_shutdown(grace=5)
        opcode, payload = ws.recv()
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (0x8, 1001))


# ---------------------------------------------------------------------------- robustness

def _tree_snapshot(directory, skip):
    out = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        if os.path.abspath(dirpath).startswith(os.path.abspath(skip)):
            continue
        for name in filenames + dirnames:
            out.add(os.path.join(dirpath, name))
    return out


class FuzzTests(unittest.TestCase):

    def malformed_requests(self, rng, module):
        """(name, bytes, stall) for >= 2000 malformed requests of many kinds."""
        methods = ["get", "G ET", "GET\x00", "BREW", "PROPFIND", "GETT", "\x16\x03\x01", "", "POST\t"]
        evil_paths = ["/api/v1/module/%2e%2e/%2e%2e/escape.wasm", "/api/v1/module/../../escape.wasm",
                      "/api/v1/module/..%2f..%2fescape.wasm", "/api/v1/module/%2E%2E/escape.wasm",
                      "/api/v1/module/a/%00/escape.wasm", "/api/v1/module/a%00b.wasm",
                      "/api/v1/module/%zz", "/api/v1/module/%", "/api/v1/module/%c3%28.wasm",
                      "/api/v1/module/%ff%fe.wasm", "/api/v1/module/./x.wasm", "/api/v1/module/x%2fy.wasm",
                      "/api/v1/modules/%2e%2e", "/api/v1/hash/%2e%2e/%2e%2e", "/api/v1/version/-1/x",
                      "/api/v1/restore/%2e%2e", "/api/v1/branch/%2e%2e", "/api/v1/merge/..",
                      "//api/v1/module/../escape.wasm", "http://x/api/v1/module/%2e%2e/escape.wasm",
                      "/api/v1/module/" + "a/" * 100 + "deep.wasm", "/api/v1/module/" + "x" * 300 + ".wasm",
                      "/api/v1/module/\x01\x02.wasm", "/api/v1/module/C:\\backslash.wasm", "*", "escape.wasm"]
        body_methods = ["POST", "PUT", "DELETE", "GET"]
        out = []
        for i in range(2100):
            kind = i % 14
            path = rng.choice(evil_paths)
            if kind == 0:
                data = f"{rng.choice(methods)} /api/v1/modules HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1")
            elif kind in (1, 2):
                method = rng.choice(body_methods)
                data = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(module)}\r\n\r\n"
                        .encode("latin-1") + module)
            elif kind == 3:
                data = b"GET /api/v1/module/" + b"x" * rng.randint(9000, 70000) + b" HTTP/1.1\r\n\r\n"
            elif kind == 4:
                data = b"GET /api/v1/modules HTTP/1.1\r\nX-Big: " + b"y" * rng.randint(33000, 70000) + b"\r\n\r\n"
            elif kind == 5:
                data = b"GET /api/v1/modules HTTP/1.1\r\n" + b"".join(
                    b"X-H%d: v\r\n" % n for n in range(rng.randint(101, 300))) + b"\r\n"
            elif kind == 6:                  # body shorter than Content-Length, then the client quits
                data = (b"POST /api/v1/module/short.wasm HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                        % (len(module) + rng.randint(1, 500)) + module)
            elif kind == 7:                  # body longer than Content-Length: the rest is garbage
                data = (b"POST /api/v1/module/long%d.wasm HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                        % (i, len(module)) + module + os.urandom(rng.randint(1, 300)))
            elif kind == 8:
                data = os.urandom(rng.randint(1, 2000))
            elif kind == 9:
                data = rng.choice([b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                   b"GET / HTTP/1.1 extra\r\n\r\n", b"GET /api/v1/modules HTTP/1.1\r\n bad\r\n\r\n",
                                   b"GET /api/v1/modules HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                                   b"POST /api/v1/module/a.wasm HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                                   b"POST /api/v1/module/a.wasm HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                                   b"POST /api/v1/module/a.wasm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                   b"POST /api/v1/module/a.wasm HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
                                   b"GET /api/v1/watch HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!\r\n\r\n"])
            elif kind == 10:
                data = f"GET {path} HTTP/1.1\r\nHost: x\r\nWasmstore-Branch: ../../x\r\n\r\n".encode("latin-1")
            elif kind == 11:
                data = (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        f"{len(module):x}\r\n").encode("latin-1") + module + b"\r\n0\r\n\r\n"
            elif kind == 12:                 # bad percent-encoding / NUL in the branch of a route
                data = (f"POST /api/v1/branch/{rng.choice(['%00', '%zz', '..', 'a%2fb', '%c3'])} HTTP/1.1\r\n"
                        f"Host: x\r\nContent-Length: 0\r\n\r\n").encode("latin-1")
            else:
                data = rng.choice([b"\x00" * 100, b"GET /api/v1/modules HTTP/1.1\r\nHost: \x00\r\n\r\n",
                                   b"GET /api/v1/module/a\x00b HTTP/1.1\r\n\r\n",
                                   b"GET /api/v1/module/\xff\xfe HTTP/1.1\r\n\r\n"])
            out.append((kind, data))
        return out

    def test_two_thousand_malformed_requests(self):
        parent = tempfile.mkdtemp(prefix="wasmstore-fuzz-")
        self.addCleanup(shutil.rmtree, parent, True)
        root = os.path.join(parent, "root")
        live = LiveServer(self, root=root, timeout=1.0, quiet=True)
        module = wasm_module("fuzz")
        before = _tree_snapshot(parent, root)
        rng = random.Random(1234)
        requests = self.malformed_requests(rng, module)
        self.assertGreaterEqual(len(requests), 2000)
        results = []
        lock = threading.Lock()

        def worker(items):
            for kind, data in items:
                with socket.create_connection(("127.0.0.1", live.port), timeout=3) as sock:
                    try:
                        sock.sendall(data)
                        # EOF after the request: a short body ends early, and a keep-alive
                        # connection closes after its answer instead of idling until the timeout.
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    answer = read_until_close(sock, 3)
                with lock:
                    results.append((kind, statuses(answer)))

        # connections that stall mid-request, held open during the whole run
        stalled = []
        for partial in [b"GET /api/v1/modules HTTP/1.1\r\nHost:", b"POST /api/v1/module/s.wasm HTTP/1.1\r\n"
                        b"Content-Length: 1000\r\n\r\n\0asm", b"GE", b""]:
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(partial)
            stalled.append(sock)
        threads = [threading.Thread(target=worker, args=(requests[i::6],)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(len(results), len(requests))
        all_statuses = [s for _, found in results for s in found]
        server_errors = [(kind, found) for kind, found in results if any(s >= 500 and s not in (501, 505) for s in found)]
        self.assertEqual(server_errors, [])
        self.assertGreater(len(all_statuses), 1500)      # nearly every request got an answer
        self.assertTrue(all(s in (200, 400, 404, 405, 408, 411, 413, 414, 426, 431, 501, 505)
                            for s in all_statuses), sorted(set(all_statuses)))
        # stalled connections were closed by the server after its timeout
        for sock in stalled:
            self.assertIn(statuses(read_until_close(sock, 3)), ([], [408]))
        # the server still answers, the store is clean, nothing was written outside the root
        self.assertEqual(live.request("GET", "/api/v1/branches")[0], 200)
        self.assertEqual(live.store.fsck(), [])
        self.assertEqual(_tree_snapshot(parent, root), before)
        for directory in {parent, os.path.dirname(parent), HERE, os.getcwd(), "/"}:
            self.assertFalse([n for n in os.listdir(directory) if n.startswith("escape")], directory)
        for listed in live.store.list():
            self.assertNotIn("escape", listed)
        text = live.request("GET", "/metrics")[2].decode()
        self.assertNotIn('status="500"', text)
        self.assertEqual(live.server.metrics.requests[("invalid", "GET", 500)], 0)


class TimeoutTests(unittest.TestCase):

    def setUp(self):
        self.live = LiveServer(self, timeout=1.0, max_connections=4)

    def test_idle_and_stalled_connections_are_closed_after_the_timeout(self):
        partials = [b"", b"GET /api/v1/modules HTTP/1.1\r\nHost: x\r\n",
                    b"POST /api/v1/module/a.wasm HTTP/1.1\r\nContent-Length: 100\r\n\r\n\0asm"]
        socks = []
        started = time.monotonic()
        for partial in partials:
            sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(partial)
            socks.append(sock)
        for sock in socks:
            read_until_close(sock, 4)
        self.assertLess(time.monotonic() - started, 3.5)

    def test_trickling_client_cannot_hold_a_connection(self):
        sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
        self.addCleanup(sock.close)
        started = time.monotonic()
        closed = False
        for byte in b"GET /api/v1/modules HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)                       # always active, never finishing in time
            if time.monotonic() - started > 4:
                break
        answer = read_until_close(sock, 3)
        self.assertTrue(closed or statuses(answer) in ([408], []))
        self.assertNotIn(200, statuses(answer))
        self.assertLess(time.monotonic() - started, 5)

    def test_client_that_stops_reading_a_download_is_dropped(self):
        big = wasm_module("big", padding=16 * 1024 * 1024)      # far more than socket buffers
        self.live.store.add("big.wasm", big)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.live.port))
        sock.sendall(b"GET /api/v1/module/big.wasm HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 8
        while self.live.server.metrics.connections != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        while self.live.server.metrics.connections != 0 and time.monotonic() < deadline:
            time.sleep(0.05)                            # never reading: dropped after the timeout
        self.assertEqual(self.live.server.metrics.connections, 0)
        self.assertLess(len(read_until_close(sock, 3)), len(big))
        self.assertEqual(self.live.request("GET", "/api/v1/branches")[0], 200)

    def test_stalled_connections_cannot_exhaust_the_server(self):
        socks = []
        for _ in range(4):                         # fill every connection slot
            sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /api/v1/modules HTTP/1.1\r\n")
            socks.append(sock)
        time.sleep(0.2)
        raw = self.live.raw(b"GET /api/v1/branches HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(statuses(raw), [503])     # refused at once, not queued forever
        time.sleep(1.5)                            # the stalled ones time out and free their slots
        self.assertEqual(self.live.request("GET", "/api/v1/branches")[0], 200)


class ConcurrencyTests(unittest.TestCase):

    def test_sixteen_clients_mixed_operations_no_5xx_no_lost_update(self):
        live = LiveServer(self, quiet=True)
        deadline = time.monotonic() + STRESS_SECONDS
        expected_by_client = [dict() for _ in range(16)]
        problems = []
        counts = [0] * 16

        def client(number):
            rng = random.Random(number)
            expected = expected_by_client[number]
            conn = live.connect(timeout=30)
            sequence = 0
            try:
                while time.monotonic() < deadline:
                    operation = rng.choice(["add", "add", "find", "remove", "list"])
                    path = f"c{number}/m{rng.randrange(6)}.wasm"
                    if operation == "add":
                        sequence += 1
                        module = wasm_module(f"{number}-{sequence}")
                        status, _, body = live.request("POST", "/api/v1/module/" + path, module, conn=conn)
                        if status == 200 and body.decode() == sha(module):
                            expected["/" + path] = sha(module)
                        else:
                            problems.append(("add", path, status, body[:100]))
                    elif operation == "find":
                        status, headers, body = live.request("GET", "/api/v1/module/" + path, conn=conn)
                        want = expected.get("/" + path)
                        if (status, want and sha(body)) != ((200, want) if want else (404, None)):
                            problems.append(("find", path, status, want))
                    elif operation == "remove":
                        status, _, body = live.request("DELETE", "/api/v1/module/" + path, conn=conn)
                        if status != (200 if "/" + path in expected else 404):
                            problems.append(("remove", path, status, body[:100]))
                        expected.pop("/" + path, None)
                    else:
                        status, _, body = live.request("GET", f"/api/v1/modules/c{number}", conn=conn)
                        if status != 200 or json.loads(body) != expected:
                            problems.append(("list", number, status))
                    counts[number] += 1
            except Exception as exc:          # noqa: BLE001 - reported below, with its kind
                problems.append(("exception", number, repr(exc)))
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STRESS_SECONDS + 60)
        self.assertEqual(problems, [])
        self.assertGreater(sum(counts), 16 * 5)
        final = {}
        for expected in expected_by_client:
            final.update(expected)
        self.assertEqual(json.loads(live.request("GET", "/api/v1/modules")[2]), final)
        self.assertEqual(live.store.fsck(), [])
        text = live.server.metrics.render().decode()
        self.assertNotRegex(text, r'status="5\d\d"')


# ------------------------------------------------------------------- process and signals

class ShutdownTests(unittest.TestCase):

    def setUp(self):
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        self.root = os.path.join(parent, "root")

    def wait_until_in_flight(self, port, count, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
            finally:
                conn.close()
            if metric(text, "wasmstore_http_requests_in_flight") >= count:
                return
            time.sleep(0.05)
        self.fail("the server never started serving the request")

    def check_in_flight_request_finishes(self, signum):
        proc, port = start_server_process(self, self.root)
        module = wasm_module("inflight", padding=5000)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /api/v1/module/inflight.wasm HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(module) + module[:100])
        self.wait_until_in_flight(port, 2)          # the upload and the metrics request itself
        proc.send_signal(signum)
        time.sleep(0.7)
        self.assertIsNone(proc.poll(), "the server quit with a request in flight")
        with self.assertRaises(OSError):             # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sock.sendall(module[100:])
        answer = read_until_close(sock, 10)
        self.assertEqual(statuses(answer), [200])
        self.assertTrue(answer.endswith(sha(module).encode()))
        self.assertIn(b"Connection: close", answer)
        self.assertEqual(proc.wait(10), 0)
        stderr = proc.stderr.read()
        self.assertNotIn("Traceback", stderr)
        self.assertIn('"POST /api/v1/module/inflight.wasm" 200', stderr)
        store = wasmstore.Store(self.root)
        self.assertEqual(store.find("inflight.wasm"), module)
        self.assertEqual(store.fsck(), [])

    def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(self):
        self.check_in_flight_request_finishes(signal.SIGTERM)

    def test_ctrl_c_lets_the_in_flight_request_finish_and_exits_0(self):
        self.check_in_flight_request_finishes(signal.SIGINT)

    def test_idle_server_exits_promptly_on_sigterm(self):
        proc, port = start_server_process(self, self.root, "--quiet")
        keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)   # an idle keep-alive client
        self.addCleanup(keepalive.close)
        keepalive.request("GET", "/api/v1/branches")
        keepalive.getresponse().read()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(proc.stderr.read(), "")         # --quiet: no access log either


class CommandLineTests(unittest.TestCase):

    def run_server(self, *args, env=None):
        return subprocess.run([sys.executable, os.path.join(HERE, "http_server.py"), *args],
                              capture_output=True, text=True, timeout=30, env=env, cwd=HERE)

    def test_help_mentions_every_option(self):
        result = self.run_server("--help")
        self.assertEqual(result.returncode, 0)
        for option in ["--root", "--host", "--port", "--auth", "--tls", "--cors", "--max-body",
                       "--quiet", "--timeout", "WASMSTORE_ROOT", "WASMSTORE_AUTH"]:
            self.assertIn(option, result.stdout)

    def test_bad_options_exit_2_with_one_line_and_no_key_echo(self):
        for args in [["--auth", "topsecret"], ["--port", "99999"], ["--tls", "onlyone"],
                     ["--max-body", "lots"], ["--timeout", "0"]]:
            with self.subTest(args=args):
                result = self.run_server(*args)
                self.assertEqual(result.returncode, 2)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn("topsecret", result.stderr)

    def test_missing_tls_files_exit_1_without_traceback(self):
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        result = self.run_server("--root", os.path.join(parent, "root"), "--port", "0",
                                 "--tls", "/nonexistent/key.pem,/nonexistent/cert.pem")
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"^http_server.py: error: .+\n$")

    def test_environment_configures_root_and_auth(self):
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        env = dict(os.environ, WASMSTORE_ROOT=os.path.join(parent, "envroot"), WASMSTORE_AUTH="envkey:GET")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "http_server.py"), "--port", "0"],
                                stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait(10), proc.stderr.close()))
        line = proc.stderr.readline()
        self.assertIn(os.path.join(parent, "envroot"), line)
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("GET", "/api/v1/branches")
        self.assertEqual(conn.getresponse().status, 401)
        self.assertTrue(os.path.isdir(os.path.join(parent, "envroot")))

    def test_port_in_use_exits_1(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            parent = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, parent, True)
            result = self.run_server("--root", os.path.join(parent, "r"), "--port", str(busy.getsockname()[1]))
        self.assertEqual(result.returncode, 1)
        self.assertIn("error:", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


# ------------------------------------------------------------------------- observability

class ObservabilityTests(unittest.TestCase):

    def test_metrics_counts_routes_statuses_latency_bytes_and_store(self):
        live = LiveServer(self)
        module = wasm_module("metrics")
        live.request("POST", "/api/v1/module/a.wasm", module)
        live.request("GET", "/api/v1/module/a.wasm")
        live.request("GET", "/api/v1/module/a.wasm")
        live.request("GET", "/api/v1/module/nope.wasm")
        status, headers, body = live.request("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain; version=0.0.4"))
        text = body.decode()
        route = "/api/v1/module/*"
        self.assertEqual(metric(text, "wasmstore_http_requests_total", route=route, method="GET", status="200"), 2)
        self.assertEqual(metric(text, "wasmstore_http_requests_total", route=route, method="GET", status="404"), 1)
        self.assertEqual(metric(text, "wasmstore_http_requests_total", route=route, method="POST", status="200"), 1)
        self.assertEqual(metric(text, "wasmstore_http_request_duration_seconds_count", route=route), 4)
        self.assertEqual(metric(text, "wasmstore_http_request_duration_seconds_bucket", route=route, le="+Inf"), 4)
        self.assertGreater(metric(text, "wasmstore_http_request_duration_seconds_sum", route=route), 0)
        self.assertEqual(metric(text, "wasmstore_http_request_body_bytes_total"), len(module))
        self.assertGreaterEqual(metric(text, "wasmstore_http_response_body_bytes_total"), 2 * len(module) + 64)
        self.assertEqual(metric(text, "wasmstore_modules", branch="main"), 1)
        self.assertEqual(metric(text, "wasmstore_commits", branch="main"), 1)
        self.assertIn("# TYPE wasmstore_http_request_duration_seconds histogram", text)
        self.assertEqual(metric(text, "wasmstore_http_requests_in_flight"), 1)   # the scrape itself

    def test_access_log_one_line_per_request(self):
        live = LiveServer(self, auth="logkey-42:*")
        key = {"Wasmstore-Auth": "logkey-42"}
        live.request("POST", "/api/v1/module/a.wasm", wasm_module("log"), key)
        live.request("GET", "/api/v1/module/a.wasm", headers=key)
        live.request("GET", "/api/v1/module/a%22x%01.wasm?auth=logkey-42", headers=key)
        live.request("GET", "/api/v1/modules")
        deadline = time.monotonic() + 5           # the line is written just after the reply
        while len(live.log.getvalue().splitlines()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = live.log.getvalue().splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertRegex(lines[0], r'^127\.0\.0\.1 "POST /api/v1/module/a\.wasm" 200 64 \d+\.\dms$')
        self.assertRegex(lines[1], r'"GET /api/v1/module/a\.wasm" 200 \d+ ')
        self.assertRegex(lines[2], r'"GET /api/v1/module/a%22x%01\.wasm" 400 ')
        self.assertRegex(lines[3], r'"GET /api/v1/modules" 401 ')
        self.assertNotIn("logkey-42", live.log.getvalue())

    def test_corrupt_object_is_500_with_its_message_and_never_served(self):
        live = LiveServer(self, quiet=True)
        module = wasm_module("corrupt")
        digest = live.store.add("c.wasm", module)
        self.assertEqual(live.request("GET", "/api/v1/module/c.wasm")[2], module)   # now cached
        filename = live.store.module_filename(digest)
        os.chmod(filename, 0o644)
        with open(filename, "r+b") as handle:          # same size, new mtime: re-checked
            handle.seek(len(module) - 1)
            handle.write(b"X")
        os.utime(filename, ns=(time.time_ns(), time.time_ns() + 10**9))
        status, _, body = live.request("GET", "/api/v1/module/c.wasm")
        self.assertEqual(status, 500)
        self.assertIn(b"corrupt", body)
        self.assertNotIn(b"X", body[-2:])
        self.assertNotIn("Traceback", live.log.getvalue())
        self.assertIn("corrupt", live.log.getvalue())

    def test_quiet_silences_the_access_log(self):
        live = LiveServer(self, quiet=True)
        live.request("GET", "/api/v1/modules")
        live.request("GET", "/api/v1/nope")
        self.assertEqual(live.log.getvalue(), "")

    def test_internal_errors_500_with_traceback_in_log_only(self):
        live = LiveServer(self, quiet=True)

        def broken(*args, **kwargs):
            raise RuntimeError("boom: internal detail")
        live.store.branches = broken
        status, _, body = live.request("GET", "/api/v1/branches")
        self.assertEqual((status, body), (500, b"internal server error\n"))
        self.assertIn("Traceback", live.log.getvalue())
        self.assertIn("boom: internal detail", live.log.getvalue())
        self.assertEqual(live.request("GET", "/api/v1/modules")[0], 200)


if __name__ == "__main__":
    unittest.main()
